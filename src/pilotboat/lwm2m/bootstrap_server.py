"""The LwM2M bootstrap server door: ``POST /bs`` (client-initiated bootstrap) and ``GET /bspack``
(Bootstrap-Pack, LwM2M 1.2) over aiocoap, driving one ``BootstrapSession`` per endpoint.

The door parses and answers; who may bootstrap and with what comes from ``BootstrapService``, and the
order of requests from the pure session in ``lwm2m.bootstrap_session``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import aiocoap
from aiocoap import resource
from aiocoap.numbers.codes import Code

from pilotboat.bootstrap.plan import BootstrapPlan, PlanRefused
from pilotboat.bootstrap.service import BootstrapService
from pilotboat.coap.codes import code
from pilotboat.coap.load import LoopLag
from pilotboat.dtls.transport import Limits, SessionEnded, peer_identity
from pilotboat.lwm2m import content
from pilotboat.lwm2m.bootstrap_session import BootstrapFailed, BootstrapSession, Request, pack_values
from pilotboat.lwm2m.listener import DoorCredentials, Listener, Ports
from pilotboat.lwm2m.messages import Reply
from pilotboat.lwm2m.model import ROOT, CodecError

log = logging.getLogger("pilotboat.lwm2m.bootstrap")

DOOR = "lwm2m"
#: Largest query the door reads (the ``ep`` plus a few short parameters).
MAX_QUERY_OPTIONS = 16
#: Max-Age (s) sent with 5.03 when the node is busy: a random value in this range spreads the retries.
RETRY_AFTER_SECONDS = (2, 10)
METHODS = {"GET": Code.GET, "PUT": Code.PUT, "POST": Code.POST, "DELETE": Code.DELETE}


@dataclass(frozen=True)
class BootstrapRequestQuery:
    endpoint: str | None
    preferred_format: int | None


def read_query(options: tuple[str, ...]) -> BootstrapRequestQuery:
    """``ep`` and ``pct`` from a Bootstrap-Request's query, in any order; other parameters (Pelion's
    ``aid``…) are ignored, as is a ``pct`` that is not a number."""
    endpoint = preferred = None
    for option in options[:MAX_QUERY_OPTIONS]:
        name, _, value = option.partition("=")
        if name == "ep" and endpoint is None:
            endpoint = value
        elif name == "pct" and preferred is None and value.isascii() and value.isdecimal() and len(value) <= 5:
            preferred = int(value)
    return BootstrapRequestQuery(endpoint, preferred)


def _refusal(text: str, dotted: str = "4.00") -> aiocoap.Message:
    return aiocoap.Message(code=code(dotted), payload=text.encode())


def _plan_refusal(exc: PlanRefused) -> aiocoap.Message:
    """4.03 for a credential of another device, 4.00 otherwise; the reason is in the server's events, not
    for the peer."""
    return _refusal("bootstrap refused", exc.code)


class BootstrapSessions:
    """Running sessions, one per endpoint: a new Bootstrap-Request replaces the endpoint's session."""

    def __init__(
        self, service: BootstrapService, *, request_timeout: float, max_sessions: int
    ) -> None:
        self._service = service
        self._timeout = request_timeout
        self._max = max_sessions
        self._running: dict[str, asyncio.Task[None]] = {}
        self.context: aiocoap.Context | None = None

    @property
    def full(self) -> bool:
        return len(self._running) >= self._max

    def __len__(self) -> int:
        return len(self._running)

    def start(self, plan: BootstrapPlan, remote: object, preferred_format: int | None) -> None:
        """Run the session in its own task. Called from the render of ``POST /bs``: the task's first
        request goes out on a later turn of the loop, after aiocoap has sent the 2.04."""
        previous = self._running.pop(plan.endpoint, None)
        if previous is not None:
            previous.cancel("superseded")
        task = asyncio.get_running_loop().create_task(
            self._run(plan, remote, preferred_format), name=f"bootstrap {plan.endpoint}"
        )
        self._running[plan.endpoint] = task
        task.add_done_callback(lambda done: self._forget(plan.endpoint, done))

    def _forget(self, endpoint: str, task: asyncio.Task[None]) -> None:
        if self._running.get(endpoint) is task:
            del self._running[endpoint]

    async def _run(self, plan: BootstrapPlan, remote: object, preferred_format: int | None) -> None:
        session = BootstrapSession(plan, preferred_format)
        started = time.monotonic()
        request: Request | None = session.first()
        step = "discover"
        outcome, reason = "ok", None
        try:
            while request is not None:
                step = request.step
                reply = await self._exchange(remote, request)
                request = session.advance(reply)
        except BootstrapFailed as exc:
            outcome, reason, step = "failed", exc.reason, exc.step
        except TimeoutError:
            outcome, reason = "timeout", f"no answer to {request} within {self._timeout:g} s"
        except (SessionEnded, aiocoap.error.NoRequestInterface) as exc:
            # Over DTLS: the session ended (closed by the device, idle, evicted); never retried in clear.
            outcome, reason = "failed", f"the DTLS session of the device ended before {request}: {exc}"
        except asyncio.CancelledError:
            # A new Bootstrap-Request from the endpoint (recorded), or the server stopping (not recorded).
            if self._running.get(plan.endpoint) is not asyncio.current_task():
                await self._record(plan, "superseded", "a new Bootstrap-Request from the endpoint replaced this session",
                                   step, started, session)
            raise
        except aiocoap.error.NetworkError as exc:
            # Typically ICMP "port unreachable": the device closed its socket (it may have done so right
            # after answering the last request, if that answer was not read before a retransmission).
            outcome, reason = "failed", f"network error on {request}, the device's address refuses datagrams: {exc}"
        except aiocoap.error.Error as exc:
            outcome, reason = "failed", f"CoAP error on {request}: {exc}"
        await self._record(plan, outcome, reason, step if outcome != "ok" else None, started, session)

    async def _exchange(self, remote: object, request: Request) -> Reply:
        assert self.context is not None
        message = aiocoap.Message(code=METHODS[request.method], uri_path=request.uri_path, payload=request.payload)
        if request.accept is not None:
            message.opt.accept = request.accept
        if request.content_format is not None:
            message.opt.content_format = request.content_format
        message.remote = remote
        pending = self.context.request(message)
        response = await asyncio.wait_for(pending.response, self._timeout)
        fmt = response.opt.content_format
        return Reply(response.code.dotted, int(fmt) if fmt is not None else None, bytes(response.payload))

    async def _record(
        self, plan: BootstrapPlan, outcome: str, reason: str | None, step: str | None, started: float,
        session: BootstrapSession,
    ) -> None:
        detail: dict[str, object] = {
            "duration_ms": round((time.monotonic() - started) * 1000),
            "format": content.format_name(session.write_format),
            "written": [str(path) for path in session.written],
        }
        if step is not None:
            detail["step"] = step
        if session.discovery is not None:
            detail["lwm2m_version"] = session.discovery.lwm2m_version
            detail["bootstrap_account"] = sorted(session.discovery.protected)
        try:
            await asyncio.shield(self._service.record_session(plan, door=DOOR, outcome=outcome, reason=reason, **detail))
        except Exception:  # the session is over either way; the database being away must not kill the door
            log.exception("could not record the end of a bootstrap session", extra={"device_id": plan.device_id})

    async def close(self) -> None:
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel("server stopping")
        await asyncio.gather(*tasks, return_exceptions=True)


