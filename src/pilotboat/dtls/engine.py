"""The DTLS engine interface the transport drives: server-side connections fed with datagrams.

An engine is synchronous and does no I/O. The transport owns the socket, the timers and the
credential look-ups (which may wait on a database); it hands the engine only what is already known.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

#: ``psk_for(identity)``: the key for a PSK identity, or None for an unknown identity.
PskLookup = Callable[[bytes], Awaitable[bytes | None]]
#: ``accept_chain(chain)``: whether a client certificate chain (DER, leaf first) may connect. It is
#: asked after the engine checked the chain against the trust anchors and the validity dates, and
#: decides the rest (revocation, the device it belongs to).
ChainCheck = Callable[[tuple[bytes, ...]], Awaitable[bool]]


class HandshakeFailed(Exception):
    """The peer failed the handshake (bad key, unknown identity, untrusted certificate, protocol error)."""


class ConnectionClosed(Exception):
    """The peer closed an established connection, or it broke."""


@dataclass(frozen=True)
class ServerCredentials:
    """What a DTLS server authenticates with and against.

    PSK suites are offered when ``psk_for`` is set; ECDHE-ECDSA suites when the server has a
    certificate chain and key. Client certificates are then required: the engine checks that the client
    holds the key of the certificate it sent (CertificateVerify) and, when ``trust_anchors`` (DER CA
    certificates) are given, its chain and dates against them; ``accept_chain`` decides the rest.

    Without ``trust_anchors``, ``accept_chain`` alone judges the chain (trust, dates, revocation). This is
    what the LwM2M servers do: their anchors (every organisation's CA) change at run time and would all
    be named in each CertificateRequest, which grows with the number of organisations.
    """

    psk_for: PskLookup | None = None
    certificate_chain: tuple[bytes, ...] = ()
    private_key: bytes | None = None
    trust_anchors: tuple[bytes, ...] = ()
    accept_chain: ChainCheck | None = None

    def __post_init__(self) -> None:
        if self.psk_for is None and not self.certificate_chain:
            raise ValueError("DTLS credentials need a PSK lookup or a server certificate")
        if bool(self.certificate_chain) != (self.private_key is not None):
            raise ValueError("a server certificate chain needs its private key, and a key its chain")
        if self.certificate_chain and not self.trust_anchors and self.accept_chain is None:
            raise ValueError("certificate mode needs trust anchors or a chain check for the client certificates")

    def __repr__(self) -> str:
        return (
            f"ServerCredentials(psk={self.psk_for is not None}, certificates={len(self.certificate_chain)}, "
            f"trust_anchors={len(self.trust_anchors)})"
        )


@dataclass
class Progress:
    """What feeding one datagram (or a timer) produced."""

    datagrams: list[bytes] = field(default_factory=list)
    application_data: list[bytes] = field(default_factory=list)
    #: True exactly once: when this step completed the handshake.
    established: bool = False


class ServerConnection(Protocol):
    """One peer's DTLS state on the server side."""

    @property
    def established(self) -> bool: ...

    @property
    def psk_identity(self) -> bytes | None:
        """The identity the client authenticated with (PSK mode), once established."""

    @property
    def peer_certificate(self) -> bytes | None:
        """The client's leaf certificate (DER) the handshake verified (certificate mode), once established."""

    @property
    def cipher_suite(self) -> str | None: ...

    def feed(self, datagram: bytes, psk: dict[bytes, bytes]) -> Progress:
        """Process one datagram. ``psk`` holds the keys of the identities the transport already looked
        up for this peer. Raises HandshakeFailed or ConnectionClosed."""

    def on_timer(self) -> Progress:
        """Retransmit the last flight if its timer ran out; raises HandshakeFailed when the handshake
        timed out for good."""

    def encrypt(self, data: bytes) -> list[bytes]:
        """Datagrams carrying ``data`` as application data (established connections only)."""

    def close(self) -> list[bytes]:
        """Datagrams carrying a close_notify alert."""


class ServerEngine(Protocol):
    """Creates connections; the first datagram of every peer passes its cookie check."""

    def accept(self, datagram: bytes, client_id: bytes) -> tuple[ServerConnection | None, list[bytes]]:
        """Check a ClientHello's cookie for ``client_id`` (the peer's transport address).

        Returns ``(None, reply)`` when the hello carried no valid cookie (``reply`` holds the
        HelloVerifyRequest, or nothing for garbage): nothing about the peer is kept. Returns a new
        connection that has processed the hello, with its first flight, otherwise.
        """
