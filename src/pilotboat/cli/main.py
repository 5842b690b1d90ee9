"""The ``pilotboat`` command."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pilotboat import __version__
from pilotboat.cli import admin, bootstrap, credentials, devices, events, keys, lwm2m, simulate
from pilotboat.settings import Settings, load_settings

app = typer.Typer(
    name="pilotboat",
    help="Pilotboat: take IoT devices from factory credentials to a managed, registered device.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(bootstrap.app, name="bootstrap")
app.add_typer(admin.app, name="admin")
app.add_typer(credentials.app, name="credentials")
app.add_typer(keys.app, name="keys")
app.add_typer(simulate.app, name="simulate")
app.add_typer(devices.app, name="devices")
app.add_typer(lwm2m.app, name="lwm2m")
app.add_typer(events.app, name="events")

err = Console(stderr=True)



def _default(field: object) -> str:
    value = getattr(field, "default", None)
    return "unset" if value is None else str(value)


_SETTINGS_HELP = "\n\n".join(
    f"[bold]PILOTBOAT_{name.upper()}[/bold] (default: {_default(field)}): {field.description}"
    for name, field in Settings.model_fields.items()
)


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


@app.command(help=f"Run the server (HTTP API and bootstrap routes, LwM2M bootstrap and management servers over CoAP and DTLS) on this machine.\n\nSettings come from flags and environment variables:\n\n{_SETTINGS_HELP}")
def serve(
    host: Annotated[str | None, typer.Option(help="HTTP listen address (env PILOTBOAT_HTTP_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (env PILOTBOAT_HTTP_PORT)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data folder (env PILOTBOAT_DATA_DIR)")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL (env PILOTBOAT_DATABASE_URL)")] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR (env PILOTBOAT_LOG_LEVEL)")] = None,
    log_format: Annotated[str | None, typer.Option(help="json or text (env PILOTBOAT_LOG_FORMAT)")] = None,
) -> None:
    import uvicorn
    from pydantic import ValidationError

    from pilotboat import logs
    from pilotboat.app import bootstrap_ports, create_app, management_ports
    from pilotboat.runtime import secure_keys
    from pilotboat.security.secure_bootstrap import SecureBootstrapKeyError

    os.umask(0o077)  # the data dir, database and keys the server creates are private to its user
    try:
        settings = load_settings(
            http_host=host, http_port=port, data_dir=data_dir, database_url=database_url, log_level=log_level,
            log_format=log_format,
        )
        secure_keys(settings)
        application = create_app(settings)
    except ValidationError as exc:
        _fail(f"invalid setting: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}")
    except (SecureBootstrapKeyError, ValueError) as exc:
        _fail(str(exc))
    tls = _http_tls(settings)
    logs.configure(settings.log_level, settings.log_format)
    scheme = "https" if tls else "http"
    err.print(f"Pilotboat {__version__} on {scheme}://{settings.http_host}:{settings.http_port} (docs at /docs)")
    for server, ports in (("bootstrap", bootstrap_ports(settings)), ("management", management_ports(settings))):
        for address in ports.addresses():
            err.print(f"LwM2M {server} server on {address}")
    if not settings.allow_nosec:
        err.print("Plain CoAP is off (PILOTBOAT_ALLOW_NOSEC=false): devices connect over DTLS only")
    # The standard asyncio loop, not uvloop: under uvloop, aiocoap's UDP socket stops receiving once an
    # ICMP "port unreachable" comes back from a departed client (its error-queue reader is not served).
    uvicorn.run(application, host=settings.http_host, port=settings.http_port, log_config=None, access_log=False,
                server_header=False, loop="asyncio", **tls)


def _http_tls(settings: Settings) -> dict[str, str]:
    """uvicorn's TLS arguments for the HTTP API (none without a certificate); exits with a clear error
    when the certificate or key cannot be read or do not belong together."""
    import ssl

    if settings.http_tls_certificate is None or settings.http_tls_private_key is None:
        return {}
    certificate, key = settings.http_tls_certificate, settings.http_tls_private_key
    for setting, path in (("PILOTBOAT_HTTP_TLS_CERTIFICATE", certificate), ("PILOTBOAT_HTTP_TLS_PRIVATE_KEY", key)):
        if not path.is_file():
            _fail(f"{setting}: {path}: no such file")
        if not os.access(path, os.R_OK):
            _fail(f"{setting}: {path}: not readable by this user")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certificate, key)
    except (ssl.SSLError, OSError) as exc:
        _fail(f"PILOTBOAT_HTTP_TLS_CERTIFICATE ({certificate}) and PILOTBOAT_HTTP_TLS_PRIVATE_KEY ({key}) are not a "
              f"PEM certificate chain and its private key: {exc}")
    return {"ssl_certfile": str(certificate), "ssl_keyfile": str(key)}


@db_app.command("upgrade", help="Apply pending database migrations (also done by serve on start).")
def db_upgrade(database_url: Annotated[str | None, typer.Option(help="(env PILOTBOAT_DATABASE_URL)")] = None) -> None:
    from pilotboat.store import database

    settings = load_settings(database_url=database_url)

    async def run() -> tuple[str | None, str | None]:
        engine = database.create_engine(settings.resolved_database_url)
        try:
            await database.upgrade(engine)
            return await database.revisions(engine)
        finally:
            await engine.dispose()

    current, head = asyncio.run(run())
    typer.echo(f"database at revision {current} (newest: {head})")


@app.command(help="Print the version.")
def version() -> None:
    typer.echo(__version__)


if __name__ == "__main__":
    app()
