"""WebAccess/DMP compatible routes (API base ``/api``): the trust store, users' per-company permissions,
management-server definitions ("bootstrap servers" upstream) and their assignment to devices.

Answers are wrapped as upstream does, ``{"data": ..., "success": true}``; errors are
``{"success": false, "message": "..."}`` (see ``pilotboat.api.errors``). A "company" is a Pilotboat
organisation.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pilotboat.api.deps import PrincipalDep, ServicesDep
from pilotboat.model.principal import Principal
from pilotboat.model.roles import GRANTABLE, ROLE_PERMISSIONS, Permission, Role
from pilotboat.security.pki import MAX_PEM_CHARS
from pilotboat.services.access import caller_org
from pilotboat.services.accounts import MembershipChange, MembershipView
from pilotboat.services.container import Services
from pilotboat.services.device_operations import Trigger
from pilotboat.services.errors import InvalidInput, NotFound
from pilotboat.services.management_servers import ManagementServerRecord, ServerFields, transport_for_port

router = APIRouter(prefix="/api", tags=["WebAccess/DMP compatibility"])

#: Upstream's names of the permissions.
DISPLAY_NAMES: dict[Permission, str] = {
    Permission.READ: "Read",
    Permission.WRITE: "Write",
    Permission.MANAGE_USERS: "Manage Users",
    Permission.MANAGE_PKI: "Manage PKI",
    Permission.DEVICE_MANAGEMENT_SERVER: "Device Management Server",
}
#: Display names and native values, case-insensitive.
_BY_NAME: dict[str, Permission] = {
    **{permission.value: permission for permission in Permission},
    **{name.lower(): permission for permission, name in DISPLAY_NAMES.items()},
}
#: Base64 of the largest PEM bundle the trust store takes.
MAX_CERTS_CHARS = (MAX_PEM_CHARS + 2) // 3 * 4


class CertsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    certs: str = Field(max_length=MAX_CERTS_CHARS, description="Base64 of a PEM bundle of CA certificates; empty empties the store")


class CompanyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    company_id: str = Field(min_length=1, max_length=64)
    company_name: str | None = Field(default=None, max_length=256, description="Ignored (accepted so that a GET answer can be sent back)")
    role: Role | None = None
    permissions: list[Annotated[str, Field(max_length=64)]] | None = Field(
        default=None, max_length=32, description="The full set of permissions: display names or native values"
    )


class _FoldedKeys(BaseModel):
    """Upstream spells field names in several ways (``address``, ``Address``, ``companyId``): keys
    match the fields ignoring case and underscores."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _fold_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        names = {name.replace("_", "").lower(): name for name in cls.model_fields}
        folded: dict[Any, Any] = {}
        for key, value in data.items():
            name = names.get(key.replace("_", "").lower(), key) if isinstance(key, str) else key
            if name in folded:
                raise ValueError(f"field '{name}' is given twice (field names ignore case)")
            folded[name] = value
        return folded


class BootstrapServerIn(_FoldedKeys):
    name: str = Field(max_length=1024)
    address: str = Field(max_length=1024, description="Host name or IP address, without scheme or port")
    port: int = Field(description="5684 gives coaps with certificates (mutual TLS); any other port coap without security")
    company_id: str | None = Field(
        default=None, max_length=64, description="The organisation; may be left out by a caller who belongs to one only"
    )


class BootstrapServerChange(_FoldedKeys):
    name: str | None = Field(default=None, max_length=1024)
    address: str | None = Field(default=None, max_length=1024)
    port: int | None = Field(default=None, description="A new port sets the scheme and security mode as on creation")
    company_id: str | None = Field(default=None, max_length=64, description="Ignored: a definition stays in its company")


def _ok(data: Any) -> dict[str, Any]:
    return {"data": data, "success": True}


def _server_view(record: ManagementServerRecord) -> dict[str, Any]:
    definition = record.definition
    return {
        "id": definition.id,
        "name": definition.name,
        "address": definition.address,
        "port": definition.port,
        "company_id": definition.org_id,
        "uri": definition.uri,
        "uri_scheme": definition.uri_scheme,
        "security_mode": definition.security_mode.name,
        "short_server_id": definition.short_server_id,
        "lifetime": definition.lifetime,
        "binding": definition.binding,
        "is_default": definition.is_default,
    }


def _permission(name: str) -> Permission:
    permission = _BY_NAME.get(name.strip().lower())
    if permission is None:
        known = ", ".join(f"'{display}'" for display in DISPLAY_NAMES.values())
        raise InvalidInput(f"unknown permission '{name}'; known: {known}", field="permissions")
    return permission


