"""Creator IoT device server compatible routes: device identities (certificates and PSKs) at ``/identities``.

The organisation is the caller's (``X-Pilotboat-Org`` names it for callers in several). Without
``device_id`` each call creates a device for the new identity; errors are
``{"ErrorCode": "...", "ErrorMessage": "..."}`` (see ``pilotboat.api.errors``).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, Response, status

from pilotboat.api.compat.mainflux import org_of_caller
from pilotboat.api.deps import PrincipalDep, ServicesDep
from pilotboat.model.principal import Principal
from pilotboat.services.container import Services
from pilotboat.services.devices import DeviceInput
from pilotboat.store.tables import PskIdentity

router = APIRouter(prefix="/identities", tags=["Creator compatibility"])

OrgId = Annotated[str, Depends(org_of_caller)]
DeviceId = Annotated[str | None, Query(max_length=64, description="An existing device; without it a device is created")]
T = TypeVar("T")


async def _on_device(
    services: Services, principal: Principal, org_id: str, device_id: str | None, make: Callable[[str], Awaitable[T]]
) -> T:
    """Run ``make(device_id)`` on the given device, or on a device created for it; a device created
    here is deleted again when ``make`` fails, so that nothing is left half-made."""
    if device_id:
        return await make(device_id)
    record, _ = await services.devices.create(
        principal, org_id, DeviceInput(columns={"name": f"creator-{secrets.token_hex(4)}"}, state=1)
    )
    try:
        return await make(record.device.id)
    except Exception:
        await services.devices.delete(principal, org_id, record.device.id, missing_ok=True)
        raise


def _psk_view(request: Request, record: PskIdentity, key: bytes) -> dict[str, Any]:
    href = f"{str(request.base_url).rstrip('/')}{router.prefix}/psk/{quote(record.identity, safe='')}"
    return {
        "Identity": record.identity,
        "Secret": key.hex().upper(),
        "Links": [{"rel": "self", "href": href}, {"rel": "remove", "href": href}],
    }


@router.post("/certificates", status_code=status.HTTP_201_CREATED,
             summary="A new device certificate: PEM private key followed by the PEM certificate")
async def create_certificate(org_id: OrgId, services: ServicesDep, principal: PrincipalDep,
                             device_id: DeviceId = None) -> dict[str, str]:
    issued = await _on_device(services, principal, org_id, device_id,
                              lambda target: services.certificates.issue(principal, org_id, target))
    assert issued.private_key_pem is not None  # generated here, not from a CSR
    return {"CertificateFormat": "PEM", "RawCertificate": issued.private_key_pem + issued.record.certificate_pem}


@router.post("/psk", status_code=status.HTTP_201_CREATED, summary="A new PSK identity (16-byte identity, 32-byte key)")
async def create_psk(request: Request, org_id: OrgId, services: ServicesDep, principal: PrincipalDep,
                     device_id: DeviceId = None) -> dict[str, Any]:
    created = await _on_device(services, principal, org_id, device_id,
                               lambda target: services.psks.create(principal, org_id, target))
    return _psk_view(request, created.record, created.key)


@router.get("/psk/{identity:path}", summary="A PSK identity and its key")
async def get_psk(identity: str, request: Request, org_id: OrgId, services: ServicesDep,
                  principal: PrincipalDep) -> dict[str, Any]:
    record = await services.psks.get_by_identity(principal, org_id, identity)
    return _psk_view(request, record, services.psks.reveal(principal, record))


@router.delete("/psk/{identity:path}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               summary="Remove a PSK identity (its device stays)")
async def delete_psk(identity: str, org_id: OrgId, services: ServicesDep, principal: PrincipalDep) -> Response:
    record = await services.psks.get_by_identity(principal, org_id, identity)
    await services.psks.delete(principal, org_id, record.id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
