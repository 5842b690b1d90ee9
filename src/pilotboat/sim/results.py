"""What a simulated device reports: the outcome of a bootstrap or a registration exchange, and the
requests it received."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pilotboat.sim.objects import AssignedServer


class Failure(enum.StrEnum):
    """Why a bootstrap or a registration exchange failed."""

    NO_RESPONSE = "no response"  # the request was never answered
    RESET = "reset"  # the server answered it with a CoAP Reset
    REJECTED = "rejected"  # answered with another code than the success code: see ``code``
    TIMEOUT = "timeout"  # the server accepted the Bootstrap-Request, but no successful Bootstrap-Finish came in time
    INCONSISTENT = "inconsistent"  # Bootstrap-Finish (or the pack) left an unusable configuration
    BAD_PACK = "bad pack"  # a Bootstrap-Pack payload the device could not read or apply
    SOCKET = "socket error"  # the device could not open or use its socket, or resolve the server
    NO_SERVER = "no server account"  # the device has no management-server account to register with
    HANDSHAKE = "DTLS handshake failed"  # no DTLS session with a coaps:// server (credentials refused, no answer…)


@dataclass(frozen=True)
class BootstrapResult:
    endpoint: str
    ok: bool
    #: "request" (``POST /bs``) or "pack" (``GET /bspack``).
    method: str
    failure: Failure | None = None
    #: The CoAP code of a rejecting answer (``"4.00"``) when ``failure`` is ``REJECTED``.
    code: str | None = None
    #: A human-readable explanation of a failure.
    detail: str | None = None
    #: Seconds from sending the request to answering Bootstrap-Finish (or applying the pack); set on success.
    latency: float | None = None
    #: The management servers the device ends up with (see ``SimulatedDevice.servers``).
    servers: tuple[AssignedServer, ...] = ()

    @property
    def reason(self) -> str | None:
        """The failure with its code, for grouping: ``"rejected 4.00"``, ``"timeout"``…"""
        return _reason(self.failure, self.code)


@dataclass(frozen=True)
class RegistrationResult:
    """One Register, Update or De-register exchange with the management server."""

    endpoint: str
    #: "register", "update" or "deregister".
    operation: str
    ok: bool
    failure: Failure | None = None
    #: The CoAP code of the answer (``"2.01"``, ``"4.04"``…), None when there was none.
    code: str | None = None
    detail: str | None = None
    #: Seconds from sending the request (its first block) to the final answer; set on success.
    latency: float | None = None
    #: The registration's location, ``"rd/<id>"``.
    location: str | None = None
    #: Seconds the server asked to wait before trying again (Max-Age of a 4.29 or 5.03 answer).
    retry_after: float | None = None
    #: ``time.monotonic()`` when the exchange ended.
    at: float = 0.0

    @property
    def reason(self) -> str | None:
        return _reason(self.failure, self.code)


@dataclass(frozen=True)
class ReceivedRequest:
    """A request the device received from a server, and the code it answered (None: not answered)."""

    method: str
    path: str
    content_format: int | None
    accept: int | None
    code: str | None
    #: The Observe option of the request (0 register, 1 cancel), None without one.
    observe: int | None = None
    #: The query options (Write-Attributes carries its attributes there).
    query: tuple[str, ...] = ()
    #: Whether it came over a DTLS session (a peer with a session never gets through in clear).
    secure: bool = False


def _reason(failure: Failure | None, code: str | None) -> str | None:
    if failure is None:
        return None
    return f"{failure} {code}" if code else str(failure)
