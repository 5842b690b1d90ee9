"""DTLS test peers and material: a CoAP site that reports who asked, test PKI, a python-mbedtls client."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiocoap
from aiocoap import resource
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from mbedtls.tls import ClientContext, DTLSConfiguration, DTLSVersion, TrustStore, WantReadError, WantWriteError
from mbedtls import pk, x509 as mx509
from mbedtls.exceptions import TLSError

from pilotboat.dtls import records
from pilotboat.dtls.engine import ServerCredentials
from pilotboat.dtls.server import dtls_transport, serve_dtls
from pilotboat.dtls.transport import DtlsServerTransport, Limits, peer_identity
from pilotboat.security import pki

PSK_IDENTITY = b"urn:imei:356938035643809"
PSK_KEY = b"secret-PSK-16byt"


class WhoAmI(resource.Resource):
    """Answers with the identity the transport attached to the request; remembers the requests."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[aiocoap.Message] = []

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        self.requests.append(request)
        identity = peer_identity(request)
        assert identity is not None
        text = identity.psk_identity if identity.psk_identity is not None else b"chain:%d" % len(identity.certificate_chain)
        return aiocoap.Message(payload=text)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Pki:
    """A test CA, a server certificate, a client certificate; all P-256."""

    def __init__(self, name: str = "Test") -> None:
        self.ca = pki.generate_ca(name)
        self.server_key = pki.new_key()
        self.server_certificate = _server_certificate(self.ca, self.server_key)
        self.client_key = pki.new_key()
        self.client_certificate = pki.issue_device_certificate(
            self.ca, self.client_key.public_key(), "urn:dev:client", uuid.uuid4(), timedelta(days=1)
        )

    def der(self, certificate: object) -> bytes:
        return certificate.public_bytes(serialization.Encoding.DER)  # type: ignore[attr-defined]

    @property
    def anchors(self) -> tuple[bytes, ...]:
        """The issuing CA and its root: clients that send only their leaf still chain up."""
        return tuple(self.der(c) for c in self.ca.chain)

    @property
    def server_chain(self) -> tuple[bytes, ...]:
        return (self.der(self.server_certificate), self.der(self.ca.certificate))

    @property
    def client_chain(self) -> tuple[bytes, ...]:
        return (self.der(self.client_certificate), self.der(self.ca.certificate))

    def server_key_der(self) -> bytes:
        return self.server_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def write_client_files(self, directory: Path) -> dict[str, Path]:
        """PEM files for an external client: certificate chain, key, root CA."""
        files = {
            "cert": directory / "client.pem", "key": directory / "client.key", "ca": directory / "ca.pem",
        }
        files["cert"].write_text(pki.chain_pem([self.client_certificate, self.ca.certificate]))
        files["key"].write_text(pki.key_pem(self.client_key))
        files["ca"].write_text(pki.chain_pem(list(self.ca.parents)))
        return files


def _server_certificate(ca: pki.CertificateAuthority, key: pki.PrivateKey) -> x509.Certificate:
    """A server-authentication certificate for 127.0.0.1 (device certificates are for clients only)."""
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


def psk_credentials(keys: dict[bytes, bytes] | None = None, lookups: list[bytes] | None = None) -> ServerCredentials:
    store = {PSK_IDENTITY: PSK_KEY} if keys is None else keys

    async def psk_for(identity: bytes) -> bytes | None:
        if lookups is not None:
            lookups.append(identity)
        await asyncio.sleep(0)  # a real look-up waits on the database
        return store.get(identity)

    return ServerCredentials(psk_for=psk_for)


@asynccontextmanager
async def dtls_server(
    credentials: ServerCredentials, limits: Limits = Limits()
) -> AsyncIterator[tuple[aiocoap.Context, DtlsServerTransport, WhoAmI, int]]:
    who = WhoAmI()
    site = resource.Site()
    site.add_resource(["who"], who)
    port = free_port()
    context = await serve_dtls(site, "127.0.0.1", port, name="dtls-test", credentials=credentials, limits=limits)
    try:
        yield context, dtls_transport(context), who, port
    finally:
        await context.shutdown()


