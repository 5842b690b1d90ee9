"""The identity a transport authenticated for a peer; travels with every request into the services."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PeerIdentity:
    """A PSK identity or a certificate chain (DER, leaf first). Plain CoAP peers have none (None)."""

    psk_identity: bytes | None = None
    certificate_chain: tuple[bytes, ...] = ()

    def __repr__(self) -> str:
        if self.psk_identity is not None:
            return f"PeerIdentity(psk={self.psk_identity[:32]!r})"
        return f"PeerIdentity(certificates={len(self.certificate_chain)})"
