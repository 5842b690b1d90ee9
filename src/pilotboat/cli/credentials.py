"""``pilotboat credentials``: organisation CAs, device certificates, PSKs and the trust store, run on
the server's machine straight against its database (like ``pilotboat admin``)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pilotboat.cli.admin import OPERATOR, resolve_org, run_action
from pilotboat.model.credential import Purpose
from pilotboat.services.authorities import chain_pem
from pilotboat.services.errors import NotFound

if TYPE_CHECKING:
    from pilotboat.services.certificates import IssuedCertificate
    from pilotboat.services.container import Services
    from pilotboat.services.psks import CreatedPsk
    from pilotboat.store.tables import CertificateAuthority, DeviceCertificate, PskIdentity

app = typer.Typer(
    help="Organisation CAs, device certificates, PSKs and the trust store (uses PILOTBOAT_DATABASE_URL / "
    "PILOTBOAT_DATA_DIR and the master key).",
    no_args_is_help=True,
)
ca_app = typer.Typer(help="The organisations' certificate authorities.", no_args_is_help=True)
certs_app = typer.Typer(help="Device certificates.", no_args_is_help=True)
psk_app = typer.Typer(help="Pre-shared keys of devices.", no_args_is_help=True)
trust_app = typer.Typer(help="The deployment's trust store (CA certificates accepted for devices).", no_args_is_help=True)
app.add_typer(ca_app, name="ca")
app.add_typer(certs_app, name="certs")
app.add_typer(psk_app, name="psk")
app.add_typer(trust_app, name="trust")

console = Console()
err = Console(stderr=True)
T = TypeVar("T")
DEVICE_HINT = "give the device's id (not its name or external id)"
#: Rows fetched per request when listing everything.
PAGE = 100

Org = Annotated[str, typer.Argument(help="Organisation name or id")]
PurposeOption = Annotated[Purpose, typer.Option(
    "--purpose", help="bootstrap: a factory credential for the bootstrap server; management: pre-provisioned for the "
    "management server",
)]
InFile = Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="PEM file")]
OutFile = Annotated[Path | None, typer.Option("--output", "-o", dir_okay=False, help="Write to this file instead of stdout")]


class CertStatus(str, Enum):
    active = "active"
    revoked = "revoked"
    expired = "expired"


# --- helpers -------------------------------------------------------------------------------------


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        _fail(f"{path} is not a PEM text file")
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror}")


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror}")


def _emit(text: str, output: Path | None, what: str) -> None:
    """PEM text to ``output``, or to stdout without one."""
    if output is None:
        typer.echo(text, nl=False)
    else:
        _write(output, text)
        console.print(f"wrote {what} to {escape(str(output))}")


def _check_writable(path: Path) -> None:
    if path.is_dir() or not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        _fail(f"cannot write {path}: give a file in an existing, writable folder", 2)


def _create_private(path: Path) -> int:
    """A new file only its owner may read (checked before anything is issued)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        _fail(f"{path} already exists; the private key goes into a new file: remove it or give another --key-out", 2)
    except OSError as exc:
        _fail(f"cannot create {path}: {exc.strerror}", 2)
    os.fchmod(fd, 0o600)
    return fd


async def _hinted(awaitable: Awaitable[T], hint: str) -> T:
    """``awaitable``, with what to do next added to a 'not found' error."""
    try:
        return await awaitable
    except NotFound as exc:
        raise NotFound(f"{exc.message}; {hint}") from exc


async def _all_pages(fetch: Callable[[int, int], Awaitable[tuple[int, list[T]]]]) -> list[T]:
    """Every row of a paginated service listing."""
    rows: list[T] = []
    while True:
        total, page = await fetch(len(rows), PAGE)
        rows.extend(page)
        if not page or len(rows) >= total:
            return rows


def _row(table: Table, *values: object) -> None:
    table.add_row(*(escape("" if value is None else str(value)) for value in values))


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else ""


# --- certificate authorities -----------------------------------------------------------------------


