"""``pilotboat lwm2m``: read, write, execute, discover and observe on a registered LwM2M device through a
running server. DEVICE is the device's endpoint name or id; PATH an LwM2M path such as ``/3/0/1``."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Annotated, Any

import typer
from rich.markup import escape

from pilotboat.cli.events import OUTCOME_STYLES
from pilotboat.cli.remote import (
    DEFAULT_URL,
    USAGE,
    DeviceRef,
    OrgOption,
    Remote,
    RemoteError,
    TokenOption,
    UrlOption,
    code_text,
    connect,
    console,
    err,
    fail,
    segment,
    shown,
    stopped_by_sigterm,
    table,
    when,
)
from pilotboat.lwm2m.model import Path, ResourceType
from pilotboat.lwm2m.operations import Operation, OperationError, resource_type, target

app = typer.Typer(
    help="Operations on registered LwM2M devices, through a running server (--url / PILOTBOAT_URL, --token / "
         "PILOTBOAT_TOKEN). DEVICE is the endpoint name or the device id.",
    no_args_is_help=True,
)

#: Longest wait for a device the server allows (seconds).
MAX_TIMEOUT = 300.0
#: Extra seconds the HTTP request may take beyond the device's wait.
HTTP_MARGIN = 15.0

DeviceArg = Annotated[str, typer.Argument(help="Endpoint name or device id")]
PathArg = Annotated[str, typer.Argument(help="LwM2M path, e.g. /3/0 or /3/0/1")]
TimeoutOption = Annotated[float | None, typer.Option(
    min=0.1, max=MAX_TIMEOUT, help="Seconds to wait for the device (default: the server's setting)")]
WaitOption = Annotated[bool, typer.Option(
    "--wait/--no-wait", help="--no-wait: return the request id at once (for queue-mode devices that sleep)")]


class Format(str, Enum):
    tlv = "tlv"
    senml_json = "senml-json"
    senml_cbor = "senml-cbor"
    text = "text"


def _target(text: str, operation: Operation) -> Path:
    try:
        return target(text, operation)
    except OperationError as exc:
        fail(f"PATH: {exc}", USAGE)


def _lwm2m_path(device: DeviceRef, at: Path) -> str:
    return f"/devices/{segment(device.id)}/lwm2m{at}"


def _operate(remote: Remote, method: str, device: DeviceRef, at: Path, *, timeout: float | None, wait: bool,
             params: dict[str, Any] | None = None, body: Any = None) -> dict[str, Any] | None:
    """Ask the server for one operation; the device's answer, or None when it was queued (printed)."""
    query = dict(params or {})
    if timeout is not None:
        query["timeout"] = timeout
    if not wait:
        query["wait"] = "false"
    try:
        response = remote.request(method, remote.org_path(_lwm2m_path(device, at)), params=query, json_body=body,
                                  timeout=(timeout or MAX_TIMEOUT) + HTTP_MARGIN)
    except RemoteError as exc:
        request_id = exc.body.get("request_id")
        if exc.status == 504 and request_id:
            _explain_pending(remote, device, str(request_id), exc)
        raise
    answer = response.json()
    if response.status_code == 202:
        _queued(device, answer["request_id"], answer.get("status", "queued"))
        return None
    return answer


def _queued(device: DeviceRef, request_id: str, status: str) -> None:
    follow_up = f"`pilotboat lwm2m request {device.label} {request_id}`"
    if status == "queued":
        console.print(f"[yellow]queued[/yellow]: the device is asleep (queue mode); request {escape(request_id)} goes "
                      f"out when it next wakes up. Its result: {escape(follow_up)}", soft_wrap=True)
    else:
        console.print(f"[yellow]{escape(status)}[/yellow]: request {escape(request_id)} waits for the device's answer. "
                      f"Its result: {escape(follow_up)}", soft_wrap=True)


def _explain_pending(remote: Remote, device: DeviceRef, request_id: str, exc: RemoteError) -> None:
    """A request the device did not answer in time: say whether it waits in the queue of a sleeping device."""
    try:
        state = remote.json("GET", remote.org_path(f"/devices/{segment(device.id)}/lwm2m-requests/{segment(request_id)}"))
    except RemoteError:
        return
    if state.get("status") == "queued":
        _queued(device, request_id, "queued")
        fail(f"no answer yet: the device is asleep and request {request_id} waits in its queue")
    if state.get("status") == "sent":
        fail(f"{exc.message}; request {request_id} still waits for the answer: "
             f"`pilotboat lwm2m request {device.label} {request_id}`")


def _check_answer(answer: dict[str, Any]) -> None:
    """Print the device's code; exit 1 when it refused or its answer could not be read."""
    code = str(answer.get("code") or "")
    if not answer.get("ok"):
        fail(f"the device answered {code_text(code)}: {answer.get('error') or 'no explanation'}")
    label = code_text(code) + (f" ({answer['format']})" if answer.get("format") else "")
    console.print(f"[green]{escape(label)}[/green]")
    if answer.get("error"):
        fail(answer["error"])


