"""Helpers of the credential tests: certificate material (made with the ``openssl`` binary or with
``cryptography``), the native error shape, and what a server really stored in its database."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import subprocess
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import update
from sqlalchemy.engine import make_url

from harness import Api, ServerProcess
from pilotboat.security import pki
from pilotboat.settings import Settings
from pilotboat.store import database
from pilotboat.store.tables import DeviceCertificate

PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\n.*?\n-----END \1-----\n?", re.S)


# --- native API -----------------------------------------------------------------------------------


def assert_native_error(response: httpx.Response, status: int | set[int], field: str | None = None) -> str:
    """A native error: ``status`` (or one of them) and ``{"detail": "...", "field": field}``; returns the detail."""
    allowed = status if isinstance(status, set) else {status}
    assert response.status_code in allowed, (response.status_code, response.text)
    body = response.json()
    assert isinstance(body.get("detail"), str) and body["detail"], body
    if field is not None:
        assert body.get("field") == field, body
    return body["detail"]


def org_path(org_id: str, suffix: str = "") -> str:
    return f"/api/v1/orgs/{org_id}{suffix}"


def issue(client: Api, org_id: str, device_id: str, csr: str | None = None) -> dict[str, Any]:
    """Issue a device certificate through the API (server-generated key unless ``csr`` is given)."""
    body = {"csr": csr} if csr is not None else None
    response = client.post(org_path(org_id, f"/devices/{device_id}/certificates"), json=body)
    assert response.status_code == 201, response.text
    return response.json()


def ca_chain(client: Api, org_id: str) -> list[str]:
    """The organisation's issuing CA chain, issuing certificate first, root last (PEM each)."""
    response = client.get(org_path(org_id, "/ca/chain"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/pem-certificate-chain"), response.headers
    return split_pem(response.text)


def set_policy(client: Api, org_id: str, **policy: Any) -> dict[str, Any]:
    response = client.patch(org_path(org_id), json=policy)
    assert response.status_code == 200, response.text
    return response.json()


# --- certificate material -------------------------------------------------------------------------


def split_pem(text: str) -> list[str]:
    """The PEM blocks of a text, in order."""
    return [match.group(0) if match.group(0).endswith("\n") else match.group(0) + "\n" for match in PEM_BLOCK.finditer(text)]


def load(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def openssl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the openssl binary (the caller checks the outcome)."""
    return subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False)


def openssl_ok(*args: str, cwd: Path | None = None) -> str:
    result = openssl(*args, cwd=cwd)
    assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr}"
    return result.stdout


def openssl_verify(directory: Path, chain: list[str], certificate_pem: str) -> subprocess.CompletedProcess[str]:
    """``openssl verify`` of a client certificate against a chain (issuing CA first, root last)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "root.pem").write_text(chain[-1])
    (directory / "cert.pem").write_text(certificate_pem)
    args = ["verify", "-purpose", "sslclient", "-CAfile", "root.pem"]
    if len(chain) > 1:
        (directory / "untrusted.pem").write_text("".join(chain[:-1]))
        args += ["-untrusted", "untrusted.pem"]
    return openssl(*args, "cert.pem", cwd=directory)


def openssl_ca(directory: Path, name: str, days: int = 30) -> tuple[list[str], str]:
    """An organisation's own two-level CA made with the openssl binary: ([issuing, root], issuing key)."""
    directory.mkdir(parents=True, exist_ok=True)
    openssl_ok(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "root.key",
        "-out", "root.pem", "-subj", f"/CN={name} Root", "-days", str(days),
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory,
    )
    openssl_ok(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "issuing.key",
        "-out", "issuing.csr", "-subj", f"/CN={name} Issuing", cwd=directory,
    )
    (directory / "issuing.ext").write_text(
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    openssl_ok(
        "x509", "-req", "-in", "issuing.csr", "-CA", "root.pem", "-CAkey", "root.key", "-set_serial", "4242",
        "-days", str(days - 1), "-extfile", "issuing.ext", "-out", "issuing.pem", cwd=directory,
    )
    return [(directory / "issuing.pem").read_text(), (directory / "root.pem").read_text()], (directory / "issuing.key").read_text()


def openssl_csr(directory: Path, key_spec: tuple[str, ...] = ("ec", "-pkeyopt", "ec_paramgen_curve:P-256")) -> tuple[str, str]:
    """A key and a PKCS#10 request for it made with the openssl binary: (csr PEM, key PEM)."""
    directory.mkdir(parents=True, exist_ok=True)
    openssl_ok("req", "-new", "-newkey", *key_spec, "-nodes", "-subj", "/CN=ignored", "-keyout", "csr.key", "-out", "req.csr",
               cwd=directory)
    return (directory / "req.csr").read_text(), (directory / "csr.key").read_text()


def self_signed(
    common_name: str, *, ca: bool = True, not_before: datetime | None = None, not_after: datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed certificate (a CA unless ``ca`` is False) with the given validity."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(days=1)).not_valid_after(not_after or now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
        ), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return builder.sign(key, hashes.SHA256()), key


def public_der(value: x509.Certificate | x509.CertificateSigningRequest | pki.PrivateKey) -> bytes:
    """The SubjectPublicKeyInfo (DER) of a certificate, a request or a private key."""
    public = value.public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def pem_body_lines(pem: str) -> list[str]:
    """The base64 lines of a PEM block (what must not show up where the secret is not allowed)."""
    return [line for line in pem.strip().splitlines() if line and not line.startswith("-----")]


# --- the server's database ------------------------------------------------------------------------


def server_settings(server: ServerProcess) -> Settings:
    """Settings naming the same database and data dir (hence master key file) as the running server."""
    return Settings(data_dir=server.data_dir, database_url=server.database_url)


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _postgres_rows(url: str, query: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    import asyncpg

    connection = await asyncpg.connect(_asyncpg_dsn(url), timeout=10)
    try:
        return [tuple(row) for row in await connection.fetch(query, *params)]
    finally:
        await connection.close()


def raw_rows(server: ServerProcess, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of a SQL query run directly on the server's database (``?`` placeholders)."""
    if server.database_url is None:
        with closing(sqlite3.connect(server.data_dir / "pilotboat.db")) as connection:
            return connection.execute(query, params).fetchall()
    numbered = query
    for position in range(1, query.count("?") + 1):
        numbered = numbered.replace("?", f"${position}", 1)
    return asyncio.run(_postgres_rows(server.database_url, numbered, params))


def raw_dump(server: ServerProcess) -> str:
    """Every row of every table of the server's database, as text."""
    if server.database_url is None:
        with closing(sqlite3.connect(server.data_dir / "pilotboat.db")) as connection:
            return "\n".join(connection.iterdump())
    tables = [name for (name,) in raw_rows(
        server, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
    )]
    assert "device_certificates" in tables and "psk_identities" in tables, tables
    return "\n".join(str(row[0]) for table in tables for row in raw_rows(server, f'SELECT t::text FROM "{table}" AS t'))


async def _set_not_after(url: str, certificate_id: str, not_after: datetime) -> None:
    engine = database.create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                update(DeviceCertificate).where(DeviceCertificate.id == certificate_id).values(not_after=not_after)
            )
    finally:
        await engine.dispose()


def set_recorded_expiry(server: ServerProcess, certificate_id: str, not_after: datetime) -> None:
    """Move the expiry the server recorded for a certificate (certificates cannot be issued already expired)."""
    asyncio.run(_set_not_after(server_settings(server).resolved_database_url, certificate_id, not_after))
