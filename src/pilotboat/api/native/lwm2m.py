"""Native API: LwM2M device operations (REST → CoAP), request states, observations and triggers.

A device that answered gives 200 with ``{"request_id", "operation", "path", "status": "done", "code",
"ok", "format", "values" | "links" | "error"}`` (``ok`` false when the device answered 4.xx/5.xx);
``wait=false`` gives 202 with ``{"request_id", "status": "queued" | "sent"}``. 504: no answer in time
(with the request id); 409: the device is not registered; 404: unknown device.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Body, Query, Response, status
from pydantic import BaseModel, Field, ValidationError

from pilotboat.api.deps import PrincipalDep, ServicesDep
from pilotboat.api.errors import validation_message
from pilotboat.api.native.schemas import Strict
from pilotboat.lwm2m import operations
from pilotboat.lwm2m.operations import Operation, WriteInput
from pilotboat.services.device_operations import (
    TrackedRequest,
    Trigger,
)
from pilotboat.services.errors import InvalidInput

router = APIRouter(prefix="/api/v1/orgs/{org_id}/devices/{device_id}", tags=["lwm2m"])

Timeout = Annotated[float | None, Query(gt=0, le=300, description="Seconds to wait for the device (default: the server's setting)")]
Wait = Annotated[bool, Query(description="false: answer 202 with the request id at once (see lwm2m-requests)")]
Format = Annotated[str | None, Query(max_length=16, description="tlv, senml-json, senml-cbor, text or opaque")]
ServerInstance = Annotated[int | None, Query(ge=0, le=65534, description="The Server object instance (default: the lowest registered)")]
JsonBody = Annotated[dict[str, Any] | None, Body()]

LWM2M_PATH = "/lwm2m/{path:path}"
ModelT = TypeVar("ModelT", bound=BaseModel)


class WriteIn(Strict):
    values: dict[str, Any] | None = Field(default=None, description='Path → value, e.g. {"/3/0/14": "+02"}')
    value: Any = Field(default=None, description="One value for the resource in the URL")

    def write_input(self) -> WriteInput:
        if "value" in self.model_fields_set:
            return WriteInput(values=self.values, value=self.value)
        return WriteInput(values=self.values)


class ExecuteIn(Strict):
    arguments: str | None = Field(default=None, max_length=1024, description="e.g. 0='on',1")


class ObservationIn(Strict):
    path: str = Field(min_length=1, max_length=64, description="e.g. /3303/0/5700")
    attributes: dict[str, Any] | None = Field(
        default=None, description="Written first: pmin, pmax, gt, lt, st, epmin, epmax (null clears)"
    )


def _parsed(model: type[ModelT], body: dict[str, Any] | None) -> ModelT:
    """``body`` as ``model``; a body that does not fit is a 400 naming the field."""
    try:
        return model.model_validate(body or {})
    except ValidationError as exc:
        message, field = validation_message(list(exc.errors()))
        raise InvalidInput(message, field=field) from None


def _answer(tracked: TrackedRequest, response: Response) -> dict[str, Any]:
    if tracked.pending:
        response.status_code = status.HTTP_202_ACCEPTED
        return tracked.summary()
    return tracked.result()


@router.get(LWM2M_PATH, summary="Read (or, with op=discover, Discover) an object, instance or resource")
async def read(
    org_id: str, device_id: str, path: str, services: ServicesDep, principal: PrincipalDep, response: Response,
    op: Literal["read", "discover"] = "read", format: Format = None, timeout: Timeout = None, wait: Wait = True,
) -> dict[str, Any]:
    device_operations = services.device_operations
    if op == "discover":
        tracked = await device_operations.discover(principal, org_id, device_id, path, timeout=timeout, wait=wait)
    else:
        tracked = await device_operations.read(principal, org_id, device_id, path, format=format, timeout=timeout, wait=wait)
    return _answer(tracked, response)


@router.put(LWM2M_PATH, summary="Write (replace) values, or with op=attributes Write-Attributes")
async def write(
    org_id: str, device_id: str, path: str, services: ServicesDep, principal: PrincipalDep, response: Response,
    body: JsonBody = None, op: Literal["write", "attributes"] = "write", format: Format = None, timeout: Timeout = None,
    wait: Wait = True,
) -> dict[str, Any]:
    """Write body: ``{"values": {"/3/0/14": "+02"}}`` or ``{"value": "+02"}``; attributes body:
    ``{"pmin": 5, "pmax": 60, "gt": 30.5, "lt": 10, "st": 0.5}`` (null clears one)."""
    device_operations = services.device_operations
    if op == "attributes":
        tracked = await device_operations.write_attributes(
            principal, org_id, device_id, path, body or {}, timeout=timeout, wait=wait,
        )
    else:
        tracked = await device_operations.write(
            principal, org_id, device_id, path, _parsed(WriteIn, body).write_input(), format=format, timeout=timeout,
            wait=wait,
        )
    return _answer(tracked, response)


@router.patch(LWM2M_PATH, summary="Write (partial update) values of an object instance")
async def write_partial(
    org_id: str, device_id: str, path: str, services: ServicesDep, principal: PrincipalDep, response: Response,
    body: JsonBody = None, format: Format = None, timeout: Timeout = None, wait: Wait = True,
) -> dict[str, Any]:
    tracked = await services.device_operations.write(
        principal, org_id, device_id, path, _parsed(WriteIn, body).write_input(), partial=True, format=format,
        timeout=timeout, wait=wait,
    )
    return _answer(tracked, response)


@router.post(LWM2M_PATH, summary="Execute a resource (body: arguments), or Create an instance of an object (body: values)")
async def execute_or_create(
    org_id: str, device_id: str, path: str, services: ServicesDep, principal: PrincipalDep, response: Response,
    body: JsonBody = None, format: Format = None, timeout: Timeout = None, wait: Wait = True,
) -> dict[str, Any]:
    operation = operations.post_operation(path)
    device_operations = services.device_operations
    if operation is Operation.CREATE:
        tracked = await device_operations.create(
            principal, org_id, device_id, path, _parsed(WriteIn, body).write_input(), format=format, timeout=timeout,
            wait=wait,
        )
    else:
        tracked = await device_operations.execute(
            principal, org_id, device_id, path, _parsed(ExecuteIn, body).arguments, timeout=timeout, wait=wait,
        )
    return _answer(tracked, response)


@router.delete(LWM2M_PATH, summary="Delete an object instance")
async def delete_instance(
    org_id: str, device_id: str, path: str, services: ServicesDep, principal: PrincipalDep, response: Response,
    timeout: Timeout = None, wait: Wait = True,
) -> dict[str, Any]:
    tracked = await services.device_operations.delete(principal, org_id, device_id, path, timeout=timeout, wait=wait)
    return _answer(tracked, response)


@router.get("/lwm2m-requests/{request_id}", summary="The state and result of a device operation (kept in memory, bounded)")
async def request_state(
    org_id: str, device_id: str, request_id: str, services: ServicesDep, principal: PrincipalDep,
) -> dict[str, Any]:
    return (await services.device_operations.request_state(principal, org_id, device_id, request_id)).state()


# --- observations ---------------------------------------------------------------------------------


@router.post("/observations", status_code=status.HTTP_201_CREATED,
             summary="Observe a path: kept, and set up again whenever the device registers")
async def create_observation(
    org_id: str, device_id: str, body: ObservationIn, services: ServicesDep, principal: PrincipalDep,
) -> dict[str, Any]:
    view = await services.observations.create(principal, org_id, device_id, body.path, body.attributes)
    return view.as_json()


@router.get("/observations", summary="The device's observations and their state")
async def list_observations(org_id: str, device_id: str, services: ServicesDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    return [view.as_json() for view in await services.observations.list(principal, org_id, device_id)]


@router.delete("/observations/{observation_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Cancel an observation")
async def delete_observation(
    org_id: str, device_id: str, observation_id: str, services: ServicesDep, principal: PrincipalDep,
) -> Response:
    await services.observations.delete(principal, org_id, device_id, observation_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# --- triggers -----------------------------------------------------------------------------------------


def trigger_answer(tracked: TrackedRequest, response: Response) -> dict[str, Any]:
    """A trigger's answer: ``accepted`` says whether the device took it (2.04)."""
    answer = _answer(tracked, response)
    if not tracked.pending:
        answer["accepted"] = bool(tracked.outcome and tracked.outcome.ok)
    return answer


@router.post("/commands/trigger-bootstrap", summary="Execute the Bootstrap-Request Trigger (/1/x/9): the device bootstraps again")
async def trigger_bootstrap(
    org_id: str, device_id: str, services: ServicesDep, principal: PrincipalDep, response: Response,
    server_instance: ServerInstance = None, timeout: Timeout = None, wait: Wait = True,
) -> dict[str, Any]:
    tracked = await services.device_operations.trigger(
        principal, org_id, device_id, Trigger.BOOTSTRAP, server_instance=server_instance, timeout=timeout, wait=wait,
    )
    return trigger_answer(tracked, response)


@router.post("/commands/trigger-update", summary="Execute the Registration Update Trigger (/1/x/8): the device updates")
async def trigger_update(
    org_id: str, device_id: str, services: ServicesDep, principal: PrincipalDep, response: Response,
    server_instance: ServerInstance = None, timeout: Timeout = None, wait: Wait = True,
) -> dict[str, Any]:
    tracked = await services.device_operations.trigger(
        principal, org_id, device_id, Trigger.UPDATE, server_instance=server_instance, timeout=timeout, wait=wait,
    )
    return trigger_answer(tracked, response)