def _values_table(values: dict[str, Any]) -> None:
    rows = table("path", "value")
    for path, value in values.items():
        rows.add_row(escape(path), escape(shown(value)))
    console.print(rows)


def _typed(text: str, at: Path) -> Any:
    """A value given on the command line, as the JSON the resource's type needs (when known)."""
    kind = resource_type(at)
    if kind is ResourceType.BOOLEAN:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "false", "0"):
            return lowered in ("true", "1")
        fail(f"{at} is a boolean: give true or false", USAGE)
    if kind in (ResourceType.INTEGER, ResourceType.UNSIGNED, ResourceType.TIME):
        try:
            return int(text)
        except ValueError:
            fail(f"{at} is an integer resource ({kind.value}): {text!r} is not a whole number", USAGE)
    if kind is ResourceType.FLOAT:
        try:
            return float(text)
        except ValueError:
            fail(f"{at} is a float resource: {text!r} is not a number", USAGE)
    if kind is not None:
        return text  # string, opaque (base64), object link (3:0), core link
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    return parsed if isinstance(parsed, bool | int | float) else text


# --- commands -------------------------------------------------------------------------------------------


@app.command("read", help="Read an object, instance or resource; prints the values as a table.")
def read(
    device: DeviceArg, path: PathArg,
    format: Annotated[Format | None, typer.Option("--format", help="Ask the device for this format")] = None,
    timeout: TimeoutOption = None, wait: WaitOption = True,
    url: UrlOption = DEFAULT_URL, token: TokenOption = None, org: OrgOption = None,
) -> None:
    at = _target(path, Operation.READ)
    with connect(url, token, org) as remote:
        ref = remote.device(device)
        answer = _operate(remote, "GET", ref, at, timeout=timeout, wait=wait,
                          params={"format": format.value} if format else None)
    if answer is not None:
        _check_answer(answer)
        _values_table(answer.get("values") or {})


@app.command("write", help="Write one resource (VALUE, typed by the resource; put -- before a negative number), "
                           "or several values with --json '{\"/3/0/14\": \"+02\"}'.")
def write(
    device: DeviceArg, path: PathArg,
    value: Annotated[str | None, typer.Argument(help="The resource's new value")] = None,
    json_values: Annotated[str | None, typer.Option("--json", help="Values as a JSON object of path → value")] = None,
    partial: Annotated[bool, typer.Option("--partial", help="Partial update of an object instance "
                                                            "(other resources are kept)")] = False,
    timeout: TimeoutOption = None, wait: WaitOption = True,
    url: UrlOption = DEFAULT_URL, token: TokenOption = None, org: OrgOption = None,
) -> None:
    at = _target(path, Operation.WRITE_PARTIAL if partial else Operation.WRITE)
    if (value is None) == (json_values is None):
        fail("give either VALUE or --json (not both)", USAGE)
    if value is not None:
        if at.depth < 3:
            fail(f"VALUE writes one resource; {at} is not one: give --json with its resources' values", USAGE)
        body: dict[str, Any] = {"value": _typed(value, at)}
    else:
        try:
            values = json.loads(json_values or "")
        except ValueError as exc:
            fail(f"--json: not valid JSON ({exc})", USAGE)
        if not isinstance(values, dict) or not values:
            fail('--json: give an object of path → value, e.g. {"/3/0/14": "+02"}', USAGE)
        body = {"values": values}
    with connect(url, token, org) as remote:
        ref = remote.device(device)
        answer = _operate(remote, "PATCH" if partial else "PUT", ref, at, timeout=timeout, wait=wait, body=body)
    if answer is not None:
        _check_answer(answer)


@app.command("exec", help="Execute a resource, optionally with arguments such as 0='on',1.")
def execute(
    device: DeviceArg, path: PathArg,
    arguments: Annotated[str | None, typer.Argument(help="Execute arguments, e.g. 0='on',1")] = None,
    timeout: TimeoutOption = None, wait: WaitOption = True,
    url: UrlOption = DEFAULT_URL, token: TokenOption = None, org: OrgOption = None,
) -> None:
    at = _target(path, Operation.EXECUTE)
    with connect(url, token, org) as remote:
        ref = remote.device(device)
        answer = _operate(remote, "POST", ref, at, timeout=timeout, wait=wait,
                          body={"arguments": arguments} if arguments else {})
    if answer is not None:
        _check_answer(answer)


@app.command("discover", help="Discover an object, instance or resource: its resources and attributes.")
def discover(
    device: DeviceArg, path: PathArg, timeout: TimeoutOption = None, wait: WaitOption = True,
    url: UrlOption = DEFAULT_URL, token: TokenOption = None, org: OrgOption = None,
) -> None:
    at = _target(path, Operation.DISCOVER)
    with connect(url, token, org) as remote:
        ref = remote.device(device)
        answer = _operate(remote, "GET", ref, at, timeout=timeout, wait=wait, params={"op": "discover"})
    if answer is None:
        return
    _check_answer(answer)
    links = table("path", "attributes")
    for link in answer.get("links") or []:
        attributes = ", ".join(name if value is True else f"{name}={value}"
                               for name, value in (link.get("attributes") or {}).items())
        links.add_row(escape(str(link.get("path"))), escape(attributes))
    console.print(links)


