"""A small CoAP message layer over one UDP socket, for simulating many devices in one process.

aiocoap's ``Message`` gives the wire format; this module adds only what a constrained device does:
confirmable requests with RFC 7252 retransmission, piggybacked and separate responses, and answers to
the requests a server sends it (piggybacked in the ACK, de-duplicated by message id). It uses timer
callbacks rather than a task per message, so thousands of endpoints stay cheap.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiocoap
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

Address = tuple[str, int]
#: Answers a request from a peer: the response (its code, options and payload; the message layer sets
#: type, message id and token), or None to stay silent.
RequestHandler = Callable[[aiocoap.Message, Address], aiocoap.Message | None]

#: Remembered message ids of peers (for duplicate detection) per endpoint.
DEDUP_ENTRIES = 256
TOKEN_BYTES = 4
COAP_PORT = 5683


@dataclass(frozen=True)
class Timing:
    """RFC 7252 transmission parameters; tests shorten them."""

    ack_timeout: float = 2.0
    ack_random_factor: float = 1.5
    max_retransmit: int = 4
    max_latency: float = 100.0

    def __post_init__(self) -> None:
        if self.ack_timeout <= 0 or self.ack_random_factor < 1 or self.max_retransmit < 0 or self.max_latency < 0:
            raise ValueError("timing: ack_timeout > 0, ack_random_factor >= 1, max_retransmit and max_latency >= 0")

    @property
    def exchange_lifetime(self) -> float:
        """How long a message id is remembered, and how long a separate response is awaited."""
        span = self.ack_timeout * ((1 << self.max_retransmit) - 1) * self.ack_random_factor
        return span + 2 * self.max_latency + self.ack_timeout


class ExchangeError(Exception):
    """A request that got no response."""


class ExchangeTimeout(ExchangeError, TimeoutError):
    """No acknowledgement after all retransmissions, or no separate response in time."""


class PeerReset(ExchangeError):
    """The peer answered the request with a Reset."""


def coap_address(uri: str) -> tuple[str, int]:
    """Host and port of a ``coap://`` URI (the simulator speaks plain CoAP only)."""
    parts = urlsplit(uri)
    if parts.scheme != "coap":
        raise ValueError(f"{uri!r}: only coap:// URIs are supported (no DTLS in the simulator)")
    try:
        port = parts.port or COAP_PORT
    except ValueError as exc:
        raise ValueError(f"{uri!r}: {exc}") from None
    if not parts.hostname:
        raise ValueError(f"{uri!r} names no host")
    return parts.hostname, port


async def resolve(uri: str) -> tuple[socket.AddressFamily, Address]:
    """The address family and ``(host, port)`` of a ``coap://`` URI's first address."""
    host, port = coap_address(uri)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"{host} has no address")
    family, _, _, _, sockaddr = infos[0]
    return family, (sockaddr[0], sockaddr[1])


def local_host_for(family: socket.AddressFamily, remote_host: str) -> str:
    """Loopback when the peer is on this machine, else every interface of the family."""
    if ipaddress.ip_address(remote_host.split("%")[0]).is_loopback:
        return "::1" if family == socket.AF_INET6 else "127.0.0.1"
    return "::" if family == socket.AF_INET6 else "0.0.0.0"


class _Outgoing:
    """A confirmable request in flight."""

    __slots__ = ("data", "mid", "token", "remote", "future", "timeout", "remaining", "timer")

    def __init__(self, data: bytes, mid: int, token: bytes, remote: Address, future: asyncio.Future[aiocoap.Message],
                 timeout: float, remaining: int) -> None:
        self.data = data
        self.mid = mid
        self.token = token
        self.remote = remote
        self.future = future
        self.timeout = timeout
        self.remaining = remaining
        self.timer: asyncio.TimerHandle | None = None


