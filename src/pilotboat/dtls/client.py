"""The client side of DTLS 1.2 on python-mbedtls, sans I/O: datagrams in, datagrams and application data out.

A ``ClientConnection`` authenticates with a PSK (identity and key) or with a certificate and its private
key; in certificate mode the server's chain must lead to one of the trust anchors the client was given
(LwM2M's Server Public Key, ``/0/x/4``). The caller owns the socket and calls ``on_timer`` while the
handshake runs: the connection retransmits its last flight when its timer ran out, doubling the timeout
up to ``handshake_timeout_max``, after which the handshake fails.
"""

from __future__ import annotations

from dataclasses import dataclass

from mbedtls import pk, x509
from mbedtls.exceptions import TLSError
from mbedtls.tls import ClientContext, DTLSConfiguration, DTLSVersion, TrustStore

from pilotboat.dtls.engine import ConnectionClosed, HandshakeFailed, Progress
from pilotboat.dtls.mbedtls_engine import CERTIFICATE_SUITES, PSK_SUITES, BufferedConnection

__all__ = ["ClientConnection", "ClientCredentials", "ConnectionClosed", "HandshakeFailed", "Progress"]


@dataclass(frozen=True)
class ClientCredentials:
    """What a DTLS client authenticates with: a PSK, or a certificate chain (DER, leaf first) with its
    private key (DER, PKCS#8 or SEC1) and the trust anchors (DER) the server's certificate must chain to."""

    psk_identity: bytes | None = None
    psk_key: bytes | None = None
    certificate_chain: tuple[bytes, ...] = ()
    private_key: bytes | None = None
    trust_anchors: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        psk = self.psk_identity is not None or self.psk_key is not None
        certificate = bool(self.certificate_chain) or self.private_key is not None or bool(self.trust_anchors)
        if psk == certificate:
            raise ValueError("DTLS client credentials are a PSK (identity and key) or a certificate, not both")
        if psk:
            if not self.psk_identity or not self.psk_key:
                raise ValueError("a PSK needs a non-empty identity and key")
            try:
                self.psk_identity.decode()
            except UnicodeDecodeError:
                raise ValueError("the PSK identity must be UTF-8 text") from None
        elif not self.certificate_chain or not self.private_key or not self.trust_anchors:
            raise ValueError("certificate mode needs the certificate, its private key and the server's trust anchor")

    @classmethod
    def psk(cls, identity: bytes, key: bytes) -> ClientCredentials:
        return cls(psk_identity=identity, psk_key=key)

    @classmethod
    def certificate(cls, chain: tuple[bytes, ...], private_key: bytes, trust_anchors: tuple[bytes, ...]
                    ) -> ClientCredentials:
        return cls(certificate_chain=chain, private_key=private_key, trust_anchors=trust_anchors)

    @property
    def is_psk(self) -> bool:
        return self.psk_identity is not None

    def __repr__(self) -> str:
        if self.psk_identity is not None:
            return f"ClientCredentials(psk_identity={self.psk_identity[:32]!r})"
        return f"ClientCredentials(certificates={len(self.certificate_chain)}, trust_anchors={len(self.trust_anchors)})"


def _configuration(credentials: ClientCredentials, timeout_min: float, timeout_max: float) -> DTLSConfiguration:
    common = dict(
        lowest_supported_version=DTLSVersion.DTLSv1_2, highest_supported_version=DTLSVersion.DTLSv1_2,
        anti_replay=True, handshake_timeout_min=timeout_min, handshake_timeout_max=timeout_max,
    )
    if credentials.psk_identity is not None:
        assert credentials.psk_key is not None
        return DTLSConfiguration(
            pre_shared_key=(credentials.psk_identity.decode(), credentials.psk_key), validate_certificates=False,
            ciphers=PSK_SUITES, **common,  # type: ignore[arg-type]
        )
    assert credentials.private_key is not None
    try:
        chain = tuple(x509.CRT.from_DER(der) for der in credentials.certificate_chain)
        key = pk.ECC.from_DER(credentials.private_key)
        anchors = TrustStore([x509.CRT.from_DER(der) for der in credentials.trust_anchors])
    except (TLSError, ValueError, TypeError) as exc:
        raise ValueError(f"unusable certificate material: {exc}") from None
    return DTLSConfiguration(
        certificate_chain=(chain, key), trust_store=anchors, validate_certificates=True,
        ciphers=CERTIFICATE_SUITES, **common,  # type: ignore[arg-type]
    )


class ClientConnection(BufferedConnection):
    """One DTLS connection to a server: ``start()`` for the first flight, ``feed()`` each datagram from
    the server, ``on_timer()`` while not established, then ``encrypt()`` and ``close()``.

    The server's name is not checked, only its chain against the trust anchors (what LwM2M clients do
    with the Server Public Key). ``ValueError`` for certificate material Mbed TLS cannot use."""

    def __init__(self, credentials: ClientCredentials, *, mtu: int = 1200, handshake_timeout_min: float = 1.0,
                 handshake_timeout_max: float = 16.0) -> None:
        if not 0 < handshake_timeout_min <= handshake_timeout_max:
            raise ValueError("handshake timeouts: 0 < minimum <= maximum")
        context = ClientContext(_configuration(credentials, handshake_timeout_min, handshake_timeout_max))
        super().__init__(context.wrap_buffers(None), mtu)
        self._buffer.setmtu(mtu)
        self.credentials = credentials
        self._started = False

    def start(self) -> list[bytes]:
        """The ClientHello (once; later calls return nothing)."""
        if self._started:
            return []
        self._started = True
        progress = Progress()
        self._handshake(progress)
        return progress.datagrams

    def feed(self, datagram: bytes) -> Progress:
        """Process one datagram from the server. Raises ``HandshakeFailed`` (the server's certificate is
        not trusted, a fatal alert) or ``ConnectionClosed`` (close_notify, a broken session)."""
        if not self._started:
            raise RuntimeError("start() the connection first")
        self._buffer.receive_from_network(datagram)
        progress = Progress()
        if not self._established:
            self._handshake(progress)
        if self._established:
            self._read(progress)
        return progress

    def on_timer(self) -> Progress:
        """Retransmit the last flight when its timer ran out; ``HandshakeFailed`` once the handshake
        timed out for good. Nothing to do once established."""
        progress = Progress()
        if self._started and not self._established:
            self._handshake(progress)
        return progress
