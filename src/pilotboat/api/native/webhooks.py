"""Native API: an organisation's webhooks and their delivery log."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from pydantic import BaseModel, Field

from pilotboat.api.deps import PrincipalDep, ServicesDep
from pilotboat.api.native.schemas import StrictPatch
from pilotboat.services.webhooks import WebhookChange
from pilotboat.store.tables import Webhook, WebhookDelivery

router = APIRouter(prefix="/api/v1/orgs/{org_id}/webhooks", tags=["webhooks"])


class WebhookPatch(StrictPatch):
    """Values are checked by the service (400 naming the field)."""

    url: str | None = Field(default=None, description="http:// or https:// URL the events are POSTed to")
    kinds: list[str] | None = Field(
        default=None, description="Event kinds (e.g. lwm2m.registered) or prefixes ending in '.' (e.g. lwm2m.); empty: all",
    )
    secret: str | None = Field(default=None, description="16 to 256 characters signing the deliveries")

    def change(self) -> WebhookChange:
        return WebhookChange(**self.model_dump(exclude_unset=True))


class WebhookIn(WebhookPatch):
    """A new webhook: ``url`` is required; without ``secret`` one is generated (32 random bytes)."""

    url: str = Field(description="http:// or https:// URL the events are POSTed to")


class WebhookOut(BaseModel):
    id: str
    org_id: str
    url: str
    kinds: list[str]
    active: bool
    cursor: int = Field(description="Id of the last event delivered (or skipped by the kinds)")
    consecutive_failures: int
    failing_since: datetime | None
    disabled_at: datetime | None
    disabled_reason: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, webhook: Webhook) -> WebhookOut:
        return cls(
            id=webhook.id, org_id=webhook.org_id, url=webhook.url, kinds=list(webhook.kinds), active=webhook.active,
            cursor=webhook.cursor, consecutive_failures=webhook.consecutive_failures, failing_since=webhook.failing_since,
            disabled_at=webhook.disabled_at, disabled_reason=webhook.disabled_reason, created_at=webhook.created_at,
            updated_at=webhook.updated_at,
        )


class WebhookCreated(WebhookOut):
    secret: str = Field(description="Signs every delivery (X-Pilotboat-Signature); shown only in this response.")


class DeliveryOut(BaseModel):
    id: int = Field(description="Sent as X-Pilotboat-Delivery")
    first_event_id: int
    last_event_id: int
    events: int
    attempt: int = Field(description="1 for the first attempt at these events, 2 for the first retry…")
    outcome: str = Field(description="pending, delivered or failed")
    status_code: int | None
    error: str | None
    duration_ms: int
    created_at: datetime

    @classmethod
    def of(cls, row: WebhookDelivery) -> DeliveryOut:
        return cls(
            id=row.id, first_event_id=row.first_event_id, last_event_id=row.last_event_id, events=row.events,
            attempt=row.attempt, outcome=row.outcome, status_code=row.status_code, error=row.error,
            duration_ms=row.duration_ms, created_at=row.created_at,
        )


class DeliveryPage(BaseModel):
    total: int
    offset: int
    limit: int
    deliveries: list[DeliveryOut]


@router.post("", response_model=WebhookCreated, status_code=status.HTTP_201_CREATED,
             summary="Create a webhook: the organisation's events from now on are POSTed to it")
async def create_webhook(org_id: str, body: WebhookIn, services: ServicesDep, principal: PrincipalDep) -> WebhookCreated:
    webhook, secret = await services.webhooks.create(principal, org_id, body.change())
    return WebhookCreated(**WebhookOut.of(webhook).model_dump(), secret=secret)


@router.get("", response_model=list[WebhookOut])
async def list_webhooks(org_id: str, services: ServicesDep, principal: PrincipalDep) -> list[WebhookOut]:
    return [WebhookOut.of(webhook) for webhook in await services.webhooks.list(principal, org_id)]


@router.get("/{webhook_id}", response_model=WebhookOut)
async def get_webhook(org_id: str, webhook_id: str, services: ServicesDep, principal: PrincipalDep) -> WebhookOut:
    return WebhookOut.of(await services.webhooks.get(principal, org_id, webhook_id))


@router.patch("/{webhook_id}", response_model=WebhookOut, summary="Change the URL, the kinds or the secret")
async def update_webhook(
    org_id: str, webhook_id: str, body: WebhookPatch, services: ServicesDep, principal: PrincipalDep
) -> WebhookOut:
    return WebhookOut.of(await services.webhooks.update(principal, org_id, webhook_id, body.change()))


@router.delete("/{webhook_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_webhook(org_id: str, webhook_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    await services.webhooks.delete(principal, org_id, webhook_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{webhook_id}/enable", response_model=WebhookOut,
             summary="Switch a disabled webhook on again; it goes on from the last event it delivered")
async def enable_webhook(org_id: str, webhook_id: str, services: ServicesDep, principal: PrincipalDep) -> WebhookOut:
    return WebhookOut.of(await services.webhooks.enable(principal, org_id, webhook_id))


@router.get("/{webhook_id}/deliveries", response_model=DeliveryPage, summary="The delivery log, newest first")
async def list_deliveries(
    org_id: str, webhook_id: str, services: ServicesDep, principal: PrincipalDep,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> DeliveryPage:
    total, rows = await services.webhooks.deliveries(principal, org_id, webhook_id, offset=offset, limit=limit)
    return DeliveryPage(total=total, offset=offset, limit=limit, deliveries=[DeliveryOut.of(row) for row in rows])
