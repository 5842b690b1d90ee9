"""Native API: authentication, organisations, users and API keys."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Response, status

from pilotboat.api.deps import PrincipalDep, ServicesDep
from pilotboat.model.principal import Principal
from pilotboat.services.authorities import CredentialPolicy
from pilotboat.store.tables import Organisation
from pilotboat.api.native.schemas import (
    ApiKeyCreated,
    ApiKeyIn,
    ApiKeyOut,
    MemberOut,
    MembershipIn,
    OrgIn,
    OrgOut,
    OrgPatch,
    TokenOut,
    UserIn,
)

router = APIRouter(prefix="/api/v1")


@router.post("/auth/token", response_model=TokenOut, tags=["auth"], summary="Log in (OAuth2 password grant)")
async def token(
    services: ServicesDep,
    username: Annotated[str, Form(max_length=320)],
    password: Annotated[str, Form(max_length=1024)],
    grant_type: Annotated[str | None, Form(pattern="^password$")] = None,
) -> TokenOut:
    issued = await services.accounts.login(username, password)
    return TokenOut(access_token=issued.access_token, expires_in=issued.expires_in)


@router.get("/me", tags=["auth"], summary="Who am I")
async def me(principal: PrincipalDep) -> dict[str, object]:
    return {
        "id": principal.user_id,
        "email": principal.email,
        "is_system_admin": principal.is_system_admin,
        "orgs": {org_id: principal.roles[org_id].value for org_id in principal.visible_org_ids() if org_id in principal.roles},
    }


@router.get("/orgs", response_model=list[OrgOut], tags=["organisations"])
async def list_orgs(services: ServicesDep, principal: PrincipalDep) -> list[OrgOut]:
    orgs = await services.accounts.list_orgs(principal)
    return [_org_out(org, principal) for org in orgs]


@router.post("/orgs", response_model=OrgOut, status_code=status.HTTP_201_CREATED, tags=["organisations"])
async def create_org(body: OrgIn, services: ServicesDep, principal: PrincipalDep) -> OrgOut:
    org = await services.accounts.create_org(principal, body.name)
    return _org_out(org, principal)


@router.get("/orgs/{org_id}", response_model=OrgOut, tags=["organisations"])
async def get_org(org_id: str, services: ServicesDep, principal: PrincipalDep) -> OrgOut:
    org = await services.accounts.get_org(principal, org_id)
    return _org_out(org, principal)


@router.patch("/orgs/{org_id}", response_model=OrgOut, tags=["organisations"], summary="Set the credential policy")
async def patch_org(org_id: str, body: OrgPatch, services: ServicesDep, principal: PrincipalDep) -> OrgOut:
    policy = CredentialPolicy(cert_validity_days=body.cert_validity_days, keep_device_keys=body.keep_device_keys)
    return _org_out(await services.authorities.set_policy(principal, org_id, policy), principal)


def _org_out(org: Organisation, principal: Principal) -> OrgOut:
    return OrgOut(
        id=org.id, name=org.name, role=principal.roles.get(org.id), cert_validity_days=org.cert_validity_days,
        keep_device_keys=org.keep_device_keys, created_at=org.created_at,
    )


@router.get("/orgs/{org_id}/users", response_model=list[MemberOut], tags=["users"])
async def list_users(org_id: str, services: ServicesDep, principal: PrincipalDep) -> list[MemberOut]:
    members = await services.accounts.list_members(principal, org_id)
    return [
        MemberOut(id=user.id, email=user.email, role=role, grants=sorted(grants), is_system_admin=user.is_system_admin)
        for user, role, grants in members
    ]


@router.post("/orgs/{org_id}/users", response_model=MemberOut, status_code=status.HTTP_201_CREATED, tags=["users"])
async def add_user(org_id: str, body: UserIn, services: ServicesDep, principal: PrincipalDep) -> MemberOut:
    user = await services.accounts.add_member(principal, org_id, body.email, body.password, body.role)
    return MemberOut(id=user.id, email=user.email, role=body.role, is_system_admin=user.is_system_admin)


@router.patch("/orgs/{org_id}/users/{user_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["users"],
              summary="Change a user's role and granted permissions")
async def set_role(org_id: str, user_id: str, body: MembershipIn, services: ServicesDep, principal: PrincipalDep) -> Response:
    grants = frozenset(body.grants) if body.grants is not None else None
    await services.accounts.set_role(principal, org_id, user_id, body.role, grants)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete("/orgs/{org_id}/users/{user_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["users"])
async def remove_user(org_id: str, user_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    await services.accounts.remove_member(principal, org_id, user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _key_out(key: object) -> ApiKeyOut:
    return ApiKeyOut.model_validate(key, from_attributes=True)


@router.get("/api-keys", response_model=list[ApiKeyOut], tags=["auth"], summary="The caller's API keys")
async def list_api_keys(services: ServicesDep, principal: PrincipalDep) -> list[ApiKeyOut]:
    return [_key_out(key) for key in await services.accounts.list_api_keys(principal)]


@router.post("/api-keys", response_model=ApiKeyCreated, status_code=status.HTTP_201_CREATED, tags=["auth"])
async def create_api_key(body: ApiKeyIn, services: ServicesDep, principal: PrincipalDep) -> ApiKeyCreated:
    created = await services.accounts.create_api_key(principal, body.name, body.org_id, body.expires_in_days)
    return ApiKeyCreated(**_key_out(created.key).model_dump(), key=created.secret)


@router.delete("/api-keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["auth"], summary="Revoke an API key")
async def revoke_api_key(key_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    await services.accounts.revoke_api_key(principal, key_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