@ca_app.command("show", help="List the organisation's CAs (the active one issues).")
def ca_show(org: Org) -> None:
    async def action(services: Services) -> list[CertificateAuthority]:
        return await services.authorities.list(OPERATOR, await resolve_org(services, org))

    table = Table("id", "source", "active", "subject", "not after", "fingerprint (SHA-256)")
    for row in run_action(action):
        _row(table, row.id, row.source, "yes" if row.active else "", row.subject, _when(row.not_after), row.fingerprint)
    console.print(table)


@ca_app.command("export", help="Print the active CA's chain (issuing certificate first, root last) as PEM.")
def ca_export(org: Org, output: OutFile = None) -> None:
    async def action(services: Services) -> str:
        row = await services.authorities.active(OPERATOR, await resolve_org(services, org))
        return chain_pem(row)

    _emit(run_action(action), output, "the CA chain")


@ca_app.command("import", help="Make the organisation's own CA its issuing CA (the previous one stays trusted).")
def ca_import(
    org: Org,
    cert: Annotated[Path, typer.Option("--cert", exists=True, dir_okay=False, readable=True, help="The issuing CA certificate (PEM)")],
    key: Annotated[Path, typer.Option("--key", exists=True, dir_okay=False, readable=True, help="Its unencrypted private key (PEM)")],
    chain: Annotated[Path | None, typer.Option(
        "--chain", exists=True, dir_okay=False, readable=True, help="Its parent certificates up to the root (PEM)"
    )] = None,
) -> None:
    certificate_pem, key_pem, chain_pem = _read(cert), _read(key), _read(chain) if chain else ""

    async def action(services: Services) -> CertificateAuthority:
        return await services.authorities.import_ca(OPERATOR, await resolve_org(services, org), certificate_pem, key_pem, chain_pem)

    row = run_action(action)
    console.print(f"imported CA {row.id} ({escape(row.subject)}); it issues the organisation's certificates from now on")


@ca_app.command("crl", help="Print the CA's certificate revocation list (PEM), signed now.")
def ca_crl(org: Org, ca_id: Annotated[str, typer.Argument(help="CA id (see 'credentials ca show')")], output: OutFile = None) -> None:
    async def action(services: Services) -> str:
        org_id = await resolve_org(services, org)
        return await _hinted(services.authorities.crl_pem(OPERATOR, org_id, ca_id), f"see 'pilotboat credentials ca show {org}'")

    _emit(run_action(action), output, "the CRL")


# --- device certificates --------------------------------------------------------------------------


@certs_app.command("issue", help="Issue a device certificate from a CSR, or with a generated key written to --key-out.")
def certs_issue(
    org: Org,
    device_id: Annotated[str, typer.Argument(help="The device's id")],
    csr: Annotated[Path | None, typer.Option(
        "--csr", exists=True, dir_okay=False, readable=True, help="PKCS#10 request (PEM); the private key stays with you"
    )] = None,
    key_out: Annotated[Path | None, typer.Option(
        "--key-out", dir_okay=False, help="New file (mode 0600) for the generated private key; required without --csr"
    )] = None,
    cert_out: Annotated[Path | None, typer.Option(
        "--cert-out", dir_okay=False, help="File for the certificate and its CA chain (default: stdout)"
    )] = None,
    purpose: PurposeOption = Purpose.BOOTSTRAP,
) -> None:
    if csr is None and key_out is None:
        _fail("without --csr a private key is generated, and it is never printed: give --key-out FILE "
              "(created with mode 0600), or --csr FILE to keep the key on the device", 2)
    if csr is not None and key_out is not None:
        _fail("--key-out is for a generated key; with --csr the private key stays with you: drop one of them", 2)
    csr_pem = _read(csr) if csr else None
    if cert_out is not None:
        _check_writable(cert_out)
    fd = _create_private(key_out) if key_out else None

    async def action(services: Services) -> IssuedCertificate:
        org_id = await resolve_org(services, org)
        return await _hinted(services.certificates.issue(OPERATOR, org_id, device_id, csr_pem, purpose=purpose), DEVICE_HINT)

    try:
        issued = run_action(action)
    except BaseException:
        if fd is not None and key_out is not None:
            os.close(fd)
            key_out.unlink(missing_ok=True)
        raise
    if fd is not None:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(issued.private_key_pem or "")
    record = issued.record
    _emit(record.certificate_pem + issued.chain_pem, cert_out, "the certificate and its CA chain")
    note = console if cert_out else err
    note.print(f"issued {record.purpose} certificate {record.id} (serial {record.serial}, CN {escape(record.common_name)}, "
               f"valid until {_when(record.not_after)})")
    if key_out is not None:
        note.print(f"private key written to {escape(str(key_out))} (mode 0600)")


