"""An organisation's webhooks: where its events are POSTed, signed with a secret of the webhook.

The secret is shown once, when the webhook is created, and stored sealed. A webhook starts at the
organisation's newest event; ``WebhookDispatcher`` (``webhook_delivery``) delivers what follows.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.model.principal import Principal
from pilotboat.model.roles import Permission
from pilotboat.security.sealing import Sealer
from pilotboat.services import events
from pilotboat.services.access import require, require_org
from pilotboat.services.errors import InvalidInput, NotFound
from pilotboat.services.event_stream import checked_kinds
from pilotboat.services.transaction import writing
from pilotboat.store.tables import Event, Webhook, WebhookDelivery, new_id, utcnow

SECRET_PURPOSE = "webhook.secret"
WEBHOOK_CREATED = "webhook.created"
WEBHOOK_UPDATED = "webhook.updated"
WEBHOOK_DELETED = "webhook.deleted"
WEBHOOK_ENABLED = "webhook.enabled"
#: Deliveries kept failing: the webhook was switched off (``reason`` says why).
WEBHOOK_DISABLED = "webhook.disabled"
MAX_URL_CHARS = 2048
MIN_SECRET_CHARS = 16
MAX_SECRET_CHARS = 256
#: Random bytes of a generated secret (url-safe base64).
SECRET_BYTES = 32
SCHEMES = ("http", "https")


def host_is_private(host: str) -> bool:
    """Whether ``host`` (a name or an address) is loopback, private, link-local or otherwise not public."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return not ipaddress.ip_address(host.split("%", 1)[0]).is_global
    except ValueError:
        return False


def checked_url(value: Any, *, allow_private: bool) -> str:
    """A webhook URL: http or https with a host, without user name, password or fragment."""
    if not isinstance(value, str) or not value:
        raise InvalidInput("url: an http:// or https:// URL is required", field="url")
    if len(value) > MAX_URL_CHARS:
        raise InvalidInput(f"url: at most {MAX_URL_CHARS} characters", field="url")
    if any(char.isspace() or not char.isprintable() for char in value):
        raise InvalidInput("url: spaces and control characters are not allowed", field="url")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise InvalidInput(f"url: not a valid URL ({exc})", field="url") from exc
    if parts.scheme.lower() not in SCHEMES:
        raise InvalidInput("url: must start with http:// or https://", field="url")
    if not parts.hostname:
        raise InvalidInput("url: names no host", field="url")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput(
            "url: must not hold a user name or password; receivers check the X-Pilotboat-Signature header", field="url"
        )
    if parts.fragment:
        raise InvalidInput("url: must not have a fragment (#…)", field="url")
    if not allow_private and host_is_private(parts.hostname):
        raise InvalidInput(
            f"url: {parts.hostname} is a loopback, private or link-local address, which webhooks may not reach here "
            "(PILOTBOAT_WEBHOOK_ALLOW_PRIVATE)",
            field="url",
        )
    return value


def checked_secret(value: Any) -> str:
    if not isinstance(value, str) or not MIN_SECRET_CHARS <= len(value) <= MAX_SECRET_CHARS or not value.isprintable():
        raise InvalidInput(
            f"secret: {MIN_SECRET_CHARS} to {MAX_SECRET_CHARS} printable characters (omit it to get a generated one)",
            field="secret",
        )
    return value


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def _summary(webhook: Webhook) -> dict[str, Any]:
    """What events say about a webhook: never its secret, nor the URL's path and query (they may hold tokens)."""
    return {"webhook_id": webhook.id, "host": urlsplit(webhook.url).hostname, "kinds": list(webhook.kinds)}


@dataclass(frozen=True)
class WebhookChange:
    """Fields a caller gives (None: not given)."""

    url: str | None = None
    kinds: Sequence[str] | None = None
    secret: str | None = None


