"""Native API: devices, channels and events of one organisation."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from pilotboat.api.deps import PrincipalDep, ServicesDep
from pilotboat.api.native.schemas import (
    ChannelIn,
    ChannelOut,
    ChannelPage,
    ChannelPatch,
    ChannelsIn,
    DeviceCreated,
    DeviceFields,
    DeviceIn,
    DeviceOut,
    DevicePage,
    EventOut,
    EventPage,
    StateIn,
)
from pilotboat.services.devices import DeviceFilter, DeviceInput
from pilotboat.services.events import EventFilter

router = APIRouter(prefix="/api/v1/orgs/{org_id}")

Offset = Annotated[int, Query(ge=0, le=1_000_000)]
Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("/devices", response_model=DeviceCreated, status_code=status.HTTP_201_CREATED, tags=["devices"])
async def create_device(org_id: str, body: DeviceIn, services: ServicesDep, principal: PrincipalDep) -> DeviceCreated:
    data = DeviceInput(
        columns=body.columns(), external_key=body.external_key, client_key=body.client_key, state=body.state,
        channels=body.channels,
    )
    record, secret = await services.devices.create(principal, org_id, data)
    return DeviceCreated(**DeviceOut.of(record).model_dump(), client_secret=secret)


@router.get("/devices", response_model=DevicePage, tags=["devices"])
async def list_devices(
    org_id: str, services: ServicesDep, principal: PrincipalDep, offset: Offset = 0, limit: Limit = 10,
    name: Annotated[str | None, Query(max_length=256, description="Partial, case-insensitive")] = None,
    state: Annotated[int | None, Query(ge=0, le=1)] = None,
    external_id: str | None = None, endpoint: str | None = None, mac_address: str | None = None,
    serial_number: str | None = None, imei: str | None = None, channel_id: str | None = None,
) -> DevicePage:
    flt = DeviceFilter(
        name=name, state=state, external_id=external_id, endpoint=endpoint, mac_address=mac_address,
        serial_number=serial_number, imei=imei, channel_id=channel_id, offset=offset, limit=limit,
    )
    total, records = await services.devices.list(principal, org_id, flt)
    return DevicePage(total=total, offset=offset, limit=limit, devices=[DeviceOut.of(record) for record in records])


@router.get("/devices/{device_id}", response_model=DeviceOut, tags=["devices"])
async def get_device(org_id: str, device_id: str, services: ServicesDep, principal: PrincipalDep) -> DeviceOut:
    return DeviceOut.of(await services.devices.get(principal, org_id, device_id))


@router.patch("/devices/{device_id}", response_model=DeviceOut, tags=["devices"])
async def update_device(
    org_id: str, device_id: str, body: DeviceFields, services: ServicesDep, principal: PrincipalDep
) -> DeviceOut:
    record = await services.devices.update(principal, org_id, device_id, body.columns(), external_key=body.external_key)
    return DeviceOut.of(record)


@router.delete("/devices/{device_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["devices"])
async def delete_device(org_id: str, device_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    await services.devices.delete(principal, org_id, device_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.put("/devices/{device_id}/state", response_model=DeviceOut, tags=["devices"])
async def set_state(org_id: str, device_id: str, body: StateIn, services: ServicesDep, principal: PrincipalDep) -> DeviceOut:
    await services.devices.set_state(principal, org_id, device_id, body.state)
    return DeviceOut.of(await services.devices.get(principal, org_id, device_id))


@router.put("/devices/{device_id}/channels", response_model=DeviceOut, tags=["devices"])
async def set_channels(
    org_id: str, device_id: str, body: ChannelsIn, services: ServicesDep, principal: PrincipalDep
) -> DeviceOut:
    await services.devices.set_channels(principal, org_id, device_id, body.channels)
    return DeviceOut.of(await services.devices.get(principal, org_id, device_id))


@router.post("/channels", response_model=ChannelOut, status_code=status.HTTP_201_CREATED, tags=["channels"])
async def create_channel(org_id: str, body: ChannelIn, services: ServicesDep, principal: PrincipalDep) -> ChannelOut:
    return ChannelOut.of(await services.devices.create_channel(principal, org_id, body.name, body.metadata))


@router.get("/channels", response_model=ChannelPage, tags=["channels"])
async def list_channels(
    org_id: str, services: ServicesDep, principal: PrincipalDep, offset: Offset = 0, limit: Limit = 10,
    name: Annotated[str | None, Query(max_length=256)] = None,
) -> ChannelPage:
    total, channels = await services.devices.list_channels(principal, org_id, name=name, offset=offset, limit=limit)
    return ChannelPage(total=total, offset=offset, limit=limit, channels=[ChannelOut.of(channel) for channel in channels])


@router.get("/channels/{channel_id}", response_model=ChannelOut, tags=["channels"])
async def get_channel(org_id: str, channel_id: str, services: ServicesDep, principal: PrincipalDep) -> ChannelOut:
    return ChannelOut.of(await services.devices.get_channel(principal, org_id, channel_id))


@router.patch("/channels/{channel_id}", response_model=ChannelOut, tags=["channels"])
async def update_channel(
    org_id: str, channel_id: str, body: ChannelPatch, services: ServicesDep, principal: PrincipalDep
) -> ChannelOut:
    channel = await services.devices.update_channel(principal, org_id, channel_id, name=body.name, metadata=body.metadata)
    return ChannelOut.of(channel)


@router.delete("/channels/{channel_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["channels"])
async def delete_channel(org_id: str, channel_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    await services.devices.delete_channel(principal, org_id, channel_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/events", response_model=EventPage, tags=["events"])
async def list_events(
    org_id: str, services: ServicesDep, principal: PrincipalDep, offset: Offset = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    device_id: str | None = None,
    kind: Annotated[str | None, Query(max_length=64, description="Exact kind, or a prefix ending with '.'")] = None,
    outcome: Annotated[str | None, Query(max_length=16)] = None,
    since: datetime | None = None, until: datetime | None = None,
) -> EventPage:
    flt = EventFilter(device_id=device_id, kind=kind, outcome=outcome, since=since, until=until, offset=offset, limit=limit)
    total, rows = await services.events.list(principal, org_id, flt)
    return EventPage(total=total, offset=offset, limit=limit, events=[EventOut.of(event) for event in rows])
