"""WebAccess/DMP compatible routes (API base ``/api``): the trust store and users' per-company permissions.

Answers are wrapped as upstream does, ``{"data": ..., "success": true}``; errors are
``{"success": false, "message": "..."}`` (see ``pilotboat.api.errors``). A "company" is a Pilotboat
organisation.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, Body
from pydantic import BaseModel, ConfigDict, Field

from pilotboat.api.deps import PrincipalDep, ServicesDep
from pilotboat.model.principal import Principal
from pilotboat.model.roles import GRANTABLE, ROLE_PERMISSIONS, Permission, Role
from pilotboat.security.pki import MAX_PEM_CHARS
from pilotboat.services.accounts import MembershipChange, MembershipView
from pilotboat.services.container import Services
from pilotboat.services.errors import InvalidInput, NotFound

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


def _ok(data: dict[str, Any]) -> dict[str, Any]:
    return {"data": data, "success": True}


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
