"""``pilotboat simulate``: simulated LwM2M devices against a running server (one device, or a fleet)."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pilotboat.lwm2m import content
from pilotboat.model.management_server import SecurityMode
from pilotboat.sim import AssignedServer, BootstrapResult, FleetStats, SimulatedDevice, endpoint_names, run_fleet
from pilotboat.sim.exchange import coap_address
from pilotboat.sim.fleet import DEFAULT_LINGER, bootstrap_device, raise_open_file_limit

app = typer.Typer(help="Simulated LwM2M devices, one or thousands, against a running server.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


class WriteFormat(enum.StrEnum):
    tlv = "tlv"
    senml_json = "senml-json"
    senml_cbor = "senml-cbor"


class Version(enum.StrEnum):
    v1_0 = "1.0"
    v1_1 = "1.1"
    v1_2 = "1.2"


FORMATS = {WriteFormat.tlv: content.TLV, WriteFormat.senml_json: content.SENML_JSON,
           WriteFormat.senml_cbor: content.SENML_CBOR}


def _fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(2)


def _mode(value: int | None) -> str:
    return SecurityMode(value).name if value in iter(SecurityMode) else str(value)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _print_device(result: BootstrapResult, device: SimulatedDevice) -> None:
    summary = Table(title=f"Bootstrap of {escape(result.endpoint)}", show_header=False)
    summary.add_row("outcome", "[green]ok[/green]" if result.ok else f"[red]{escape(result.reason or '')}[/red]")
    summary.add_row("method", "Bootstrap-Pack" if result.method == "pack" else "Bootstrap-Request")
    if result.detail:
        summary.add_row("detail", escape(result.detail))
    summary.add_row("latency", _ms(result.latency))
    account = device.bootstrap_account
    summary.add_row("bootstrap account", f"/0/{device.bootstrap_instance} kept" if account is not None
                    else f"[red]/0/{device.bootstrap_instance} lost (deleted or overwritten)[/red]")
    console.print(summary)
    if device.received:
        _print_requests(device)
    servers = result.servers or tuple(device.servers())
    if servers:
        _print_servers(servers)


def _print_requests(device: SimulatedDevice) -> None:
    requests = Table(title="Requests from the server")
    for column in ("method", "path", "format", "accept", "answer"):
        requests.add_column(column)
    for request in device.received:
        requests.add_row(request.method, request.path, _format(request.content_format), _format(request.accept),
                         request.code or "[red]none[/red]")
    console.print(requests)


def _print_servers(servers: tuple[AssignedServer, ...]) -> None:
    table = Table(title="Management servers given")
    for column in ("URI", "security mode", "short server id", "lifetime", "binding"):
        table.add_column(column)
    for server in servers:
        table.add_row(escape(server.uri or "-"), _mode(server.security_mode),
                        str(server.short_server_id), "-" if server.lifetime is None else f"{server.lifetime} s",
                        escape(server.binding or "-"))
    console.print(table)


def _format(number: int | None) -> str:
    return "-" if number is None else f"{number} ({content.format_name(number)})"


def _print_fleet(stats: FleetStats) -> None:
    table = Table(title="Fleet bootstrap", show_header=False)
    table.add_row("devices", str(len(stats.results)))
    table.add_row("completed", f"[green]{stats.completed}[/green]")
    table.add_row("failed", f"[red]{stats.failed}[/red]" if stats.failed else "0")
    for reason, count in stats.failures.items():
        table.add_row(f"  {escape(reason)}", str(count))
    table.add_row("elapsed", f"{stats.elapsed:.2f} s")
    table.add_row("bootstraps/s", f"{stats.rate:.1f}")
    for share in (50, 90, 99):
        table.add_row(f"latency p{share}", _ms(stats.latency(share)))
    console.print(table)


@dataclass(frozen=True)
class DeviceOptions:
    server: str
    lwm2m_version: str
    content_format: int | None
    bootstrap_instance: int
    timeout: float
    pack: bool
    linger: float


async def _one(endpoint: str, options: DeviceOptions) -> bool:
    device = SimulatedDevice(endpoint, options.server, lwm2m_version=options.lwm2m_version,
                             content_format=options.content_format, bootstrap_instance=options.bootstrap_instance)
    try:
        result = await bootstrap_device(device, timeout=options.timeout, pack=options.pack)
    finally:
        await device.close()
    _print_device(result, device)
    return result.ok


async def _many(endpoints: list[str], options: DeviceOptions, rate: float | None, window: int) -> bool:
    raise_open_file_limit()
    columns = (TextColumn("bootstrapping"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("fleet", total=len(endpoints), failed=0)
        failed = 0

        def advance(result: BootstrapResult) -> None:
            nonlocal failed
            failed += 0 if result.ok else 1
            progress.update(task, advance=1, failed=failed)

        stats = await run_fleet(
            options.server, endpoints, rate=rate, window=window, timeout=options.timeout, pack=options.pack,
            lwm2m_version=options.lwm2m_version, content_format=options.content_format,
            bootstrap_instance=options.bootstrap_instance, linger=options.linger, progress=advance,
        )
    _print_fleet(stats)
    return stats.failed == 0


@app.command("bootstrap", help="Client-initiated bootstrap (or Bootstrap-Pack) of one device or a fleet. "
                               "Exits 1 when any device failed.")
def bootstrap(
    server: Annotated[str, typer.Option(help="The bootstrap server's coap:// URI")] = "coap://127.0.0.1:5783",
    endpoint: Annotated[str | None, typer.Option(help="Bootstrap one device with this endpoint name")] = None,
    prefix: Annotated[str, typer.Option(help="Fleet endpoint names: <prefix><zero-padded index>")] = "sim-",
    devices: Annotated[int | None, typer.Option(help="Bootstrap a fleet of this many devices", min=1)] = None,
    rate: Annotated[float | None, typer.Option(help="Devices started per second (default: no limit)")] = None,
    window: Annotated[int, typer.Option(help="Most bootstrap sessions at a time", min=1)] = 100,
    format: Annotated[WriteFormat | None, typer.Option("--format", help="Preferred format sent as pct (1.1+)")] = None,
    lwm2m: Annotated[Version, typer.Option("--lwm2m", help="LwM2M version of the devices")] = Version.v1_1,
    pack: Annotated[bool, typer.Option(help="Bootstrap-Pack first, then Bootstrap-Request if refused (1.2)")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds each device may take", min=0.1)] = 30.0,
    bootstrap_instance: Annotated[int, typer.Option(help="Security instance of the bootstrap account", min=0,
                                                    max=65535)] = 1,
    linger: Annotated[float, typer.Option(help="Seconds a fleet device keeps answering after its bootstrap",
                                          min=0)] = DEFAULT_LINGER,
) -> None:
    if (endpoint is None) == (devices is None):
        _fail("give either --endpoint NAME (one device) or --devices N (a fleet)")
    if pack and lwm2m is not Version.v1_2:
        _fail("--pack needs --lwm2m 1.2")
    if format is not None and lwm2m is Version.v1_0:
        _fail("LwM2M 1.0 devices send no preferred format: drop --format or use --lwm2m 1.1")
    if rate is not None and rate <= 0:
        _fail("--rate must be positive")
    try:
        coap_address(server)
    except ValueError as exc:
        _fail(str(exc))
    options = DeviceOptions(server, lwm2m.value, FORMATS[format] if format else None, bootstrap_instance, timeout, pack,
                            linger)
    if endpoint is not None:
        ok = asyncio.run(_one(endpoint, options))
    else:
        assert devices is not None
        ok = asyncio.run(_many(endpoint_names(prefix, devices), options, rate, window))
    if not ok:
        raise typer.Exit(1)
