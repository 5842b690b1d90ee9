"""``pilotboat bootstrap``: act as a device against a Magistrala-compatible bootstrap server."""

from __future__ import annotations

import json
from typing import Annotated

import httpx
import typer
from cryptography.exceptions import InvalidTag
from rich.console import Console

from pilotboat.security import sealed_bootstrap, secure_bootstrap

app = typer.Typer(help="Fetch a device's bootstrap configuration, as the device would.", no_args_is_help=True)
err = Console(stderr=True)

Url = Annotated[str, typer.Option("--url", help="Server base URL", envvar="PILOTBOAT_URL")]
Things = Annotated[bool, typer.Option("--things", help="Use the Mainflux 0.13 paths (/things/bootstrap)")]


def _get(url: str, path: str, authorization: str) -> httpx.Response:
    try:
        response = httpx.get(url.rstrip("/") + path, headers={"Authorization": authorization}, timeout=15)
    except httpx.HTTPError as exc:
        err.print(f"[red]error:[/red] cannot reach {url}: {exc}")
        raise typer.Exit(1) from exc
    if response.status_code != 200:
        detail = response.text.strip() or response.reason_phrase
        err.print(f"[red]error:[/red] the server answered {response.status_code}: {detail}")
        raise typer.Exit(1)
    return response


def _print(document: object) -> None:
    typer.echo(json.dumps(document, indent=2))


@app.command("get", help="GET /clients/bootstrap/<external_id> with 'Client <external_key>'.")
def get(external_id: str, external_key: str, url: Url = "http://127.0.0.1:8080", things: Things = False) -> None:
    prefix, scheme = ("/things/bootstrap", "Thing") if things else ("/clients/bootstrap", "Client")
    _print(_get(url, f"{prefix}/{external_id}", f"{scheme} {external_key}").json())


@app.command("secure", help="Secure bootstrap: encrypt the key, fetch, decrypt and print the configuration.")
def secure(
    external_id: str, external_key: str,
    crypto_key: Annotated[str, typer.Argument(help="The server's PILOTBOAT_BOOTSTRAP_ENCRYPT_KEY")],
    url: Url = "http://127.0.0.1:8080", things: Things = False,
) -> None:
    try:
        key = secure_bootstrap.mainflux_key(crypto_key) if things else secure_bootstrap.magistrala_key(crypto_key)
    except secure_bootstrap.SecureBootstrapKeyError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    prefix, scheme = ("/things/bootstrap/secure", "Thing") if things else ("/clients/bootstrap/secure", "Client")
    header = f"{scheme} {secure_bootstrap.encrypt(key, external_key.encode()).hex()}"
    body = _get(url, f"{prefix}/{external_id}", header).content
    try:
        _print(json.loads(secure_bootstrap.decrypt(key, body)))
    except (ValueError, UnicodeDecodeError) as exc:
        err.print("[red]error:[/red] the response did not decrypt to JSON: is the crypto key the server's?")
        raise typer.Exit(1) from exc


@app.command("sealed", help="Sealed bootstrap (AES-GCM, timestamped, single-use): fetch, verify and print.")
def sealed(
    external_id: str, external_key: str,
    crypto_key: Annotated[str, typer.Argument(help="The server's PILOTBOAT_BOOTSTRAP_ENCRYPT_KEY")],
    url: Url = "http://127.0.0.1:8080",
) -> None:
    try:
        key = secure_bootstrap.magistrala_key(crypto_key)
    except secure_bootstrap.SecureBootstrapKeyError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    token, nonce = sealed_bootstrap.seal_request(key, external_id, external_key)
    body = _get(url, f"/clients/bootstrap/sealed/{external_id}", f"Sealed {token}").content
    try:
        _print(json.loads(sealed_bootstrap.open_response(key, external_id, nonce, body)))
    except (ValueError, InvalidTag) as exc:
        err.print("[red]error:[/red] the response failed authentication: wrong crypto key, or it was tampered with")
        raise typer.Exit(1) from exc
