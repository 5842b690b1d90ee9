"""Which device a DTLS peer is: the answers the DTLS servers need during a handshake (a PSK's key,
whether a certificate chain may connect) and, for every request, the device behind the identity the
handshake authenticated.

Each credential has a purpose: "bootstrap" credentials (the factory ones) open the bootstrap port only,
"management" credentials the management port only. Certificates of a trust-store CA (devices moved in
from another deployment) open the management port only, bound to the device whose endpoint name is
their CN. A management credential written at a bootstrap is "issued" until the device first uses it:
that use makes it "active" and retires the device's other management credentials of its kind.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.model.credential import CredentialState, Purpose
from pilotboat.model.management_server import SecurityMode
from pilotboat.model.peer import PeerIdentity
from pilotboat.security import pki
from pilotboat.services import events
from pilotboat.services.certificates import revoke_where
from pilotboat.services.psks import MAX_IDENTITY_CHARS, PskMatch, PskService
from pilotboat.services.server_key import DeploymentKeyStore, ServerKeyPair, load_configured
from pilotboat.services.trust import ClientIdentity, TrustService, Untrusted
from pilotboat.store.tables import Device, DeviceCertificate, PskIdentity

log = logging.getLogger("pilotboat.identity")

INACTIVE = "device inactive"
SUPERSEDED = "superseded"
ACTIVATED_EVENT = "credential.activated"
RETIRED_EVENT = "credential.retired"


class Door(enum.StrEnum):
    """The DTLS port a peer came through."""

    BOOTSTRAP = "bootstrap"
    MANAGEMENT = "management"

    @property
    def purpose(self) -> Purpose:
        """The credential purpose this door accepts."""
        return Purpose(self.value)


@dataclass(frozen=True)
class AuthenticatedDevice:
    """The device a DTLS peer authenticated as."""

    device_id: str
    org_id: str
    endpoint: str | None
    kind: str  # "psk" | "certificate"
    #: PskIdentity.id, DeviceCertificate.id, or "trusted:<sha256 fingerprint>" for a trust-store CA's certificate.
    credential_id: str

    @property
    def security_mode(self) -> SecurityMode:
        return SecurityMode.PSK if self.kind == "psk" else SecurityMode.CERTIFICATE


class IdentityRefused(Exception):
    """The peer's credential does not admit it here; the message is the reason, recorded in events."""


@dataclass(frozen=True)
class ServerKeySource:
    """Where the DTLS server key pair comes from: the configured PEM files, else the deployment's own."""

    public_host: str
    certificate: Path | None = None
    private_key: Path | None = None


