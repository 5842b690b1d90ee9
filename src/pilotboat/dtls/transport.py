"""An aiocoap message interface that serves CoAP over DTLS on one UDP socket.

Sessions are kept by peer address. A peer gets state only once its ClientHello carried a valid cookie.
A ClientHello with a new client random and a valid cookie from the same address replaces its session
(a client that restarted); a repeated one (a retransmission) goes to the session's own handshake. Every message that arrives has a ``DtlsRemote`` as ``remote``, which carries the identity
the handshake authenticated; responses and server-to-client requests sent to that remote go out over
its session.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from aiocoap import Message, error, interfaces
from aiocoap.numbers.constants import MAX_REGULAR_BLOCK_SIZE_EXP
from aiocoap.util import hostportjoin

from pilotboat.dtls.engine import (
    ConnectionClosed,
    HandshakeFailed,
    Progress,
    ServerConnection,
    ServerCredentials,
    ServerEngine,
)
from pilotboat.dtls.records import (
    CERTIFICATE,
    CLIENT_KEY_EXCHANGE,
    HandshakeReader,
    certificate_chain,
    client_hello_random,
    opens_with_client_hello,
    psk_identity,
)
from pilotboat.model.peer import PeerIdentity

Address = tuple[Any, ...]


@dataclass(frozen=True)
class Limits:
    """Bounds on what peers can make the server keep."""

    max_sessions: int = 10_000
    #: An established session without traffic for this long is dropped.
    idle_timeout: float = 600.0
    #: A handshake not finished within this long is dropped.
    handshake_timeout: float = 30.0
    #: How often handshakes are checked for a due retransmission.
    retransmit_check: float = 0.25
    #: Datagrams held for a peer while its credentials are being looked up.
    max_backlog: int = 16


class DtlsRemote(interfaces.EndpointAddress):
    """A DTLS peer as aiocoap sees it; ``peer_identity`` is what its handshake authenticated."""

    scheme = "coaps"
    is_multicast = False
    is_multicast_locally = False
    maximum_block_size_exp = MAX_REGULAR_BLOCK_SIZE_EXP

    def __init__(self, address: Address, local: Address, peer_identity: PeerIdentity) -> None:
        self.address = address
        self._local = local
        self.peer_identity = peer_identity

    def __repr__(self) -> str:
        return f"<DtlsRemote {self.hostinfo} {self.peer_identity!r}>"

    @property
    def sockaddr(self) -> Address:
        """The peer's socket address, as aiocoap's UDP remotes have it."""
        return self.address

    @property
    def hostinfo(self) -> str:
        return hostportjoin(self.address[0], self.address[1])

    @property
    def hostinfo_local(self) -> str:
        return hostportjoin(self._local[0], self._local[1])

    @property
    def uri_base(self) -> str:
        return "coaps://" + self.hostinfo

    @property
    def uri_base_local(self) -> str:
        return "coaps://" + self.hostinfo_local

    @property
    def authenticated_claims(self) -> tuple[PeerIdentity]:
        return (self.peer_identity,)

    @property
    def blockwise_key(self) -> tuple[Address, PeerIdentity]:
        return (self.address, self.peer_identity)


class SessionEnded(error.NetworkError):
    """The DTLS session a request was sent over ended (closed, dropped, or never there)."""


def peer_identity(message: Message) -> PeerIdentity | None:
    """The identity authenticated for a message's sender; None for plain CoAP."""
    remote = message.remote
    return remote.peer_identity if isinstance(remote, DtlsRemote) else None


@dataclass(eq=False)
class _Session:
    address: Address
    connection: ServerConnection
    started: float
    last_seen: float
    hello_random: bytes
    reader: HandshakeReader = field(default_factory=HandshakeReader)
    psk: dict[bytes, bytes] = field(default_factory=dict)
    chain: tuple[bytes, ...] = ()
    chain_checked: bool = False
    remote: DtlsRemote | None = None
    backlog: deque[bytes] | None = None
    timer: asyncio.TimerHandle | None = None


