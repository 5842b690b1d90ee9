"""Mainflux 0.13 bootstrap API: ``/things/...`` with ``thing_id``/``mainflux_*`` field names."""

from typing import Annotated

from fastapi import Header

from pilotboat.api.compat.configs import Dialect, MainfluxConfigCreate, build_router
from pilotboat.api.deps import PrincipalDep
from pilotboat.model.roles import Permission
from pilotboat.services.access import require
from pilotboat.services.errors import InvalidInput, NotFound

ORG_HEADER = "X-Pilotboat-Org"


async def caller_org(
    principal: PrincipalDep,
    x_pilotboat_org: Annotated[str | None, Header(description="Organisation id, for callers in several")] = None,
) -> str:
    """Mainflux paths name no tenant: use the caller's only organisation, or the one in X-Pilotboat-Org."""
    if x_pilotboat_org:
        require(principal, x_pilotboat_org, Permission.READ)
        return x_pilotboat_org
    orgs = principal.visible_org_ids()
    if len(orgs) == 1:
        return orgs[0]
    if not orgs:
        raise NotFound("you belong to no organisation")
    raise InvalidInput(f"you belong to several organisations: name one in the {ORG_HEADER} header", field=ORG_HEADER)


DIALECT = Dialect(
    family="mainflux",
    configs_prefix="/things",
    location_prefix="/things/configs",
    bootstrap_prefix="/things/bootstrap",
    state_path="/things/state/{config_id}",
    id_field="mainflux_id",
    secret_field="mainflux_key",
    channels_field="mainflux_channels",
    create_model=MainfluxConfigCreate,
    device_schemes=("thing",),
    bare_device_key=True,
    org_dependency=caller_org,
)

router = build_router(DIALECT)
