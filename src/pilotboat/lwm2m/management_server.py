"""The LwM2M management server door: the registration interface (``POST /rd``, ``POST /rd/<id>``,
``DELETE /rd/<id>``) over aiocoap, and ``CoapDeviceLink``, which carries the server's requests to
registered devices over the same socket.

The door parses (``lwm2m.registration``) and answers; ``RegistryService`` decides.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiocoap
from aiocoap import resource
from aiocoap.numbers.codes import Code

from pilotboat.coap.codes import code
from pilotboat.coap.load import LoopLag
from pilotboat.dtls.transport import Limits, SessionEnded, peer_identity
from pilotboat.lwm2m import registration as parsing
from pilotboat.lwm2m.listener import DoorCredentials, Listener, Ports
from pilotboat.lwm2m.messages import DeviceRequest, DeviceUnreachable, Reply
from pilotboat.lwm2m.registration import RegistrationError
from pilotboat.registry.service import RegistryService
from pilotboat.registry.store import Address, Registration

log = logging.getLogger("pilotboat.lwm2m.server")

#: Max-Age (s) sent with 5.03 when the node is busy: a random value in this range spreads the retries.
RETRY_AFTER_SECONDS = (2, 10)
METHODS = {"GET": Code.GET, "PUT": Code.PUT, "POST": Code.POST, "DELETE": Code.DELETE}


def peer_address(remote: object) -> Address:
    """The ``(host, port)`` of an aiocoap UDP remote, IPv4-mapped addresses as plain IPv4."""
    host, port = remote.sockaddr[:2]  # type: ignore[attr-defined]
    mapped = ipaddress.ip_address(host.split("%")[0]).ipv4_mapped if ":" in host else None
    return (str(mapped) if mapped is not None else host, port)


def _answer(code: Code, text: str = "", *, max_age: int | None = None) -> aiocoap.Message:
    message = aiocoap.Message(code=code, payload=text.encode())
    if max_age is not None:
        message.opt.max_age = max_age
    return message


def _refusal(exc: RegistrationError) -> aiocoap.Message:
    return _answer(code(exc.code), str(exc), max_age=exc.retry_after)


def _reply(response: aiocoap.Message) -> Reply:
    fmt = response.opt.content_format
    return Reply(response.code.dotted, int(fmt) if fmt is not None else None, bytes(response.payload))


@dataclass
class DeviceObservation:
    """An observation running on a device: its first answer, then its notifications."""

    first: Reply
    _request: object

    async def notifications(self) -> AsyncIterator[Reply]:
        """Each notification until the observation ends (cancelled, or the device stopped it)."""
        try:
            async for response in self._request.observation:  # type: ignore[attr-defined]
                yield _reply(response)
        except aiocoap.error.Error as exc:
            log.info("an observation ended", extra={"reason": str(exc)})

    def cancel(self) -> None:
        observation = getattr(self._request, "observation", None)
        if observation is not None:
            observation.cancel()


class CoapDeviceLink:
    """Sends the server's requests to registered devices, from the registration socket, to the address
    of each registration's latest Register or Update; over DTLS, over the session of that Register or
    Update (never in clear: without the session the request fails at once)."""

    def __init__(self) -> None:
        self.context: aiocoap.Context | None = None
        self._remotes: dict[str, object] = {}

    def remember(self, registration_id: str, remote: object) -> None:
        self._remotes[registration_id] = remote

    def forget(self, registration_id: str) -> None:
        self._remotes.pop(registration_id, None)

    # As a RegistrationListener: forget the addresses of registrations that ended.
    async def registered(self, registration: Registration, previous: Registration | None) -> None:
        if previous is not None:
            self.forget(previous.registration_id)

    async def updated(self, registration: Registration) -> None:
        pass

    async def ended(self, registration: Registration, why: str) -> None:
        self.forget(registration.registration_id)

    def _message(self, registration: Registration, request: DeviceRequest, observe: int | None = None) -> aiocoap.Message:
        if self.context is None:
            raise DeviceUnreachable("the management server is not running")
        message = aiocoap.Message(code=METHODS[request.method], uri_path=request.uri_path, payload=request.payload)
        if request.query:
            message.opt.uri_query = request.query
        if request.accept is not None:
            message.opt.accept = request.accept
        if request.content_format is not None:
            message.opt.content_format = request.content_format
        if observe is not None:
            message.opt.observe = observe
        remote = self._remotes.get(registration.registration_id)
        if remote is not None:
            message.remote = remote
        elif registration.peer is not None:
            raise DeviceUnreachable("the device's DTLS session is not held by this node; it is reachable again after its next Update")
        else:  # registered through another node: address it by its registration address
            host, port = registration.address
            message.set_request_uri(f"coap://{'[' + host + ']' if ':' in host else host}:{port}")
            message.opt.uri_path = request.uri_path
        return message

    async def send(self, registration: Registration, request: DeviceRequest, timeout: float) -> Reply:
        """The device's answer; ``DeviceUnreachable`` when it cannot be reached or does not answer in time."""
        pending = self.context.request(self._message(registration, request)) if self.context else None
        return _reply(await self._first(pending, request, timeout))

    async def observe(self, registration: Registration, request: DeviceRequest, timeout: float) -> DeviceObservation:
        """Start observing ``request.path``; the first answer says whether the device accepted."""
        pending = self.context.request(self._message(registration, request, observe=0)) if self.context else None
        first = _reply(await self._first(pending, request, timeout))
        return DeviceObservation(first, pending)

    @staticmethod
    async def _first(pending: object, request: DeviceRequest, timeout: float) -> aiocoap.Message:
        if pending is None:
            raise DeviceUnreachable("the management server is not running")
        try:
            return await asyncio.wait_for(pending.response, timeout)  # type: ignore[attr-defined]
        except TimeoutError:
            raise DeviceUnreachable(f"no answer to {request} within {timeout:g} s", timed_out=True) from None
        except (SessionEnded, aiocoap.error.NoRequestInterface):
            raise DeviceUnreachable("the device's DTLS session ended; it is reachable again after its next Update") from None
        except aiocoap.error.NetworkError as exc:
            raise DeviceUnreachable(f"the device's address refuses datagrams ({exc})") from None
        except aiocoap.error.Error as exc:
            raise DeviceUnreachable(f"CoAP error on {request}: {exc}") from None