class BootstrapRequestResource(resource.Resource):
    """``POST /bs?ep=…[&pct=…]``: 2.04 and a session for a known, active endpoint; 4.00 otherwise."""

    def __init__(self, service: BootstrapService, sessions: BootstrapSessions, lag: LoopLag) -> None:
        super().__init__()
        self._service = service
        self._sessions = sessions
        self._lag = lag

    async def needs_blockwise_assembly(self, request: aiocoap.Message) -> bool:
        return False  # a Bootstrap-Request has no body worth assembling

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        query = read_query(request.opt.uri_query)
        if not query.endpoint:
            return _refusal("missing ep: send POST /bs?ep=<endpoint name>")
        if self._sessions.full or self._lag.overloaded:
            # Busy: the sessions already running finish first; the client asks again after Max-Age.
            return aiocoap.Message(code=Code.SERVICE_UNAVAILABLE, max_age=random.randint(*RETRY_AFTER_SECONDS))
        try:
            # The identity the DTLS handshake authenticated; None over plain CoAP.
            plan = await self._service.plan_for_endpoint(query.endpoint, peer=peer_identity(request), door=DOOR)
        except PlanRefused as exc:
            return _plan_refusal(exc)
        self._sessions.start(plan, request.remote, query.preferred_format)
        return aiocoap.Message(code=Code.CHANGED)