@certs_app.command("list", help="List the organisation's device certificates.")
def certs_list(
    org: Org,
    device: Annotated[str | None, typer.Option("--device", help="Only this device's certificates (device id)")] = None,
    status: Annotated[CertStatus | None, typer.Option("--status", help="active, revoked or expired")] = None,
    expiring_within_days: Annotated[int | None, typer.Option(
        "--expiring-within-days", min=0, help="Only certificates that expire within this many days"
    )] = None,
) -> None:
    from pilotboat.services.certificates import CertificateFilter
    from pilotboat.store.tables import utcnow

    now = utcnow()
    before = now + timedelta(days=expiring_within_days) if expiring_within_days is not None else None

    async def action(services: Services) -> list[DeviceCertificate]:
        org_id = await resolve_org(services, org)

        def fetch(offset: int, limit: int) -> Awaitable[tuple[int, list[DeviceCertificate]]]:
            flt = CertificateFilter(device_id=device, status=status.value if status else None, expiring_before=before,
                                    offset=offset, limit=limit)
            return services.certificates.list(OPERATOR, org_id, flt)

        return await _all_pages(fetch)

    rows = run_action(action)
    table = Table("id", "device", "serial", "common name", "purpose", "status", "not after", "key")
    for row in rows:
        state = "revoked" if row.revoked_at else "expired" if row.not_after <= now else row.state
        key = row.key_source + (", kept" if row.key_sealed else "")
        _row(table, row.id, row.device_id or "(deleted)", row.serial, row.common_name, row.purpose, state,
             _when(row.not_after), key)
    console.print(table)
    console.print(f"{len(rows)} certificate(s)")


@certs_app.command("revoke", help="Revoke a device certificate (it goes on its CA's CRL).")
def certs_revoke(
    org: Org,
    cert_id: Annotated[str, typer.Argument(help="Certificate id (see 'credentials certs list')")],
    reason: Annotated[str, typer.Option("--reason", help="RFC 5280 reason, e.g. key_compromise, superseded")] = "unspecified",
) -> None:
    async def action(services: Services) -> DeviceCertificate:
        org_id = await resolve_org(services, org)
        return await _hinted(services.certificates.revoke(OPERATOR, org_id, cert_id, reason),
                             f"see 'pilotboat credentials certs list {org}'")

    record = run_action(action)
    console.print(f"revoked certificate {cert_id} (serial {record.serial}, reason {escape(reason)})")


# --- PSKs -------------------------------------------------------------------------------------------


@psk_app.command("create", help="Generate a PSK for a device (or import one: --identity and --key-hex); "
                                "the key is shown this once.")
def psk_create(
    org: Org,
    device_id: Annotated[str, typer.Argument(help="The device's id")],
    identity: Annotated[str | None, typer.Option("--identity", help="Import: the factory identity")] = None,
    key_hex: Annotated[str | None, typer.Option("--key-hex", help="Import: the factory key, in hex")] = None,
    key_length: Annotated[int, typer.Option("--key-length", help="Bytes of a generated key (16 to 64)")] = 32,
    purpose: PurposeOption = Purpose.BOOTSTRAP,
) -> None:
    if (identity is None) != (key_hex is None):
        _fail("to import a PSK give both --identity and --key-hex; to generate one give neither", 2)
    try:
        key = bytes.fromhex(key_hex) if key_hex is not None else None
    except ValueError:
        _fail("--key-hex must be an even number of hex digits", 2)

    async def action(services: Services) -> CreatedPsk:
        org_id = await resolve_org(services, org)
        return await _hinted(
            services.psks.create(OPERATOR, org_id, device_id, identity=identity, key=key, key_length=key_length,
                                purpose=purpose),
            DEVICE_HINT,
        )

    created = run_action(action)
    typer.echo(f"psk id: {created.record.id}")
    typer.echo(f"identity: {created.record.identity}")
    typer.echo(f"purpose: {created.record.purpose}")
    typer.echo(f"key: {created.key.hex().upper()}")
    err.print("the key is not shown again: put it on the device now")


