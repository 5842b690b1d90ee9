"""Magistrala "classic" bootstrap API: ``/{domainID}/clients/...`` and ``/clients/bootstrap/...``."""

from pilotboat.api.compat.configs import Dialect, MagistralaConfigCreate, build_router
from pilotboat.api.deps import PrincipalDep
from pilotboat.model.roles import Permission
from pilotboat.services.access import require


async def domain_org(domain_id: str, principal: PrincipalDep) -> str:
    """The ``{domainID}`` of Magistrala paths is a Pilotboat organisation id."""
    require(principal, domain_id, Permission.READ)
    return domain_id


DIALECT = Dialect(
    family="magistrala",
    configs_prefix="/{domain_id}/clients",
    location_prefix="/clients/configs",
    bootstrap_prefix="/clients/bootstrap",
    state_path="/{domain_id}/clients/state/{config_id}",
    id_field="client_id",
    secret_field="client_secret",
    channels_field="channels",
    create_model=MagistralaConfigCreate,
    device_schemes=("client",),
    bare_device_key=False,
    org_dependency=domain_org,
)

router = build_router(DIALECT)
