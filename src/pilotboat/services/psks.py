"""Pre-shared keys of devices: generated (identity 16 random bytes, key 32 by default) or imported
from the factory. Identities are unique in the deployment, because a DTLS server looks one up before
it knows the organisation; keys are sealed at rest and shown only when created."""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.model.credential import CredentialState, Purpose, parse_purpose
from pilotboat.model.principal import Principal
from pilotboat.model.roles import Permission
from pilotboat.security.sealing import Sealer
from pilotboat.services import events
from pilotboat.services.access import require, require_org
from pilotboat.services.errors import Conflict, InvalidInput, NotFound
from pilotboat.services.transaction import writing
from pilotboat.store.tables import Device, PskIdentity

PSK_KEY_PURPOSE = "psk.key"
IDENTITY_BYTES = 16
DEFAULT_KEY_BYTES = 32
#: Shortest key accepted (128 bits; tinydtls clients take at most 16 bytes) and the longest.
MIN_KEY_BYTES, MAX_KEY_BYTES = 16, 64
MAX_IDENTITY_CHARS = 128
_IDENTITY = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII without spaces


def new_identity() -> str:
    """16 random bytes in URL-safe base64 without padding (22 characters)."""
    return base64.urlsafe_b64encode(os.urandom(IDENTITY_BYTES)).rstrip(b"=").decode()


@dataclass(frozen=True)
class CreatedPsk:
    record: PskIdentity
    #: The key, returned to the caller once.
    key: bytes


@dataclass(frozen=True)
class PskMatch:
    """What the DTLS layer learns from an identity: the key and who it belongs to."""

    identity: str
    key: bytes
    org_id: str
    device_id: str
    psk_id: str
    purpose: str
    state: str

    def __repr__(self) -> str:  # keeps the key out of logs and tracebacks
        return f"PskMatch({self.identity!r}, psk_id={self.psk_id!r}, purpose={self.purpose!r}, state={self.state!r})"


async def issue_management_psk(session: AsyncSession, sealer: Sealer, device: Device) -> CreatedPsk:
    """A new management PSK (state "issued") for a device being bootstrapped, in the caller's
    transaction; the device's older issued, never used management PSKs are deleted, so that failed
    bootstraps leave at most one behind."""
    await session.execute(delete(PskIdentity).where(
        PskIdentity.device_id == device.id, PskIdentity.purpose == Purpose.MANAGEMENT,
        PskIdentity.state == CredentialState.ISSUED,
    ))
    key = os.urandom(DEFAULT_KEY_BYTES)
    record = PskIdentity(
        identity=new_identity(), org_id=device.org_id, device_id=device.id, key_sealed=sealer.seal(key, PSK_KEY_PURPOSE),
        key_length=len(key), source="generated", purpose=Purpose.MANAGEMENT.value, state=CredentialState.ISSUED.value,
    )
    session.add(record)
    await session.flush()
    return CreatedPsk(record, key)


