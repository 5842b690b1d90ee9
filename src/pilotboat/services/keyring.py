"""Which master key sealed each stored secret, and re-sealing them all under the current key.

Rotation without downtime for reads: the new key goes first in the keyring while the old one stays
(nodes open values under either), every sealed value is re-sealed in small transactions, and only
when no value is left under the old key may it be dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import InstrumentedAttribute

from pilotboat.security.sealing import KEY_ID_LENGTH, PREFIX, Sealer, SealError
from pilotboat.services.authorities import CA_KEY_PURPOSE, CA_ROOT_KEY_PURPOSE
from pilotboat.services.certificates import DEVICE_KEY_PURPOSE
from pilotboat.services.devices import CLIENT_KEY_PURPOSE, SECRET_PURPOSE
from pilotboat.services.psks import PSK_KEY_PURPOSE
from pilotboat.services.server_key import SERVER_KEY_PURPOSE
from pilotboat.services.webhooks import SECRET_PURPOSE as WEBHOOK_SECRET_PURPOSE
from pilotboat.store.tables import CertificateAuthority, Device, DeviceCertificate, DtlsServerKey, PskIdentity, Webhook


@dataclass(frozen=True)
class SealedColumn:
    column: InstrumentedAttribute[str | None]
    primary_key: InstrumentedAttribute[str]
    purpose: str

    @property
    def name(self) -> str:
        return f"{self.column.class_.__tablename__}.{self.column.key}"


#: Every column that holds a sealed secret. A new one must be added here, or rotation would miss it.
SEALED_COLUMNS: tuple[SealedColumn, ...] = (
    SealedColumn(Device.secret_sealed, Device.id, SECRET_PURPOSE),  # type: ignore[arg-type]
    SealedColumn(Device.client_key_sealed, Device.id, CLIENT_KEY_PURPOSE),
    SealedColumn(CertificateAuthority.key_sealed, CertificateAuthority.id, CA_KEY_PURPOSE),  # type: ignore[arg-type]
    SealedColumn(CertificateAuthority.root_key_sealed, CertificateAuthority.id, CA_ROOT_KEY_PURPOSE),
    SealedColumn(DeviceCertificate.key_sealed, DeviceCertificate.id, DEVICE_KEY_PURPOSE),
    SealedColumn(PskIdentity.key_sealed, PskIdentity.id, PSK_KEY_PURPOSE),  # type: ignore[arg-type]
    SealedColumn(Webhook.secret_sealed, Webhook.id, WEBHOOK_SECRET_PURPOSE),  # type: ignore[arg-type]
    SealedColumn(DtlsServerKey.key_sealed, DtlsServerKey.id, SERVER_KEY_PURPOSE),  # type: ignore[arg-type]
)


def _key_id_of(column: InstrumentedAttribute[str | None]):  # type: ignore[no-untyped-def]
    """SQL for the key id inside ``pbs1.<key id>.<…>`` (the same on SQLite and PostgreSQL)."""
    return func.substr(column, len(PREFIX) + 2, KEY_ID_LENGTH)


@dataclass(frozen=True)
class SealedCount:
    column: str
    key_id: str
    count: int


@dataclass
class ResealReport:
    resealed: dict[str, int] = field(default_factory=dict)
    #: Values that could not be opened with any key of the keyring, per column.
    unreadable: dict[str, int] = field(default_factory=dict)


Progress = Callable[[str, int], None]


class KeyringService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], sealer: Sealer) -> None:
        self._sessions = sessions
        self._sealer = sealer

    @property
    def sealer(self) -> Sealer:
        return self._sealer

    async def census(self) -> list[SealedCount]:
        """How many stored values each master key sealed, per column."""
        counts: list[SealedCount] = []
        async with self._sessions() as session:
            for sealed in SEALED_COLUMNS:
                kid = _key_id_of(sealed.column)
                rows = await session.execute(
                    select(kid, func.count()).where(sealed.column.is_not(None)).group_by(kid).order_by(kid)
                )
                counts.extend(SealedCount(sealed.name, key_id, int(count)) for key_id, count in rows)
        return counts

    async def unknown_key_ids(self) -> set[str]:
        """Key ids of stored values that no key of this node's keyring opens (a wrong master key)."""
        self._sealer.refresh(force=True)
        return {count.key_id for count in await self.census() if count.key_id not in self._sealer.key_ids}

    async def reseal(self, progress: Progress | None = None, batch_size: int = 200) -> ResealReport:
        """Re-seal every value not sealed under the current key, a batch per transaction. A value
        changed by someone else meanwhile is left alone (it was sealed anew by that writer)."""
        report = ResealReport()
        current = self._sealer.key_id
        for sealed in SEALED_COLUMNS:
            done, unreadable, last_id = 0, 0, ""
            while True:
                async with self._sessions.begin() as session:
                    rows = list(await session.execute(
                        select(sealed.primary_key, sealed.column)
                        .where(sealed.column.is_not(None), _key_id_of(sealed.column) != current, sealed.primary_key > last_id)
                        .order_by(sealed.primary_key).limit(batch_size)
                    ))
                    for row_id, value in rows:
                        try:
                            fresh = self._sealer.reseal(value, sealed.purpose)
                        except SealError:
                            unreadable += 1
                            continue
                        result = await session.execute(
                            update(sealed.column.class_)
                            .where(sealed.primary_key == row_id, sealed.column == value)
                            .values({sealed.column.key: fresh})
                        )
                        done += int(result.rowcount or 0)  # type: ignore[attr-defined]
                if not rows:
                    break
                last_id = rows[-1][0]
                if progress:
                    progress(sealed.name, len(rows))
            report.resealed[sealed.name] = done
            if unreadable:
                report.unreadable[sealed.name] = unreadable
        return report
