"""Native API: the management servers an organisation's devices can be sent to, and the assignment."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from pydantic import BaseModel, Field

from pilotboat.api.deps import PrincipalDep, ServicesDep
from pilotboat.api.native.schemas import DeviceOut, Strict, StrictPatch
from pilotboat.bootstrap.plan import PlanRefused
from pilotboat.services.management_servers import ManagementServerRecord, ServerFields

router = APIRouter(prefix="/api/v1/orgs/{org_id}", tags=["management servers"])


class ManagementServerFields(StrictPatch):
    """Values are checked by the service (400 naming the field)."""

    name: str | None = Field(default=None, description="1 to 128 characters")
    address: str | None = Field(default=None, description="Host name or IP address, without scheme or port")
    port: int | None = Field(default=None, description="1 to 65535")
    uri_scheme: str | None = Field(default=None, description="coap or coaps")
    security_mode: int | str | None = Field(
        default=None, description="PSK (0), RPK (1), CERTIFICATE (2), NOSEC (3) or EST (4): the name or the number"
    )
    short_server_id: int | None = Field(default=None, description="1 to 65534")
    lifetime: int | None = Field(default=None, description="Registration lifetime in seconds")
    binding: str | None = Field(default=None, description="Letters of U, T, S, N, Q (e.g. U, UQ, T)")

    def server_fields(self) -> ServerFields:
        return ServerFields(**self.model_dump(exclude_unset=True))


class ManagementServerIn(ManagementServerFields):
    """A new definition: name, address and port are required. Without uri_scheme and security_mode,
    port 5684 gives coaps with CERTIFICATE and any other port coap with NOSEC."""


class ManagementServerOut(BaseModel):
    id: str = Field(description="'default' for this deployment's own management server")
    org_id: str | None
    name: str
    address: str
    port: int
    uri_scheme: str
    uri: str = Field(description="The Server URI written to the device's Security object")
    security_mode: str = Field(description="PSK, RPK, CERTIFICATE, NOSEC or EST")
    security_mode_value: int = Field(description="The number written to the Security object (resource 2)")
    short_server_id: int
    lifetime: int
    binding: str
    is_default: bool
    created_at: datetime | None
    updated_at: datetime | None

    @classmethod
    def of(cls, record: ManagementServerRecord) -> ManagementServerOut:
        definition = record.definition
        return cls(
            id=definition.id, org_id=definition.org_id, name=definition.name, address=definition.address,
            port=definition.port, uri_scheme=definition.uri_scheme, uri=definition.uri,
            security_mode=definition.security_mode.name, security_mode_value=int(definition.security_mode),
            short_server_id=definition.short_server_id, lifetime=definition.lifetime, binding=definition.binding,
            is_default=definition.is_default, created_at=record.created_at, updated_at=record.updated_at,
        )


class AssignmentIn(Strict):
    server_id: str = Field(min_length=1, max_length=64, description="A management server of the organisation, or 'default'")


@router.get("/management-servers", response_model=list[ManagementServerOut],
            summary="The default management server, then the organisation's own")
async def list_servers(
    org_id: str, services: ServicesDep, principal: PrincipalDep,
    address: Annotated[str | None, Query(max_length=253, description="Only the definitions at this address")] = None,
) -> list[ManagementServerOut]:
    return [ManagementServerOut.of(record) for record in await services.management_servers.list(principal, org_id, address=address)]


@router.post("/management-servers", response_model=ManagementServerOut, status_code=status.HTTP_201_CREATED)
async def create_server(org_id: str, body: ManagementServerIn, services: ServicesDep, principal: PrincipalDep) -> ManagementServerOut:
    return ManagementServerOut.of(await services.management_servers.create(principal, org_id, body.server_fields()))


@router.get("/management-servers/{server_id}", response_model=ManagementServerOut)
async def get_server(org_id: str, server_id: str, services: ServicesDep, principal: PrincipalDep) -> ManagementServerOut:
    return ManagementServerOut.of(await services.management_servers.get(principal, org_id, server_id))


@router.patch("/management-servers/{server_id}", response_model=ManagementServerOut,
              summary="Change a definition (the default one is read-only)")
async def update_server(
    org_id: str, server_id: str, body: ManagementServerFields, services: ServicesDep, principal: PrincipalDep
) -> ManagementServerOut:
    return ManagementServerOut.of(await services.management_servers.update(principal, org_id, server_id, body.server_fields()))


@router.delete("/management-servers/{server_id}", status_code=status.HTTP_204_NO_CONTENT,
               summary="Delete a definition; its devices fall back to the default")
async def delete_server(org_id: str, server_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    await services.management_servers.delete(principal, org_id, server_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.put("/devices/{device_id}/management-server", response_model=DeviceOut,
            summary="Send the device to a management server at its next bootstrap")
async def assign_server(
    org_id: str, device_id: str, body: AssignmentIn, services: ServicesDep, principal: PrincipalDep
) -> DeviceOut:
    await services.management_servers.assign(principal, org_id, device_id, body.server_id)
    return DeviceOut.of(await services.devices.get(principal, org_id, device_id))


class PlannedServerOut(BaseModel):
    server_id: str
    uri: str
    security_mode: str
    short_server_id: int
    lifetime: int
    binding: str


class BootstrapPlanOut(BaseModel):
    device_id: str
    transport: str = Field(description="The transport the plan is for: coap (plain CoAP, the bootstrap port)")
    ready: bool = Field(description="Whether the device would be bootstrapped now")
    refusal: str | None = Field(description="Why it would be refused (recorded as the reason of the event)")
    servers: list[PlannedServerOut] = Field(description="The management servers the device would be given, in order")


@router.get("/devices/{device_id}/bootstrap-plan", response_model=BootstrapPlanOut,
            summary="What the device would be given if it bootstrapped now over LwM2M (nothing is recorded)")
async def bootstrap_plan(org_id: str, device_id: str, services: ServicesDep, principal: PrincipalDep) -> BootstrapPlanOut:
    try:
        plan = await services.bootstrap.preview(principal, org_id, device_id)
    except PlanRefused as refused:
        return BootstrapPlanOut(device_id=device_id, transport="coap", ready=False, refusal=str(refused), servers=[])
    servers = [
        PlannedServerOut(
            server_id=account.definition.id, uri=account.definition.uri, security_mode=account.definition.security_mode.name,
            short_server_id=account.definition.short_server_id, lifetime=account.definition.lifetime,
            binding=account.definition.binding,
        )
        for account in plan.servers
    ]
    return BootstrapPlanOut(device_id=device_id, transport="coap", ready=True, refusal=None, servers=servers)
