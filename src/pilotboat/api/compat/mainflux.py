"""Mainflux 0.13 bootstrap API: ``/things/...`` with ``thing_id``/``mainflux_*`` field names."""

from typing import Annotated

from fastapi import Header

from pilotboat.api.compat.configs import Dialect, MainfluxConfigCreate, build_router
from pilotboat.api.deps import PrincipalDep
from pilotboat.services.access import caller_org

ORG_HEADER = "X-Pilotboat-Org"


async def org_of_caller(
    principal: PrincipalDep,
    x_pilotboat_org: Annotated[str | None, Header(description="Organisation id, for callers in several")] = None,
) -> str:
    """Mainflux paths name no tenant: the caller's only organisation, or the one in X-Pilotboat-Org."""
    return caller_org(principal, x_pilotboat_org, named_by=ORG_HEADER)


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
    org_dependency=org_of_caller,
)

router = build_router(DIALECT)