def _decode_bundle(certs: str) -> str:
    try:
        raw = base64.b64decode("".join(certs.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput("certs: not valid base64", field="certs") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput("certs: the decoded value is not a PEM text bundle", field="certs") from exc


async def _certs_view(services: Services, principal: Principal) -> dict[str, Any]:
    bundle = "".join(await services.trust.bundle(principal))
    return _ok({"certs": base64.b64encode(bundle.encode()).decode()})


async def _user_view(services: Services, principal: Principal, user_id: str) -> dict[str, Any]:
    user, memberships = await services.accounts.get_user(principal, user_id)
    return _ok({
        "id": user.id,
        "email": user.email,
        "is_system_admin": user.is_system_admin,
        "companies": [
            {
                "company_id": view.org.id,
                "company_name": view.org.name,
                "role": view.role.value,
                "permissions": [DISPLAY_NAMES[permission] for permission in Permission if permission in view.permissions],
            }
            for view in memberships
        ],
    })


def _change(company: CompanyIn, current: MembershipView | None) -> MembershipChange:
    """A company entry as a membership change. The permissions the (new or current) role implies are
    dropped; the rest are the grants, which the service checks (only some may be granted alone)."""
    if company.permissions is None:
        return MembershipChange(company.company_id, company.role, None)
    permissions = {_permission(name) for name in company.permissions}
    if current is None:
        # No membership the caller may see: the service refuses the change (404 or 403) whatever it
        # holds, so keep only what could be granted and let it answer.
        return MembershipChange(company.company_id, company.role, frozenset(permissions & GRANTABLE))
    implied = ROLE_PERMISSIONS[company.role or current.role]
    return MembershipChange(company.company_id, company.role, frozenset(permissions - implied))


def _check_companies(companies: list[CompanyIn]) -> None:
    """Refuse what no membership could take (before looking anything up): repeated companies, unknown names."""
    company_ids = [company.company_id for company in companies]
    if len(set(company_ids)) != len(company_ids):
        raise InvalidInput("each company may appear only once", field="company_id")
    for company in companies:
        for name in company.permissions or ():
            _permission(name)


@router.get("/certs", summary="The trust store of the management servers (base64 of a PEM bundle)")
async def get_certs(services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    return await _certs_view(services, principal)


@router.put("/certs", summary="Replace the trust store (system administrators)")
async def put_certs(body: CertsIn, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    await services.trust.replace(principal, _decode_bundle(body.certs))
    return await _certs_view(services, principal)


@router.get("/users/{user_id}", summary="A user and its permissions per company")
async def get_user(user_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    return await _user_view(services, principal, user_id)


@router.put("/users/{user_id}/companies", summary="Set a user's role and permissions in some companies, all or nothing")
async def put_user_companies(
    user_id: str, services: ServicesDep, principal: PrincipalDep,
    body: Annotated[list[CompanyIn], Body(min_length=1, max_length=1000)],
) -> dict[str, Any]:
    _check_companies(body)
    try:
        _, memberships = await services.accounts.get_user(principal, user_id)
    except NotFound:
        memberships = []  # the service refuses below: 403 to a member who may not manage users, else 404
    current = {view.org.id: view for view in memberships}
    changes = [_change(company, current.get(company.company_id)) for company in body]
    await services.accounts.change_memberships(principal, user_id, changes)
    return await _user_view(services, principal, user_id)


# --- management servers ("bootstrap servers" upstream) -----------------------------------------


@router.post("/bootstrap", summary="Define a management server in a company")
async def create_bootstrap_server(body: BootstrapServerIn, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    org_id = caller_org(principal, body.company_id, named_by="company_id", kind="field")
    fields = ServerFields(name=body.name, address=body.address, port=body.port)
    return _ok(_server_view(await services.management_servers.create(principal, org_id, fields)))


@router.get("/bootstrap", summary="The management servers of the caller's companies (the default one first), by address")
async def list_bootstrap_servers(
    services: ServicesDep, principal: PrincipalDep,
    address_as_upstream: Annotated[str | None, Query(alias="Address", max_length=253)] = None,
    address: Annotated[str | None, Query(max_length=253)] = None,
) -> dict[str, Any]:
    if address_as_upstream and address and address_as_upstream != address:
        raise InvalidInput("Address and address differ: give one", field="Address")
    records = await services.management_servers.list(principal, None, address=address_as_upstream or address)
    return _ok([_server_view(record) for record in records])


@router.get("/bootstrap/{server_id}", summary="One management server")
async def get_bootstrap_server(server_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    return _ok(_server_view(await services.management_servers.get(principal, None, server_id)))


@router.put("/bootstrap/{server_id}", summary="Change a management server's name, address or port")
async def update_bootstrap_server(
    server_id: str, body: BootstrapServerChange, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    scheme, mode = transport_for_port(body.port) if body.port is not None else (None, None)
    fields = ServerFields(name=body.name, address=body.address, port=body.port, uri_scheme=scheme, security_mode=mode)
    return _ok(_server_view(await services.management_servers.update(principal, None, server_id, fields)))


@router.delete("/bootstrap/{server_id}", summary="Delete a management server; its devices fall back to the default")
async def delete_bootstrap_server(server_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    reassigned = await services.management_servers.delete(principal, None, server_id)
    return _ok({"id": server_id, "devices_reassigned": reassigned})


@router.put("/management/devices/{mac_address}/bootstrap-server/{server_id}",
            summary="Send the device with this MAC address to a management server at its next bootstrap")
async def assign_bootstrap_server(mac_address: str, server_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    device, definition = await services.management_servers.assign_by_mac(principal, mac_address, server_id)
    return _ok({
        "device_id": device.id, "mac_address": device.mac_address, "company_id": device.org_id,
        "server_id": definition.id, "uri": definition.uri,
    })


@router.post("/management/devices/{mac_address}/commands/trigger-bootstrap",
             summary="Make the device with this MAC address bootstrap again (executes /1/x/9)")
async def trigger_bootstrap(
    mac_address: str, services: ServicesDep, principal: PrincipalDep,
    server_instance: Annotated[int | None, Query(ge=0, le=65534, description="The Server object instance (default: the lowest registered)")] = None,
    timeout: Annotated[float | None, Query(gt=0, le=300, description="Seconds to wait for the device")] = None,
) -> dict[str, Any]:
    """``accepted`` says whether the device took the trigger (2.04) or refused it (e.g. 4.05); 409 when
    the device is not registered, 504 when it did not answer in time."""
    tracked = await services.device_operations.trigger_by_mac(
        principal, mac_address, Trigger.BOOTSTRAP, server_instance=server_instance, timeout=timeout,
    )
    return _ok({**tracked.result(), "accepted": bool(tracked.outcome and tracked.outcome.ok), "device_id": tracked.device_id,
                "company_id": tracked.org_id})
