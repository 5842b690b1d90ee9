"""Simulated LwM2M devices, many per process: for tests, benchmarks and ``pilotboat simulate``.

``SimulatedDevice`` is one device (its own UDP socket, Security/Server/Device objects, client-initiated
bootstrap and Bootstrap-Pack); ``run_fleet`` bootstraps many at a given rate and window and aggregates
the outcome. The message layer (``exchange``) uses aiocoap only for the wire format.
"""

from pilotboat.sim.device import BootstrapResult, Failure, ReceivedRequest, SimulatedDevice
from pilotboat.sim.exchange import Timing
from pilotboat.sim.fleet import FleetStats, endpoint_names, run_fleet
from pilotboat.sim.objects import AssignedServer

__all__ = [
    "AssignedServer", "BootstrapResult", "Failure", "FleetStats", "ReceivedRequest", "SimulatedDevice", "Timing",
    "endpoint_names", "run_fleet",
]
