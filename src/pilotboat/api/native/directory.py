"""Native API: the device directory of the LwM2M management server."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from pilotboat.api.deps import PrincipalDep, ServicesDep
from pilotboat.api.native.schemas import EventOut
from pilotboat.registry.service import address_text
from pilotboat.services.directory import DirectoryView, LiveRegistration

router = APIRouter(prefix="/api/v1/orgs/{org_id}", tags=["device directory"])


class RegistrationOut(BaseModel):
    """The device's current registration on this deployment."""

    registration_id: str
    endpoint: str
    address: str
    lifetime: int
    lwm2m_version: str
    binding: str
    queue_mode: bool
    sms: str | None
    objects: list[str]
    registered_at: datetime
    updated_at: datetime
    expires_at: datetime = Field(description="Last update + lifetime + the deployment's grace period")

    @classmethod
    def of(cls, live: LiveRegistration) -> RegistrationOut:
        reg = live.registration
        return cls(
            registration_id=reg.registration_id, endpoint=reg.endpoint, address=address_text(reg.address),
            lifetime=reg.lifetime, lwm2m_version=reg.lwm2m_version, binding=reg.binding, queue_mode=reg.queue_mode,
            sms=reg.sms, objects=list(reg.objects), registered_at=datetime.fromtimestamp(reg.registered_at, live.expires_at.tzinfo),
            updated_at=datetime.fromtimestamp(reg.updated_at, live.expires_at.tzinfo), expires_at=live.expires_at,
        )


class DirectoryEntryOut(BaseModel):
    device_id: str = Field(description="The device's id: stable whatever endpoint name it registers with")
    org_id: str
    first_endpoint: str = Field(description="The endpoint name of the device's first registration")
    endpoint: str = Field(description="The endpoint name of its latest registration")
    status: str = Field(description="registered, deregistered or expired")
    registrations: int = Field(description="How many times the device registered")
    first_registered_at: datetime
    last_registered_at: datetime
    last_updated_at: datetime = Field(description="Last registration or update that changed something, or the last one before the end")
    ended_at: datetime | None
    address: str
    lwm2m_version: str
    binding: str
    queue_mode: bool
    lifetime: int
    objects: list[str] = Field(description="Objects and object instances, e.g. /3/0")
    content_formats: list[int] = Field(description="Content formats the device announced (LwM2M 1.1+)")
    registration: RegistrationOut | None = Field(description="The live registration, when registered")

    @classmethod
    def of(cls, view: DirectoryView) -> DirectoryEntryOut:
        entry = view.entry
        return cls(
            device_id=entry.device_id, org_id=entry.org_id, first_endpoint=entry.first_endpoint, endpoint=entry.endpoint,
            status=entry.status, registrations=entry.registrations, first_registered_at=entry.first_registered_at,
            last_registered_at=entry.last_registered_at, last_updated_at=entry.last_updated_at, ended_at=entry.ended_at,
            address=entry.address, lwm2m_version=entry.lwm2m_version, binding=entry.binding, queue_mode=entry.queue_mode,
            lifetime=entry.lifetime, objects=list(entry.objects), content_formats=list(entry.content_formats),
            registration=RegistrationOut.of(view.live) if view.live is not None else None,
        )


class DirectoryEntryDetail(DirectoryEntryOut):
    history: list[EventOut] = Field(description="Registration events of the device, newest first")


class DirectoryPage(BaseModel):
    total: int
    offset: int
    limit: int
    devices: list[DirectoryEntryOut]


@router.get("/directory", response_model=DirectoryPage, summary="Devices that registered with this deployment")
async def list_directory(
    org_id: str, services: ServicesDep, principal: PrincipalDep,
    status: Annotated[str | None, Query(description="registered, deregistered or expired")] = None,
    endpoint: Annotated[str | None, Query(max_length=256)] = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> DirectoryPage:
    total, views = await services.directory.list(principal, org_id, status=status, endpoint=endpoint, offset=offset, limit=limit)
    return DirectoryPage(total=total, offset=offset, limit=limit, devices=[DirectoryEntryOut.of(view) for view in views])


@router.get("/directory/{device_id}", response_model=DirectoryEntryDetail, summary="A device's directory entry and registration history")
async def get_directory_entry(org_id: str, device_id: str, services: ServicesDep, principal: PrincipalDep) -> DirectoryEntryDetail:
    view = await services.directory.get(principal, org_id, device_id)
    return DirectoryEntryDetail(**DirectoryEntryOut.of(view).model_dump(), history=[EventOut.of(event) for event in view.history])
