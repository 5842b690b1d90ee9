"""Simulated LwM2M devices, many per process: for tests, benchmarks and ``pilotboat simulate``.

``SimulatedDevice`` is one device (its own UDP socket, Security/Server/Device/Temperature objects,
client-initiated bootstrap and Bootstrap-Pack, registration with a management server and the requests
and observations it serves); ``run_fleet`` bootstraps many at a given rate and window, and
``register_fleet`` registers many with a management server (and keeps them updating), each aggregating
the outcome. The message layer (``exchange``) uses aiocoap only for the wire format, and puts a DTLS
session between the socket and CoAP for ``coaps://`` servers; ``onboard`` bootstraps a device (over
DTLS with factory ``ClientCredentials``) and returns it registered.
"""

from pilotboat.dtls.client import ClientCredentials
from pilotboat.sim.device import OnboardingFailed, SimulatedDevice, onboard
from pilotboat.sim.exchange import Timing
from pilotboat.sim.fleet import FleetStats, RegistrationFleetStats, endpoint_names, register_fleet, run_fleet
from pilotboat.sim.objects import AssignedServer
from pilotboat.sim.results import BootstrapResult, Failure, ReceivedRequest, RegistrationResult

__all__ = [
    "AssignedServer", "BootstrapResult", "ClientCredentials", "Failure", "FleetStats", "OnboardingFailed",
    "ReceivedRequest", "RegistrationFleetStats", "RegistrationResult", "SimulatedDevice", "Timing", "endpoint_names",
    "onboard", "register_fleet", "run_fleet",
]