class PskService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], sealer: Sealer) -> None:
        self._sessions = sessions
        self._sealer = sealer

    async def create(
        self, principal: Principal, org_id: str, device_id: str, *,
        identity: str | None = None, key: bytes | None = None, key_length: int = DEFAULT_KEY_BYTES,
        purpose: str = Purpose.BOOTSTRAP,
    ) -> CreatedPsk:
        """Generate a PSK for a device, or import one (``identity`` and ``key`` both given). A
        "bootstrap" PSK opens the bootstrap DTLS port, a "management" one the management DTLS port."""
        require(principal, org_id, Permission.WRITE)
        try:
            chosen = parse_purpose(purpose)
        except ValueError as exc:
            raise InvalidInput(str(exc), field="purpose") from None
        if (identity is None) != (key is None):
            raise InvalidInput("to import a PSK give both identity and key; to generate one give neither",
                               field="key" if key is None else "identity")
        imported = identity is not None
        if identity is not None:
            if len(identity) > MAX_IDENTITY_CHARS or not _IDENTITY.match(identity):
                raise InvalidInput(
                    f"identity must be 1 to {MAX_IDENTITY_CHARS} printable ASCII characters without spaces", field="identity"
                )
        else:
            identity = new_identity()
        if key is None:
            if not MIN_KEY_BYTES <= key_length <= MAX_KEY_BYTES:
                raise InvalidInput(f"key_length must be between {MIN_KEY_BYTES} and {MAX_KEY_BYTES} bytes", field="key_length")
            key = os.urandom(key_length)
        elif not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
            raise InvalidInput(f"key must be {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes", field="key")
        record = PskIdentity(
            identity=identity, org_id=org_id, device_id=device_id, key_sealed=self._sealer.seal(key, PSK_KEY_PURPOSE),
            key_length=len(key), source="imported" if imported else "generated", purpose=chosen.value,
            state=CredentialState.ACTIVE.value,
        )
        async with writing(self._sessions, "this PSK identity is already in use") as session:
            await require_org(session, org_id)
            device = await session.get(Device, device_id)
            if device is None or device.org_id != org_id:
                raise NotFound("device not found")
            if await session.scalar(select(PskIdentity.id).where(PskIdentity.identity == identity)):
                raise Conflict("this PSK identity is already in use", field="identity")
            session.add(record)
            await session.flush()
            events.record(
                session, "psk.created", org_id=org_id, device_id=device_id, actor=principal.email,
                psk_id=record.id, identity=identity, source=record.source, purpose=record.purpose,
            )
        return CreatedPsk(record, key)

    async def list(
        self, principal: Principal, org_id: str, device_id: str | None = None, offset: int = 0, limit: int = 50
    ) -> tuple[int, list[PskIdentity]]:
        require(principal, org_id, Permission.READ)
        query = select(PskIdentity).where(PskIdentity.org_id == org_id)
        if device_id is not None:
            query = query.where(PskIdentity.device_id == device_id)
        async with self._sessions() as session:
            await require_org(session, org_id)
            total = await session.scalar(select(func.count()).select_from(query.subquery()))
            rows = await session.scalars(query.order_by(PskIdentity.created_at, PskIdentity.id).offset(offset).limit(limit))
            return int(total or 0), list(rows)

    async def get(self, principal: Principal, org_id: str, psk_id: str) -> PskIdentity:
        require(principal, org_id, Permission.READ)
        async with self._sessions() as session:
            return await self._load(session, org_id, PskIdentity.id == psk_id)

    async def get_by_identity(self, principal: Principal, org_id: str, identity: str) -> PskIdentity:
        require(principal, org_id, Permission.READ)
        async with self._sessions() as session:
            return await self._load(session, org_id, PskIdentity.identity == identity)

    def reveal(self, principal: Principal, record: PskIdentity) -> bytes:
        """The key of a PSK, for callers who may write in its organisation (the Creator door shows it)."""
        require(principal, record.org_id, Permission.WRITE)
        return self._sealer.open_bytes(record.key_sealed, PSK_KEY_PURPOSE)

    async def delete(self, principal: Principal, org_id: str, psk_id: str) -> None:
        require(principal, org_id, Permission.WRITE)
        async with self._sessions.begin() as session:
            record = await self._load(session, org_id, PskIdentity.id == psk_id)
            await session.delete(record)
            events.record(
                session, "psk.deleted", org_id=org_id, device_id=record.device_id, actor=principal.email,
                psk_id=record.id, identity=record.identity,
            )

    # --- for the DTLS server (no caller: the identity comes from a handshake) -----------------

    async def lookup(self, identity: str, *, purpose: Purpose | None = None) -> PskMatch | None:
        """The PSK with ``identity`` (of ``purpose`` when given), its key unsealed; None when there is none."""
        query = select(PskIdentity).where(PskIdentity.identity == identity)
        if purpose is not None:
            query = query.where(PskIdentity.purpose == purpose)
        async with self._sessions() as session:
            record = await session.scalar(query)
        if record is None:
            return None
        key = self._sealer.open_bytes(record.key_sealed, PSK_KEY_PURPOSE)
        return PskMatch(record.identity, key, record.org_id, record.device_id, record.id, record.purpose, record.state)

    async def _load(self, session: AsyncSession, org_id: str, where: object) -> PskIdentity:
        await require_org(session, org_id)
        record = await session.scalar(select(PskIdentity).where(where, PskIdentity.org_id == org_id))  # type: ignore[arg-type]
        if record is None:
            raise NotFound("PSK identity not found")
        return record
