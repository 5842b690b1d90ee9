"""Native API: organisation CAs, device certificates, PSK identities and the deployment's trust store."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Body, Query, Response, status

from pilotboat.api.deps import PrincipalDep, ServicesDep
from pilotboat.api.native.credential_schemas import (
    CaImport,
    CaOut,
    CertificateIssued,
    CertificateOut,
    CertificatePage,
    CertificateRequest,
    PskCreated,
    PskIn,
    PskOut,
    PskPage,
    RevokeIn,
    TrustedIn,
    TrustedOut,
)
from pilotboat.services.authorities import chain_pem
from pilotboat.services.certificates import CertificateFilter
from pilotboat.services.errors import InvalidInput

router = APIRouter(prefix="/api/v1")
org_router = APIRouter(prefix="/api/v1/orgs/{org_id}")

Offset = Annotated[int, Query(ge=0, le=1_000_000)]
Limit = Annotated[int, Query(ge=1, le=100)]
PEM_CHAIN = "application/pem-certificate-chain"


# --- certificate authorities -------------------------------------------------------------------


@org_router.get("/cas", response_model=list[CaOut], tags=["credentials"], summary="The organisation's CAs (active first)")
async def list_cas(org_id: str, services: ServicesDep, principal: PrincipalDep) -> list[CaOut]:
    return [CaOut.of(row) for row in await services.authorities.list(principal, org_id)]


@org_router.post("/cas", response_model=CaOut, status_code=status.HTTP_201_CREATED, tags=["credentials"],
                 summary="Import the organisation's own CA; it becomes the issuing CA")
async def import_ca(org_id: str, body: CaImport, services: ServicesDep, principal: PrincipalDep) -> CaOut:
    return CaOut.of(await services.authorities.import_ca(principal, org_id, body.certificate, body.private_key, body.chain))


@org_router.get("/ca/chain", tags=["credentials"], summary="The issuing CA chain (PEM, root last)",
                response_class=Response, responses={200: {"content": {PEM_CHAIN: {}}}})
async def ca_chain(org_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    row = await services.authorities.active(principal, org_id)
    return Response(chain_pem(row), media_type=PEM_CHAIN)


@org_router.get("/cas/{ca_id}/crl", tags=["credentials"], summary="The CA's certificate revocation list (PEM)",
                response_class=Response, responses={200: {"content": {"application/x-pem-file": {}}}})
async def ca_crl(org_id: str, ca_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    return Response(await services.authorities.crl_pem(principal, org_id, ca_id), media_type="application/x-pem-file")


# --- device certificates -----------------------------------------------------------------------


@org_router.post("/devices/{device_id}/certificates", response_model=CertificateIssued, status_code=status.HTTP_201_CREATED,
                 tags=["credentials"], summary="Issue a device certificate (server-generated key, or from a CSR)")
async def issue_certificate(
    org_id: str, device_id: str, services: ServicesDep, principal: PrincipalDep,
    body: Annotated[CertificateRequest | None, Body()] = None,
) -> CertificateIssued:
    body = body or CertificateRequest()
    issued = await services.certificates.issue(principal, org_id, device_id, body.csr, purpose=body.purpose)
    return CertificateIssued(
        **CertificateOut.of(issued.record).model_dump(), chain_pem=issued.chain_pem, private_key_pem=issued.private_key_pem
    )


@org_router.get("/certificates", response_model=CertificatePage, tags=["credentials"])
async def list_certificates(
    org_id: str, services: ServicesDep, principal: PrincipalDep, offset: Offset = 0, limit: Limit = 50,
    device_id: Annotated[str | None, Query(max_length=36)] = None,
    status_: Annotated[str | None, Query(alias="status", description="active, revoked or expired")] = None,
    expiring_before: Annotated[datetime | None, Query(description="Only certificates that expire before this time")] = None,
) -> CertificatePage:
    flt = CertificateFilter(device_id=device_id, status=status_, expiring_before=expiring_before, offset=offset, limit=limit)
    total, rows = await services.certificates.list(principal, org_id, flt)
    return CertificatePage(total=total, offset=offset, limit=limit, certificates=[CertificateOut.of(row) for row in rows])


@org_router.get("/certificates/{certificate_id}", response_model=CertificateOut, tags=["credentials"])
async def get_certificate(org_id: str, certificate_id: str, services: ServicesDep, principal: PrincipalDep) -> CertificateOut:
    return CertificateOut.of(await services.certificates.get(principal, org_id, certificate_id))


@org_router.post("/certificates/{certificate_id}/revoke", response_model=CertificateOut, tags=["credentials"])
async def revoke_certificate(
    org_id: str, certificate_id: str, services: ServicesDep, principal: PrincipalDep,
    body: Annotated[RevokeIn | None, Body()] = None,
) -> CertificateOut:
    reason = body.reason if body else "unspecified"
    return CertificateOut.of(await services.certificates.revoke(principal, org_id, certificate_id, reason))


# --- PSK identities ----------------------------------------------------------------------------


@org_router.post("/devices/{device_id}/psks", response_model=PskCreated, status_code=status.HTTP_201_CREATED,
                 tags=["credentials"], summary="Generate a PSK for a device, or import a factory one")
async def create_psk(
    org_id: str, device_id: str, services: ServicesDep, principal: PrincipalDep,
    body: Annotated[PskIn | None, Body()] = None,
) -> PskCreated:
    body = body or PskIn()
    try:
        key = bytes.fromhex(body.key) if body.key is not None else None
    except ValueError as exc:
        raise InvalidInput("key must be an even number of hex digits", field="key") from exc
    created = await services.psks.create(
        principal, org_id, device_id, identity=body.identity, key=key, key_length=body.key_length, purpose=body.purpose,
    )
    return PskCreated(**PskOut.of(created.record).model_dump(), key=created.key.hex().upper())


@org_router.get("/psks", response_model=PskPage, tags=["credentials"], summary="PSK identities (never their keys)")
async def list_psks(
    org_id: str, services: ServicesDep, principal: PrincipalDep, offset: Offset = 0, limit: Limit = 50,
    device_id: Annotated[str | None, Query(max_length=36)] = None,
) -> PskPage:
    total, rows = await services.psks.list(principal, org_id, device_id, offset, limit)
    return PskPage(total=total, offset=offset, limit=limit, psks=[PskOut.of(row) for row in rows])


@org_router.get("/psks/{psk_id}", response_model=PskOut, tags=["credentials"])
async def get_psk(org_id: str, psk_id: str, services: ServicesDep, principal: PrincipalDep) -> PskOut:
    return PskOut.of(await services.psks.get(principal, org_id, psk_id))


@org_router.delete("/psks/{psk_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["credentials"])
async def delete_psk(org_id: str, psk_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    await services.psks.delete(principal, org_id, psk_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# --- the deployment's trust store --------------------------------------------------------------


@router.get("/trust-store", response_model=list[TrustedOut], tags=["trust store"],
            summary="CA certificates trusted for device certificates, besides the organisation CAs")
async def list_trusted(services: ServicesDep, principal: PrincipalDep) -> list[TrustedOut]:
    return [TrustedOut.of(row) for row in await services.trust.list(principal)]


@router.post("/trust-store", response_model=TrustedOut, status_code=status.HTTP_201_CREATED, tags=["trust store"],
             summary="Trust a CA certificate (system administrators)")
async def add_trusted(body: TrustedIn, services: ServicesDep, principal: PrincipalDep) -> TrustedOut:
    return TrustedOut.of(await services.trust.add(principal, body.certificate, body.name))


@router.get("/trust-store/{entry_id}", response_model=TrustedOut, tags=["trust store"])
async def get_trusted(entry_id: str, services: ServicesDep, principal: PrincipalDep) -> TrustedOut:
    return TrustedOut.of(await services.trust.get(principal, entry_id))


@router.delete("/trust-store/{entry_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["trust store"])
async def delete_trusted(entry_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    await services.trust.delete(principal, entry_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# --- the DTLS servers' own certificate ---------------------------------------------------------


@router.get("/dtls/server-certificate", tags=["trust store"], response_class=Response,
            responses={200: {"content": {PEM_CHAIN: {}}}},
            summary="The certificate chain the DTLS servers present (PEM, leaf first; the last one is the "
                    "trust anchor devices keep in /0/x/4)")
async def dtls_server_certificate(services: ServicesDep, principal: PrincipalDep) -> Response:
    pair = await services.device_identity.server_credentials()
    return Response(pair.chain_pem, media_type=PEM_CHAIN)