class BootstrapPackResource(resource.Resource):
    """``GET /bspack?ep=…`` (LwM2M 1.2): the whole configuration in one SenML-CBOR or SenML-JSON answer."""

    FORMATS = (content.SENML_CBOR, content.SENML_JSON)

    def __init__(self, service: BootstrapService) -> None:
        super().__init__()
        self._service = service

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        accept = request.opt.accept
        fmt = content.SENML_CBOR if accept is None else int(accept)
        if fmt not in self.FORMATS:
            return aiocoap.Message(code=Code.NOT_ACCEPTABLE, payload=b"Bootstrap-Pack is served as SenML-CBOR (112) or SenML-JSON (110)")
        query = read_query(request.opt.uri_query)
        if not query.endpoint:
            return _refusal("missing ep: send GET /bspack?ep=<endpoint name>")
        try:
            plan = await self._service.plan_for_endpoint(query.endpoint, peer=peer_identity(request), door=DOOR)
            payload = content.encode(fmt, pack_values(plan), ROOT)
        except PlanRefused as exc:
            return _plan_refusal(exc)
        except CodecError:
            log.exception("could not encode a Bootstrap-Pack")
            return aiocoap.Message(code=Code.INTERNAL_SERVER_ERROR)
        await self._service.record_session(plan, door=DOOR, outcome="ok", mode="bootstrap-pack",
                                           format=content.format_name(fmt))
        return aiocoap.Message(code=Code.CONTENT, content_format=fmt, payload=payload)


class BootstrapServer:
    """The running bootstrap server on its plain CoAP and/or DTLS port."""

    def __init__(self, listener: Listener, sessions: BootstrapSessions, lag: LoopLag) -> None:
        self.listener = listener
        self.context = listener.context
        self.sessions = sessions
        self.lag = lag

    @classmethod
    async def start(
        cls, service: BootstrapService, ports: Ports, *, credentials: DoorCredentials | None = None,
        limits: Limits = Limits(), request_timeout: float, max_sessions: int,
    ) -> BootstrapServer:
        """Listen on ``ports`` (a port of 0 stays closed); ``credentials`` serve the DTLS port."""
        sessions = BootstrapSessions(service, request_timeout=request_timeout, max_sessions=max_sessions)
        lag = LoopLag()
        site = resource.Site()
        site.add_resource(["bs"], BootstrapRequestResource(service, sessions, lag))
        site.add_resource(["bspack"], BootstrapPackResource(service))
        listener = await Listener.open(site, ports, name="bootstrap", credentials=credentials, limits=limits)
        sessions.context = listener.context
        lag.start()
        for address in ports.addresses():
            log.info("LwM2M bootstrap server listening on %s", address, extra={"address": address})
        return cls(listener, sessions, lag)

    async def close(self) -> None:
        await self.lag.close()
        await self.sessions.close()
        await self.listener.close()
