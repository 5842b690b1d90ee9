"""The bootstrap plan: the protocol-neutral decision of what a device is given at bootstrap.

"Device D gets management server M, in security mode S, with credentials C and lifetime L." The CoAP
bootstrap session renders a plan as Security/Server object writes (or one Bootstrap-Pack); nothing
here knows about CoAP or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

from pilotboat.model.management_server import SecurityMode, ServerDefinition


class PlanRefused(Exception):
    """The device may not be bootstrapped as asked; the message is the reason recorded in the event."""


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


def build_plan(
    device_id: str, org_id: str, endpoint: str, definition: ServerDefinition, *, authenticated: bool
) -> BootstrapPlan:
    """The plan for one device sent to ``definition``.

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
    if mode is not SecurityMode.NOSEC:
        raise PlanRefused(f"provisioning {mode.name} credentials is not available on this server yet")
    return BootstrapPlan(device_id, org_id, endpoint, (ServerAccount(definition),))
