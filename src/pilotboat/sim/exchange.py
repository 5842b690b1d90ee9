"""A small CoAP message layer over one UDP socket, for simulating many devices in one process.

aiocoap's ``Message`` gives the wire format; this module adds only what a constrained device does:
confirmable requests with RFC 7252 retransmission, piggybacked and separate responses, Block1 (RFC 7959)
for request payloads larger than one block (sent, and received from servers), Observe notifications
(RFC 7641, confirmable or not), and answers to the requests a server sends it (piggybacked in the ACK,
de-duplicated by message id). A ``deaf`` endpoint ignores every datagram, as a queue-mode device whose
radio is off. It uses timer callbacks rather than a task per message, so thousands of endpoints stay cheap.

``coaps://`` peers get a DTLS session (``Endpoint.connect``) between the socket and this layer: from then
on every message to and from that peer travels through it, and nothing goes to it in plaintext. Plain
peers cost one look-up in an empty mapping.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiocoap
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type
from aiocoap.optiontypes import BlockOption

from pilotboat.dtls.client import ClientConnection, ClientCredentials, ConnectionClosed, HandshakeFailed

Address = tuple[str, int]
#: Answers a request from a peer: the response (its code, options and payload; the message layer sets
#: type, message id and token), or None to stay silent.
RequestHandler = Callable[[aiocoap.Message, Address], aiocoap.Message | None]
#: Told of a Reset the peer sent in answer to a non-confirmable notification: the peer and the token.
ResetHandler = Callable[[Address, bytes], None]

#: Remembered message ids of peers (for duplicate detection) per endpoint.
DEDUP_ENTRIES = 256
TOKEN_BYTES = 4
COAP_PORT = 5683
COAPS_PORT = 5684
SCHEMES = {"coap": COAP_PORT, "coaps": COAPS_PORT}
#: Datagrams of DTLS flights and records are at most this large.
DTLS_MTU = 1200
#: Non-confirmable notifications remembered (message id -> token) so that a Reset to one can cancel.
NON_ENTRIES = 64
BLOCK_SIZES = (16, 32, 64, 128, 256, 512, 1024)
#: The largest request payload a server may send in Block1 blocks, and how many such requests are
#: received at once.
MAX_BLOCKWISE_PAYLOAD = 65_536
BLOCKWISE_ENTRIES = 8


@dataclass(frozen=True)
class Timing:
    """RFC 7252 transmission parameters, the Block1 size, and the LwM2M client's timers; tests shorten them."""

    ack_timeout: float = 2.0
    ack_random_factor: float = 1.5
    max_retransmit: int = 4
    max_latency: float = 100.0
    #: Block size of request payloads sent with Block1 (larger payloads are split).
    block_size: int = 1024
    #: An Update goes out this many seconds before the registration's lifetime ends (at half the lifetime
    #: when that is later, as for short lifetimes).
    update_margin: float = 93.0
    #: A queue-mode device stays reachable this long after each message it sends.
    awake: float = 93.0
    #: Seconds before a failed registration is tried again; doubled after each failure, up to 32 times.
    register_retry: float = 30.0
    #: DTLS handshakes: the first retransmission timeout, doubled until it would exceed the maximum,
    #: when the handshake fails.
    dtls_timeout_min: float = 1.0
    dtls_timeout_max: float = 16.0

    def __post_init__(self) -> None:
        if self.ack_timeout <= 0 or self.ack_random_factor < 1 or self.max_retransmit < 0 or self.max_latency < 0:
            raise ValueError("timing: ack_timeout > 0, ack_random_factor >= 1, max_retransmit and max_latency >= 0")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"timing: block_size is one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.update_margin < 0 or self.awake < 0 or self.register_retry <= 0:
            raise ValueError("timing: update_margin and awake >= 0, register_retry > 0")
        if not 0 < self.dtls_timeout_min <= self.dtls_timeout_max:
            raise ValueError("timing: 0 < dtls_timeout_min <= dtls_timeout_max")

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


class HandshakeError(ExchangeError):
    """No DTLS session with the peer: the handshake failed, or the session ended."""


def coap_address(uri: str) -> tuple[str, int]:
    """Host and port of a ``coap://`` or ``coaps://`` URI."""
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"{uri!r}: only coap:// and coaps:// URIs are supported")
    try:
        port = parts.port or SCHEMES[parts.scheme]
    except ValueError as exc:
        raise ValueError(f"{uri!r}: {exc}") from None
    if not parts.hostname:
        raise ValueError(f"{uri!r} names no host")
    return parts.hostname, port


