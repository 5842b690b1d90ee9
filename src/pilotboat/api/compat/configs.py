"""Bootstrap-config routes shared by the Magistrala (classic) and Mainflux 0.13 doors.

The two upstream APIs differ only in paths, field names, the device header scheme and how the tenant
is named; a :class:`Dialect` captures those differences and :func:`build_router` makes the routes.
Everything else is the device and bootstrap services.
"""

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Self

from fastapi import APIRouter, Depends, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pilotboat.api.deps import PrincipalDep, ServicesDep
from pilotboat.bootstrap.service import BootstrapConfig
from pilotboat.services.devices import DeviceFilter, DeviceInput, DeviceRecord
from pilotboat.services.errors import InvalidInput

ExternalId = Field(min_length=1, max_length=256)
ExternalKey = Field(min_length=1, max_length=1024)
Pem = Field(default="", max_length=65536)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConfigCreateBase(_Strict):
    external_id: str = ExternalId
    external_key: str = ExternalKey
    channels: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(min_length=1)
    name: str = Field(default="", max_length=256)
    content: str = Field(default="", max_length=65536)
    client_cert: str = Pem
    client_key: str = Pem
    ca_cert: str = Pem

    #: The request field naming an existing device (``client_id`` or ``thing_id``).
    id_field: ClassVar[str]

    def device_id(self) -> str | None:
        return getattr(self, self.id_field)

    def to_input(self) -> DeviceInput:
        # Only the fields the caller gave: attaching a config to an existing device keeps the rest.
        columns = {"external_id": self.external_id}
        columns.update({name: getattr(self, name) for name in ("name", "content", "client_cert", "ca_cert")
                        if name in self.model_fields_set})
        return DeviceInput(columns=columns, external_key=self.external_key, client_key=self.client_key or None,
                           channels=self.channels)


class MagistralaConfigCreate(ConfigCreateBase):
    id_field = "client_id"
    client_id: str | None = Field(default=None, max_length=64)


class MainfluxConfigCreate(ConfigCreateBase):
    id_field = "thing_id"
    thing_id: str | None = Field(default=None, max_length=64)


class ConfigUpdate(_Strict):
    name: str | None = Field(default=None, max_length=256)
    content: str | None = Field(default=None, max_length=65536)

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if self.name is None and self.content is None:
            raise ValueError("give name and/or content")
        return self


class CertsUpdate(_Strict):
    client_cert: str | None = Field(default=None, max_length=65536)
    client_key: str | None = Field(default=None, max_length=65536)
    ca_cert: str | None = Field(default=None, max_length=65536)

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if self.client_cert is None and self.client_key is None and self.ca_cert is None:
            raise ValueError("give client_cert, client_key and/or ca_cert")
        return self


class ConnectionsUpdate(_Strict):
    channels: list[Annotated[str, Field(min_length=1, max_length=64)]]


class StateUpdate(_Strict):
    state: int = Field(strict=True)  # upstream decodes into an int: "1", true or 1.0 are 400


@dataclass(frozen=True)
class Dialect:
    family: str  # "magistrala" | "mainflux"
    configs_prefix: str  # management routes, may contain {domain_id}
    location_prefix: str  # Location header of a created config
    bootstrap_prefix: str  # device routes
    state_path: str
    id_field: str
    secret_field: str
    channels_field: str
    create_model: type[ConfigCreateBase]
    device_schemes: tuple[str, ...]  # accepted Authorization schemes on device routes
    bare_device_key: bool  # accept a key with no scheme (Mainflux 0.12)
    org_dependency: Callable[..., Awaitable[str]]


def _channel_views(record: DeviceRecord) -> list[dict[str, Any]]:
    return [{"id": link.channel.id, "name": link.channel.name, "metadata": link.channel.metadata_} for link in record.channels]


def config_view(dialect: Dialect, record: DeviceRecord) -> dict[str, Any]:
    """A config as upstream renders it, minus the secrets (see docs/api.md)."""
    device = record.device
    return {
        dialect.id_field: device.id,
        dialect.channels_field: _channel_views(record),
        "external_id": device.external_id,
        "content": device.content,
        "name": device.name,
        "state": device.state,
        "client_cert": device.client_cert,
        "ca_cert": device.ca_cert,
    }


def bootstrap_view(dialect: Dialect, config: BootstrapConfig) -> dict[str, Any]:
    return {
        dialect.id_field: config.client_id,
        dialect.secret_field: config.client_secret,
        dialect.channels_field: config.channels,
        "content": config.content,
        "client_cert": config.client_cert,
        "client_key": config.client_key,
        "ca_cert": config.ca_cert,
    }


def device_key(dialect: Dialect, request: Request) -> str | None:
    """The key in ``Authorization: <scheme> <key>`` for one of the dialect's schemes."""
    raw = request.headers.get("authorization", "").strip()
    if not raw:
        return None
    scheme, _, value = raw.partition(" ")
    if value and scheme.lower() in dialect.device_schemes:
        return value.strip() or None
    if dialect.bare_device_key and not value:
        return scheme
    return None


