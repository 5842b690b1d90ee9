"""The bootstrap plan: the protocol-neutral decision of what a device is given at bootstrap.

"Device D gets management server M, in security mode S, with credentials C and lifetime L." The CoAP
bootstrap session renders a plan as Security/Server object writes (or one Bootstrap-Pack); nothing
here knows about CoAP or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

from pilotboat.model.management_server import SecurityMode, ServerDefinition


class PlanRefused(Exception):
    """The device may not be bootstrapped as asked; the message is the reason recorded in the event,
    ``code`` the CoAP response code the door answers ("4.00", or "4.03" for a credential of another device)."""

    def __init__(self, reason: str, *, code: str = "4.00") -> None:
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class ServerAccount:
    """One management server account to provision: the definition plus the device's credentials for it
    (Security resources 3, 4 and 5; empty in NoSec mode)."""

    definition: ServerDefinition
    identity: bytes = b""
    server_public_key: bytes = b""
    secret_key: bytes = b""

    def __repr__(self) -> str:  # keeps secret keys out of logs and tracebacks
        return f"ServerAccount({self.definition.uri!r}, mode={self.definition.security_mode.name})"


@dataclass(frozen=True)
class BootstrapPlan:
    device_id: str
    org_id: str
    endpoint: str
    servers: tuple[ServerAccount, ...]

    @property
    def summary(self) -> list[dict[str, object]]:
        """Non-secret description of the plan, for events and logs."""
        return [
            {"server_id": account.definition.id, "uri": account.definition.uri,
             "security_mode": account.definition.security_mode.name, "short_server_id": account.definition.short_server_id}
            for account in self.servers
        ]


def check_transport(definition: ServerDefinition, *, authenticated: bool) -> None:
    """Refuse a definition whose credentials cannot be provisioned over this transport.

    Credentials are provisioned only over an authenticated, encrypted transport: a management server
    that needs a PSK or a certificate cannot be given to a device bootstrapping over plain CoAP, since
    its keys would cross the network in clear.
    """
    mode = definition.security_mode
    if mode is not SecurityMode.NOSEC and not authenticated:
        raise PlanRefused(
            f"management server {definition.uri} needs security mode {mode.name}, whose credentials are "
            "provisioned only to devices bootstrapping over DTLS"
        )
    if mode not in PROVISIONED_MODES:
        raise PlanRefused(f"provisioning {mode.name} credentials is not available on this server")


#: Security modes whose credentials a bootstrap provisions.
PROVISIONED_MODES = (SecurityMode.NOSEC, SecurityMode.PSK, SecurityMode.CERTIFICATE)


def build_plan(
    device_id: str, org_id: str, endpoint: str, definition: ServerDefinition, *, authenticated: bool,
    identity: bytes = b"", server_public_key: bytes = b"", secret_key: bytes = b"",
) -> BootstrapPlan:
    """The plan for one device sent to ``definition``, with its credentials for it: PSK identity and
    key, or certificate, server trust anchor and private key (DER); none in NoSec mode."""
    check_transport(definition, authenticated=authenticated)
    mode = definition.security_mode
    needed = {SecurityMode.NOSEC: (), SecurityMode.PSK: (identity, secret_key),
              SecurityMode.CERTIFICATE: (identity, server_public_key, secret_key)}[mode]
    if not all(needed):
        raise ValueError(f"security mode {mode.name} needs its credentials")
    account = ServerAccount(definition, identity, server_public_key, secret_key) if needed else ServerAccount(definition)
    return BootstrapPlan(device_id, org_id, endpoint, (account,))
