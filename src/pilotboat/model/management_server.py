"""Management-server definitions: where a device is sent by its bootstrap, and how it must connect."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

#: Id of the deployment's own (co-located) management server; it is built from the settings, not stored.
DEFAULT_ID = "default"
DEFAULT_LIFETIME = 86400
#: Ten years: far beyond any useful registration lifetime, and within the 32-bit integers clients keep.
MAX_LIFETIME = 10 * 365 * 86400
DEFAULT_SHORT_SERVER_ID = 1
DEFAULT_BINDING = "U"
SCHEMES = ("coap", "coaps")
#: Bindings of LwM2M 1.0 (``UQ``…) and 1.1 (``U``, ``T``, ``S``, ``N`` and their combinations).
BINDING_LETTERS = frozenset("UTSNQ")


class SecurityMode(enum.IntEnum):
    """Security Mode resource (/0/x/2) of the LwM2M Security object."""

    PSK = 0
    RPK = 1
    CERTIFICATE = 2
    NOSEC = 3
    EST = 4


@dataclass(frozen=True)
class ServerDefinition:
    """A management server devices can be directed to."""

    id: str
    org_id: str | None
    name: str
    address: str
    port: int
    uri_scheme: str = "coap"
    security_mode: SecurityMode = SecurityMode.NOSEC
    short_server_id: int = DEFAULT_SHORT_SERVER_ID
    lifetime: int = DEFAULT_LIFETIME
    binding: str = DEFAULT_BINDING

    @property
    def is_default(self) -> bool:
        return self.id == DEFAULT_ID

    @property
    def uri(self) -> str:
        """The Server URI written to /0/x/0, e.g. ``coap://mgmt.example.com:5683`` (IPv6 in brackets)."""
        host = self.address
        try:
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        except ValueError:
            pass
        return f"{self.uri_scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class DeploymentServer:
    """The deployment's own management server, which every device gets unless assigned another. Its
    definition follows the transport the device bootstraps over: over DTLS (PSK or certificate) the
    DTLS port in the same mode, over plain CoAP the plain port in NoSec mode (when NoSec is allowed)."""

    public_host: str
    lwm2m_port: int
    #: 0: the management server has no DTLS port.
    lwm2m_dtls_port: int = 0
    allow_nosec: bool = True

    def _definition(self, port: int, scheme: str, mode: SecurityMode) -> ServerDefinition:
        return ServerDefinition(
            id=DEFAULT_ID, org_id=None, name="this deployment", address=self.public_host, port=port, uri_scheme=scheme,
            security_mode=mode,
        )

    @property
    def listed(self) -> ServerDefinition:
        """The definition as listed to operators: plain CoAP when allowed, else DTLS with a PSK."""
        if self.allow_nosec or not self.lwm2m_dtls_port:
            return self._definition(self.lwm2m_port, "coap", SecurityMode.NOSEC)
        return self._definition(self.lwm2m_dtls_port, "coaps", SecurityMode.PSK)

    def over(self, transport: SecurityMode) -> ServerDefinition | None:
        """The definition for a device bootstrapping in ``transport`` mode (NOSEC: plain CoAP), or None
        when this deployment has none for it."""
        if transport in (SecurityMode.PSK, SecurityMode.CERTIFICATE) and self.lwm2m_dtls_port:
            return self._definition(self.lwm2m_dtls_port, "coaps", transport)
        if self.allow_nosec:
            return self._definition(self.lwm2m_port, "coap", SecurityMode.NOSEC)
        return None
