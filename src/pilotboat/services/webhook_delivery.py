"""Delivering events to webhooks: one worker task per active webhook on every node.

A worker reads its organisation's events after the webhook's cursor (up to the feed's horizon),
POSTs up to ``BATCH`` of those its kinds select as one signed JSON body, and on a 2xx answer moves
the cursor with a compare-and-set, so that of two nodes delivering the same batch only one moves it
(delivery is at least once: receivers drop event ids they have seen). Events the kinds skip move the
cursor without a POST. Any other answer, a timeout or a network error is a failed attempt: the same
events are tried again after a pause doubling from ``backoff_initial`` up to ``backoff_max``, and
after ``max_failures`` failed attempts in a row, or failures for longer than ``max_failing``, the
webhook is switched off (event ``webhook.disabled``). Each attempt is a row of the delivery log,
which keeps the newest ``log_size`` rows per webhook. Redirects are not followed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, timedelta
from urllib.parse import urlsplit

import httpx
from sqlalchemy import delete, func, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat import __version__
from pilotboat.security.sealing import Sealer
from pilotboat.services import events
from pilotboat.services.event_feed import EventFeed, event_json, kind_matches
from pilotboat.services.webhooks import SECRET_PURPOSE, WEBHOOK_DISABLED, host_is_private
from pilotboat.store.tables import Event, Webhook, WebhookDelivery, utcnow

log = logging.getLogger("pilotboat.webhooks")

#: Most events in one POST.
BATCH = 100
#: Events of the organisation looked at per round (those the kinds skip included).
SCAN = 1000
#: How often the active webhooks are looked up (webhooks created on other nodes start within this).
SUPERVISE_SECONDS = 5.0
#: Longest wait of an idle worker before it looks at its webhook again (a change made on another node).
IDLE_SECONDS = 5.0
#: Longest error text kept in the log (the column's size).
MAX_ERROR_CHARS = 256
SIGNATURE_HEADER = "X-Pilotboat-Signature"


def signature(secret: str, body: bytes) -> str:
    """The ``X-Pilotboat-Signature`` value of ``body``: ``sha256=<hex HMAC-SHA256 keyed with the secret>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class DeliveryPolicy:
    timeout: float = 10.0
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    max_failures: int = 20
    max_failing: float = 86_400.0
    log_size: int = 200
    allow_private: bool = False

    def backoff(self, failures: int) -> float:
        """Pause after the ``failures``-th failed attempt in a row."""
        return min(self.backoff_max, self.backoff_initial * 2 ** min(max(failures - 1, 0), 62))


@dataclass(frozen=True)
class Plan:
    """What a round does: POST ``batch`` (maybe nothing), then set the cursor to ``cursor``."""

    batch: list[Event]
    cursor: int


def plan(rows: Sequence[Event], kinds: Sequence[str], until: int) -> Plan | None:
    """The round for ``rows`` (the organisation's next events, at most ``SCAN``, read up to ``until``);
    None when there is nothing to do."""
    if not rows:
        return None
    matching = [event for event in rows if kind_matches(event.kind, kinds)]
    if len(matching) > BATCH:
        return Plan(matching[:BATCH], matching[BATCH - 1].id)
    return Plan(matching, rows[-1].id if len(rows) >= SCAN else until)


class _Refused(Exception):
    """The destination may not be reached (a private address)."""


