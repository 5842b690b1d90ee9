"""Simulated LwM2M devices, many per process: for tests, benchmarks and ``pilotboat simulate``.

``SimulatedDevice`` is one device (its own UDP socket, Security/Server/Device/Temperature objects,
client-initiated bootstrap and Bootstrap-Pack, registration with a management server and the requests
and observations it serves); ``run_fleet`` bootstraps many at a given rate and window, and
``register_fleet`` registers many with a management server (and keeps them updating), each aggregating
the outcome. The message layer (``exchange``) uses aiocoap only for the wire format.
"""

from pilotboat.sim.device import SimulatedDevice
from pilotboat.sim.exchange import Timing
from pilotboat.sim.fleet import FleetStats, RegistrationFleetStats, endpoint_names, register_fleet, run_fleet
from pilotboat.sim.objects import AssignedServer
from pilotboat.sim.results import BootstrapResult, Failure, ReceivedRequest, RegistrationResult

__all__ = [
    "AssignedServer", "BootstrapResult", "Failure", "FleetStats", "ReceivedRequest", "RegistrationFleetStats",
    "RegistrationResult", "SimulatedDevice", "Timing", "endpoint_names", "register_fleet", "run_fleet",
]
