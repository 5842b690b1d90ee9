"""``pilotboat credentials``: every command end to end against the database of a running server, on each
backend. What the CLI changes the API shows, and the other way round; certificates, chains and CRLs are
checked with the ``openssl`` binary; bad input gets a clear error and changes nothing.
"""

from __future__ import annotations

import re
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from compat_helpers import new_device, unique
from harness import Api, ServerProcess, Tenant

# --- helpers -------------------------------------------------------------------------------------


def rows(output: str) -> dict[str, list[str]]:
    """The body rows of a table the CLI printed, by their first cell."""
    cells = [[cell.strip() for cell in line.strip("│ ").split("│")] for line in output.splitlines() if line.startswith("│")]
    return {row[0]: row for row in cells}


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args, result.returncode, result.stdout, result.stderr)
    return result.stdout


def refused(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """The command failed with ``code`` and said each of ``needles`` (in its error output, line breaks ignored)."""
    assert result.returncode == code, (result.args, result.returncode, result.stdout, result.stderr)
    said = " ".join(result.stderr.split())
    for needle in needles:
        assert needle in said, (needle, result.stderr)
    return said


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=60, check=False)


def json_ok(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, (response.request.method, str(response.request.url), response.text)
    return response.json()


def certificates(client: Api, org_id: str) -> list[dict[str, Any]]:
    return json_ok(client.get(f"/api/v1/orgs/{org_id}/certificates", params={"limit": 100}))["certificates"]


def psks(client: Api, org_id: str) -> list[dict[str, Any]]:
    return json_ok(client.get(f"/api/v1/orgs/{org_id}/psks", params={"limit": 100}))["psks"]


def cas(client: Api, org_id: str) -> list[dict[str, Any]]:
    return json_ok(client.get(f"/api/v1/orgs/{org_id}/cas"))


def trusted(root: Api) -> dict[str, dict[str, Any]]:
    """The trust store by fingerprint."""
    return {entry["fingerprint"]: entry for entry in json_ok(root.get("/api/v1/trust-store"))}


def load_pems(data: str | bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(data.encode() if isinstance(data, str) else data)


def fingerprint(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex()


def public_der(key_or_certificate: Any) -> bytes:
    return key_or_certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_pems(path: Path, certificates_: list[x509.Certificate]) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates_))
    return path


def split_chain(server: ServerProcess, org_id: str, folder: Path) -> tuple[Path, Path]:
    """The organisation's CA chain as ``ca export -o`` writes it, split into (intermediate, root) files."""
    chain = folder / "chain.pem"
    ok(server.cli("credentials", "ca", "export", org_id, "-o", str(chain)))
    intermediate, root = load_pems(chain.read_bytes())
    return write_pems(folder / "intermediate.pem", [intermediate]), write_pems(folder / "root.pem", [root])


def assert_verifies(root: Path, intermediate: Path, leaf: Path) -> None:
    result = openssl("verify", "-CAfile", root, "-untrusted", intermediate, leaf)
    assert result.returncode == 0 and result.stdout.strip() == f"{leaf}: OK", (result.stdout, result.stderr)


def self_signed_ca(folder: Path, name: str, *, ca: bool = True) -> tuple[Path, Path]:
    """(certificate, key) files of a fresh self-signed P-256 certificate, a CA unless ``ca`` is off."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    constraints = "critical,CA:TRUE" if ca else "critical,CA:FALSE"
    result = openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
                     "-subj", f"/CN={name}-{uuid.uuid4().hex[:8]}", "-days", "30", "-addext", f"basicConstraints={constraints}",
                     "-out", cert)
    assert result.returncode == 0, result.stderr
    return cert, key


# --- certificate authorities ---------------------------------------------------------------------


def test_ca_show_and_export(server: ServerProcess, tenant: Tenant, tmp_path: Path) -> None:
    (generated,) = cas(tenant.admin, tenant.org_id)
    shown = rows(ok(server.cli("credentials", "ca", "show", tenant.name)))  # an organisation by name (or id)
    assert shown == {generated["id"]: [
        generated["id"], "generated", "yes", generated["subject"], generated["not_after"][:16].replace("T", " "),
        generated["fingerprint"],
    ]}

    chain = ok(server.cli("credentials", "ca", "export", tenant.org_id))
    assert chain == tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/ca/chain").text == generated["chain_pem"]
    intermediate, root = load_pems(chain)
    assert fingerprint(intermediate) == generated["fingerprint"]
    assert root.subject == root.issuer and intermediate.issuer == root.subject
    ok(server.cli("credentials", "ca", "export", tenant.org_id, "-o", str(tmp_path / "chain.pem")))
    assert (tmp_path / "chain.pem").read_text() == chain

    refused(server.cli("credentials", "ca", "export", "no-such-org"), 2, "no organisation named", "admin orgs list")


def _intermediate_ca(folder: Path) -> tuple[Path, Path, Path]:
    """(intermediate certificate, its key, root certificate) of a two-level CA made with openssl."""
    root, root_key = self_signed_ca(folder, "own-root")
    key, request, cert = folder / "own-ca.key", folder / "own-ca.csr", folder / "own-ca.pem"
    extensions = folder / "ca.ext"
    extensions.write_text("basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n"
                          "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    for args in (
        ("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
         "-subj", "/CN=Own Device CA", "-out", request),
        ("x509", "-req", "-in", request, "-CA", root, "-CAkey", root_key, "-CAcreateserial", "-days", "30",
         "-extfile", extensions, "-out", cert),
    ):
        result = openssl(*args)
        assert result.returncode == 0, result.stderr
    return cert, key, root


def test_ca_import(server: ServerProcess, tenant: Tenant, tmp_path: Path) -> None:
    org = tenant.org_id
    cert, key, root = _intermediate_ca(tmp_path)
    _, stranger_key = self_signed_ca(tmp_path, "stranger")
    (generated,) = cas(tenant.admin, org)

    refused(server.cli("credentials", "ca", "import", org, "--cert", str(cert), "--key", str(stranger_key), "--chain", str(root)),
            1, "does not belong to the certificate")
    assert cas(tenant.admin, org) == [generated]

    said = ok(server.cli("credentials", "ca", "import", org, "--cert", str(cert), "--key", str(key), "--chain", str(root)))
    imported = next(ca for ca in cas(tenant.admin, org) if ca["source"] == "imported")
    assert imported["id"] in said and imported["active"] is True
    shown = rows(ok(server.cli("credentials", "ca", "show", org)))
    assert {ca_id: row[1:3] for ca_id, row in shown.items()} == {imported["id"]: ["imported", "yes"], generated["id"]: ["generated", ""]}
    assert [fingerprint(c) for c in load_pems(ok(server.cli("credentials", "ca", "export", org)))] == [
        fingerprint(c) for c in load_pems(cert.read_bytes() + root.read_bytes())
    ]
    # Certificates are now issued by the imported CA and verify against its root.
    device = new_device(tenant.admin, org)
    issued = json_ok(tenant.admin.post(f"/api/v1/orgs/{org}/devices/{device['id']}/certificates"), 201)
    (tmp_path / "leaf.pem").write_text(issued["certificate_pem"])
    assert_verifies(root, cert, tmp_path / "leaf.pem")
    refused(server.cli("credentials", "ca", "import", org, "--cert", str(cert), "--key", str(key)), 1, "already registered")
    assert len(cas(tenant.admin, org)) == 2


# --- device certificates ---------------------------------------------------------------------------


def test_issue_with_a_generated_key(server: ServerProcess, tenant: Tenant, tmp_path: Path) -> None:
    org = tenant.org_id
    device = new_device(tenant.admin, org, name="sensor")
    key, cert = tmp_path / "device.key", tmp_path / "device.pem"

    # The private key is never printed: without a CSR, --key-out is required.
    refused(server.cli("credentials", "certs", "issue", org, device["id"]), 2, "--key-out", "--csr")
    assert certificates(tenant.admin, org) == []

    said = ok(server.cli("credentials", "certs", "issue", org, device["id"], "--key-out", str(key), "--cert-out", str(cert)))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "PRIVATE KEY" not in said
    (record,) = certificates(tenant.admin, org)
    assert record["id"] in said and record["key_source"] == "server" and record["device_id"] == device["id"]
    leaf, *chain = load_pems(cert.read_bytes())
    assert fingerprint(leaf) == record["fingerprint"]
    assert [fingerprint(c) for c in chain] == [fingerprint(c) for c in load_pems(cas(tenant.admin, org)[0]["chain_pem"])]
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert public_der(private) == public_der(leaf)
    intermediate, root = split_chain(server, org, tmp_path)
    assert_verifies(root, intermediate, write_pems(tmp_path / "leaf.pem", [leaf]))

    # An existing key file is not overwritten, and nothing is issued.
    refused(server.cli("credentials", "certs", "issue", org, device["id"], "--key-out", str(key)), 2, "already exists")
    assert serialization.load_pem_private_key(key.read_bytes(), password=None).private_numbers() == private.private_numbers()  # type: ignore[union-attr]
    # An unknown device: a clear error, and no key file left behind.
    refused(server.cli("credentials", "certs", "issue", org, str(uuid.uuid4()), "--key-out", str(tmp_path / "other.key")),
            1, "device not found", "device's id")
    assert not (tmp_path / "other.key").exists()
    assert len(certificates(tenant.admin, org)) == 1
    assert (record["purpose"], record["state"]) == ("bootstrap", "active")

    # A management certificate, pre-provisioned by the operator.
    said = ok(server.cli("credentials", "certs", "issue", org, device["id"], "--purpose", "management",
                         "--key-out", str(tmp_path / "managed.key"), "--cert-out", str(tmp_path / "managed.pem")))
    (managed,) = [item for item in certificates(tenant.admin, org) if item["id"] != record["id"]]
    assert "management certificate" in said and (managed["purpose"], managed["state"]) == ("management", "active")


def test_issue_from_a_csr(server: ServerProcess, tenant: Tenant, tmp_path: Path) -> None:
    org = tenant.org_id
    device = new_device(tenant.admin, org, name="csr-device")
    work = tmp_path / "work"
    work.mkdir()
    csr, device_key = tmp_path / "device.csr", tmp_path / "device.key"
    made = openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", device_key,
                   "-subj", "/CN=whatever", "-out", csr)
    assert made.returncode == 0, made.stderr

    refused(server.cli("credentials", "certs", "issue", org, device["id"], "--csr", str(csr), "--key-out", str(work / "k")),
            2, "--key-out")
    garbage = tmp_path / "garbage.csr"
    garbage.write_text("-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n-----END CERTIFICATE REQUEST-----\n")
    refused(server.cli("credentials", "certs", "issue", org, device["id"], "--csr", str(garbage)), 1, "csr")
    assert certificates(tenant.admin, org) == []

    result = server.cli("credentials", "certs", "issue", org, device["id"], "--csr", str(csr))
    printed = ok(result)
    assert list(work.iterdir()) == [] and "PRIVATE KEY" not in printed + result.stderr
    leaf, intermediate_cert, _root = load_pems(printed)
    private = serialization.load_pem_private_key(device_key.read_bytes(), password=None)
    assert public_der(leaf) == public_der(private)
    (record,) = certificates(tenant.admin, org)
    assert record["key_source"] == "csr" and record["key_kept"] is False and record["fingerprint"] == fingerprint(leaf)
    assert record["id"] in result.stderr
    intermediate, root = split_chain(server, org, work)
    assert fingerprint(load_pems(intermediate.read_bytes())[0]) == fingerprint(intermediate_cert)
    assert_verifies(root, intermediate, write_pems(tmp_path / "leaf.pem", [leaf]))


def test_list_revoke_and_crl(server: ServerProcess, tenant: Tenant, tmp_path: Path) -> None:
    org, admin = tenant.org_id, tenant.admin
    first, second = new_device(admin, org), new_device(admin, org)
    issued = [json_ok(admin.post(f"/api/v1/orgs/{org}/devices/{device['id']}/certificates"), 201)
              for device in (first, first, second)]
    ids = [record["id"] for record in issued]
    cli = ("credentials", "certs")

    everything = ok(server.cli(*cli, "list", org))
    assert {cert_id: row[1:6] for cert_id, row in rows(everything).items()} == {
        record["id"]: [record["device_id"], record["serial"], record["common_name"], "bootstrap", "active"] for record in issued
    }
    assert "3 certificate(s)" in everything
    assert set(rows(ok(server.cli(*cli, "list", org, "--device", first["id"])))) == set(ids[:2])
    assert rows(ok(server.cli(*cli, "list", org, "--expiring-within-days", "30"))) == {}
    refused(server.cli(*cli, "list", org, "--status", "lost"), 2, "lost")

    said = ok(server.cli(*cli, "revoke", org, ids[0], "--reason", "key_compromise"))
    assert ids[0] in said
    revoked = json_ok(admin.get(f"/api/v1/orgs/{org}/certificates/{ids[0]}"))
    assert revoked["revoked_at"] and revoked["revocation_reason"] == "key_compromise"
    assert {cert_id: row[5] for cert_id, row in rows(ok(server.cli(*cli, "list", org, "--status", "revoked"))).items()} == {
        ids[0]: "revoked"
    }
    assert set(rows(ok(server.cli(*cli, "list", org, "--status", "active", "--expiring-within-days", "400")))) == set(ids[1:])

    refused(server.cli(*cli, "revoke", org, ids[0]), 1, "already revoked")
    refused(server.cli(*cli, "revoke", org, ids[1], "--reason", "bored"), 1, "reason must be one of")
    refused(server.cli(*cli, "revoke", org, str(uuid.uuid4())), 1, "certificate not found", "certs list")
    assert json_ok(admin.get(f"/api/v1/orgs/{org}/certificates/{ids[1]}"))["revoked_at"] is None

    # The CRL of the issuing CA lists exactly the revoked serial, and verifies against the CA.
    crl, chain = tmp_path / "crl.pem", tmp_path / "chain.pem"
    ok(server.cli("credentials", "ca", "crl", org, revoked["ca_id"], "-o", str(crl)))
    chain.write_text(admin.get(f"/api/v1/orgs/{org}/ca/chain").text)
    text = openssl("crl", "-in", crl, "-noout", "-text")
    assert text.returncode == 0, text.stderr
    assert {int(serial, 16) for serial in re.findall(r"Serial Number: ([0-9A-F]+)", text.stdout)} == {int(revoked["serial"], 16)}
    assert "Key Compromise" in text.stdout
    checked = openssl("crl", "-in", crl, "-noout", "-CAfile", chain)
    assert checked.returncode == 0 and "verify OK" in checked.stdout + checked.stderr, checked
    refused(server.cli("credentials", "ca", "crl", org, str(uuid.uuid4())), 1, "CA not found", "ca show")


# --- PSKs -------------------------------------------------------------------------------------------


def _fields(output: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)


def test_psk_create_list_delete(server: ServerProcess, tenant: Tenant) -> None:
    org, admin = tenant.org_id, tenant.admin
    device, other = new_device(admin, org), new_device(admin, org)

    generated = _fields(ok(server.cli("credentials", "psk", "create", org, device["id"])))
    assert re.fullmatch(r"[0-9A-F]{64}", generated["key"]), generated
    (record,) = psks(admin, org)
    assert (record["id"], record["identity"], record["key_length"], record["source"]) == (
        generated["psk id"], generated["identity"], 32, "generated"
    )
    factory_identity, factory_key = unique("factory"), "00112233445566778899aabbccddeeff"
    imported = _fields(ok(server.cli("credentials", "psk", "create", org, device["id"],
                                     "--identity", factory_identity, "--key-hex", factory_key)))
    assert imported["identity"] == factory_identity and imported["key"] == factory_key.upper()

    managed = _fields(ok(server.cli("credentials", "psk", "create", org, other["id"], "--purpose", "management")))
    assert managed["purpose"] == "management" and generated["purpose"] == imported["purpose"] == "bootstrap"
    refused(server.cli("credentials", "psk", "create", org, other["id"], "--purpose", "firmware"), 2, "--purpose")

    listing = ok(server.cli("credentials", "psk", "list", org))
    assert {psk_id: row[1:7] for psk_id, row in rows(listing).items()} == {
        generated["psk id"]: [generated["identity"], device["id"], "bootstrap", "active", "32", "generated"],
        imported["psk id"]: [factory_identity, device["id"], "bootstrap", "active", "16", "imported"],
        managed["psk id"]: [managed["identity"], other["id"], "management", "active", "32", "generated"],
    }
    for secret in (generated["key"], factory_key):
        assert secret.lower() not in listing.lower()
    assert list(rows(ok(server.cli("credentials", "psk", "list", org, "--device", other["id"])))) == [managed["psk id"]]

    create = ("credentials", "psk", "create", org, device["id"])
    refused(server.cli(*create, "--identity", unique("half")), 2, "--identity", "--key-hex")
    refused(server.cli(*create, "--identity", unique("odd"), "--key-hex", "abc"), 2, "hex digits")
    refused(server.cli(*create, "--key-length", "8"), 1, "key_length must be between 16 and 64")
    refused(server.cli(*create, "--identity", factory_identity, "--key-hex", factory_key), 1, "already in use")
    assert len(psks(admin, org)) == 3

    ok(server.cli("credentials", "psk", "delete", org, managed["psk id"]))
    ok(server.cli("credentials", "psk", "delete", org, generated["psk id"]))
    assert admin.get(f"/api/v1/orgs/{org}/psks/{generated['psk id']}").status_code == 404
    refused(server.cli("credentials", "psk", "delete", org, generated["psk id"]), 1, "not found", "psk list")
    assert [psk["identity"] for psk in psks(admin, org)] == [factory_identity]


def test_psk_list_pages_through_everything(server: ServerProcess, tenant: Tenant) -> None:
    org = tenant.org_id
    device = new_device(tenant.admin, org)
    identities = [json_ok(tenant.admin.post(f"/api/v1/orgs/{org}/devices/{device['id']}/psks", json={"key_length": 16}), 201)
                  ["identity"] for _ in range(105)]  # more than a page of the CLI (100)
    listing = ok(server.cli("credentials", "psk", "list", org, "--device", device["id"]))
    assert "105 PSK(s)" in listing
    assert sorted(row[1] for row in rows(listing).values()) == sorted(identities)


# --- trust store ------------------------------------------------------------------------------------


@pytest.fixture()
def restore_trust_store(root: Api) -> Iterator[None]:
    """The trust store is the deployment's: put back what other tests left in it."""
    saved = trusted(root)
    yield
    for entry in trusted(root).values():
        assert root.delete(f"/api/v1/trust-store/{entry['id']}").status_code == 204
    for entry in saved.values():
        json_ok(root.post("/api/v1/trust-store", json={"certificate": entry["certificate_pem"], "name": entry["name"]}), 201)


def test_trust_store(server: ServerProcess, root: Api, tenant: Tenant, tmp_path: Path, restore_trust_store: None) -> None:
    (ca1, _), (ca2, _), (ca3, _) = (self_signed_ca(tmp_path, f"ca{n}") for n in (1, 2, 3))
    leaf, _ = self_signed_ca(tmp_path, "leaf", ca=False)
    fp = {path: fingerprint(load_pems(path.read_bytes())[0]) for path in (ca1, ca2, ca3)}
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(ca2.read_text() + ca3.read_text())
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    binary = tmp_path / "binary.pem"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    trust = ("credentials", "trust")

    ok(server.cli(*trust, "replace", str(ca1)))
    assert set(trusted(root)) == {fp[ca1]}
    said = ok(server.cli(*trust, "add", str(ca2), "--name", "second"))
    entry = trusted(root)[fp[ca2]]
    assert entry["name"] == "second" and entry["id"] in said and entry["added_by"] == "cli"
    refused(server.cli(*trust, "add", str(leaf)), 1, "not a CA certificate")
    refused(server.cli(*trust, "add", str(bundle)), 1, "exactly one")
    refused(server.cli(*trust, "add", str(ca1)), 1, "already trusted")

    dump = tmp_path / "dump.pem"
    shown = ok(server.cli(*trust, "show", "-o", str(dump)))
    assert {entry_id: [row[1], row[-1]] for entry_id, row in rows(shown).items()} == {
        item["id"]: [item["name"], item["fingerprint"]] for item in trusted(root).values()
    }
    assert {fingerprint(c) for c in load_pems(dump.read_bytes())} == {fp[ca1], fp[ca2]}

    # Replacing is all or nothing: any bad file and the store stays as it was.
    before = trusted(root)
    for bad, message in (([garbage], "expected PEM certificates"), ([ca3, garbage], "garbage.pem"),
                         ([binary], "not a PEM text file"), ([ca3, leaf], "not a CA certificate"),
                         ([tmp_path / "missing.pem"], "missing.pem")):
        said = refused(server.cli(*trust, "replace", *map(str, bad)), 2 if "missing" in message else 1, message)
        assert trusted(root) == before, said

    # An organisation's own CA chain in the bundle is skipped: it is trusted already.
    own_chain = tmp_path / "own.pem"
    own_chain.write_text(tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/ca/chain").text)
    said = ok(server.cli(*trust, "replace", str(bundle), str(ca1), str(own_chain)))
    assert "3 certificate(s)" in said and "2 skipped" in said
    after = trusted(root)
    assert set(after) == {fp[ca1], fp[ca2], fp[ca3]}

    ok(server.cli(*trust, "remove", after[fp[ca3]]["id"]))
    assert set(trusted(root)) == {fp[ca1], fp[ca2]}
    refused(server.cli(*trust, "remove", after[fp[ca3]]["id"]), 1, "not found", "trust show")
