"""``pilotboat events``: an organisation's events, live, from a running server."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from pilotboat.cli.remote import DEFAULT_URL, OrgOption, TokenOption, UrlOption, connect, console, err, shown, when

app = typer.Typer(
    help="An organisation's events, from a running server (--url / PILOTBOAT_URL, --token / PILOTBOAT_TOKEN).",
    no_args_is_help=True,
)

#: Colour of an event's kind by its outcome (others: yellow).
OUTCOME_STYLES = {"ok": "green", "failed": "red", "refused": "red", "timeout": "red"}
#: Longest detail shown on one line.
MAX_DETAIL_CHARS = 120


def _values(values: Any) -> str:
    if not isinstance(values, dict):
        return shown(values)
    return ", ".join(f"{path}={shown(value)}" for path, value in values.items())


def summary(event: dict[str, Any]) -> str:
    """A short, readable detail of an event."""
    kind, detail = event.get("kind", ""), event.get("detail") or {}
    reason = event.get("reason")
    if kind == "lwm2m.registered":
        text = (f"lwm2m {detail.get('lwm2m_version')}, binding {detail.get('binding')}, lifetime {detail.get('lifetime')} s, "
                f"{len(detail.get('objects') or ())} objects, from {detail.get('address')}")
        if detail.get("first_registration"):
            text += ", first registration"
        elif detail.get("replaced"):
            text += ", replaced the previous registration"
    elif kind == "lwm2m.updated":
        changed = detail.get("changed") or []
        text = ("changed " + ", ".join(map(str, changed))) if changed else "keep-alive"
    elif kind in ("lwm2m.deregistered", "lwm2m.expired"):
        text = f"registration {detail.get('registration_id')}"
    elif kind == "lwm2m.held":
        text = f"held for {detail.get('retry_after')} s"
    elif kind == "lwm2m.notification":
        text = reason or detail.get("error") or _values(detail.get("values", f"{detail.get('values_omitted')} values"))
    elif kind == "lwm2m.operation":
        text = f"{detail.get('operation')} {detail.get('path')} → {detail.get('code') or reason or ''}"
        if detail.get("values"):
            text += f": {_values(detail['values'])}"
    else:
        text = reason or ", ".join(f"{name}={shown(value)}" for name, value in detail.items() if value not in (None, "", [], {}))
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 1] + "…"


def kind_markup(event: dict[str, Any]) -> str:
    """An event's kind coloured by its outcome (with the outcome when it is not ``ok``)."""
    outcome = str(event.get("outcome") or "")
    style = OUTCOME_STYLES.get(outcome, "yellow")
    marker = "" if outcome == "ok" else f" {escape(outcome)}"
    return f"[{style}]{escape(str(event.get('kind')))}{marker}[/{style}]"


def line(event: dict[str, Any]) -> str:
    """An event as one line of Rich markup: time, kind, device and endpoint, detail."""
    who = event.get("device_id") or ""
    endpoint = (event.get("detail") or {}).get("endpoint")
    if endpoint:
        who = f"{who} ({endpoint})" if who else str(endpoint)
    return f"{when(event.get('created_at'))}  {kind_markup(event)}  {escape(who or '-')}  {escape(summary(event))}"


@app.command("tail", help="Follow the organisation's events as they happen, one line each, until Ctrl-C. "
                          "A dropped connection is resumed where it stopped.")
def tail(
    kind: Annotated[list[str] | None, typer.Option(
        "--kind", help="Only this kind (lwm2m.registered) or prefix ending in '.' (lwm2m.); repeatable")] = None,
    device: Annotated[str | None, typer.Option("--device", help="Only events of this device (endpoint name or id)")] = None,
    since_id: Annotated[int | None, typer.Option("--since-id", min=0, help="Start after this event id (default: now)")] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    org: OrgOption = None,
) -> None:
    with connect(url, token, org) as remote:
        device_id = remote.device(device).id if device is not None else None
        scope = f" of {device}" if device is not None else ""
        org_name = remote.org["name"]

        def connected() -> None:
            err.print(f"following the events{escape(scope)} of organisation {escape(org_name)} (Ctrl-C to stop)",
                      soft_wrap=True)

        try:
            for event in remote.follow(kind or (), since_id, on_connect=connected):
                if device_id is None or event.get("device_id") == device_id:
                    console.print(line(event), soft_wrap=True, highlight=False)
        except KeyboardInterrupt:
            err.print("stopped")