class _RegistrationInterface(resource.Resource):
    def __init__(self, registry: RegistryService, link: CoapDeviceLink, lag: LoopLag) -> None:
        super().__init__()
        self._registry = registry
        self._link = link
        self._lag = lag

    def _busy(self) -> aiocoap.Message | None:
        if self._lag.overloaded:
            return _answer(Code.SERVICE_UNAVAILABLE, "busy", max_age=random.randint(*RETRY_AFTER_SECONDS))
        return None


class RegisterResource(_RegistrationInterface):
    """``POST /rd?ep=…``: Register."""

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        busy = self._busy()
        if busy is not None:
            return busy
        try:
            query = parsing.read_register(request.opt.uri_query)
            objects = parsing.read_objects(request.payload)
            # The identity the DTLS handshake authenticated; None over plain CoAP.
            registration = await self._registry.register(
                query, objects, peer_address(request.remote), peer=peer_identity(request),
            )
        except RegistrationError as exc:
            return _refusal(exc)
        self._link.remember(registration.registration_id, request.remote)
        return aiocoap.Message(code=Code.CREATED, location_path=("rd", registration.registration_id))


class RegistrationResource(_RegistrationInterface, resource.PathCapable):
    """``/rd/<id>``: Update (``POST``) and De-register (``DELETE``)."""

    @staticmethod
    def _registration_id(request: aiocoap.Message) -> str | None:
        segments = request.opt.uri_path
        return segments[0] if len(segments) == 1 and segments[0] else None

    async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
        registration_id = self._registration_id(request)
        if registration_id is None:
            return _answer(Code.NOT_FOUND, "no such registration")
        busy = self._busy()
        if busy is not None:
            return busy
        try:
            update = parsing.read_update(request.opt.uri_query)
            objects = parsing.read_objects(request.payload) if request.payload else None
            registration = await self._registry.update(
                registration_id, update, objects, peer_address(request.remote), peer=peer_identity(request),
            )
        except RegistrationError as exc:
            return _refusal(exc)
        self._link.remember(registration.registration_id, request.remote)
        return aiocoap.Message(code=Code.CHANGED)

    async def render_delete(self, request: aiocoap.Message) -> aiocoap.Message:
        registration_id = self._registration_id(request)
        if registration_id is None:
            return _answer(Code.NOT_FOUND, "no such registration")
        try:
            registration = await self._registry.deregister(
                registration_id, peer=peer_identity(request), address=peer_address(request.remote),
            )
        except RegistrationError as exc:
            return _refusal(exc)
        self._link.forget(registration.registration_id)
        return aiocoap.Message(code=Code.DELETED)


class ManagementServer:
    """The running registration interface on its plain CoAP and/or DTLS port."""

    def __init__(self, listener: Listener, lag: LoopLag) -> None:
        self.listener = listener
        self.context = listener.context
        self.lag = lag

    @classmethod
    async def start(
        cls, registry: RegistryService, link: CoapDeviceLink, ports: Ports, *,
        credentials: DoorCredentials | None = None, limits: Limits = Limits(),
    ) -> ManagementServer:
        """Listen on ``ports`` (a port of 0 stays closed); ``credentials`` serve the DTLS port."""
        lag = LoopLag()
        site = resource.Site()
        site.add_resource(["rd"], RegisterResource(registry, link, lag))
        site.add_resource(["rd"], RegistrationResource(registry, link, lag))  # /rd/<id>
        listener = await Listener.open(site, ports, name="lwm2m", credentials=credentials, limits=limits)
        link.context = listener.context
        lag.start()
        for address in ports.addresses():
            log.info("LwM2M management server listening on %s", address, extra={"address": address})
        return cls(listener, lag)

    async def close(self) -> None:
        await self.lag.close()
        await self.listener.close()
