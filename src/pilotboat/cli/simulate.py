"""``pilotboat simulate``: simulated LwM2M devices against a running server: bootstrap one device or a
fleet, register a fleet with a management server, or run one device that stays registered."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pilotboat.lwm2m import content
from pilotboat.model.management_server import DEFAULT_LIFETIME, SecurityMode
from pilotboat.sim import (
    AssignedServer,
    BootstrapResult,
    ClientCredentials,
    FleetStats,
    ReceivedRequest,
    RegistrationFleetStats,
    RegistrationResult,
    SimulatedDevice,
    Timing,
    endpoint_names,
    register_fleet,
    run_fleet,
)
from pilotboat.sim.exchange import BLOCK_SIZES, coap_address, is_secure
from pilotboat.sim.fleet import DEFAULT_LINGER, bootstrap_device, raise_open_file_limit
from pilotboat.sim.security import load_credentials, read_credentials_csv

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


# DTLS credentials: one set for a single device (or shared by a fleet), or a CSV file with one per device.
PskIdentity = Annotated[str | None, typer.Option("--psk-identity", help="PSK identity for a coaps:// server")]
PskKey = Annotated[str | None, typer.Option("--psk-key", help="PSK key in hex for a coaps:// server")]
CertificateFile = Annotated[Path | None, typer.Option("--certificate", help="The device's certificate (PEM, chain "
                                                                          "leaf first) for a coaps:// server")]
PrivateKeyFile = Annotated[Path | None, typer.Option("--private-key", help="The device certificate's private key (PEM)")]
ServerCertificateFile = Annotated[Path | None, typer.Option(
    "--server-certificate", help="The coaps:// server's certificate or CA (PEM): the trust anchor its chain must reach")]
CredentialsFile = Annotated[Path | None, typer.Option(
    "--credentials", help="CSV with one DTLS credential per device: endpoint,psk_identity,psk_key (hex) or "
                          "endpoint,certificate,private_key,server_certificate (PEM files)")]


def _credentials(uri: str, psk_identity: str | None, psk_key: str | None, certificate: Path | None,
                 private_key: Path | None, server_certificate: Path | None, *, paired: bool = True
                 ) -> ClientCredentials | None:
    """The one set of credentials given on the command line; exit 2 when incomplete or (``paired``)
    when the URI and the credentials do not go together."""
    try:
        credentials = load_credentials(psk_identity=psk_identity, psk_key=psk_key, certificate=certificate,
                                       private_key=private_key, server_certificate=server_certificate)
    except ValueError as exc:
        _fail(str(exc))
    if paired:
        _check_pairing(uri, credentials is not None)
    return credentials


def _check_pairing(uri: str, has_credentials: bool) -> None:
    if is_secure(uri) and not has_credentials:
        _fail(f"{uri} is a DTLS server: give --psk-identity and --psk-key, or --certificate, --private-key and "
              "--server-certificate")
    if has_credentials and not is_secure(uri):
        _fail(f"DTLS credentials need a coaps:// server, not {uri}")


def _fleet_credentials(uri: str, endpoints: list[str], file: Path | None, shared: ClientCredentials | None
                       ) -> Mapping[str, ClientCredentials] | None:
    """Per-device credentials from ``--credentials``, or the shared ones for every device."""
    if file is None:
        return {endpoint: shared for endpoint in endpoints} if shared is not None else None
    if shared is not None:
        _fail("give --credentials or one set of credentials, not both")
    try:
        found = read_credentials_csv(file)
    except ValueError as exc:
        _fail(str(exc))
    missing = [endpoint for endpoint in endpoints if endpoint not in found]
    if missing:
        _fail(f"{file} has no credentials for {len(missing)} device(s), {missing[0]} the first")
    _check_pairing(uri, True)
    return found


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
    credentials: Mapping[str, ClientCredentials] | None = None


async def _one(endpoint: str, options: DeviceOptions) -> bool:
    device = SimulatedDevice(endpoint, options.server, lwm2m_version=options.lwm2m_version,
                             content_format=options.content_format, bootstrap_instance=options.bootstrap_instance,
                             bootstrap_credentials=(options.credentials or {}).get(endpoint))
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
            credentials=options.credentials,
        )
    _print_fleet(stats)
    return stats.failed == 0


@app.command("bootstrap", help="Client-initiated bootstrap (or Bootstrap-Pack) of one device or a fleet. "
                               "Exits 1 when any device failed.")
def bootstrap(
    server: Annotated[str, typer.Option(help="The bootstrap server's coap:// or coaps:// URI")] = "coap://127.0.0.1:5783",
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
    psk_identity: PskIdentity = None,
    psk_key: PskKey = None,
    certificate: CertificateFile = None,
    private_key: PrivateKeyFile = None,
    server_certificate: ServerCertificateFile = None,
    credentials_file: CredentialsFile = None,
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
    endpoints = [endpoint] if endpoint is not None else endpoint_names(prefix, devices or 0)
    shared = _credentials(server, psk_identity, psk_key, certificate, private_key, server_certificate,
                          paired=credentials_file is None)
    options = DeviceOptions(server, lwm2m.value, FORMATS[format] if format else None, bootstrap_instance, timeout, pack,
                            linger, _fleet_credentials(server, endpoints, credentials_file, shared))
    if endpoint is not None:
        ok = asyncio.run(_one(endpoint, options))
    else:
        ok = asyncio.run(_many(endpoints, options, rate, window))
    if not ok:
        raise typer.Exit(1)


# --- registration with a management server -----------------------------------------------------------


def _check_uri(uri: str) -> None:
    try:
        coap_address(uri)
    except ValueError as exc:
        _fail(str(exc))


def _timing(block_size: int) -> Timing:
    if block_size not in BLOCK_SIZES:
        _fail(f"--block-size is one of {', '.join(map(str, BLOCK_SIZES))}")
    return Timing(block_size=block_size)


def _phase_rows(table: Table, stats: FleetStats, noun: str) -> None:
    table.add_row(f"{noun} ok", f"[green]{stats.completed}[/green]")
    table.add_row(f"{noun} failed", f"[red]{stats.failed}[/red]" if stats.failed else "0")
    for reason, count in stats.failures.items():
        table.add_row(f"  {escape(reason)}", str(count))


def _print_registration_fleet(stats: RegistrationFleetStats, kept_running: float) -> None:
    table = Table(title="Fleet registration", show_header=False)
    first = stats.registrations
    table.add_row("devices", str(len(first.results)))
    _phase_rows(table, first, "registered")
    table.add_row("elapsed", f"{first.elapsed:.2f} s")
    table.add_row("registrations/s", f"{first.rate:.1f}")
    for share in (50, 90, 99):
        table.add_row(f"latency p{share}", _ms(first.latency(share)))
    if kept_running:
        updates = stats.updates
        table.add_row("kept running", f"{updates.elapsed:.1f} s")
        _phase_rows(table, updates, "updates")
        table.add_row("registered again", str(stats.reregistrations))
        table.add_row("updates/s", f"{updates.rate:.1f}")
        for share in (50, 99):
            table.add_row(f"update latency p{share}", _ms(updates.latency(share)))
    if stats.deregistrations.results:
        _phase_rows(table, stats.deregistrations, "de-registered")
    console.print(table)


@app.command("register", help="Register a fleet of devices directly with a management server (factory "
                              "accounts, no bootstrap), optionally keep them registered for a while, then "
                              "de-register them. Exits 1 when any Register, Update or De-register failed.")
def register(
    count: Annotated[int, typer.Option(help="How many devices", min=1)],
    server: Annotated[str, typer.Option(help="The management server's coap:// or coaps:// URI")] = "coap://127.0.0.1:5683",
    prefix: Annotated[str, typer.Option(help="Endpoint names: <prefix><zero-padded index>")] = "sim-",
    lifetime: Annotated[int, typer.Option(help="Registration lifetime in seconds", min=1)] = DEFAULT_LIFETIME,
    queue: Annotated[bool, typer.Option("--queue", help="Register in queue mode")] = False,
    lwm2m: Annotated[Version, typer.Option("--lwm2m", help="LwM2M version of the devices")] = Version.v1_1,
    format: Annotated[WriteFormat | None, typer.Option("--format", help="Preferred format announced as ct "
                                                                       "(1.1+)")] = None,
    rate: Annotated[float | None, typer.Option(help="Registers started per second (default: no limit)")] = None,
    window: Annotated[int, typer.Option(help="Most Registers in flight", min=1)] = 100,
    timeout: Annotated[float, typer.Option(help="Seconds each Register may take", min=0.1)] = 30.0,
    keep_running: Annotated[float, typer.Option(help="Seconds the fleet stays registered, sending Updates",
                                                min=0)] = 0.0,
    sensors: Annotated[int, typer.Option(help="Temperature instances per device (more make larger "
                                              "registrations)", min=0)] = 1,
    block_size: Annotated[int, typer.Option(help="Block1 size of registration payloads")] = 1024,
    deregister: Annotated[bool, typer.Option(help="De-register at the end (else the devices just vanish)")] = True,
    psk_identity: PskIdentity = None,
    psk_key: PskKey = None,
    certificate: CertificateFile = None,
    private_key: PrivateKeyFile = None,
    server_certificate: ServerCertificateFile = None,
    credentials_file: CredentialsFile = None,
) -> None:
    _check_uri(server)
    if rate is not None and rate <= 0:
        _fail("--rate must be positive")
    if format is not None and lwm2m is Version.v1_0:
        _fail("LwM2M 1.0 devices announce no format: drop --format or use --lwm2m 1.1")
    timing = _timing(block_size)
    endpoints = endpoint_names(prefix, count)
    shared = _credentials(server, psk_identity, psk_key, certificate, private_key, server_certificate,
                          paired=credentials_file is None)
    credentials = _fleet_credentials(server, endpoints, credentials_file, shared)
    stats = asyncio.run(_register_fleet(endpoints, server, lifetime=lifetime, queue_mode=queue, credentials=credentials,
                                        lwm2m_version=lwm2m.value, content_format=FORMATS[format] if format else None,
                                        rate=rate, window=window, timeout=timeout, keep_running=keep_running,
                                        temperature_sensors=sensors, deregister=deregister, timing=timing))
    _print_registration_fleet(stats, keep_running)
    if stats.registrations.failed or stats.updates.failed or stats.deregistrations.failed:
        raise typer.Exit(1)


async def _register_fleet(endpoints: list[str], server: str, **options: object) -> RegistrationFleetStats:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("registering", total=len(endpoints), failed=0)
        done = failed = 0

        def advance(result: RegistrationResult) -> None:
            nonlocal done, failed
            done += 1
            failed += 0 if result.ok else 1
            progress.update(task, advance=1, failed=failed)
            if done == len(endpoints) and options.get("keep_running"):
                progress.update(task, description="registered, running")

        return await register_fleet(server, endpoints, progress=advance, **options)  # type: ignore[arg-type]


def _clock() -> str:
    return time.strftime("%H:%M:%S")


def _show_request(request: ReceivedRequest) -> None:
    parts = [request.method, request.path]
    if request.query:
        parts.append("?" + "&".join(request.query))
    if request.observe is not None:
        parts.append("observe" if request.observe == 0 else "cancel observation")
    if request.content_format is not None:
        parts.append(f"format {_format(request.content_format)}")
    if request.accept is not None:
        parts.append(f"accept {_format(request.accept)}")
    console.print(f"{_clock()} [cyan]{escape(' '.join(parts))}[/cyan] -> {request.code or '[red]no answer[/red]'}")


def _show_registration(result: RegistrationResult) -> None:
    if result.ok:
        where = f" {escape(result.location)}" if result.location and result.operation == "register" else ""
        console.print(f"{_clock()} [green]{result.operation}[/green] {result.code}{where} ({_ms(result.latency)})")
    else:
        console.print(f"{_clock()} [red]{result.operation} failed[/red]: {escape(result.reason or '')}"
                      f"{': ' + escape(result.detail) if result.detail else ''}")


@app.command("device", help="Run one device: bootstrap it (--bootstrap) or give it a factory account (--server), "
                            "register, and keep answering the management server until Ctrl-C (or --duration), "
                            "printing every request and registration exchange. Exits 1 when the bootstrap or "
                            "the first Register failed.")
def device(
    endpoint: Annotated[str, typer.Argument(help="The device's endpoint name")],
    bootstrap: Annotated[str | None, typer.Option(help="Bootstrap first with this coap:// or coaps:// "
                                                                      "bootstrap server")] = None,
    server: Annotated[str | None, typer.Option(help="Register directly with this coap:// or coaps:// "
                                                                   "management server")] = None,
    lifetime: Annotated[int, typer.Option(help="Registration lifetime with --server", min=1)] = DEFAULT_LIFETIME,
    queue: Annotated[bool, typer.Option("--queue", help="Register in queue mode")] = False,
    lwm2m: Annotated[Version, typer.Option("--lwm2m", help="LwM2M version of the device")] = Version.v1_1,
    format: Annotated[WriteFormat | None, typer.Option("--format", help="Preferred format (pct and ct, 1.1+)")] = None,
    sensors: Annotated[int, typer.Option(help="Temperature instances (/3303/x)", min=0)] = 1,
    sensor_interval: Annotated[float, typer.Option(help="Seconds between temperature readings", min=0.01)] = 10.0,
    duration: Annotated[float | None, typer.Option(help="Stop after this many seconds (default: Ctrl-C)",
                                                   min=0)] = None,
    timeout: Annotated[float, typer.Option(help="Seconds the bootstrap and the first Register may take",
                                           min=0.1)] = 30.0,
    deregister: Annotated[bool, typer.Option(help="De-register when stopping")] = True,
    psk_identity: PskIdentity = None,
    psk_key: PskKey = None,
    certificate: CertificateFile = None,
    private_key: PrivateKeyFile = None,
    server_certificate: ServerCertificateFile = None,
) -> None:
    if (bootstrap is None) == (server is None):
        _fail("give either --bootstrap URI or --server URI")
    _check_uri(bootstrap or server or "")
    credentials = _credentials(bootstrap or server or "", psk_identity, psk_key, certificate, private_key,
                               server_certificate)
    if format is not None and lwm2m is Version.v1_0:
        _fail("LwM2M 1.0 devices send no preferred format: drop --format or use --lwm2m 1.1")
    simulated = SimulatedDevice(endpoint, bootstrap, server_uri=server, lifetime=lifetime, queue_mode=queue,
                                bootstrap_credentials=credentials if bootstrap else None,
                                server_credentials=credentials if server else None,
                                lwm2m_version=lwm2m.value, content_format=FORMATS[format] if format else None,
                                temperature_sensors=sensors, sensor_interval=sensor_interval,
                                on_request=_show_request, on_registration=_show_registration)
    options = _RunOptions(timeout, duration, deregister)
    try:
        ok = asyncio.run(_run_device(simulated, options))
    except KeyboardInterrupt:
        ok = True
    console.print(f"{_clock()} stopped: {simulated.answered} requests answered, {simulated.notifications} "
                  f"notifications sent")
    if not ok:
        raise typer.Exit(1)


@dataclass(frozen=True)
class _RunOptions:
    timeout: float
    duration: float | None
    deregister: bool


async def _run_device(simulated: SimulatedDevice, options: _RunOptions) -> bool:
    try:
        if simulated.bootstrap_uri is not None:
            result = await simulated.bootstrap(options.timeout)
            _print_device(result, simulated)
            if not result.ok:
                return False
        first = await simulated.register(options.timeout)
        if not first.ok:
            return False
        account = simulated.management_server
        assert account is not None
        console.print(f"{_clock()} registered with {escape(account.uri or '')} as {escape(simulated.endpoint)}; "
                      f"answering requests" + (" until Ctrl-C" if options.duration is None else ""))
        if options.duration is None:
            await asyncio.Event().wait()  # until Ctrl-C cancels it
        else:
            await asyncio.sleep(options.duration)
        return True
    finally:
        await simulated.close(deregister=options.deregister and simulated.registered)

