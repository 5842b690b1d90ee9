"""Magistrala "classic" bootstrap API: ``/{domainID}/clients/...`` and ``/clients/bootstrap/...``."""

import json

from fastapi import Request, Response

from pilotboat.api.compat.configs import Dialect, MagistralaConfigCreate, bootstrap_view, build_router
from pilotboat.api.deps import PrincipalDep, ServicesDep
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


@router.get(
    "/clients/bootstrap/sealed/{external_id}",
    response_class=Response,
    tags=["bootstrap"],
    summary="Sealed bootstrap: AES-GCM, timestamped and single-use (Pilotboat extension)",
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def bootstrap_sealed(external_id: str, request: Request, services: ServicesDep) -> Response:
    """The authenticated successor of secure bootstrap; see docs/api.md for the token format."""
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    config, nonce = await services.bootstrap.fetch_sealed(
        external_id, token.strip() if scheme.lower() == "sealed" else None, door="sealed"
    )
    body = json.dumps(bootstrap_view(DIALECT, config), separators=(",", ":")).encode()
    return Response(services.bootstrap.seal_response(body, external_id, nonce), media_type="application/octet-stream")