def build_router(dialect: Dialect) -> APIRouter:
    router = APIRouter(tags=[f"{dialect.family} compatibility"])
    OrgId = Annotated[str, Depends(dialect.org_dependency)]
    prefix = dialect.configs_prefix

    @router.get(f"{dialect.bootstrap_prefix}/secure/{{external_id}}", response_class=Response,
                summary="Secure bootstrap: encrypted key in, encrypted configuration out",
                responses={200: {"content": {"application/octet-stream": {}}}})
    async def bootstrap_secure(external_id: str, request: Request, services: ServicesDep) -> Response:
        config = await services.bootstrap.fetch_secure(
            external_id, device_key(dialect, request), door=f"{dialect.family}-secure", family=dialect.family
        )
        body = json.dumps(bootstrap_view(dialect, config), separators=(",", ":")).encode()
        return Response(services.bootstrap.encrypt_response(body, family=dialect.family), media_type="application/octet-stream")

    @router.get(f"{dialect.bootstrap_prefix}/{{external_id}}", summary="Bootstrap: get the device's configuration")
    async def bootstrap(external_id: str, request: Request, services: ServicesDep) -> dict[str, Any]:
        config = await services.bootstrap.fetch(external_id, device_key(dialect, request), door=dialect.family)
        return bootstrap_view(dialect, config)

    @router.get(f"{dialect.bootstrap_prefix}/", include_in_schema=False)
    @router.get(f"{dialect.bootstrap_prefix}/secure/", include_in_schema=False)
    async def bootstrap_without_id() -> None:
        raise InvalidInput("missing external id in the path", field="external_id")

    @router.post(f"{prefix}/configs", status_code=status.HTTP_201_CREATED, response_class=Response,
                 summary="Create a config (creates the device when no id is given)")
    async def create_config(body: dialect.create_model, org_id: OrgId, services: ServicesDep,  # type: ignore[valid-type]
                            principal: PrincipalDep) -> Response:
        device_id = await services.devices.create_config(principal, org_id, body.device_id(), body.to_input())
        return Response(status_code=status.HTTP_201_CREATED, headers={"Location": f"{dialect.location_prefix}/{device_id}"})

    @router.get(f"{prefix}/configs", summary="List configs")
    async def list_configs(
        org_id: OrgId, services: ServicesDep, principal: PrincipalDep,
        offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=100)] = 10,
        state: Annotated[int | None, Query(ge=0, le=1)] = None, external_id: str | None = None,
        name: Annotated[str | None, Query(max_length=256)] = None,
    ) -> dict[str, Any]:
        flt = DeviceFilter(name=name, state=state, external_id=external_id, has_config=True, offset=offset, limit=limit)
        total, records = await services.devices.list(principal, org_id, flt)
        return {"total": total, "offset": offset, "limit": limit, "configs": [config_view(dialect, r) for r in records]}

    @router.get(f"{prefix}/configs/{{config_id}}", summary="View a config")
    async def view_config(config_id: str, org_id: OrgId, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
        return config_view(dialect, await services.devices.get(principal, org_id, config_id, config=True))

    @router.put(f"{prefix}/configs/{{config_id}}", response_class=Response, summary="Update name and content")
    async def update_config(config_id: str, body: ConfigUpdate, org_id: OrgId, services: ServicesDep,
                            principal: PrincipalDep) -> Response:
        await services.devices.update(principal, org_id, config_id, body.model_dump(exclude_none=True), config=True)
        return Response(status_code=status.HTTP_200_OK)

    @router.patch(f"{prefix}/configs/certs/{{config_id}}", summary="Update certificates")
    async def update_certs(config_id: str, body: CertsUpdate, org_id: OrgId, services: ServicesDep,
                           principal: PrincipalDep) -> dict[str, Any]:
        device = await services.devices.update_certs(
            principal, org_id, config_id, client_cert=body.client_cert, client_key=body.client_key, ca_cert=body.ca_cert
        )
        return {dialect.id_field: device.id, "client_cert": device.client_cert,
                "client_key": services.devices.client_key(device), "ca_cert": device.ca_cert}

    @router.put(f"{prefix}/configs/connections/{{config_id}}", response_class=Response, summary="Update channels")
    async def update_connections(config_id: str, body: ConnectionsUpdate, org_id: OrgId, services: ServicesDep,
                                 principal: PrincipalDep) -> Response:
        await services.devices.set_channels(principal, org_id, config_id, body.channels, config=True)
        return Response(status_code=status.HTTP_200_OK)

    @router.delete(f"{prefix}/configs/{{config_id}}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
                   summary="Remove a config (204 also when it does not exist)")
    async def remove_config(config_id: str, org_id: OrgId, services: ServicesDep, principal: PrincipalDep) -> Response:
        await services.devices.remove_config(principal, org_id, config_id)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.put(dialect.state_path, response_class=Response, summary="Activate (1) or deactivate (0)")
    async def update_state(config_id: str, body: StateUpdate, org_id: OrgId, services: ServicesDep,
                           principal: PrincipalDep) -> Response:
        await services.devices.set_state(principal, org_id, config_id, body.state, config=True)
        return Response(status_code=status.HTTP_200_OK)

    return router