class WebhookDispatcher:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        sealer: Sealer,
        feed: EventFeed,
        policy: DeliveryPolicy,
    ) -> None:
        self._sessions = sessions
        self._sealer = sealer
        self._feed = feed
        self.policy = policy
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._pending: set[int] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None

    # --- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._supervisor is not None:
            return
        self._client = httpx.AsyncClient(
            follow_redirects=False, timeout=self.policy.timeout, trust_env=False,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=50),
            headers={"User-Agent": f"pilotboat/{__version__}"},
        )
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name="webhook supervisor")

    async def close(self) -> None:
        """Stop every worker; attempts cut short are logged as failed."""
        tasks = [task for task in (self._supervisor, *self._workers.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._supervisor = None
        self._workers.clear()
        self._wake.clear()
        if self._pending:
            try:
                async with self._sessions.begin() as session:
                    await session.execute(
                        update(WebhookDelivery).where(WebhookDelivery.id.in_(self._pending))
                        .values(outcome="failed", error="interrupted: the node stopped")
                    )
            except Exception:
                log.exception("could not close the log of interrupted deliveries")
            self._pending.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def changed(self, webhook_id: str) -> None:
        """A webhook was created, changed, enabled or deleted on this node: act on it now."""
        wake = self._wake.get(webhook_id)
        if wake is not None:
            wake.set()
        elif self._supervisor is not None:
            self._ensure_worker(webhook_id)

    # --- supervision ------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            try:
                async with self._sessions() as session:
                    active = set(await session.scalars(select(Webhook.id).where(Webhook.active.is_(True))))
                for webhook_id in active:
                    self._ensure_worker(webhook_id)
            except Exception:
                log.exception("could not look up the active webhooks")
            await asyncio.sleep(SUPERVISE_SECONDS)

    def _ensure_worker(self, webhook_id: str) -> None:
        if webhook_id in self._workers:
            return
        self._wake[webhook_id] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._work(webhook_id), name=f"webhook {webhook_id}")
        self._workers[webhook_id] = task

        def done(finished: asyncio.Task[None]) -> None:
            if self._workers.get(webhook_id) is finished:
                del self._workers[webhook_id]
                self._wake.pop(webhook_id, None)

        task.add_done_callback(done)

    # --- one webhook ------------------------------------------------------------------------------

    async def _work(self, webhook_id: str) -> None:
        wake = self._wake[webhook_id]
        while True:
            wake.clear()
            try:
                pause = await self._round(webhook_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook round failed", extra={"webhook_id": webhook_id})
                pause = IDLE_SECONDS
            if pause is None:
                return  # deleted or disabled
            if pause > 0:
                try:
                    await asyncio.wait_for(wake.wait(), pause)
                except TimeoutError:
                    pass

    async def _round(self, webhook_id: str) -> float | None:
        """One round for the webhook; the pause before the next (0: at once), None to stop."""
        async with self._sessions() as session:
            webhook = await session.get(Webhook, webhook_id)
        if webhook is None or not webhook.active:
            return None
        until = self._feed.horizon
        rows = await self._feed.read(webhook.org_id, webhook.cursor, until=until, limit=SCAN)
        step = plan(rows, webhook.kinds, until)
        if step is None:
            wake = self._wake[webhook_id]
            waiting = asyncio.ensure_future(self._feed.wait_for_org(webhook.org_id, until, IDLE_SECONDS))
            woken = asyncio.ensure_future(wake.wait())
            try:
                await asyncio.wait({waiting, woken}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiting.cancel()
                woken.cancel()
            return 0
        if not step.batch:
            await self._move_cursor(webhook, step.cursor)
            return 0
        failures = await self._deliver(webhook, step)
        return self.policy.backoff(failures) if failures else 0

    async def _move_cursor(self, webhook: Webhook, cursor: int, session: AsyncSession | None = None) -> bool:
        statement = (
            update(Webhook).where(Webhook.id == webhook.id, Webhook.cursor == webhook.cursor)
            .values(cursor=cursor, consecutive_failures=0, failing_since=None)
        )
        if session is not None:
            return bool((await session.execute(statement)).rowcount)  # type: ignore[attr-defined]
        async with self._sessions.begin() as own:
            return bool((await own.execute(statement)).rowcount)  # type: ignore[attr-defined]

    async def _deliver(self, webhook: Webhook, step: Plan) -> int:
        """POST the batch once; the failed attempts in a row after it (0: delivered)."""
        async with self._sessions.begin() as session:
            attempt = WebhookDelivery(
                webhook_id=webhook.id, first_event_id=step.batch[0].id, last_event_id=step.batch[-1].id,
                events=len(step.batch), attempt=webhook.consecutive_failures + 1, outcome="pending", duration_ms=0,
            )
            session.add(attempt)
        self._pending.add(attempt.id)
        body = json.dumps(
            {"webhook_id": webhook.id, "events": [event_json(event) for event in step.batch]},
            separators=(",", ":"), ensure_ascii=False,
        ).encode()
        started = time.perf_counter()
        status, error = await self._post(webhook, attempt.id, body)
        duration = round((time.perf_counter() - started) * 1000)
        delivered = status is not None and 200 <= status < 300
        async with self._sessions.begin() as session:
            await session.execute(
                update(WebhookDelivery).where(WebhookDelivery.id == attempt.id).values(
                    outcome="delivered" if delivered else "failed", status_code=status,
                    error=None if delivered else (error or f"HTTP {status}")[:MAX_ERROR_CHARS], duration_ms=duration,
                )
            )
            if delivered:
                await self._move_cursor(webhook, step.cursor, session)
                failures = 0
            else:
                failures = await self._count_failure(session, webhook, error or f"HTTP {status}")
        self._pending.discard(attempt.id)
        await self._trim_log(webhook.id)
        log.info(
            "webhook delivery", extra={"webhook_id": webhook.id, "delivery_id": attempt.id, "events": len(step.batch),
                                       "status": status, "outcome": "delivered" if delivered else "failed", "ms": duration},
        )
        return failures

    async def _post(self, webhook: Webhook, delivery_id: int, body: bytes) -> tuple[int | None, str | None]:
        """(HTTP status, None) or (None, what went wrong)."""
        secret = self._sealer.open(webhook.secret_sealed, SECRET_PURPOSE)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature(secret, body),
            "X-Pilotboat-Delivery": str(delivery_id),
            "X-Pilotboat-Webhook": webhook.id,
        }
        try:
            return await asyncio.wait_for(self._send(webhook.url, body, headers), self.policy.timeout), None
        except _Refused as refused:
            return None, str(refused)
        except (TimeoutError, httpx.TimeoutException):
            return None, f"no answer within {self.policy.timeout:g} s"
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except OSError as exc:
            return None, f"could not resolve or reach the host: {exc.strerror or exc}"

    async def _send(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        assert self._client is not None
        await self._check_destination(url)
        async with self._client.stream("POST", url, content=body, headers=headers) as response:
            return response.status_code  # the answer's body is not read

    async def _check_destination(self, url: str) -> None:
        """Refuse a host that resolves to a loopback, private or link-local address (unless allowed)."""
        if self.policy.allow_private:
            return
        parts = urlsplit(url)
        host = parts.hostname or ""
        if host_is_private(host):
            raise _Refused(f"{host} is not a public address")
        try:
            ipaddress.ip_address(host)
            return  # a public address literal
        except ValueError:
            pass
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        for *_, address in await asyncio.get_running_loop().getaddrinfo(host, port):
            if host_is_private(str(address[0])):
                raise _Refused(f"{host} resolves to {address[0]}, which is not a public address")

    async def _count_failure(self, session: AsyncSession, webhook: Webhook, error: str) -> int:
        """Count a failed attempt, switch the webhook off when it failed too often or too long; the
        failed attempts in a row."""
        now = utcnow()
        await session.execute(
            update(Webhook).where(Webhook.id == webhook.id).values(
                consecutive_failures=Webhook.consecutive_failures + 1,
                failing_since=func.coalesce(Webhook.failing_since, literal(now, Webhook.failing_since.type)),
            )
        )
        row = (await session.execute(
            select(Webhook.consecutive_failures, Webhook.failing_since, Webhook.active).where(Webhook.id == webhook.id)
        )).one_or_none()
        if row is None or not row.active:
            return 1
        failing_since = row.failing_since or now
        if failing_since.tzinfo is None:
            failing_since = failing_since.replace(tzinfo=UTC)
        if row.consecutive_failures >= self.policy.max_failures:
            reason = f"{row.consecutive_failures} deliveries in a row failed; the last: {error}"
        elif now - failing_since >= timedelta(seconds=self.policy.max_failing):
            reason = f"deliveries failed for {_duration(now - failing_since)}; the last: {error}"
        else:
            return int(row.consecutive_failures)
        reason = reason[:MAX_ERROR_CHARS]
        disabled = await session.execute(
            update(Webhook).where(Webhook.id == webhook.id, Webhook.active.is_(True))
            .values(active=False, disabled_at=now, disabled_reason=reason)
        )
        if disabled.rowcount:  # type: ignore[attr-defined]
            events.record(
                session, WEBHOOK_DISABLED, org_id=webhook.org_id, actor="system", reason=reason, webhook_id=webhook.id,
                host=urlsplit(webhook.url).hostname, failures=row.consecutive_failures,
            )
            log.warning("webhook disabled", extra={"webhook_id": webhook.id, "failures": row.consecutive_failures})
        return int(row.consecutive_failures)

    async def _trim_log(self, webhook_id: str) -> None:
        async with self._sessions.begin() as session:
            oldest_kept = await session.scalar(
                select(WebhookDelivery.id).where(WebhookDelivery.webhook_id == webhook_id)
                .order_by(WebhookDelivery.id.desc()).offset(self.policy.log_size - 1).limit(1)
            )
            if oldest_kept is not None:
                await session.execute(
                    delete(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id, WebhookDelivery.id < oldest_kept)
                )


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"