async def coap_client(binary: str, port: int, *args: str, path: str = "who", timeout: float = 5.0) -> tuple[int, str]:
    """Run a libcoap client GET; (exit code, stdout)."""
    process = await asyncio.create_subprocess_exec(
        binary, "-B", str(int(timeout)), *args, f"coaps://127.0.0.1:{port}/{path}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout + 10)
    return process.returncode or 0, out.decode(errors="replace")


class MbedtlsClient(asyncio.DatagramProtocol):
    """A DTLS client on python-mbedtls over a real UDP socket; answers server requests with ``answer``."""

    def __init__(self, configuration: DTLSConfiguration) -> None:
        self._buffer = ClientContext(configuration).wrap_buffers(None)
        self._socket: asyncio.DatagramTransport | None = None
        self.connected = asyncio.Event()
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        #: Every datagram from the server, with its arrival time.
        self.datagrams: list[tuple[float, bytes]] = []
        #: When set, the server's first flight after the cookie exchange is lost (for this many seconds).
        self.lose_first_flight_for: float = 0.0
        self._first_flight_at: float | None = None
        #: The last ClientHello this client sent.
        self.last_hello = b""

    @classmethod
    def psk(cls, identity: bytes = PSK_IDENTITY, key: bytes = PSK_KEY, suite: str = "TLS-PSK-WITH-AES-128-CCM-8") -> MbedtlsClient:
        return cls(DTLSConfiguration(
            pre_shared_key=(identity.decode(), key), validate_certificates=False,
            ciphers=(suite,), lowest_supported_version=DTLSVersion.DTLSv1_2,
        ))

    @classmethod
    def certificate(cls, material: Pki, suite: str = "TLS-ECDHE-ECDSA-WITH-AES-128-CCM-8") -> MbedtlsClient:
        key = pk.ECC.from_DER(material.client_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))
        chain = tuple(mx509.CRT.from_DER(der) for der in material.client_chain)
        return cls(DTLSConfiguration(
            certificate_chain=(chain, key), trust_store=TrustStore([mx509.CRT.from_DER(d) for d in material.anchors]),
            validate_certificates=False, ciphers=(suite,),
            lowest_supported_version=DTLSVersion.DTLSv1_2,
        ))

    async def connect(self, port: int, local_port: int = 0, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(
            lambda: self, local_addr=("127.0.0.1", local_port), remote_addr=("127.0.0.1", port)
        )
        self._step()
        await asyncio.wait_for(self.connected.wait(), timeout)

    @property
    def cipher_suite(self) -> str | None:
        return self._buffer.cipher()

    @property
    def local_port(self) -> int:
        assert self._socket is not None
        return self._socket.get_extra_info("sockname")[1]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._socket = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        now = time.monotonic()
        self.datagrams.append((now, data))
        if self.lose_first_flight_for and len(data) > 13 and data[0] == 22 and data[13] == 2 and self._first_flight_at is None:
            self._first_flight_at = now  # the ServerHello opens the server's first flight
        if self._first_flight_at is not None and now - self._first_flight_at < self.lose_first_flight_for:
            return
        self._buffer.receive_from_network(data)
        if not self.connected.is_set():
            self._step()
            if not self.connected.is_set():
                return
        while True:
            try:
                chunk = self._buffer.read(4096)
            except (WantReadError, TLSError):
                break
            if not chunk:
                break
            self.received.put_nowait(chunk)

    def first_flight(self) -> bytes:
        """The ClientHello this client would send first (for replaying it from elsewhere)."""
        for _ in range(8):
            try:
                self._buffer.do_handshake()
            except (WantReadError, WantWriteError):
                pass
            pending = self._buffer.peek_outgoing(1 << 15)
            if pending:
                return pending
        raise AssertionError("no ClientHello")

    def _step(self) -> None:
        for _ in range(64):
            try:
                self._buffer.do_handshake()
            except WantReadError:
                break
            except WantWriteError:
                pass
            if self._buffer.cipher() is not None:
                self.connected.set()
                break
        self._flush()

    def _flush(self) -> None:
        pending = self._buffer.peek_outgoing(1 << 15)
        if pending and self._socket is not None:
            if pending[0] == 22 and pending[13] == 1:
                self.last_hello = pending
            self._buffer.consume_outgoing(len(pending))
            self._socket.sendto(pending)

    def send_message(self, message: aiocoap.Message) -> None:
        self._buffer.write(message.encode())
        self._flush()

    async def request(self, message: aiocoap.Message, timeout: float = 5.0) -> aiocoap.Message:
        self._mid = getattr(self, "_mid", 0) + 1
        message.mtype, message.mid, message.token = aiocoap.CON, self._mid, self._mid.to_bytes(2, "big")
        self.send_message(message)
        return aiocoap.Message.decode(await asyncio.wait_for(self.received.get(), timeout))

    def close_notify(self) -> None:
        """End the session the polite way: the server drops it at once."""
        try:
            self._buffer.shutdown()
        except TLSError:
            pass
        self._flush()

    async def next_request(self, timeout: float = 5.0) -> aiocoap.Message:
        """The next request the server sent over the session."""
        while True:
            message = aiocoap.Message.decode(await asyncio.wait_for(self.received.get(), timeout))
            if message.code.is_request():
                return message

    def answer(self, request: aiocoap.Message, response: aiocoap.Message) -> None:
        """Piggy-back ``response`` on the ACK of a server's confirmable request."""
        response.mtype, response.mid, response.token = aiocoap.ACK, request.mid, request.token
        self.send_message(response)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()


# --- against a running server --------------------------------------------------------------------

_LIBCOAP_PDU = re.compile(r"t:(?:CON|NON|ACK|RST) c:(\S+) i:[0-9a-f]+ \{([0-9a-f]*)\}")


async def libcoap(binary: str, uri: str, *args: str, method: str = "get", timeout: float = 5.0) -> tuple[str | None, str]:
    """Send one request with a libcoap client (its debug output shows the PDUs): (the response code, such
    as "2.04", or None when none came, e.g. the handshake failed; the output)."""
    process = await asyncio.create_subprocess_exec(
        binary, "-v", "7", "-B", str(int(timeout)), "-m", method, *args, uri,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout + 10)
    text = out.decode(errors="replace")
    pdus = _LIBCOAP_PDU.findall(text)
    token = next((token for code, token in pdus if code == method.upper()), None)
    code = next((code for code, tok in pdus if tok == token and code[:1].isdigit()), None)
    return code, text


async def server_chain(port: int, host: str = "127.0.0.1") -> tuple[bytes, ...]:
    """The certificate chain a DTLS server presents (read from its handshake flight, in clear in DTLS 1.2)."""
    client = MbedtlsClient.certificate(Pki("Prober"))
    try:
        await client.connect(port, timeout=1.5)
    except TimeoutError:
        pass  # the prober's own certificate is refused: the server's flight is what counts
    finally:
        client.close()
    reader = records.HandshakeReader()
    for _, datagram in client.datagrams:
        for msg_type, body in reader.feed(datagram):
            if msg_type == records.CERTIFICATE:
                chain = records.certificate_chain(body)
                if chain:
                    return chain
    raise AssertionError("the server presented no certificate")


def der_to_pem(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()
