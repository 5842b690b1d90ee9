"""The DTLS engine on python-mbedtls (Mbed TLS 2.28): in-memory buffers, one per peer, shared configuration."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from mbedtls import pk, x509
from mbedtls.exceptions import TLSError
from mbedtls.tls import (
    DTLSConfiguration,
    DTLSVersion,
    HelloVerifyRequest,
    RaggedEOF,
    ServerContext,
    TLSWrappedBuffer,
    TrustStore,
    WantReadError,
    WantWriteError,
)

from pilotboat.dtls.engine import ConnectionClosed, HandshakeFailed, Progress, ServerCredentials
from pilotboat.dtls.records import pack_datagrams

#: Offered with PSK credentials; the first is the one constrained LwM2M clients implement.
PSK_SUITES = (
    "TLS-PSK-WITH-AES-128-CCM-8",
    "TLS-PSK-WITH-AES-128-GCM-SHA256",
    "TLS-PSK-WITH-AES-128-CCM",
    "TLS-PSK-WITH-AES-128-CBC-SHA256",
)
#: Offered with a server certificate.
CERTIFICATE_SUITES = (
    "TLS-ECDHE-ECDSA-WITH-AES-128-CCM-8",
    "TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256",
    "TLS-ECDHE-ECDSA-WITH-AES-128-CCM",
    "TLS-ECDHE-ECDSA-WITH-AES-128-CBC-SHA256",
)
#: More than any single flight or record can hold (the library's buffers are 32 KiB).
_OUTPUT_CHUNK = 1 << 15
#: MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY: the peer ended the session the polite way.
_PEER_CLOSE_NOTIFY = 0x7880
#: A handshake advances one state per step; a single datagram never needs more.
_MAX_STEPS = 64


class _PreparedKeys(Mapping[str, bytes]):
    """The PSK store the library asks during a handshake: it answers only from the keys the transport
    looked up for the connection being fed, and notes which identity was used."""

    def __init__(self) -> None:
        self.keys: dict[bytes, bytes] = {}
        self.used: bytes | None = None

    def __getitem__(self, identity: str) -> bytes:
        raw = identity.encode()
        key = self.keys[raw]
        self.used = raw
        return key

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


class _CookieNeeded(Exception):
    def __init__(self, reply: list[bytes]) -> None:
        super().__init__("HelloVerifyRequest")
        self.reply = reply


class BufferedConnection:
    """One side of a DTLS connection: an Mbed TLS context behind in-memory buffers, driven step by step.

    Shared by the server's connections and the client (``pilotboat.dtls.client``)."""

    def __init__(self, buffer: TLSWrappedBuffer, mtu: int) -> None:
        self._buffer = buffer
        self._mtu = mtu
        self._established = False

    @property
    def established(self) -> bool:
        return self._established

    @property
    def peer_certificate(self) -> bytes | None:
        return self._buffer.getpeercert(binary_form=True) if self._established else None

    @property
    def cipher_suite(self) -> str | None:
        return self._buffer.cipher() if self._established else None

    def encrypt(self, data: bytes) -> list[bytes]:
        try:
            self._buffer.write(data)
        except TLSError as exc:
            raise ConnectionClosed(str(exc)) from None
        return self._drain()

    def close(self) -> list[bytes]:
        try:
            self._buffer.shutdown()
        except TLSError:
            pass
        return self._drain()

    def _handshake(self, progress: Progress) -> None:
        for _ in range(_MAX_STEPS):
            try:
                self._buffer.do_handshake()
            except WantReadError:
                break
            except WantWriteError:
                pass  # a step that produced output; it may have been the last one
            except HelloVerifyRequest:
                raise _CookieNeeded(self._drain()) from None
            except TLSError as exc:
                progress.datagrams += self._drain()
                raise HandshakeFailed(str(exc)) from None
            if self._buffer.cipher() is not None:  # the session exists once the handshake is over
                self._established = progress.established = True
                break
        progress.datagrams += self._drain()

    def _read(self, progress: Progress) -> None:
        chunk = bytearray(self._mtu * 2)
        while True:
            try:
                size = self._buffer.readinto(chunk, len(chunk))
            except WantReadError:
                break
            except RaggedEOF:
                raise ConnectionClosed("close_notify") from None
            except TLSError as exc:
                if exc.err == _PEER_CLOSE_NOTIFY:
                    raise ConnectionClosed("close_notify") from None
                raise ConnectionClosed(str(exc)) from None
            progress.application_data.append(bytes(chunk[:size]))
        progress.datagrams += self._drain()

    def _drain(self) -> list[bytes]:
        pending = self._buffer.peek_outgoing(_OUTPUT_CHUNK)
        if not pending:
            return []
        self._buffer.consume_outgoing(len(pending))
        return pack_datagrams(pending, self._mtu)


