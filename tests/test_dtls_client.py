"""The DTLS client (``pilotboat.dtls.client``) against the DTLS server transport over loopback: PSK and
certificate handshakes, failures, retransmission when datagrams are lost, and requests both ways."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from cryptography.hazmat.primitives import serialization
from dtls_helpers import PSK_IDENTITY, PSK_KEY, Pki, dtls_server, psk_credentials

from pilotboat.dtls.client import ClientConnection, ClientCredentials, ConnectionClosed, HandshakeFailed
from pilotboat.dtls.engine import ServerCredentials
from pilotboat.dtls.mbedtls_engine import CERTIFICATE_SUITES, PSK_SUITES
from pilotboat.dtls.transport import Limits

#: Short handshake timers: retransmission after 0.1 s, doubling; the handshake fails after 0.1+…+0.8 s.
QUICK = {"handshake_timeout_min": 0.1, "handshake_timeout_max": 0.8}
POLL = 0.01


def run(coroutine: object, limit: float = 30) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coroutine, limit)  # type: ignore[arg-type]

    asyncio.run(bounded())


def der_key(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def certificate_server(material: Pki) -> ServerCredentials:
    async def accept_chain(chain: tuple[bytes, ...]) -> bool:
        return True

    return ServerCredentials(certificate_chain=material.server_chain, private_key=material.server_key_der(),
                             trust_anchors=material.anchors, accept_chain=accept_chain)


def client_certificate(material: Pki, trusted: Pki | None = None) -> ClientCredentials:
    """The test client's certificate; the server is checked against ``trusted``'s CA (default: its own)."""
    anchor = (trusted or material).der((trusted or material).ca.certificate)
    return ClientCredentials.certificate((material.der(material.client_certificate),), der_key(material.client_key),
                                         (anchor,))


Drop = Callable[[int, bytes], bool]


class Driver(asyncio.DatagramProtocol):
    """Runs a ``ClientConnection`` over a UDP socket; ``drop_out``/``drop_in`` lose datagrams by their
    index (the client's own, the server's) to simulate a lossy network."""

    def __init__(self, connection: ClientConnection, *, drop_out: Drop | None = None, drop_in: Drop | None = None) -> None:
        self.connection = connection
        self.drop_out, self.drop_in = drop_out, drop_in
        #: Every datagram the client sent (lost ones too) and when.
        self.sent: list[tuple[float, bytes]] = []
        self.received_count = 0
        self.messages: asyncio.Queue[aiocoap.Message] = asyncio.Queue()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: Exception | None = None
        self._socket: asyncio.DatagramTransport | None = None
        self._poller: asyncio.Task[None] | None = None
        self._mid = 0

    async def connect(self, port: int) -> None:
        """Handshake; raises what the connection raised."""
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, remote_addr=("127.0.0.1", port))
        self._send(self.connection.start())
        self._poller = loop.create_task(self._poll())
        try:
            await self.done
        finally:
            self._poller.cancel()

    async def _poll(self) -> None:
        while not self.done.done():
            await asyncio.sleep(POLL)
            try:
                self._send(self.connection.on_timer().datagrams)
            except HandshakeFailed as exc:
                self.done.set_exception(exc)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._socket = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        index, self.received_count = self.received_count, self.received_count + 1
        if self.drop_in is not None and self.drop_in(index, data):
            return
        try:
            progress = self.connection.feed(data)
        except HandshakeFailed as exc:
            if not self.done.done():
                self.done.set_exception(exc)
            return
        except ConnectionClosed as exc:
            self.closed = exc
            return
        self._send(progress.datagrams)
        if progress.established:
            self.done.set_result(None)
        for plaintext in progress.application_data:
            self.messages.put_nowait(aiocoap.Message.decode(plaintext))

    def _send(self, datagrams: list[bytes]) -> None:
        for datagram in datagrams:
            index = len(self.sent)
            self.sent.append((time.monotonic(), datagram))
            if self._socket is not None and not (self.drop_out is not None and self.drop_out(index, datagram)):
                self._socket.sendto(datagram)

    def send_message(self, message: aiocoap.Message) -> None:
        self._send(self.connection.encrypt(message.encode()))

    async def request(self, code: Code, path: str) -> aiocoap.Message:
        self._mid += 1
        message = aiocoap.Message(code=code, uri_path=tuple(path.split("/")))
        message.mtype, message.mid, message.token = aiocoap.CON, self._mid, self._mid.to_bytes(2, "big")
        self.send_message(message)
        return await asyncio.wait_for(self.messages.get(), 5)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()


def hellos(driver: Driver) -> list[float]:
    """When the client sent a ClientHello (plaintext handshake record, message type 1)."""
    return [at for at, datagram in driver.sent if datagram[0] == 22 and datagram[13] == 1]


@pytest.mark.parametrize("mode", ["psk", "certificate"])
def test_handshake_and_requests_with_psk_or_certificate(mode: str) -> None:
    async def scenario() -> None:
        material = Pki()
        if mode == "psk":
            server, credentials, suites, expected = psk_credentials(), ClientCredentials.psk(PSK_IDENTITY, PSK_KEY), PSK_SUITES, PSK_IDENTITY
        else:
            server, credentials, suites, expected = certificate_server(material), client_certificate(material), CERTIFICATE_SUITES, b"chain:1"
        async with dtls_server(server) as (_, transport, who, port):
            driver = Driver(ClientConnection(credentials, **QUICK))
            try:
                await driver.connect(port)
                assert driver.connection.established and driver.connection.cipher_suite in suites
                if mode == "certificate":  # the server presented its own certificate, which the client checked
                    assert driver.connection.peer_certificate == material.server_chain[0]
                for _ in range(2):
                    answer = await driver.request(Code.GET, "who")
                    assert answer.code == Code.CONTENT and answer.payload == expected
                assert transport.established_count == 1
                identity = who.requests[0].remote.peer_identity
                assert (identity.psk_identity == PSK_IDENTITY) if mode == "psk" else (
                    identity.certificate_chain == (material.der(material.client_certificate),))
            finally:
                driver.close()
    run(scenario())


@pytest.mark.parametrize("credentials", [ClientCredentials.psk(PSK_IDENTITY, b"wrong-key-012345"),
                                         ClientCredentials.psk(b"nobody", PSK_KEY)], ids=["wrong key", "unknown identity"])
def test_a_wrong_key_or_an_unknown_identity_fails_the_handshake(credentials: ClientCredentials) -> None:
    async def scenario() -> None:
        async with dtls_server(psk_credentials(), Limits(handshake_timeout=1.0)) as (_, transport, who, port):
            driver = Driver(ClientConnection(credentials, **QUICK))
            started = time.monotonic()
            try:
                with pytest.raises(HandshakeFailed):
                    await driver.connect(port)
            finally:
                driver.close()
            # the client gave up after its retransmissions (0.1 + 0.2 + 0.4 + 0.8 s), never established
            assert 0.5 < time.monotonic() - started < 5
            assert not driver.connection.established and who.requests == [] and transport.established_count == 0
            with pytest.raises(ConnectionClosed):
                driver.connection.encrypt(b"no session")
    run(scenario())


def test_a_server_certificate_that_does_not_chain_to_the_trust_anchor_is_refused_at_once() -> None:
    async def scenario() -> None:
        material, stranger = Pki("Trusted"), Pki("Stranger")
        async with dtls_server(certificate_server(material)) as (_, transport, who, port):
            # slow timers: a failure within them is the certificate check, not a timeout
            driver = Driver(ClientConnection(client_certificate(material, trusted=stranger),
                                             handshake_timeout_min=5, handshake_timeout_max=10))
            started = time.monotonic()
            try:
                with pytest.raises(HandshakeFailed, match="(?i)verif|certificate|x509"):
                    await driver.connect(port)
            finally:
                driver.close()
            assert time.monotonic() - started < 3
            assert who.requests == [] and transport.established_count == 0
            # the same client trusting the right anchor gets in
            driver = Driver(ClientConnection(client_certificate(material), **QUICK))
            try:
                await driver.connect(port)
                assert (await driver.request(Code.GET, "who")).payload == b"chain:1"
            finally:
                driver.close()
    run(scenario())


def test_the_handshake_survives_lost_datagrams_with_doubling_retransmission_timeouts() -> None:
    async def scenario() -> None:
        async with dtls_server(psk_credentials()) as (_, transport, who, port):
            # The first three ClientHellos are lost on the way out, then the server's first flight
            # after the cookie exchange (its datagram 1: the ServerHello...) on the way back.
            driver = Driver(ClientConnection(ClientCredentials.psk(PSK_IDENTITY, PSK_KEY),
                                             handshake_timeout_min=0.1, handshake_timeout_max=3.2),
                            drop_out=lambda index, _: index < 3, drop_in=lambda index, _: index == 1)
            try:
                await driver.connect(port)
                assert (await driver.request(Code.GET, "who")).payload == PSK_IDENTITY
            finally:
                driver.close()
            sent = hellos(driver)
            gaps = [later - earlier for earlier, later in zip(sent, sent[1:])]
            # 3 lost + the one answered by the HelloVerifyRequest + the one with the cookie + its
            # retransmission after the lost server flight
            assert len(sent) == 6, gaps
            assert gaps[0] >= 0.09 and gaps[1] >= 1.6 * gaps[0] and gaps[2] >= 1.6 * gaps[1], gaps
            assert gaps[4] >= 0.09  # the lost flight was asked for again after a timeout, not at once
    run(scenario())


def test_no_server_fails_the_handshake_after_the_retransmissions() -> None:
    async def scenario() -> None:
        async with dtls_server(psk_credentials()) as (_, _transport, _who, port):
            driver = Driver(ClientConnection(ClientCredentials.psk(PSK_IDENTITY, PSK_KEY), **QUICK),
                            drop_out=lambda index, _: True)
            started = time.monotonic()
            try:
                with pytest.raises(HandshakeFailed):
                    await driver.connect(port)
            finally:
                driver.close()
            assert 1.2 < time.monotonic() - started < 4  # 0.1 + 0.2 + 0.4 + 0.8 (and the last wait)
            assert len(hellos(driver)) == 4
    run(scenario())


def test_the_server_sends_a_request_over_the_session_and_close_ends_it() -> None:
    async def scenario() -> None:
        async with dtls_server(psk_credentials()) as (context, transport, who, port):
            driver = Driver(ClientConnection(ClientCredentials.psk(PSK_IDENTITY, PSK_KEY), **QUICK))
            try:
                await driver.connect(port)
                await driver.request(Code.GET, "who")
                outgoing = aiocoap.Message(code=Code.GET, uri_path=("3", "0", "0"))
                outgoing.remote = who.requests[0].remote
                pending = asyncio.ensure_future(context.request(outgoing).response)
                request = await asyncio.wait_for(driver.messages.get(), 5)
                assert request.code == Code.GET and request.opt.uri_path == ("3", "0", "0")
                reply = aiocoap.Message(code=Code.CONTENT, payload=b"Pilotboat")
                reply.mtype, reply.mid, reply.token = aiocoap.ACK, request.mid, request.token
                driver.send_message(reply)
                response = await asyncio.wait_for(pending, 5)
                assert response.code == Code.CONTENT and response.payload == b"Pilotboat"

                driver._send(driver.connection.close())
                deadline = time.monotonic() + 3
                while transport.session_count and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                assert transport.session_count == 0
            finally:
                driver.close()
    run(scenario())


def test_credentials_are_checked_and_never_shown() -> None:
    material = Pki()
    certificate = client_certificate(material)
    for bad in (
        lambda: ClientCredentials(),
        lambda: ClientCredentials.psk(b"", PSK_KEY),
        lambda: ClientCredentials.psk(PSK_IDENTITY, b""),
        lambda: ClientCredentials.psk(b"\xff\xfe", PSK_KEY),
        lambda: ClientCredentials.certificate(certificate.certificate_chain, certificate.private_key or b"", ()),
        lambda: ClientCredentials(psk_identity=PSK_IDENTITY, psk_key=PSK_KEY, trust_anchors=certificate.trust_anchors),
    ):
        with pytest.raises(ValueError):
            bad()
    assert PSK_KEY.hex() not in repr(ClientCredentials.psk(PSK_IDENTITY, PSK_KEY))
    assert "secret" not in repr(ClientCredentials.psk(PSK_IDENTITY, PSK_KEY))
    with pytest.raises(ValueError, match="unusable certificate material"):
        ClientConnection(ClientCredentials.certificate((b"not a certificate",), b"nor a key", (b"x",)))
    with pytest.raises(ValueError):
        ClientConnection(ClientCredentials.psk(PSK_IDENTITY, PSK_KEY), handshake_timeout_min=2, handshake_timeout_max=1)
