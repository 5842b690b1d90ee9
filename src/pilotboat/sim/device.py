"""One simulated LwM2M device: its own UDP socket, its objects, and client-initiated bootstrap
(``POST /bs``) or Bootstrap-Pack (``GET /bspack``, LwM2M 1.2).

After a successful bootstrap, ``servers()`` (and ``BootstrapResult.servers``) name the management
servers the device was given: what it would register with next.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiocoap
from aiocoap.numbers.codes import Code

from pilotboat.lwm2m import content, objects
from pilotboat.lwm2m.model import ROOT, CodecError, Path
from pilotboat.sim.exchange import Address, Endpoint, ExchangeError, PeerReset, Timing, local_host_for, resolve
from pilotboat.sim.handlers import ServerRequests
from pilotboat.sim.objects import AssignedServer, Instance, NotAllowed, NotFound, ObjectStore, Resource

#: Formats a device may name in ``pct`` (and ask Bootstrap-Pack in).
PREFERRED_FORMATS = frozenset({content.SENML_JSON, content.SENML_CBOR, content.TLV})
PACK_FORMATS = frozenset({content.SENML_JSON, content.SENML_CBOR})


class Failure(enum.StrEnum):
    """Why a bootstrap failed."""

    NO_RESPONSE = "no response"  # the Bootstrap-Request (or Pack request) was never answered
    RESET = "reset"  # the server answered it with a CoAP Reset
    REJECTED = "rejected"  # answered with another code than 2.04 (2.05 for a pack): see ``code``
    TIMEOUT = "timeout"  # the server accepted, but no successful Bootstrap-Finish came in time
    INCONSISTENT = "inconsistent"  # Bootstrap-Finish (or the pack) left an unusable configuration
    BAD_PACK = "bad pack"  # a Bootstrap-Pack payload the device could not read or apply
    SOCKET = "socket error"  # the device could not open or use its socket


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
        if self.failure is None:
            return None
        return f"{self.failure} {self.code}" if self.code else str(self.failure)


@dataclass(frozen=True)
class ReceivedRequest:
    """A request the device received from a server, and the code it answered (None: not answered)."""

    method: str
    path: str
    content_format: int | None
    accept: int | None
    code: str | None


def _method(code: Code) -> str:
    """``"GET"``…, or the dotted code of a method aiocoap has no name for."""
    return code.dotted if code.name.startswith("(") else code.name


def _int_option(value: object) -> int | None:
    return int(value) if value is not None else None  # type: ignore[call-overload]


class SimulatedDevice:
    """A simulated LwM2M client with a bootstrap-server account at ``/0/<bootstrap_instance>``.

    ``content_format`` is the ``pct`` the device sends (SenML-JSON 110, SenML-CBOR 112 or TLV 11542;
    LwM2M 1.0 devices send none). ``answer_limit`` makes the device go silent after answering that many
    server requests (a device that dies mid-session). ``on_bootstrap_trigger`` is called when a server
    executes ``/1/x/9``; ``bootstrap_triggered`` is set then too.
    """

    def __init__(
        self,
        endpoint: str,
        bootstrap_uri: str,
        *,
        lwm2m_version: str = "1.1",
        content_format: int | None = None,
        bootstrap_instance: int = 1,
        device_info: Mapping[int, Resource] | None = None,
        answer_limit: int | None = None,
        timing: Timing | None = None,
        local_host: str | None = None,
        on_bootstrap_trigger: Callable[[], None] | None = None,
    ) -> None:
        if not endpoint:
            raise ValueError("the endpoint name must not be empty")
        if content_format is not None:
            if lwm2m_version == "1.0":
                raise ValueError("LwM2M 1.0 devices send no preferred content format")
            if content_format not in PREFERRED_FORMATS:
                raise ValueError(f"content format {content_format} is not one of {sorted(PREFERRED_FORMATS)}")
        if answer_limit is not None and answer_limit < 0:
            raise ValueError("answer_limit must not be negative")
        self.endpoint = endpoint
        self.bootstrap_uri = bootstrap_uri
        self.lwm2m_version = lwm2m_version
        self.content_format = content_format
        self.bootstrap_instance = bootstrap_instance
        self.answer_limit = answer_limit
        self.timing = timing or Timing()
        self._local_host = local_host
        self._on_bootstrap_trigger = on_bootstrap_trigger
        self._store = ObjectStore.initial(endpoint, bootstrap_uri, bootstrap_instance, device_info)
        self._requests = ServerRequests(self._store, lwm2m_version=lwm2m_version, on_finish=self._finished,
                                        on_execute=self._executed)
        self.received: list[ReceivedRequest] = []
        self.executed: list[Path] = []
        self.bootstrap_triggered = asyncio.Event()
        self.answered = 0
        #: How often the server answered 5.03 (busy) and the device asked again after its Max-Age.
        self.deferred = 0
        self._endpoint: Endpoint | None = None
        self._server: Address | None = None
        self._finish: asyncio.Future[str | None] | None = None
        self._finished_at: float | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve the bootstrap server and open the device's socket (``bootstrap()`` does this too)."""
        if self._endpoint is not None:
            return
        family, self._server = await resolve(self.bootstrap_uri)
        host = self._local_host or local_host_for(family, self._server[0])
        self._endpoint = await Endpoint.open((host, 0), self._handle, self.timing)

    async def close(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None

    async def __aenter__(self) -> SimulatedDevice:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def address(self) -> Address:
        """The device's local ``(host, port)``; servers send their requests there."""
        if self._endpoint is None:
            raise RuntimeError("the device is not started")
        return self._endpoint.address

    @property
    def garbage(self) -> int:
        """Datagrams received that were not CoAP (and were dropped)."""
        return self._endpoint.garbage if self._endpoint is not None else 0

    # --- state --------------------------------------------------------------------------------------

    def instances(self, object_id: int) -> dict[int, Instance]:
        """``{instance id: {resource id: value}}`` of an object (multiple resources as ``{id: value}``)."""
        return self._store.instances(object_id)

    @property
    def bootstrap_account(self) -> Instance | None:
        """The resources of the Security instance at ``bootstrap_instance`` while it still is a
        bootstrap-server account (Bootstrap-Server = true), else None (deleted or overwritten)."""
        instance = self._store.instances(objects.SECURITY).get(self.bootstrap_instance)
        if instance is None or instance.get(objects.SECURITY_BOOTSTRAP) is not True:
            return None
        return instance

    def servers(self) -> list[AssignedServer]:
        """The management-server accounts, ordered by Short Server ID."""
        return self._store.servers()

    def inconsistency(self) -> str | None:
        """Why the current configuration would fail Bootstrap-Finish, or None."""
        return self._store.inconsistency()

    # --- bootstrap ----------------------------------------------------------------------------------

    async def bootstrap(self, timeout: float = 30.0) -> BootstrapResult:
        """Client-initiated bootstrap: ``POST /bs?ep=…[&pct=…]``, then serve the server's requests until
        a Bootstrap-Finish is answered. A Finish answered 4.06 ends the attempt as INCONSISTENT."""
        query = [f"ep={self.endpoint}"]
        if self.content_format is not None:
            query.append(f"pct={self.content_format}")
        message = aiocoap.Message(code=Code.POST, uri_path=("bs",), uri_query=tuple(query))
        return await self._run("request", message, Code.CHANGED, timeout, self._await_finish)

    async def bootstrap_pack(self, timeout: float = 30.0) -> BootstrapResult:
        """Bootstrap-Pack (LwM2M 1.2): ``GET /bspack?ep=…`` with Accept SenML-CBOR (or SenML-JSON when
        that is the device's format), then apply the configuration. Any error code is a REJECTED
        failure, after which a real client falls back to ``bootstrap()``."""
        if self.lwm2m_version != "1.2":
            raise ValueError("Bootstrap-Pack needs LwM2M 1.2")
        accept = self.content_format if self.content_format in PACK_FORMATS else content.SENML_CBOR
        message = aiocoap.Message(code=Code.GET, uri_path=("bspack",), uri_query=(f"ep={self.endpoint}",),
                                  accept=accept)
        return await self._run("pack", message, Code.CONTENT, timeout, self._apply_pack)

    async def _run(self, method: str, message: aiocoap.Message, success: Code, timeout: float,
                   then: Callable[[aiocoap.Message], Awaitable[str | None]]) -> BootstrapResult:
        def failed(failure: Failure, detail: str, code: str | None = None) -> BootstrapResult:
            return BootstrapResult(self.endpoint, False, method, failure, code, detail)

        try:
            await self.start()
        except (OSError, ValueError) as exc:
            return failed(Failure.SOCKET, f"cannot reach {self.bootstrap_uri}: {exc}")
        assert self._endpoint is not None and self._server is not None
        loop = asyncio.get_running_loop()
        self._finish = loop.create_future()
        self._finished_at = None
        started = time.monotonic()
        accepted = False
        try:
            async with asyncio.timeout(timeout):
                response = await self._endpoint.request(message, self._server)
                while response.code == Code.SERVICE_UNAVAILABLE:
                    # The server is busy: ask again after its Max-Age, as LwM2M clients do.
                    self.deferred += 1
                    await asyncio.sleep(response.opt.max_age if response.opt.max_age is not None else 60)
                    response = await self._endpoint.request(message, self._server)
                if response.code != success:
                    detail = bytes(response.payload).decode("utf-8", "replace").strip() or None
                    code = response.code.dotted
                    return failed(Failure.REJECTED, detail or f"the server answered {code}", code)
                accepted = True
                problem = await then(response)
        except PeerReset:
            return failed(Failure.RESET, "the server answered with a CoAP Reset")
        except ExchangeError as exc:  # before TimeoutError: ExchangeTimeout is one too
            return failed(Failure.NO_RESPONSE, f"{self.bootstrap_uri}: {exc}")
        except TimeoutError:
            if accepted:
                return failed(Failure.TIMEOUT, f"no successful Bootstrap-Finish within {timeout:g} s")
            return failed(Failure.NO_RESPONSE, f"{self.bootstrap_uri} did not answer within {timeout:g} s")
        except _BadPack as exc:
            return failed(Failure.BAD_PACK, str(exc))
        finally:
            self._finish = None
        if problem is not None:
            return failed(Failure.INCONSISTENT, problem)
        finished = self._finished_at if self._finished_at is not None else time.monotonic()
        return BootstrapResult(self.endpoint, True, method, latency=finished - started, servers=tuple(self.servers()))

    async def _await_finish(self, response: aiocoap.Message) -> str | None:
        assert self._finish is not None
        return await self._finish

    async def _apply_pack(self, response: aiocoap.Message) -> str | None:
        fmt = response.opt.content_format
        if fmt is None or int(fmt) not in PACK_FORMATS:
            raise _BadPack(f"the pack came as {content.format_name(int(fmt)) if fmt is not None else 'no format'}")
        try:
            entries = content.decode(int(fmt), response.payload, ROOT, objects.resource_type)
            self._store.write(ROOT, entries, replace=True)
        except (CodecError, NotFound, NotAllowed) as exc:
            raise _BadPack(f"cannot apply the pack: {exc}") from exc
        self._finished_at = time.monotonic()
        return self._store.inconsistency()

    # --- serving the server's requests --------------------------------------------------------------

    def _handle(self, request: aiocoap.Message, peer: Address) -> aiocoap.Message | None:
        received = (_method(request.code),
                    "/" + "/".join(request.opt.uri_path), _int_option(request.opt.content_format),
                    _int_option(request.opt.accept))
        if self.answer_limit is not None and self.answered >= self.answer_limit:
            self.received.append(ReceivedRequest(*received, code=None))
            return None
        response = self._requests.handle(request)
        self.answered += 1
        self.received.append(ReceivedRequest(*received, code=response.code.dotted))
        return response

    def _finished(self, problem: str | None) -> None:
        if problem is None:
            self._finished_at = time.monotonic()
        if self._finish is not None and not self._finish.done():
            self._finish.set_result(problem)

    def _executed(self, path: Path) -> None:
        self.executed.append(path)
        if path.object_id == objects.SERVER and path.resource_id == objects.SERVER_BOOTSTRAP_TRIGGER:
            self.bootstrap_triggered.set()
            if self._on_bootstrap_trigger is not None:
                self._on_bootstrap_trigger()


class _BadPack(Exception):
    pass

