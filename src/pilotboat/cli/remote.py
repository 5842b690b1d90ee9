"""The HTTP client of the commands that talk to a running server (``pilotboat devices``, ``lwm2m``,
``events``): where the server is, the caller's credentials, the organisation acted on, errors that say
what to do next, and following the live event stream (Server-Sent Events, resumed after a dropped
connection). The credentials never appear in any output.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Annotated, Any, NoReturn
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from pilotboat import __version__

DEFAULT_URL = "http://127.0.0.1:8080"
#: Seconds an ordinary request may take (device operations add their own timeout).
REQUEST_TIMEOUT = 30.0
#: Seconds without a byte (events or keep-alive comments) after which a stream counts as dropped.
STREAM_IDLE_TIMEOUT = 60.0
#: Pauses before reconnecting a dropped stream: doubled after each failed attempt, up to the last.
RECONNECT_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
#: Exit codes: the server or the device refused or failed; the command was used wrongly.
FAILURE, USAGE = 1, 2

#: Output piped to another program is not cut at 80 columns (COLUMNS still decides when set).
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)
err = Console(stderr=True)

UrlOption = Annotated[str, typer.Option("--url", envvar="PILOTBOAT_URL", help="The server's base URL")]
TokenOption = Annotated[str | None, typer.Option(
    "--token", envvar="PILOTBOAT_TOKEN", show_default=False,
    help="An access token (POST /api/v1/auth/token) or an API key (pbk_…)",
)]
OrgOption = Annotated[str | None, typer.Option(
    "--org", envvar="PILOTBOAT_ORG", show_default=False,
    help="Organisation name or id (default: the caller's only organisation)",
)]


class RemoteError(Exception):
    """A request that did not succeed, with what to do next; ``exit_code`` is 1 or 2 (usage)."""

    def __init__(self, message: str, exit_code: int = FAILURE, *, status: int | None = None,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.status = status
        self.body = body or {}


def fail(message: str, exit_code: int = FAILURE) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(exit_code)


def segment(text: str) -> str:
    """``text`` as one URL path segment."""
    return quote(text, safe="")


def _detail(response: httpx.Response) -> tuple[str, dict[str, Any]]:
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase or f"HTTP {response.status_code}", {}
    if not isinstance(body, dict):
        return str(body)[:200], {}
    detail = body.get("detail")
    return (str(detail) if detail is not None else response.reason_phrase), body


_HINTS: dict[int, str] = {
    401: "give a valid access token (POST /api/v1/auth/token) or API key with --token or PILOTBOAT_TOKEN",
    404: "check the name or id you gave, and that --url points at a Pilotboat server",
    403: "your role in the organisation does not allow this (viewers may only read; operations need member), "
         "or the API key belongs to another organisation",
    409: "the device is not registered now: see `pilotboat devices show DEVICE`; it answers once it registers again",
    429: "try again later",
    503: "the server is busy; try again later",
    504: "the device did not answer in time: try a longer --timeout, or check the device",
}


@dataclass(frozen=True)
class DeviceRef:
    id: str
    name: str
    endpoint: str | None

    @property
    def label(self) -> str:
        return self.endpoint or self.name or self.id


class Remote:
    """One server, reached with one caller's credentials, acting on one organisation."""

    def __init__(self, url: str, token: str | None, org: str | None, *, timeout: float = REQUEST_TIMEOUT) -> None:
        try:
            parsed = httpx.URL(url.strip())
        except (httpx.InvalidURL, TypeError) as exc:
            raise RemoteError(f"--url / PILOTBOAT_URL: not a URL ({exc})", USAGE) from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise RemoteError("--url / PILOTBOAT_URL: give the server's http:// or https:// address, e.g. " + DEFAULT_URL,
                              USAGE)
        if not token or not token.strip():
            raise RemoteError("no credentials: set PILOTBOAT_TOKEN (or --token) to an access token from "
                              "POST /api/v1/auth/token or to an API key (pbk_…)", USAGE)
        #: The address shown in messages (without any user:password part).
        self.url = str(parsed.copy_with(username=None, password=None)).rstrip("/")
        self._org = org.strip() if org and org.strip() else None
        self._client = httpx.Client(
            base_url=str(parsed).rstrip("/"), timeout=timeout,
            headers={"Authorization": f"Bearer {token.strip()}", "User-Agent": f"pilotboat-cli/{__version__}"},
        )

    def close(self) -> None:
        self._client.close()

    # --- requests -------------------------------------------------------------------------------

    def _transport_error(self, exc: httpx.HTTPError) -> RemoteError:
        if isinstance(exc, httpx.ConnectError):
            return RemoteError(f"cannot connect to {self.url} ({exc}): is `pilotboat serve` running there? "
                               "Give the server's address with --url or PILOTBOAT_URL")
        if isinstance(exc, httpx.TimeoutException):
            return RemoteError(f"{self.url} did not answer in time: check the server (and the --timeout you gave)")
        return RemoteError(f"the request to {self.url} failed: {exc}")

    def error(self, response: httpx.Response) -> RemoteError:
        """The error an answer of 400 or more means, with what to do next."""
        status = response.status_code
        detail, body = _detail(response)
        hint = _HINTS.get(status)
        if status == 409 and "not registered" not in detail:
            hint = None
        elif status == 429 and response.headers.get("retry-after"):
            hint = f"try again after {response.headers['retry-after']} s"
        elif status >= 500 and hint is None:
            hint = "the server's log has the details"
        prefix = {401: "the server refused the credentials: ", 403: "not allowed: "}.get(status, "")
        message = f"{prefix}{detail} (HTTP {status})" + (f"; {hint}" if hint else "")
        return RemoteError(message, USAGE if status in (400, 422) else FAILURE, status=status, body=body)

    def request(self, method: str, path: str, *, params: Any = None, json_body: Any = None,
                timeout: float | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        """``method path`` (path from the server's root); RemoteError unless the answer is below 400."""
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            response = self._client.request(method, path, params=params, json=json_body, headers=headers, **extra)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if response.status_code >= 400:
            raise self.error(response)
        return response

    def json(self, method: str, path: str, **options: Any) -> Any:
        response = self.request(method, path, **options)
        if response.status_code == 204:
            return None
        try:
            return response.json()
        except ValueError:
            raise RemoteError(f"{self.url} answered {path} with something other than JSON: is it a Pilotboat server?") from None

    # --- the organisation and its devices -----------------------------------------------------------

    @cached_property
    def org(self) -> dict[str, Any]:
        """The organisation acted on: ``--org`` (name or id) among the caller's, else the only one."""
        orgs = self.json("GET", "/api/v1/orgs")
        if self._org is not None:
            for org in orgs:
                if self._org in (org["id"], org["name"]):
                    return org
            names = ", ".join(org["name"] for org in orgs) or "none"
            raise RemoteError(f"--org / PILOTBOAT_ORG: no organisation '{self._org}' among those you may see ({names})",
                              USAGE)
        if len(orgs) == 1:
            return orgs[0]
        if not orgs:
            raise RemoteError("these credentials belong to no organisation: ask an administrator to add you to one")
        names = ", ".join(org["name"] for org in orgs[:20]) + (", …" if len(orgs) > 20 else "")
        raise RemoteError(f"you may act on {len(orgs)} organisations ({names}): choose one with --org or PILOTBOAT_ORG",
                          USAGE)

    def org_path(self, suffix: str) -> str:
        return f"/api/v1/orgs/{segment(self.org['id'])}{suffix}"

    def device(self, ref: str) -> DeviceRef:
        """The organisation's device with endpoint name ``ref``, else with id ``ref``."""
        page = self.json("GET", self.org_path("/devices"), params={"endpoint": ref, "limit": 1})
        found = page["devices"][0] if page["devices"] else None
        if found is None and ref.strip():
            try:
                found = self.json("GET", self.org_path(f"/devices/{segment(ref)}"))
            except RemoteError as exc:
                if exc.status != 404:
                    raise
        if found is None:
            raise RemoteError(f"no device with the endpoint name or id '{ref}' in organisation {self.org['name']}")
        return DeviceRef(found["id"], found.get("name") or "", found.get("endpoint"))

    def newest_event_id(self) -> int:
        """The id of the organisation's newest event (0 without any)."""
        page = self.json("GET", self.org_path("/events"), params={"limit": 1})
        return int(page["events"][0]["id"]) if page["events"] else 0

    # --- the live event stream ----------------------------------------------------------------------

    def follow(self, kinds: Sequence[str] = (), after: int | None = None, *,
               on_connect: Callable[[], None] | None = None) -> Iterator[dict[str, Any]]:
        """The organisation's events as they happen (after event ``after`` when given), until the
        caller stops; a dropped connection is resumed after the last event seen. ``on_connect`` is
        called once the first connection is up. RemoteError when the first connection fails or the
        server refuses the stream."""
        path = self.org_path("/events/stream")
        params = [("kind", kind) for kind in kinds]
        last = after
        failures = 0
        connected_once = False
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            timeout = httpx.Timeout(REQUEST_TIMEOUT, read=STREAM_IDLE_TIMEOUT)
            try:
                with self._client.stream("GET", path, params=params, headers=headers, timeout=timeout) as response:
                    if response.status_code >= 400:
                        response.read()
                        problem = self.error(response)
                        if response.status_code < 500 or not connected_once:
                            raise problem
                        why = problem.message
                    else:
                        if failures:
                            err.print(f"[green]reconnected[/green] to {escape(self.url)}")
                        elif not connected_once and on_connect is not None:
                            on_connect()
                        connected_once, failures = True, 0
                        for message in sse_messages(response.iter_lines()):
                            if message.id is not None and message.id.isdigit():
                                last = int(message.id)
                            if message.data:
                                try:
                                    event = json.loads(message.data)
                                except ValueError:
                                    continue
                                yield event
                        why = "the server ended the stream"
            except httpx.HTTPError as exc:
                if not connected_once:
                    raise self._transport_error(exc) from None
                why = "no data for a while" if isinstance(exc, httpx.ReadTimeout) else str(exc) or type(exc).__name__
            delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
            failures += 1
            resume = f", resuming after event {last}" if last is not None else ""
            err.print(f"[yellow]connection lost ({escape(why)}); reconnecting in {delay:g} s{resume}[/yellow]")
            time.sleep(delay)


@dataclass(frozen=True)
class SseMessage:
    id: str | None
    event: str
    data: str


def sse_messages(lines: Iterable[str]) -> Iterator[SseMessage]:
    """Server-Sent Events messages from the lines of a stream (comments skipped)."""
    event_id: str | None = None
    event, data = "message", []
    for line in lines:
        if not line:
            if data or event_id is not None:
                yield SseMessage(event_id, event, "\n".join(data))
            event_id, event, data = None, "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id" and "\0" not in value:
            event_id = value


@contextmanager
def stopped_by_sigterm() -> Iterator[None]:
    """Inside the block SIGTERM (``kill``, ``timeout``, a service manager) stops like Ctrl-C, so the
    command still cleans up (e.g. cancels its observation)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def connect(url: str, token: str | None, org: str | None) -> Iterator[Remote]:
    """A Remote for a command; its errors end the command with their message and exit code."""
    try:
        remote = Remote(url, token, org)
    except RemoteError as exc:
        fail(exc.message, exc.exit_code)
    try:
        yield remote
    except RemoteError as exc:
        fail(exc.message, exc.exit_code)
    finally:
        remote.close()


# --- output ---------------------------------------------------------------------------------------


def when(value: str | None, *, seconds: bool = True) -> str:
    """An API timestamp in local time (empty when there is none)."""
    if not value:
        return ""
    try:
        moment = datetime.fromisoformat(value).astimezone()
    except ValueError:
        return value
    return moment.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def table(*headers: str, title: str | None = None) -> Table:
    """A table whose cells wrap rather than lose characters (ids must stay whole)."""
    return Table(*(Column(header, overflow="fold") for header in headers), title=title)


def shown(value: Any) -> str:
    """A JSON value as one short cell: strings as they are, the rest as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def code_text(code: str) -> str:
    """A CoAP code with its name, e.g. ``2.05 Content``."""
    from aiocoap.numbers.codes import Code

    try:
        major, minor = (int(part) for part in code.split("."))
        return str(Code(major * 32 + minor))
    except (ValueError, TypeError):
        return code