def _parse_chain(chain: tuple[bytes, ...]) -> list[x509.Certificate]:
    try:
        return [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as exc:
        raise IdentityRefused(f"unreadable client certificate ({exc})") from None


class DeviceIdentityService:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], psks: PskService, trust: TrustService,
        deployment_keys: DeploymentKeyStore, server_key: ServerKeySource,
    ) -> None:
        self._sessions = sessions
        self._psks = psks
        self._trust = trust
        self._deployment_keys = deployment_keys
        self._server_key_source = server_key
        self._server_key: ServerKeyPair | None = None
        self._server_key_lock = asyncio.Lock()

    # --- handshakes ---------------------------------------------------------------------------

    async def psk_key(self, identity: bytes, door: Door) -> bytes | None:
        """The key of a PSK identity of the door's purpose; None (the handshake fails) otherwise."""
        match = await self._psk(identity, door)
        return match.key if match is not None else None

    async def accept_chain(self, chain: tuple[bytes, ...], door: Door) -> bool:
        """Whether a client certificate chain (DER, leaf first) may connect through ``door``: trusted
        (organisation CA or, on the management door, the trust store), not expired, not revoked, of the
        door's purpose and bound to one device."""
        try:
            await self._certificate(chain, door)
        except IdentityRefused as exc:
            log.info("client certificate refused", extra={"door": door.value, "reason": str(exc)})
            return False
        return True

    # --- requests -----------------------------------------------------------------------------

    async def resolve(self, peer: PeerIdentity, door: Door) -> AuthenticatedDevice:
        """The device behind an authenticated peer; ``IdentityRefused`` says why there is none.

        On the management door, the first use of an "issued" credential makes it "active" and retires
        the device's other management credentials of that kind (PSKs deleted, certificates revoked
        "superseded")."""
        if peer.psk_identity is not None:
            match = await self._psk(peer.psk_identity, door)
            if match is None:
                raise IdentityRefused(f"unknown {door.value} PSK identity")
            return await self._admit(
                match.device_id, "psk", match.psk_id, door, activate=match.state == CredentialState.ISSUED,
                detail={"identity": match.identity},
            )
        if peer.certificate_chain:
            identity, record = await self._certificate(peer.certificate_chain, door)
            assert identity.device_id is not None  # _certificate refuses unbound certificates
            if record is None:
                credential_id = f"trusted:{pki.der_fingerprint(peer.certificate_chain[0])}"
                return await self._admit(identity.device_id, "certificate", credential_id, door, activate=False)
            return await self._admit(
                identity.device_id, "certificate", record.id, door, activate=record.state == CredentialState.ISSUED,
                detail={"certificate_id": record.id},
            )
        raise IdentityRefused("no authenticated identity")

    # --- the server's own credentials ---------------------------------------------------------

    async def server_credentials(self) -> ServerKeyPair:
        """The DTLS server certificate chain and key: the configured files (checked; a
        ``ServerCredentialsError`` names the bad setting), else the deployment certificate."""
        async with self._server_key_lock:
            if self._server_key is None:
                source = self._server_key_source
                if source.certificate is not None and source.private_key is not None:
                    self._server_key = load_configured(source.certificate, source.private_key)
                else:
                    self._server_key = await self._deployment_keys.key_pair(source.public_host)
            return self._server_key

    # --- helpers ------------------------------------------------------------------------------

    async def _psk(self, identity: bytes, door: Door) -> PskMatch | None:
        try:
            text = identity.decode("ascii")
        except UnicodeDecodeError:
            return None
        if not text or len(text) > MAX_IDENTITY_CHARS:
            return None
        return await self._psks.lookup(text, purpose=door.purpose)

    async def _certificate(self, chain: tuple[bytes, ...], door: Door) -> tuple[ClientIdentity, DeviceCertificate | None]:
        """The trusted identity of a chain and our record of its leaf (None for a trust-store CA's)."""
        try:
            identity = await self._trust.identify(_parse_chain(chain))
        except Untrusted as exc:
            raise IdentityRefused(str(exc)) from None
        if identity.certificate_id is None:
            if door is not Door.MANAGEMENT:
                raise IdentityRefused("certificates of trust-store CAs are accepted by the management server only")
            if identity.device_id is None:
                raise IdentityRefused("no device has the certificate's common name as endpoint name")
            return identity, None
        async with self._sessions() as session:
            record = await session.get(DeviceCertificate, identity.certificate_id)
        if record is None or record.device_id is None:
            raise IdentityRefused("the certificate's device was deleted")
        if record.purpose != door.purpose:
            raise IdentityRefused(f"a {record.purpose} certificate does not open the {door.value} server")
        return identity, record

    async def _admit(
        self, device_id: str, kind: str, credential_id: str, door: Door, *, activate: bool,
        detail: dict[str, object] | None = None,
    ) -> AuthenticatedDevice:
        async with self._sessions.begin() as session:
            device = await session.get(Device, device_id)
            if device is None:
                raise IdentityRefused("the credential's device was deleted")
            if device.state != 1:
                raise IdentityRefused(INACTIVE)
            if activate and door is Door.MANAGEMENT:
                await self._activate(session, device, kind, credential_id, detail or {})
        return AuthenticatedDevice(device.id, device.org_id, device.endpoint, kind, credential_id)

    @staticmethod
    async def _activate(session: AsyncSession, device: Device, kind: str, credential_id: str, detail: dict[str, object]) -> None:
        """Make an issued management credential active and retire the device's other ones of its kind;
        only the first of concurrent uses does it."""
        table = PskIdentity if kind == "psk" else DeviceCertificate
        changed = await session.execute(
            update(table).where(table.id == credential_id, table.state == CredentialState.ISSUED)
            .values(state=CredentialState.ACTIVE.value).execution_options(synchronize_session=False)
        )
        if changed.rowcount != 1:  # type: ignore[attr-defined]
            return  # another request activated it first
        others = (table.device_id == device.id, table.purpose == Purpose.MANAGEMENT, table.id != credential_id)
        if kind == "psk":
            retired = list(await session.scalars(select(PskIdentity.id).where(*others)))
            if retired:
                await session.execute(delete(PskIdentity).where(PskIdentity.id.in_(retired)))
        else:
            retired = await revoke_where(session, *others, reason=SUPERSEDED)
        actor = f"device:{(device.endpoint or device.id)[:64]}"
        events.record(
            session, ACTIVATED_EVENT, org_id=device.org_id, device_id=device.id, actor=actor, credential_kind=kind,
            credential_id=credential_id, **detail,
        )
        if retired:
            events.record(
                session, RETIRED_EVENT, org_id=device.org_id, device_id=device.id, actor=actor, credential_kind=kind,
                credential_ids=retired, replaced_by=credential_id, how="deleted" if kind == "psk" else "revoked (superseded)",
            )