def is_secure(uri: str) -> bool:
    """Whether a URI names a CoAP-over-DTLS peer (``coaps://``)."""
    return urlsplit(uri).scheme == "coaps"


async def resolve(uri: str) -> tuple[socket.AddressFamily, Address]:
    """The address family and ``(host, port)`` of a ``coap://`` or ``coaps://`` URI's first address."""
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
    """A confirmable request (or notification: its ACK ends the exchange) in flight."""

    __slots__ = ("data", "mid", "token", "remote", "future", "timeout", "remaining", "timer", "notification")

    def __init__(self, data: bytes, mid: int, token: bytes, remote: Address, future: asyncio.Future[aiocoap.Message],
                 timeout: float, remaining: int, notification: bool = False) -> None:
        self.data = data
        self.mid = mid
        self.token = token
        self.remote = remote
        self.future = future
        self.timeout = timeout
        self.remaining = remaining
        self.timer: asyncio.TimerHandle | None = None
        self.notification = notification


class _Session:
    """A DTLS session with one peer; ``ended`` once it failed or closed (the peer then gets nothing)."""

    __slots__ = ("connection", "ready", "timer", "ended")

    def __init__(self, connection: ClientConnection, ready: asyncio.Future[None]) -> None:
        self.connection = connection
        self.ready = ready
        self.timer: asyncio.TimerHandle | None = None
        self.ended: Exception | None = None


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
        #: Message ids of recent non-confirmable notifications -> (peer, token).
        self._non_sent: OrderedDict[int, tuple[Address, bytes]] = OrderedDict()
        #: Datagrams that did not parse as CoAP (dropped).
        self.garbage = 0
        #: While set, every datagram is ignored (counted in ``ignored``): a device that sleeps.
        self.deaf = False
        self.ignored = 0
        #: Called when a peer resets a non-confirmable notification.
        self.on_reset: ResetHandler | None = None
        #: Block1 requests being received: (peer, method, path) -> the payload so far.
        self._blocks: OrderedDict[tuple[Address, Code, tuple[str, ...]], bytes] = OrderedDict()
        #: DTLS sessions by peer: a peer in here is never sent plaintext.
        self._sessions: dict[Address, _Session] = {}

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
        if self.deaf:
            self.ignored += 1
            return
        peer: Address = (addr[0], addr[1])
        if self._sessions:
            session = self._sessions.get(peer)
            if session is not None:
                self._secure_received(session, data, peer)
                return
        self._dispatch(data, peer)

    def _dispatch(self, data: bytes, peer: Address) -> None:
        """One CoAP message from ``peer`` (a datagram, or what a DTLS record carried)."""
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

    # --- DTLS sessions ------------------------------------------------------------------------------

    async def connect(self, peer: Address, credentials: ClientCredentials, timeout: float | None = None) -> None:
        """Open a DTLS session with ``peer`` (replacing an earlier one, which is closed first). From now
        on everything to and from ``peer`` goes through a session; until one is established, what is
        sent to it is dropped. ``HandshakeError`` when the handshake fails (bad credentials, a server
        certificate the trust anchors do not vouch for, no answer), ``TimeoutError`` after ``timeout``."""
        self.disconnect(peer)
        try:
            connection = ClientConnection(credentials, mtu=DTLS_MTU, handshake_timeout_min=self.timing.dtls_timeout_min,
                                          handshake_timeout_max=self.timing.dtls_timeout_max)
        except ValueError as exc:
            raise HandshakeError(str(exc)) from None
        session = _Session(connection, self._loop.create_future())
        self._sessions[peer] = session
        self._send_datagrams(connection.start(), peer)
        self._arm_handshake_timer(session, peer)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(session.ready)
        except BaseException as exc:
            if not session.ready.done():
                self._end_session(session, peer, HandshakeError("the handshake was abandoned"))
            if isinstance(exc, (HandshakeFailed, ConnectionClosed)):
                raise HandshakeError(f"DTLS handshake failed: {exc}") from None
            raise

    def secure(self, peer: Address) -> bool:
        """Whether ``peer`` has an established DTLS session."""
        session = self._sessions.get(peer)
        return session is not None and session.ended is None and session.connection.established

    def disconnect(self, peer: Address) -> None:
        """Close the DTLS session with ``peer`` (close_notify when established); the peer stays one that
        gets no plaintext until ``connect`` opens a new session."""
        session = self._sessions.get(peer)
        if session is None or session.ended is not None:
            return
        if session.connection.established:
            self._send_datagrams(session.connection.close(), peer)
        self._end_session(session, peer, HandshakeError("the DTLS session was closed"))

    def _arm_handshake_timer(self, session: _Session, peer: Address) -> None:
        interval = min(0.25, self.timing.dtls_timeout_min / 4)
        session.timer = self._loop.call_later(interval, self._handshake_timer, session, peer)

    def _handshake_timer(self, session: _Session, peer: Address) -> None:
        if session.ended is not None or session.connection.established:
            return
        try:
            progress = session.connection.on_timer()
        except HandshakeFailed as exc:
            self._end_session(session, peer, exc)
            return
        self._send_datagrams(progress.datagrams, peer)
        self._arm_handshake_timer(session, peer)

    def _secure_received(self, session: _Session, data: bytes, peer: Address) -> None:
        if session.ended is not None:
            return
        try:
            progress = session.connection.feed(data)
        except (HandshakeFailed, ConnectionClosed) as exc:
            self._end_session(session, peer, exc)
            return
        self._send_datagrams(progress.datagrams, peer)
        if progress.established and not session.ready.done():
            session.ready.set_result(None)
        for plaintext in progress.application_data:
            self._dispatch(plaintext, peer)

    def _end_session(self, session: _Session, peer: Address, reason: Exception) -> None:
        """The session is over: the handshake waiting on it fails, and so do the exchanges with ``peer``."""
        session.ended = reason
        if session.timer is not None:
            session.timer.cancel()
        if not session.ready.done():
            session.ready.set_exception(reason)
            session.ready.exception()  # retrieved: nobody may be waiting any more
        if session.connection.established:
            error = HandshakeError(f"the DTLS session ended: {reason}")
            for outgoing in {*self._by_token.values(), *self._by_mid.values()}:
                if outgoing.remote == peer and not outgoing.future.done():
                    outgoing.future.set_exception(error)

    # --- sending requests ---------------------------------------------------------------------------

    async def request(self, message: aiocoap.Message, remote: Address) -> aiocoap.Message:
        """Send ``message`` as a confirmable request to ``remote`` and return its response; a payload
        larger than ``timing.block_size`` goes block by block (Block1) and the final response is returned.
        ``HandshakeError`` at once when ``remote`` is a DTLS peer without an established session."""
        if self._sessions and remote in self._sessions and not self.secure(remote):
            raise HandshakeError("no DTLS session with the server")
        if len(message.payload) > self.timing.block_size:
            return await self._request_blockwise(message, remote)
        return await self._exchange(message, remote)

    async def _request_blockwise(self, message: aiocoap.Message, remote: Address) -> aiocoap.Message:
        """RFC 7959 Block1: each block is its own exchange; a 2.31 Continue asks for the next one. A
        server that answers with a smaller block size (in its Block1 option, or a 4.13 to the first
        block) gets the rest in that size."""
        payload = bytes(message.payload)
        size = self.timing.block_size
        offset = 0
        while True:
            more = offset + size < len(payload)
            block = message.copy(payload=payload[offset:offset + size])
            block.opt.block1 = BlockOption.BlockwiseTuple(offset // size, more, size.bit_length() - 5)
            block.opt.size1 = len(payload) if offset == 0 else None
            response = await self._exchange(block, remote)
            asked = response.opt.block1.size if response.opt.block1 is not None else size
            if response.code == Code.REQUEST_ENTITY_TOO_LARGE and offset == 0 and asked < size:
                size = asked  # start again in the size the server can take
                continue
            if not more or response.code != Code.CONTINUE:
                return response
            offset += size
            if asked < size:
                size = asked  # the offset stays a multiple of any smaller power of two

    async def _exchange(self, message: aiocoap.Message, remote: Address) -> aiocoap.Message:
        token = random.randbytes(TOKEN_BYTES)
        while token in self._by_token:
            token = random.randbytes(TOKEN_BYTES)
        message.token = token
        outgoing = self._confirmable(message, remote)
        self._by_token[token] = outgoing
        try:
            return await outgoing.future
        finally:
            self._forget(outgoing)

    def _confirmable(self, message: aiocoap.Message, remote: Address, notification: bool = False) -> _Outgoing:
        """Send ``message`` (its token set) as CON and arm its retransmission."""
        mid = self._new_mid()
        message.mtype, message.mid = Type.CON, mid
        timeout = self.timing.ack_timeout * random.uniform(1.0, self.timing.ack_random_factor)
        future: asyncio.Future[aiocoap.Message] = self._loop.create_future()
        outgoing = _Outgoing(message.encode(), mid, message.token, remote, future, timeout, self.timing.max_retransmit,
                             notification)
        self._by_mid[mid] = outgoing
        self._send(outgoing.data, remote)
        outgoing.timer = self._loop.call_later(timeout, self._retransmit, outgoing)
        return outgoing

    async def notify(self, message: aiocoap.Message, remote: Address, *, confirmable: bool) -> None:
        """Send a notification (a response carrying the observation's token and an Observe option).
        Confirmable: returns when acknowledged, raises ``PeerReset`` when the peer resets it and
        ``ExchangeTimeout`` when it is never acknowledged. Non-confirmable: returns at once; a Reset to
        it reaches ``on_reset``."""
        if confirmable:
            outgoing = self._confirmable(message, remote, notification=True)
            try:
                await outgoing.future
            finally:
                self._forget(outgoing)
            return
        message.mtype, message.mid = Type.NON, self._new_mid()
        self._non_sent[message.mid] = (remote, message.token)
        while len(self._non_sent) > NON_ENTRIES:
            self._non_sent.popitem(last=False)
        self._send(message.encode(), remote)

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
        if outgoing is None and message.mtype is Type.RST and message.mid in self._non_sent:
            remote, token = self._non_sent.pop(message.mid)
            if remote == peer and self.on_reset is not None:
                self.on_reset(peer, token)
            return
        if outgoing is None or outgoing.remote != peer or outgoing.future.done():
            return  # a late or stray ACK/RST: never answered
        if message.mtype is Type.RST:
            outgoing.future.set_exception(PeerReset("the peer answered with Reset"))
        elif outgoing.notification:
            outgoing.future.set_result(message)
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
        block1 = message.opt.block1
        response = self._handler(message, peer) if block1 is None else self._on_block(message, block1, peer)
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

    def _on_block(self, message: aiocoap.Message, block1: BlockOption.BlockwiseTuple, peer: Address
                  ) -> aiocoap.Message | None:
        """RFC 7959 Block1 from a server (a write larger than one block): the blocks are collected in
        order per peer, method and path, 2.31 asks for the next one, and the whole request goes to the
        handler with the last block; its answer carries the last Block1 option."""
        key = (peer, message.code, tuple(message.opt.uri_path))
        received = self._blocks.pop(key, b"") if block1.block_number else b""
        if block1.start != len(received):
            return aiocoap.Message(code=Code.REQUEST_ENTITY_INCOMPLETE)
        received += bytes(message.payload)
        if len(received) > MAX_BLOCKWISE_PAYLOAD:
            return aiocoap.Message(code=Code.REQUEST_ENTITY_TOO_LARGE)
        echo = BlockOption.BlockwiseTuple(block1.block_number, block1.more, block1.size_exponent)
        if block1.more:
            self._blocks[key] = received
            while len(self._blocks) > BLOCKWISE_ENTRIES:
                self._blocks.pop(next(iter(self._blocks)))
            answer = aiocoap.Message(code=Code.CONTINUE)
            answer.opt.block1 = echo
            return answer
        whole = message.copy(payload=received)
        whole.opt.block1 = None
        response = self._handler(whole, peer)
        if response is not None:
            response.opt.block1 = echo
        return response

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
        """Send one CoAP message: through the peer's DTLS session when it has one (dropped while that is
        not established), else as a datagram."""
        if self._sessions:
            session = self._sessions.get(peer)
            if session is not None:
                if session.ended is None and session.connection.established:
                    try:
                        self._send_datagrams(session.connection.encrypt(data), peer)
                    except ConnectionClosed as exc:
                        self._end_session(session, peer, exc)
                return
        self._send_datagrams((data,), peer)

    def _send_datagrams(self, datagrams: Iterable[bytes], peer: Address) -> None:
        if self._transport is not None and not self._transport.is_closing():
            for datagram in datagrams:
                self._transport.sendto(datagram, peer)

    def _fail_all(self, error: ExchangeError) -> None:
        for outgoing in {*self._by_token.values(), *self._by_mid.values()}:
            if not outgoing.future.done():
                outgoing.future.set_exception(error)
            self._forget(outgoing)

    def close(self) -> None:
        """Close the DTLS sessions (close_notify) and the socket; requests in flight fail with ``ExchangeError``."""
        for peer in list(self._sessions):
            self.disconnect(peer)
        self._fail_all(ExchangeError("the endpoint was closed"))
        if self._transport is not None:
            self._transport.close()
