"""Tenant isolation: one check used by every service method that touches an organisation."""

from sqlalchemy.ext.asyncio import AsyncSession

from pilotboat.model.principal import Principal
from pilotboat.model.roles import Permission
from pilotboat.services.errors import Forbidden, InvalidInput, NotFound
from pilotboat.store.tables import Organisation


def require(principal: Principal, org_id: str, permission: Permission) -> None:
    """Raise unless ``principal`` holds ``permission`` in ``org_id``.

    Non-members get NotFound, so that organisation ids of other tenants cannot be probed; members
    lacking the permission get Forbidden.
    """
    if not principal.is_member(org_id):
        raise NotFound("organisation not found")
    if not principal.can(org_id, permission):
        raise Forbidden(f"your role in this organisation does not allow '{permission.value}'")


async def require_org(session: AsyncSession, org_id: str) -> None:
    """Raise NotFound unless the organisation exists (membership implies it; system admins need the check)."""
    if await session.get(Organisation, org_id) is None:
        raise NotFound("organisation not found")


def caller_org(principal: Principal, requested: str | None, *, named_by: str, kind: str = "header") -> str:
    """The organisation a call acts in when the route names none: ``requested`` if given (and
    visible), else the caller's only organisation. ``named_by`` is where a caller names one: the
    name of a header, or of a body field with ``kind="field"``."""
    if requested:
        require(principal, requested, Permission.READ)
        return requested
    orgs = principal.visible_org_ids()
    if len(orgs) == 1:
        return orgs[0]
    if not orgs:
        raise NotFound("you belong to no organisation")
    raise InvalidInput(f"you belong to several organisations: name one in the {named_by} {kind}", field=named_by)