@psk_app.command("list", help="List PSK identities (never their keys).")
def psk_list(
    org: Org, device: Annotated[str | None, typer.Option("--device", help="Only this device's PSKs (device id)")] = None
) -> None:
    async def action(services: Services) -> list[PskIdentity]:
        org_id = await resolve_org(services, org)
        return await _all_pages(lambda offset, limit: services.psks.list(OPERATOR, org_id, device, offset, limit))

    rows = run_action(action)
    table = Table("id", "identity", "device", "purpose", "state", "key bytes", "source", "created")
    for row in rows:
        _row(table, row.id, row.identity, row.device_id, row.purpose, row.state, row.key_length, row.source,
             _when(row.created_at))
    console.print(table)
    console.print(f"{len(rows)} PSK(s)")


@psk_app.command("delete", help="Delete a PSK identity.")
def psk_delete(org: Org, psk_id: Annotated[str, typer.Argument(help="PSK id (see 'credentials psk list')")]) -> None:
    async def action(services: Services) -> None:
        org_id = await resolve_org(services, org)
        await _hinted(services.psks.delete(OPERATOR, org_id, psk_id), f"see 'pilotboat credentials psk list {org}'")

    run_action(action)
    console.print(f"deleted PSK {psk_id}")


# --- trust store ----------------------------------------------------------------------------------


@trust_app.command("show", help="List the trust store; with -o also write its certificates as one PEM bundle.")
def trust_show(output: Annotated[Path | None, typer.Option(
    "--output", "-o", dir_okay=False, help="Write the stored certificates (PEM bundle) to this file"
)] = None) -> None:
    entries = run_action(lambda services: services.trust.list(OPERATOR))
    table = Table("id", "name", "subject", "not after", "fingerprint (SHA-256)")
    for entry in entries:
        _row(table, entry.id, entry.name, entry.subject, _when(entry.not_after), entry.fingerprint)
    console.print(table)
    console.print(f"{len(entries)} certificate(s)")
    if output is not None:
        _write(output, "".join(entry.certificate_pem for entry in entries))
        console.print(f"wrote {len(entries)} certificate(s) to {escape(str(output))}")


@trust_app.command("add", help="Trust one CA certificate (PEM file).")
def trust_add(
    file: InFile, name: Annotated[str, typer.Option("--name", help="A name for the entry (default: the subject)")] = ""
) -> None:
    pem = _read(file)
    entry = run_action(lambda services: services.trust.add(OPERATOR, pem, name))
    console.print(f"added {escape(entry.subject)} to the trust store as {entry.id}")


@trust_app.command("remove", help="Remove an entry from the trust store.")
def trust_remove(entry_id: Annotated[str, typer.Argument(help="Entry id (see 'credentials trust show')")]) -> None:
    run_action(lambda services: _hinted(services.trust.delete(OPERATOR, entry_id), "see 'pilotboat credentials trust show'"))
    console.print(f"removed {entry_id} from the trust store")


@trust_app.command("replace", help="Replace the whole trust store with the certificates of these PEM files (all or nothing).")
def trust_replace(files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, readable=True, help="PEM files")]) -> None:
    from pilotboat.security import pki

    texts = []
    count = 0
    for path in files:
        text = _read(path)
        try:
            count += len(pki.load_certificates(text, field=str(path)))
        except pki.PkiError as exc:
            _fail(f"{exc}; the trust store was not changed")
        texts.append(text.strip() + "\n")
    added = run_action(lambda services: services.trust.replace(OPERATOR, "".join(texts)))
    skipped = count - len(added)
    console.print(f"the trust store now holds {len(added)} certificate(s)"
                  + (f" ({skipped} skipped: organisation CAs or duplicates)" if skipped else ""))