@app.command("request", help="The state and result of an earlier request (e.g. one queued for a sleeping device).")
def request_state(
    device: DeviceArg, request_id: Annotated[str, typer.Argument(help="The request id the operation gave")],
    url: UrlOption = DEFAULT_URL, token: TokenOption = None, org: OrgOption = None,
) -> None:
    with connect(url, token, org) as remote:
        ref = remote.device(device)
        state = remote.json("GET", remote.org_path(f"/devices/{segment(ref.id)}/lwm2m-requests/{segment(request_id)}"))
    console.print(f"request {escape(request_id)}: {escape(str(state.get('operation')))} {escape(str(state.get('path')))}, "
                  f"{escape(str(state.get('status')))} (created {when(state.get('created_at'))})", soft_wrap=True)
    if state.get("status") in ("queued", "sent"):
        return
    if "code" not in state:
        fail(state.get("error") or f"the request {state.get('status')}")
    _check_answer(state)
    if state.get("values"):
        _values_table(state["values"])


def _observation(remote: Remote, ref: DeviceRef, at: Path, attributes: dict[str, int]) -> tuple[dict[str, Any], bool]:
    """The device's observation of ``at``: created now (True), or the one it already had (False)."""
    observations = remote.org_path(f"/devices/{segment(ref.id)}/observations")
    body: dict[str, Any] = {"path": str(at)}
    if attributes:
        body["attributes"] = attributes
    try:
        return remote.json("POST", observations, json_body=body), True
    except RemoteError as exc:
        if exc.status != 409:
            raise
        for existing in remote.json("GET", observations):
            if existing["path"] == str(at):
                return existing, False
        raise


def _cancel(remote: Remote, ref: DeviceRef, observation_id: str) -> None:
    remote.request("DELETE", remote.org_path(f"/devices/{segment(ref.id)}/observations/{segment(observation_id)}"))
    err.print("observation cancelled")


@app.command("observe", help="Observe a path: prints each notified value with its time until Ctrl-C, then cancels "
                             "the observation (asks first on a terminal unless --cancel-on-exit/--keep-on-exit).")
def observe(
    device: DeviceArg, path: PathArg,
    pmin: Annotated[int | None, typer.Option(min=0, help="Minimum seconds between notifications")] = None,
    pmax: Annotated[int | None, typer.Option(min=0, help="Maximum seconds between notifications")] = None,
    cancel_on_exit: Annotated[bool | None, typer.Option(
        "--cancel-on-exit/--keep-on-exit", show_default=False,
        help="Cancel the observation on exit, or keep it (default: ask on a terminal, else cancel; one that "
             "existed before is kept)")] = None,
    url: UrlOption = DEFAULT_URL, token: TokenOption = None, org: OrgOption = None,
) -> None:
    at = _target(path, Operation.OBSERVE)
    attributes = {name: value for name, value in (("pmin", pmin), ("pmax", pmax)) if value is not None}
    with connect(url, token, org) as remote:
        ref = remote.device(device)
        after = remote.newest_event_id()  # notifications from here on, the first answer included
        observation, created = _observation(remote, ref, at, attributes)
        observation_id = observation["id"]
        status = observation["status"]
        if status == "failed" and created:
            _cancel(remote, ref, observation_id)
            fail(f"the device refused the observation: {observation.get('error')}")
        origin = "" if created else "the existing "
        err.print(f"{origin}observation {escape(observation_id)} of {escape(str(at))} on {escape(ref.label)}: "
                  f"{escape(status)}" + (" (set up when the device registers or wakes up)" if status == "pending" else "")
                  + "; Ctrl-C to stop", soft_wrap=True)
        try:
            with stopped_by_sigterm():
                for event in remote.follow(["lwm2m.notification"], after):
                    detail = event.get("detail") or {}
                    if detail.get("observation_id") != observation_id:
                        continue
                    _show_notification(event, detail)
        except KeyboardInterrupt:
            pass
        cancel = cancel_on_exit
        if cancel is None:
            cancel = created and (not sys.stdin.isatty() or typer.confirm("\ncancel the observation?", default=True))
        if cancel:
            _cancel(remote, ref, observation_id)
        else:
            err.print(f"observation {escape(observation_id)} kept")


def _show_notification(event: dict[str, Any], detail: dict[str, Any]) -> None:
    moment = when(event.get("created_at"))
    if event.get("outcome") != "ok":
        style = OUTCOME_STYLES.get(str(event.get("outcome")), "red")
        console.print(f"{moment}  [{style}]{escape(str(detail.get('error') or event.get('reason')))}[/{style}]",
                      soft_wrap=True)
        return
    values = detail.get("values")
    if not isinstance(values, dict):
        console.print(f"{moment}  {detail.get('values_omitted', '?')} values (too many to show; read the path instead)")
        return
    for where, value in values.items():
        console.print(f"{moment}  {escape(where)} = {escape(shown(value))}", soft_wrap=True, highlight=False)