class WebhookService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        sealer: Sealer,
        *,
        allow_private: bool,
        changed: Callable[[str], None] = lambda webhook_id: None,
    ) -> None:
        self._sessions = sessions
        self._sealer = sealer
        self._allow_private = allow_private
        #: Told the id of a webhook created, changed or enabled on this node (the dispatcher wakes up).
        self._changed = changed

    async def create(self, principal: Principal, org_id: str, change: WebhookChange) -> tuple[Webhook, str]:
        """The new webhook and its secret (the only time the secret is shown)."""
        require(principal, org_id, Permission.WRITE)
        url = checked_url(change.url, allow_private=self._allow_private)
        kinds = list(checked_kinds(change.kinds, "kinds"))
        secret = new_secret() if change.secret is None else checked_secret(change.secret)
        async with writing(self._sessions) as session:
            await require_org(session, org_id)
            webhook = Webhook(
                id=new_id(), org_id=org_id, url=url, kinds=kinds, secret_sealed=self._sealer.seal(secret, SECRET_PURPOSE),
                active=True, consecutive_failures=0,
            )
            events.record(session, WEBHOOK_CREATED, org_id=org_id, actor=principal.email, **_summary(webhook))
            await session.flush()
            # From the newest event on, its own creation included.
            webhook.cursor = int(await session.scalar(select(func.max(Event.id)).where(Event.org_id == org_id)) or 0)
            session.add(webhook)
        self._changed(webhook.id)
        return webhook, secret

    async def list(self, principal: Principal, org_id: str) -> list[Webhook]:
        require(principal, org_id, Permission.WRITE)
        async with self._sessions() as session:
            await require_org(session, org_id)
            return list(await session.scalars(
                select(Webhook).where(Webhook.org_id == org_id).order_by(Webhook.created_at, Webhook.id)
            ))

    async def get(self, principal: Principal, org_id: str, webhook_id: str) -> Webhook:
        require(principal, org_id, Permission.WRITE)
        async with self._sessions() as session:
            return await self._find(session, org_id, webhook_id)

    async def update(self, principal: Principal, org_id: str, webhook_id: str, change: WebhookChange) -> Webhook:
        require(principal, org_id, Permission.WRITE)
        values: dict[str, Any] = {}
        if change.url is not None:
            values["url"] = checked_url(change.url, allow_private=self._allow_private)
        if change.kinds is not None:
            values["kinds"] = list(checked_kinds(change.kinds, "kinds"))
        if change.secret is not None:
            values["secret_sealed"] = self._sealer.seal(checked_secret(change.secret), SECRET_PURPOSE)
        async with writing(self._sessions) as session:
            webhook = await self._find(session, org_id, webhook_id, lock=True)
            for name, value in values.items():
                setattr(webhook, name, value)
            if values:
                webhook.updated_at = utcnow()
                changed = sorted(name.removesuffix("_sealed") for name in values)
                events.record(session, WEBHOOK_UPDATED, org_id=org_id, actor=principal.email, fields=changed, **_summary(webhook))
        self._changed(webhook.id)
        return webhook

    async def delete(self, principal: Principal, org_id: str, webhook_id: str) -> None:
        require(principal, org_id, Permission.WRITE)
        async with writing(self._sessions) as session:
            webhook = await self._find(session, org_id, webhook_id, lock=True)
            events.record(session, WEBHOOK_DELETED, org_id=org_id, actor=principal.email, **_summary(webhook))
            await session.delete(webhook)
        self._changed(webhook_id)

    async def enable(self, principal: Principal, org_id: str, webhook_id: str) -> Webhook:
        """Switch a disabled webhook on again, with its failures forgotten; it goes on from its cursor."""
        require(principal, org_id, Permission.WRITE)
        async with writing(self._sessions) as session:
            webhook = await self._find(session, org_id, webhook_id, lock=True)
            if not webhook.active:
                webhook.active = True
                webhook.disabled_at = webhook.disabled_reason = webhook.failing_since = None
                webhook.consecutive_failures = 0
                webhook.updated_at = utcnow()
                events.record(session, WEBHOOK_ENABLED, org_id=org_id, actor=principal.email, **_summary(webhook))
        self._changed(webhook.id)
        return webhook

    async def deliveries(
        self, principal: Principal, org_id: str, webhook_id: str, *, offset: int = 0, limit: int = 50
    ) -> tuple[int, list[WebhookDelivery]]:
        """The delivery log of a webhook, newest first."""
        require(principal, org_id, Permission.WRITE)
        async with self._sessions() as session:
            await self._find(session, org_id, webhook_id)
            total = await session.scalar(
                select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
            )
            rows = await session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
                .order_by(WebhookDelivery.id.desc()).offset(offset).limit(limit)
            )
            return int(total or 0), list(rows)

    @staticmethod
    async def _find(session: AsyncSession, org_id: str, webhook_id: str, *, lock: bool = False) -> Webhook:
        query = select(Webhook).where(Webhook.id == webhook_id, Webhook.org_id == org_id)
        webhook = await session.scalar(query.with_for_update() if lock else query)
        if webhook is None:
            await require_org(session, org_id)
            raise NotFound("webhook not found")
        return webhook