class Endpoint(asyncio.DatagramProtocol):
    """One UDP socket that sends requests to peers and answers the requests peers send it."""

    def __init__(self, handler: RequestHandler, timing: Timing) -> None:
        self._handler = handler
        self.timing = timing
        self._transport: asyncio.DatagramTransport | None = None
        self._loop = asyncio.get_running_loop()
        self._next_mid = random.randrange(1 << 16)
        self._by_token: dict[bytes, _Outgoing] = {}
        self._by_mid: dict[int, _Outgoing] = {}
        #: (peer, message id) -> (expiry, the datagram sent in answer or None when none was sent).
        self._seen: OrderedDict[tuple[Address, int], tuple[float, bytes | None]] = OrderedDict()
        #: Datagrams that did not parse as CoAP (dropped).
        self.garbage = 0

    @classmethod
    async def open(cls, local: Address, handler: RequestHandler, timing: Timing | None = None) -> Endpoint:
        loop = asyncio.get_running_loop()
        _, endpoint = await loop.create_datagram_endpoint(lambda: cls(handler, timing or Timing()), local_addr=local)
        return endpoint

    @property
    def address(self) -> Address:
        """The local ``(host, port)`` the socket is bound to."""
        assert self._transport is not None
        name = self._transport.get_extra_info("sockname")
        return name[0], name[1]

    # --- asyncio protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(ExchangeError("the endpoint was closed"))

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors: the request's retransmission timer decides its fate

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        peer: Address = (addr[0], addr[1])
        try:
            message = aiocoap.Message.decode(data)
        except Exception:  # any malformed datagram (aiocoap raises several kinds) is dropped
            self.garbage += 1
            return
        if message.mtype in (Type.ACK, Type.RST):
            self._on_ack_or_reset(message, peer)
        elif message.code.is_request():
            self._on_request(message, peer)
        elif message.code.is_response():
            self._on_separate_response(message, peer)
        elif message.mtype is Type.CON:
            self._send(self._reset(message.mid), peer)  # an empty CON ("CoAP ping") is answered with Reset
        # A NON empty message or a signalling code: ignored.

    # --- sending requests ---------------------------------------------------------------------------

    async def request(self, message: aiocoap.Message, remote: Address) -> aiocoap.Message:
        """Send ``message`` as a confirmable request to ``remote`` and return its response."""
        mid = self._new_mid()
        token = random.randbytes(TOKEN_BYTES)
        while token in self._by_token:
            token = random.randbytes(TOKEN_BYTES)
        message.mtype, message.mid, message.token = Type.CON, mid, token
        timeout = self.timing.ack_timeout * random.uniform(1.0, self.timing.ack_random_factor)
        future: asyncio.Future[aiocoap.Message] = self._loop.create_future()
        outgoing = _Outgoing(message.encode(), mid, token, remote, future, timeout, self.timing.max_retransmit)
        self._by_token[token] = outgoing
        self._by_mid[mid] = outgoing
        try:
            self._send(outgoing.data, remote)
            outgoing.timer = self._loop.call_later(timeout, self._retransmit, outgoing)
            return await future
        finally:
            self._forget(outgoing)

    def _new_mid(self) -> int:
        mid = self._next_mid
        self._next_mid = (mid + 1) & 0xFFFF
        return mid

    def _retransmit(self, outgoing: _Outgoing) -> None:
        if outgoing.future.done():
            return
        if outgoing.remaining <= 0:
            outgoing.future.set_exception(ExchangeTimeout(
                f"no acknowledgement after {self.timing.max_retransmit} retransmissions"))
            return
        outgoing.remaining -= 1
        outgoing.timeout *= 2
        self._send(outgoing.data, outgoing.remote)
        outgoing.timer = self._loop.call_later(outgoing.timeout, self._retransmit, outgoing)

    def _separate_timeout(self, outgoing: _Outgoing) -> None:
        if not outgoing.future.done():
            outgoing.future.set_exception(ExchangeTimeout("acknowledged, but the separate response never came"))

    def _forget(self, outgoing: _Outgoing) -> None:
        if outgoing.timer is not None:
            outgoing.timer.cancel()
        if self._by_token.get(outgoing.token) is outgoing:
            del self._by_token[outgoing.token]
        if self._by_mid.get(outgoing.mid) is outgoing:
            del self._by_mid[outgoing.mid]

    def _on_ack_or_reset(self, message: aiocoap.Message, peer: Address) -> None:
        outgoing = self._by_mid.get(message.mid)
        if outgoing is None or outgoing.remote != peer or outgoing.future.done():
            return  # a late or stray ACK/RST: never answered
        if message.mtype is Type.RST:
            outgoing.future.set_exception(PeerReset("the peer answered with Reset"))
        elif message.code == Code.EMPTY:
            # Acknowledged; the response follows separately. Stop retransmitting and wait for it.
            del self._by_mid[outgoing.mid]
            if outgoing.timer is not None:
                outgoing.timer.cancel()
            outgoing.timer = self._loop.call_later(self.timing.exchange_lifetime, self._separate_timeout, outgoing)
        elif message.token == outgoing.token:
            outgoing.future.set_result(message)

    def _on_separate_response(self, message: aiocoap.Message, peer: Address) -> None:
        if self._answer_duplicate(message, peer):
            return
        outgoing = self._by_token.get(message.token)
        if outgoing is None or outgoing.remote != peer or outgoing.future.done():
            if message.mtype is Type.CON:
                self._send(self._reset(message.mid), peer)
            return
        if message.mtype is Type.CON:
            ack = self._empty(Type.ACK, message.mid)
            self._remember(peer, message.mid, ack)
            self._send(ack, peer)
        outgoing.future.set_result(message)

    # --- answering requests -------------------------------------------------------------------------

    def _on_request(self, message: aiocoap.Message, peer: Address) -> None:
        if self._answer_duplicate(message, peer):
            return
        response = self._handler(message, peer)
        if response is None:
            self._remember(peer, message.mid, None)  # retransmissions stay unanswered too
            return
        if message.mtype is Type.CON:
            response.mtype, response.mid = Type.ACK, message.mid
        else:
            response.mtype, response.mid = Type.NON, self._new_mid()
        response.token = message.token
        data = response.encode()
        self._remember(peer, message.mid, data)
        self._send(data, peer)

    def _answer_duplicate(self, message: aiocoap.Message, peer: Address) -> bool:
        """True (and the earlier answer sent again) when ``message`` repeats one already handled."""
        key = (peer, message.mid)
        seen = self._seen.get(key)
        if seen is None:
            return False
        expiry, answer = seen
        if expiry < time.monotonic():
            del self._seen[key]
            return False
        if answer is not None:
            self._send(answer, peer)
        return True

    def _remember(self, peer: Address, mid: int, answer: bytes | None) -> None:
        self._seen[(peer, mid)] = (time.monotonic() + self.timing.exchange_lifetime, answer)
        self._seen.move_to_end((peer, mid))
        while len(self._seen) > DEDUP_ENTRIES:
            self._seen.popitem(last=False)

    # --- plumbing -----------------------------------------------------------------------------------

    @staticmethod
    def _empty(mtype: Type, mid: int) -> bytes:
        message = aiocoap.Message(code=Code.EMPTY)
        message.mtype, message.mid = mtype, mid
        return message.encode()

    def _reset(self, mid: int) -> bytes:
        return self._empty(Type.RST, mid)

    def _send(self, data: bytes, peer: Address) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(data, peer)

    def _fail_all(self, error: ExchangeError) -> None:
        for outgoing in list(self._by_token.values()):
            if not outgoing.future.done():
                outgoing.future.set_exception(error)
            self._forget(outgoing)

    def close(self) -> None:
        """Close the socket; requests in flight fail with ``ExchangeError``."""
        self._fail_all(ExchangeError("the endpoint was closed"))
        if self._transport is not None:
            self._transport.close()
