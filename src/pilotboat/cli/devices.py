"""``pilotboat devices``: the device directory of a running server's LwM2M management server."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from pilotboat.cli.events import kind_markup, summary
from pilotboat.cli.remote import (
    DEFAULT_URL,
    OrgOption,
    RemoteError,
    TokenOption,
    UrlOption,
    connect,
    console,
    fail,
    table,
    when,
)

app = typer.Typer(
    help="Devices that registered with the LwM2M management server, from a running server "
         "(--url / PILOTBOAT_URL, --token / PILOTBOAT_TOKEN).",
    no_args_is_help=True,
)

#: Directory entries fetched per request (the most the server gives at once).
PAGE = 500
STATUS_STYLES = {"registered": "green", "deregistered": "yellow", "expired": "red"}


class Status(str, Enum):
    registered = "registered"
    deregistered = "deregistered"
    expired = "expired"


def _status(status: str) -> str:
    style = STATUS_STYLES.get(status, "white")
    return f"[{style}]{escape(status)}[/{style}]"


def _binding(entry: dict[str, Any]) -> str:
    return str(entry["binding"]) + (" (queue)" if entry.get("queue_mode") else "")


@app.command("list", help="The devices that registered, with their registration state.")
def list_devices(
    status: Annotated[Status | None, typer.Option(help="Only devices in this state")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many")] = 50,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    org: OrgOption = None,
) -> None:
    params: dict[str, Any] = {} if status is None else {"status": status.value}
    devices: list[dict[str, Any]] = []
    with connect(url, token, org) as remote:
        while True:
            page = remote.json("GET", remote.org_path("/directory"),
                               params={**params, "offset": len(devices), "limit": min(PAGE, limit - len(devices))})
            devices.extend(page["devices"])
            if not page["devices"] or len(devices) >= min(limit, page["total"]):
                break
    if not devices:
        console.print(f"no {status.value + ' ' if status else ''}devices in the directory of {escape(remote.org['name'])}")
        return
    rows = table("device id", "endpoint", "status", "address", "LwM2M", "binding", "lifetime", "last registration",
                 "expires")
    for entry in devices:
        live = entry.get("registration")
        rest = (entry["address"], entry["lwm2m_version"], _binding(entry), f"{entry['lifetime']} s",
                when(entry["last_registered_at"]), when(live["expires_at"]) if live else "")
        rows.add_row(escape(entry["device_id"]), escape(entry["endpoint"]), _status(entry["status"]),
                     *(escape(str(value)) for value in rest))
    console.print(rows)
    if page["total"] > len(devices):
        console.print(f"showing {len(devices)} of {page['total']}; --limit shows more")


def _content_formats(numbers: list[int]) -> str:
    from pilotboat.lwm2m.operations import format_label

    return ", ".join(f"{number} ({format_label(number)})" for number in numbers) or "none announced"


@app.command("show", help="A device's directory entry (objects, content formats, live registration) and its "
                          "recent registration history. DEVICE is its endpoint name or id.")
def show(
    device: Annotated[str, typer.Argument(help="Endpoint name or device id")],
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    org: OrgOption = None,
) -> None:
    with connect(url, token, org) as remote:
        ref = remote.device(device)
        try:
            entry = remote.json("GET", remote.org_path(f"/directory/{ref.id}"))
        except RemoteError as exc:
            if exc.status != 404:
                raise
            fail(f"device {ref.label} ({ref.id}) has never registered with the management server")
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()

    def fact(name: str, value: object, markup: bool = False) -> None:
        facts.add_row(name, str(value) if markup else escape("" if value is None else str(value)))

    fact("device id", entry["device_id"])
    fact("endpoint", entry["endpoint"])
    if entry["first_endpoint"] != entry["endpoint"]:
        fact("first endpoint", entry["first_endpoint"])
    fact("status", _status(entry["status"]) + (f" since {when(entry['ended_at'])}" if entry.get("ended_at") else ""),
         markup=True)
    fact("registrations", f"{entry['registrations']} (first {when(entry['first_registered_at'])}, "
                          f"last {when(entry['last_registered_at'])})")
    fact("last update", when(entry["last_updated_at"]))
    fact("address", entry["address"])
    fact("LwM2M version", entry["lwm2m_version"])
    fact("binding", _binding(entry))
    fact("lifetime", f"{entry['lifetime']} s")
    fact("objects", ", ".join(entry["objects"]) or "none")
    fact("content formats", _content_formats(entry["content_formats"]))
    live = entry.get("registration")
    if live is not None:
        fact("registration", f"{live['registration_id']}: registered {when(live['registered_at'])}, "
                             f"updated {when(live['updated_at'])}, expires {when(live['expires_at'])}")
        if live.get("sms"):
            fact("SMS number", live["sms"])
    else:
        fact("registration", "none live")
    console.print(facts)
    history = entry.get("history") or []
    if not history:
        return
    events = table("time", "event", "endpoint", "detail", title="registration history (newest first)")
    for event in history:
        events.add_row(escape(when(event["created_at"])), kind_markup(event), escape(str((event.get("detail") or {}).get("endpoint") or "")),
                      escape(summary(event)))
    console.print(events)