class DtlsServerTransport(asyncio.DatagramProtocol, interfaces.MessageInterface):
    """One UDP socket, many DTLS sessions, CoAP messages in and out."""

    def __init__(
        self, mman: interfaces.MessageManager, engine: ServerEngine, credentials: ServerCredentials,
        limits: Limits, log: logging.Logger,
    ) -> None:
        self._mman: interfaces.MessageManager | None = mman
        self._engine = engine
        self._credentials = credentials
        self._limits = limits
        self._log = log
        self._sessions: OrderedDict[Address, _Session] = OrderedDict()
        self._socket: asyncio.DatagramTransport | None = None
        self._local: Address = ("", 0)
        self._sweeper: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def create(
        cls, mman: interfaces.MessageManager, engine: ServerEngine, credentials: ServerCredentials,
        bind: tuple[str, int], limits: Limits, log: logging.Logger,
    ) -> DtlsServerTransport:
        self = cls(mman, engine, credentials, limits, log)
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=bind)
        return self

    # --- observation ---------------------------------------------------------------------------

    @property
    def session_count(self) -> int:
        """Peers with state: handshakes in progress and established sessions."""
        return len(self._sessions)

    @property
    def established_count(self) -> int:
        return sum(1 for session in self._sessions.values() if session.remote is not None)

    @property
    def local_address(self) -> Address:
        return self._local

    # --- asyncio.DatagramProtocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._socket = transport  # type: ignore[assignment]
        self._local = transport.get_extra_info("sockname")
        self._schedule_sweep()

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self._mman is None:
            return
        try:
            self._received(data, addr)
        except Exception:  # one peer's datagram must never stop the others being served
            self._log.exception("DTLS: dropping %s after an unexpected error", hostportjoin(addr[0], addr[1]))
            self._drop(addr, ConnectionClosed("internal error"))

    def error_received(self, exc: Exception) -> None:
        self._log.debug("DTLS socket error: %s", exc)

    # --- aiocoap MessageInterface ----------------------------------------------------------------

    def send(self, message: Message) -> None:
        remote = message.remote
        session = self._sessions.get(getattr(remote, "address", None))  # type: ignore[arg-type]
        if session is None or session.remote is not remote:
            self._fail_later(remote, SessionEnded("the DTLS session of this peer is gone"))
            return
        try:
            datagrams = session.connection.encrypt(message.encode())
        except ConnectionClosed as exc:
            self._drop(session.address, exc)
            return
        self._send_all(datagrams, session.address)

    async def recognize_remote(self, remote: object) -> bool:
        if not isinstance(remote, DtlsRemote):
            return False
        session = self._sessions.get(remote.address)
        return session is not None and session.remote is remote

    async def determine_remote(self, message: Message) -> None:
        """A DTLS server never opens sessions itself: requests go to remotes it already serves."""
        return None

    async def shutdown(self) -> None:
        self._mman = None
        for address in list(self._sessions):
            session = self._sessions[address]
            if session.remote is not None:
                self._send_all(session.connection.close(), address)
            self._drop(address, error.LibraryShutdown("shutting down"))
        for task in list(self._tasks):
            task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._socket is not None:
            self._socket.close()

    # --- incoming --------------------------------------------------------------------------------

    def _received(self, data: bytes, addr: Address) -> None:
        session = self._sessions.get(addr)
        if opens_with_client_hello(data):
            if session is None or session.hello_random != client_hello_random(data):
                self._hello(data, addr)
                return
            if session.remote is not None:
                return  # a late copy of the hello that opened an established session
        if session is None:
            return  # not a ClientHello from an unknown peer: nothing to answer
        if session.backlog is not None:
            if len(session.backlog) < self._limits.max_backlog:
                session.backlog.append(data)
            return
        self._sessions.move_to_end(addr)
        session.last_seen = time.monotonic()
        if session.remote is None and self._needs_lookup(session, data):
            session.backlog = deque()
            self._spawn(self._look_up_then_feed(session, data))
            return
        self._feed(session, data)

    def _hello(self, data: bytes, addr: Address) -> None:
        connection, reply = self._engine.accept(data, _client_id(addr))
        self._send_all(reply, addr)
        if connection is None:
            return
        if addr in self._sessions:
            self._drop(addr, ConnectionClosed("the peer started a new handshake"))
        while len(self._sessions) >= self._limits.max_sessions:
            oldest = next(iter(self._sessions))
            self._log.info("DTLS: session cap reached, dropping the least recently active peer")
            self._drop(oldest, ConnectionClosed("session cap reached"))
        now = time.monotonic()
        session = _Session(addr, connection, now, now, client_hello_random(data))
        session.reader.feed(data)
        self._sessions[addr] = session
        self._arm_retransmission(session)

    def _needs_lookup(self, session: _Session, data: bytes) -> bool:
        """Note the credentials in this datagram; True when one must be looked up before feeding it."""
        pending = False
        for msg_type, body in session.reader.feed(data):
            if msg_type == CLIENT_KEY_EXCHANGE and self._credentials.psk_for is not None:
                identity = psk_identity(body)
                if identity is not None and identity not in session.psk:
                    session.psk[identity] = b""
                    pending = True
            elif msg_type == CERTIFICATE:
                session.chain = certificate_chain(body) or ()
                pending = pending or self._credentials.accept_chain is not None
        return pending

    async def _look_up_then_feed(self, session: _Session, data: bytes) -> None:
        addr = session.address
        try:
            for identity, key in list(session.psk.items()):
                if not key:
                    assert self._credentials.psk_for is not None
                    found = await self._credentials.psk_for(identity)
                    if found:
                        session.psk[identity] = found
                    else:
                        del session.psk[identity]
            if session.chain and self._credentials.accept_chain is not None:
                if not await self._credentials.accept_chain(session.chain):
                    self._log.info("DTLS: certificate chain refused for %s", hostportjoin(addr[0], addr[1]))
                    self._drop(addr, HandshakeFailed("certificate refused"))
                    return
                session.chain_checked = True
        except Exception:
            self._log.exception("DTLS: credential look-up failed")
            self._drop(addr, HandshakeFailed("credential look-up failed"))
            return
        if self._sessions.get(addr) is not session:
            return
        backlog, session.backlog = session.backlog or deque(), None
        self._feed(session, data)
        while backlog and self._sessions.get(addr) is session:
            self._received(backlog.popleft(), addr)

    def _feed(self, session: _Session, data: bytes) -> None:
        try:
            progress = session.connection.feed(data, session.psk)
        except (HandshakeFailed, ConnectionClosed) as exc:
            # A failed handshake is worth an operator's look; a session that ended is routine.
            level = logging.INFO if isinstance(exc, HandshakeFailed) else logging.DEBUG
            self._log.log(level, "DTLS: %s: %s", hostportjoin(session.address[0], session.address[1]), exc)
            self._drop(session.address, exc)
            return
        self._advance(session, progress)

    def _advance(self, session: _Session, progress: Progress) -> None:
        self._send_all(progress.datagrams, session.address)
        if progress.established:
            if session.timer is not None:
                session.timer.cancel()
            identity = self._identity(session)
            if identity is None:
                self._log.info("DTLS: %s: no usable identity, dropped", hostportjoin(session.address[0], session.address[1]))
                self._drop(session.address, HandshakeFailed("no usable identity"))
                return
            session.remote = DtlsRemote(session.address, self._local, identity)
            session.reader = HandshakeReader()
        for plaintext in progress.application_data:
            self._deliver(session, plaintext)

    def _identity(self, session: _Session) -> PeerIdentity | None:
        """What the finished handshake authenticated: the PSK identity, or the chain the client sent,
        which must start with the certificate the engine verified and must have passed ``accept_chain``."""
        connection = session.connection
        if connection.psk_identity is not None:
            return PeerIdentity(psk_identity=connection.psk_identity)
        leaf = connection.peer_certificate
        if not session.chain or leaf is None or session.chain[0] != leaf:
            return None
        if self._credentials.accept_chain is not None and not session.chain_checked:
            return None
        return PeerIdentity(certificate_chain=session.chain)

    def _deliver(self, session: _Session, plaintext: bytes) -> None:
        if self._mman is None or session.remote is None:
            return
        try:
            message = Message.decode(plaintext, remote=session.remote)
        except (error.UnparsableMessage, ValueError):
            self._log.debug("DTLS: ignoring an unparsable CoAP message from %s", session.remote.hostinfo)
            return
        self._mman.dispatch_message(message)

    # --- timers ----------------------------------------------------------------------------------

    def _arm_retransmission(self, session: _Session) -> None:
        loop = asyncio.get_running_loop()
        session.timer = loop.call_later(self._limits.retransmit_check, self._retransmit, session)

    def _retransmit(self, session: _Session) -> None:
        if self._sessions.get(session.address) is not session or session.remote is not None:
            return
        if session.backlog is None:
            try:
                progress = session.connection.on_timer()
            except HandshakeFailed as exc:
                self._drop(session.address, exc)
                return
            self._advance(session, progress)
        if session.remote is None:
            self._arm_retransmission(session)

    def _schedule_sweep(self) -> None:
        interval = min(self._limits.idle_timeout, self._limits.handshake_timeout) / 4
        self._sweeper = asyncio.get_running_loop().call_later(interval, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        for address, session in list(self._sessions.items()):
            if session.remote is None and now - session.started > self._limits.handshake_timeout:
                self._drop(address, HandshakeFailed("handshake took too long"))
            elif session.remote is not None and now - session.last_seen > self._limits.idle_timeout:
                self._drop(address, ConnectionClosed("idle"))
        if self._mman is not None:
            self._schedule_sweep()

    # --- helpers ---------------------------------------------------------------------------------

    def _send_all(self, datagrams: list[bytes], addr: Address) -> None:
        if self._socket is None:
            return
        for datagram in datagrams:
            self._socket.sendto(datagram, addr)

    def _drop(self, addr: Address, reason: Exception) -> None:
        session = self._sessions.pop(addr, None)
        if session is None:
            return
        if session.timer is not None:
            session.timer.cancel()
        if session.remote is not None and self._mman is not None:
            # Requests waiting on this peer fail with an aiocoap error, as on any other transport.
            ended = reason if isinstance(reason, error.Error) else SessionEnded(f"the DTLS session ended: {reason}")
            self._mman.dispatch_error(ended, session.remote)

    def _fail_later(self, remote: object, reason: Exception) -> None:
        if self._mman is not None:
            asyncio.get_running_loop().call_soon(self._mman.dispatch_error, reason, remote)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _client_id(addr: Address) -> bytes:
    return hostportjoin(addr[0], addr[1]).encode()