class MbedtlsConnection(BufferedConnection):
    """One peer's DTLS connection on the server side."""

    def __init__(self, engine: MbedtlsEngine, client_id: bytes) -> None:
        super().__init__(engine.context.wrap_buffers(), engine.mtu)
        self._engine = engine
        self._buffer.setmtu(engine.mtu)
        self._buffer.setcookieparam(client_id)
        self._psk_identity: bytes | None = None

    @property
    def psk_identity(self) -> bytes | None:
        return self._psk_identity

    def feed(self, datagram: bytes, psk: dict[bytes, bytes]) -> Progress:
        keys = self._engine.keys
        keys.keys, keys.used = psk, None
        try:
            self._buffer.receive_from_network(datagram)
            progress = Progress()
            if not self._established:
                self._handshake(progress)
                if keys.used is not None:
                    self._psk_identity = keys.used
            if self._established:
                self._read(progress)
            return progress
        finally:
            keys.keys, keys.used = {}, None

    def on_timer(self) -> Progress:
        progress = Progress()
        if not self._established:
            self._handshake(progress)
        return progress


def trust_store_of(anchors: tuple[bytes, ...]) -> TrustStore:
    """A trust store holding every anchor (DER).

    python-mbedtls hands Mbed TLS only the first certificate of a ``TrustStore`` as the CA chain, so a
    store of one certificate per anchor trusts the first anchor alone. One certificate object parsed
    from a PEM bundle carries all the anchors in its own chain, which Mbed TLS then searches whole.
    """
    bundle = "".join(x509.CRT.from_DER(der).to_PEM() for der in anchors).encode() + b"\0"
    return TrustStore([x509.CRT(bundle)])


class MbedtlsEngine:
    """A DTLS 1.2 server engine for one set of credentials."""

    def __init__(
        self, credentials: ServerCredentials, *, mtu: int = 1200,
        handshake_timeout_min: float = 1.0, handshake_timeout_max: float = 16.0,
    ) -> None:
        self.mtu = mtu
        self.keys = _PreparedKeys()
        suites: tuple[str, ...] = ()
        certificate_chain = None
        trust_store = None
        if credentials.certificate_chain:
            suites += CERTIFICATE_SUITES
            assert credentials.private_key is not None
            certificate_chain = (
                tuple(x509.CRT.from_DER(der) for der in credentials.certificate_chain),
                pk.ECC.from_DER(credentials.private_key),
            )
            if credentials.trust_anchors:
                trust_store = trust_store_of(credentials.trust_anchors)
        if credentials.psk_for is not None:
            suites += PSK_SUITES
        configuration = DTLSConfiguration(
            # True: a client chain must lead to the trust store. False (Mbed TLS's "optional"): the client
            # is still asked for a certificate and must prove it holds its key (CertificateVerify), and
            # the CertificateRequest names no CA; the transport's accept_chain judges the chain.
            validate_certificates=trust_store is not None if certificate_chain is not None else None,
            certificate_chain=certificate_chain,
            ciphers=suites,
            lowest_supported_version=DTLSVersion.DTLSv1_2,
            highest_supported_version=DTLSVersion.DTLSv1_2,
            trust_store=trust_store,
            anti_replay=True,
            handshake_timeout_min=handshake_timeout_min,
            handshake_timeout_max=handshake_timeout_max,
            pre_shared_key_store=self.keys if credentials.psk_for is not None else None,
        )
        self.context = ServerContext(configuration)

    def accept(self, datagram: bytes, client_id: bytes) -> tuple[MbedtlsConnection | None, list[bytes]]:
        connection = MbedtlsConnection(self, client_id)
        try:
            progress = connection.feed(datagram, {})
        except _CookieNeeded as needed:
            return None, needed.reply
        except (HandshakeFailed, ConnectionClosed):
            return None, []
        if not progress.datagrams:  # a hello that got no answer started nothing
            return None, []
        return connection, progress.datagrams
