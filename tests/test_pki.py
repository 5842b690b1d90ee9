"""Organisation CAs and device certificates through a real server, on each database backend.

Every organisation gets a generated CA (ECDSA P-256 root and an intermediate with path length 0) and
may import its own. Device certificates are issued from a server-generated key (returned once, kept
sealed only when the organisation's policy says so) or from a CSR; CN = the device's endpoint name,
serial = SAN GUID = the certificate id. The ``openssl`` binary checks what the server hands out.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from compat_helpers import new_device, org_events, unique
from credential_helpers import (
    assert_native_error,
    ca_chain,
    issue,
    load,
    openssl,
    openssl_ca,
    openssl_csr,
    openssl_ok,
    openssl_verify,
    org_path,
    pem_body_lines,
    public_der,
    raw_dump,
    raw_rows,
    self_signed,
    set_policy,
    set_recorded_expiry,
)
from harness import Api, ServerProcess, Tenant
from pilotboat.security import pki
from pilotboat.security.sealing import Sealer, load_master_keys
from pilotboat.services.certificates import DEVICE_KEY_PURPOSE



def cas(client: Api, org_id: str) -> list[dict[str, Any]]:
    response = client.get(org_path(org_id, "/cas"))
    assert response.status_code == 200, response.text
    return response.json()


def certificates(client: Api, org_id: str, **params: Any) -> dict[str, Any]:
    response = client.get(org_path(org_id, "/certificates"), params={"limit": 100, **params})
    assert response.status_code == 200, response.text
    return response.json()


def certificate_ids(client: Api, org_id: str, **params: Any) -> set[str]:
    return {row["id"] for row in certificates(client, org_id, **params)["certificates"]}


def crl_text(client: Api, org_id: str, ca_id: str, directory: Path) -> str:
    """The CA's CRL as ``openssl crl -text`` shows it, after openssl checked its signature."""
    response = client.get(org_path(org_id, f"/cas/{ca_id}/crl"))
    assert response.status_code == 200, response.text
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "crl.pem").write_text(response.text)
    (directory / "ca.pem").write_text("".join(ca_chain(client, org_id)))
    checked = openssl("crl", "-in", "crl.pem", "-CAfile", "ca.pem", "-noout", cwd=directory)
    assert checked.returncode == 0 and "verify OK" in checked.stderr, checked.stderr
    return openssl_ok("crl", "-in", "crl.pem", "-text", "-noout", cwd=directory)


def crl_number(text: str) -> int:
    match = re.search(r"X509v3 CRL Number:\s*\n\s*(\d+)", text)
    assert match, text
    return int(match.group(1))


def crl_serials(text: str) -> set[int]:
    return {int(value, 16) for value in re.findall(r"Serial Number: ([0-9A-F]+)", text)}


def kept_key(server: ServerProcess, certificate_id: str) -> str | None:
    ((sealed,),) = raw_rows(server, "SELECT key_sealed FROM device_certificates WHERE id = ?", certificate_id)
    return sealed


def device(client: Api, org_id: str, device_id: str) -> dict[str, Any]:
    response = client.get(org_path(org_id, f"/devices/{device_id}"))
    assert response.status_code == 200, response.text
    return response.json()


# --- organisation CAs ------------------------------------------------------------------------------


def test_every_org_and_the_default_org_have_one_active_generated_ca(root: Api, tenant: Tenant) -> None:
    orgs = {org["name"]: org["id"] for org in root.get("/api/v1/orgs").json()}
    for org_id in (orgs["default"], tenant.org_id):
        listed = cas(root, org_id)
        assert [ca["active"] for ca in listed].count(True) == 1, listed
        active = next(ca for ca in listed if ca["active"])
        assert active["source"] == "generated"
        chain = ca_chain(root, org_id)
        assert active["chain_pem"] == "".join(chain)
        assert active["fingerprint"] == pki.fingerprint(load(chain[0]))
    assert cas(root, orgs["default"])[0]["id"] != cas(root, tenant.org_id)[0]["id"]


def test_chain_is_the_intermediate_then_a_self_signed_p256_root(tenant: Tenant, tmp_path: Path) -> None:
    chain = ca_chain(tenant.viewer, tenant.org_id)
    assert len(chain) == 2
    intermediate, root = load(chain[0]), load(chain[1])
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey) and root.public_key().curve.name == "secp256r1"
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    constraints = intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is True and constraints.path_length == 0
    intermediate.verify_directly_issued_by(root)
    (tmp_path / "root.pem").write_text(chain[1])
    (tmp_path / "intermediate.pem").write_text(chain[0])
    assert "OK" in openssl_ok("verify", "-CAfile", "root.pem", "intermediate.pem", cwd=tmp_path)
    listed = cas(tenant.viewer, tenant.org_id)
    assert len(listed) == 1 and listed[0]["subject"] == intermediate.subject.rfc4514_string()


def test_only_an_org_admin_imports_a_ca(tenant: Tenant, tmp_path: Path) -> None:
    chain, key = openssl_ca(tmp_path, unique("Own"))
    body = {"certificate": chain[0], "private_key": key, "chain": chain[1]}
    before = cas(tenant.admin, tenant.org_id)
    for client in (tenant.member, tenant.viewer):
        assert_native_error(client.post(org_path(tenant.org_id, "/cas"), json=body), 403)
    assert cas(tenant.admin, tenant.org_id) == before


def _mismatched_key(directory: Path) -> tuple[dict[str, str], str]:
    chain, _ = openssl_ca(directory, "Mismatch")
    _, other = self_signed("other")
    return {"certificate": chain[0], "private_key": pki.key_pem(other), "chain": chain[1]}, "private_key"


def _not_a_ca(directory: Path) -> tuple[dict[str, str], str]:
    certificate, key = self_signed("leaf", ca=False)
    return {"certificate": pki.certificate_pem(certificate), "private_key": pki.key_pem(key)}, "certificate"


def _expired(directory: Path) -> tuple[dict[str, str], str]:
    now = datetime.now(UTC)
    certificate, key = self_signed("old CA", not_before=now - timedelta(days=60), not_after=now - timedelta(days=1))
    return {"certificate": pki.certificate_pem(certificate), "private_key": pki.key_pem(key)}, "certificate"


def _garbage_certificate(directory: Path) -> tuple[dict[str, str], str]:
    _, key = self_signed("x")
    return {"certificate": "this is no certificate", "private_key": pki.key_pem(key)}, "certificate"


def _garbage_key(directory: Path) -> tuple[dict[str, str], str]:
    certificate, _ = self_signed("x")
    garbage = "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
    return {"certificate": pki.certificate_pem(certificate), "private_key": garbage}, "private_key"


def _unrelated_chain(directory: Path) -> tuple[dict[str, str], str]:
    chain, key = openssl_ca(directory, "Unrelated")
    stranger, _ = self_signed("stranger root")
    return {"certificate": chain[0], "private_key": key, "chain": pki.certificate_pem(stranger)}, "chain[0]"


def _two_certificates(directory: Path) -> tuple[dict[str, str], str]:
    chain, key = openssl_ca(directory, "Two")
    return {"certificate": chain[0] + chain[1], "private_key": key}, "certificate"


@pytest.mark.parametrize(
    "make", [_mismatched_key, _not_a_ca, _expired, _garbage_certificate, _garbage_key, _unrelated_chain, _two_certificates],
    ids=lambda make: make.__name__.strip("_"),
)
def test_bad_ca_import_is_refused_and_changes_nothing(tenant: Tenant, tmp_path: Path, make: Any) -> None:
    body, field = make(tmp_path)
    before, chain_before = cas(tenant.admin, tenant.org_id), ca_chain(tenant.admin, tenant.org_id)
    assert_native_error(tenant.admin.post(org_path(tenant.org_id, "/cas"), json=body), 400, field)
    assert cas(tenant.admin, tenant.org_id) == before
    assert ca_chain(tenant.admin, tenant.org_id) == chain_before


def test_ca_import_needs_certificate_and_key(tenant: Tenant) -> None:
    certificate, key = self_signed("x")
    for body, field in (({"private_key": pki.key_pem(key)}, "certificate"), ({"certificate": pki.certificate_pem(certificate)}, "private_key"),
                        ({"certificate": "", "private_key": pki.key_pem(key)}, "certificate")):
        assert_native_error(tenant.admin.post(org_path(tenant.org_id, "/cas"), json=body), 422, field)
    assert len(cas(tenant.admin, tenant.org_id)) == 1


def test_imported_ca_issues_new_certificates_and_the_old_one_stays(tenant: Tenant, other_tenant: Tenant, tmp_path: Path) -> None:
    org_id = tenant.org_id
    dev = new_device(tenant.admin, org_id, name="meter")
    old_chain = ca_chain(tenant.admin, org_id)
    old_ca = cas(tenant.admin, org_id)[0]
    old_certificate = issue(tenant.admin, org_id, dev["id"])
    own_chain, own_key = openssl_ca(tmp_path / "own", unique("Own"))
    body = {"certificate": own_chain[0], "private_key": own_key, "chain": own_chain[1]}

    imported = tenant.admin.post(org_path(org_id, "/cas"), json=body)
    assert imported.status_code == 201, imported.text
    ca = imported.json()
    assert ca["source"] == "imported" and ca["active"] is True
    assert ca["chain_pem"] == "".join(own_chain)
    assert "private_key" not in imported.text and own_key not in imported.text
    listed = cas(tenant.viewer, org_id)
    assert [(row["id"], row["active"]) for row in listed] == [(ca["id"], True), (old_ca["id"], False)]
    assert ca_chain(tenant.viewer, org_id) == own_chain

    new_certificate = issue(tenant.admin, org_id, dev["id"])
    assert new_certificate["ca_id"] == ca["id"]
    assert new_certificate["chain_pem"] == "".join(own_chain)
    assert load(new_certificate["certificate_pem"]).issuer == load(own_chain[0]).subject
    verified = openssl_verify(tmp_path / "new", own_chain, new_certificate["certificate_pem"])
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert openssl_verify(tmp_path / "mixed", old_chain, new_certificate["certificate_pem"]).returncode != 0
    # Certificates of the old CA keep their issuer (and stay valid against the old chain).
    assert openssl_verify(tmp_path / "old", old_chain, old_certificate["certificate_pem"]).returncode == 0
    assert tenant.admin.get(org_path(org_id, f"/certificates/{old_certificate['id']}")).json()["ca_id"] == old_ca["id"]
    # The old CA still publishes its CRL.
    assert tenant.admin.get(org_path(org_id, f"/cas/{old_ca['id']}/crl")).status_code == 200

    assert_native_error(tenant.admin.post(org_path(org_id, "/cas"), json=body), 409)
    assert_native_error(other_tenant.admin.post(org_path(other_tenant.org_id, "/cas"), json=body), 409)
    assert len(cas(tenant.admin, org_id)) == 2 and len(cas(other_tenant.admin, other_tenant.org_id)) == 1
    kinds = [event["kind"] for event in org_events(tenant.admin, org_id, kind="ca.imported")]
    assert kinds == ["ca.imported"]


# --- device certificates -----------------------------------------------------------------------------


def test_certificate_from_a_server_generated_key(server: ServerProcess, tenant: Tenant, tmp_path: Path) -> None:
    org_id = tenant.org_id
    assert set_policy(tenant.admin, org_id, cert_validity_days=30)["cert_validity_days"] == 30
    endpoint = unique("urn:dev")
    dev = new_device(tenant.admin, org_id, name="meter", endpoint=endpoint)
    issued_at = datetime.now(UTC)
    issued = issue(tenant.member, org_id, dev["id"])

    key_pem = issued["private_key_pem"]
    assert key_pem and key_pem.startswith("-----BEGIN PRIVATE KEY-----")
    certificate = load(issued["certificate_pem"])
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert public_der(certificate) == public_der(key)  # type: ignore[arg-type]
    (tmp_path / "key.pem").write_text(key_pem)
    (tmp_path / "c.pem").write_text(issued["certificate_pem"])
    assert openssl_ok("pkey", "-in", "key.pem", "-pubout", cwd=tmp_path) == openssl_ok("x509", "-in", "c.pem", "-pubkey", "-noout", cwd=tmp_path)

    chain = ca_chain(tenant.admin, org_id)
    assert issued["chain_pem"] == "".join(chain)
    verified = openssl_verify(tmp_path, chain, issued["certificate_pem"])
    assert verified.returncode == 0 and "cert.pem: OK" in verified.stdout, verified.stdout + verified.stderr

    guid = uuid.UUID(issued["id"])
    assert pki.common_name(certificate) == endpoint == issued["common_name"]
    assert certificate.serial_number == guid.int and int(issued["serial"], 16) == guid.int
    assert issued["serial"] == format(guid.int, "x")
    assert pki.device_guid(certificate) == guid
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [guid.urn]
    assert ExtendedKeyUsageOID.CLIENT_AUTH in certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    expected = issued_at + timedelta(days=30)
    assert abs(certificate.not_valid_after_utc - expected) < timedelta(minutes=2), certificate.not_valid_after_utc
    assert certificate.not_valid_before_utc <= issued_at
    assert datetime.fromisoformat(issued["not_after"]) == certificate.not_valid_after_utc
    assert (issued["device_id"], issued["key_source"], issued["key_kept"]) == (dev["id"], "server", False)
    assert device(tenant.admin, org_id, dev["id"])["endpoint"] == endpoint

    # The key is shown once: not on later reads, not in events or the log, not in the database.
    shown = tenant.admin.get(org_path(org_id, f"/certificates/{issued['id']}"))
    assert shown.status_code == 200 and "private_key_pem" not in shown.json()
    assert shown.json() == {k: v for k, v in issued.items() if k not in {"private_key_pem", "chain_pem"}}
    assert kept_key(server, issued["id"]) is None
    body = pem_body_lines(key_pem)
    dump = raw_dump(server)
    assert issued["id"] in dump and issued["certificate_pem"].splitlines()[1] in dump  # the dump is the real one
    listing = tenant.admin.get(org_path(org_id, "/certificates"), params={"device_id": dev["id"]}).text
    events = tenant.admin.get(org_path(org_id, "/events"), params={"limit": 500}).text
    for line in body:
        for where, text in (("database", dump), ("list", listing), ("events", events), ("log", server.log())):
            assert line not in text, (where, line)


def test_device_without_endpoint_takes_the_guid(tenant: Tenant) -> None:
    org_id = tenant.org_id
    dev = new_device(tenant.admin, org_id, name="no endpoint")
    assert dev["endpoint"] is None
    first = issue(tenant.admin, org_id, dev["id"])
    urn = f"urn:uuid:{first['id']}"
    assert pki.common_name(load(first["certificate_pem"])) == urn == first["common_name"]
    assert device(tenant.admin, org_id, dev["id"])["endpoint"] == urn
    # The endpoint stays: a second certificate names it, with its own GUID in serial and SAN.
    second = issue(tenant.admin, org_id, dev["id"])
    assert second["id"] != first["id"]
    certificate = load(second["certificate_pem"])
    assert pki.common_name(certificate) == urn
    assert pki.device_guid(certificate) == uuid.UUID(second["id"]) and certificate.serial_number == uuid.UUID(second["id"]).int
    assert device(tenant.admin, org_id, dev["id"])["endpoint"] == urn


def test_kept_device_key_is_sealed_at_rest(server: ServerProcess, tenant: Tenant) -> None:
    org_id = tenant.org_id
    assert set_policy(tenant.admin, org_id, keep_device_keys=True)["keep_device_keys"] is True
    dev = new_device(tenant.admin, org_id, name="kept")
    issued = issue(tenant.admin, org_id, dev["id"])
    assert issued["key_kept"] is True and issued["private_key_pem"]
    sealed = kept_key(server, issued["id"])
    assert sealed is not None and sealed.startswith("pbs1.")
    dump = raw_dump(server)
    assert sealed in dump
    for line in pem_body_lines(issued["private_key_pem"]):
        assert line not in dump
    # Sealed under the server's master key, for the device key it returned.
    assert Sealer(load_master_keys(None, server.data_dir)).open(sealed, DEVICE_KEY_PURPOSE) == issued["private_key_pem"]
    listed = tenant.admin.get(org_path(org_id, f"/certificates/{issued['id']}"))
    assert listed.json()["key_kept"] is True and "PRIVATE KEY" not in listed.text

    set_policy(tenant.admin, org_id, keep_device_keys=False)
    later = issue(tenant.admin, org_id, dev["id"])
    assert later["key_kept"] is False and kept_key(server, later["id"]) is None


def test_certificate_from_a_csr(server: ServerProcess, tenant: Tenant, tmp_path: Path) -> None:
    org_id = tenant.org_id
    set_policy(tenant.admin, org_id, keep_device_keys=True)  # even so, a CSR's key never reaches the server
    endpoint = unique("urn:dev")
    dev = new_device(tenant.admin, org_id, name="csr", endpoint=endpoint)
    csr, key = openssl_csr(tmp_path / "req")
    issued = issue(tenant.admin, org_id, dev["id"], csr=csr)
    assert issued["private_key_pem"] is None and "PRIVATE KEY" not in str(issued)
    assert (issued["key_source"], issued["key_kept"]) == ("csr", False)
    certificate = load(issued["certificate_pem"])
    request = x509.load_pem_x509_csr(csr.encode())
    assert public_der(certificate) == public_der(request)
    assert public_der(certificate) == public_der(serialization.load_pem_private_key(key.encode(), password=None))  # type: ignore[arg-type]
    assert pki.common_name(certificate) == endpoint  # the CSR's subject is ignored
    assert "ignored" not in certificate.subject.rfc4514_string()
    assert pki.device_guid(certificate) == uuid.UUID(issued["id"])
    verified = openssl_verify(tmp_path, ca_chain(tenant.admin, org_id), issued["certificate_pem"])
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert kept_key(server, issued["id"]) is None
    dump = raw_dump(server)
    for line in pem_body_lines(key):
        assert line not in dump


@pytest.mark.parametrize("key_spec", [("ec", "-pkeyopt", "ec_paramgen_curve:P-384"), ("rsa:2048",)], ids=["ec-p384", "rsa-2048"])
def test_csr_with_other_accepted_keys(tenant: Tenant, tmp_path: Path, key_spec: tuple[str, ...]) -> None:
    dev = new_device(tenant.admin, tenant.org_id, name="csr")
    csr, _ = openssl_csr(tmp_path, key_spec)
    issued = issue(tenant.admin, tenant.org_id, dev["id"], csr=csr)
    assert public_der(load(issued["certificate_pem"])) == public_der(x509.load_pem_x509_csr(csr.encode()))
    assert openssl_verify(tmp_path, ca_chain(tenant.admin, tenant.org_id), issued["certificate_pem"]).returncode == 0


def _tampered_csr(directory: Path) -> str:
    csr, _ = openssl_csr(directory)
    der = bytearray(x509.load_pem_x509_csr(csr.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature
    tampered = x509.load_der_x509_csr(bytes(der))
    assert not tampered.is_signature_valid
    return tampered.public_bytes(serialization.Encoding.PEM).decode()


def _rsa_1024_csr(directory: Path) -> str:
    return openssl_csr(directory, ("rsa:1024",))[0]


def _garbage_csr(directory: Path) -> str:
    return "-----BEGIN CERTIFICATE REQUEST-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE REQUEST-----\n"


def _certificate_instead(directory: Path) -> str:
    return pki.certificate_pem(self_signed("not a request")[0])


@pytest.mark.parametrize("make", [_tampered_csr, _rsa_1024_csr, _garbage_csr, _certificate_instead],
                         ids=lambda make: make.__name__.strip("_"))
def test_bad_csr_is_refused_and_issues_nothing(tenant: Tenant, tmp_path: Path, make: Any) -> None:
    org_id = tenant.org_id
    dev = new_device(tenant.admin, org_id, name="bad csr")
    detail = assert_native_error(
        tenant.admin.post(org_path(org_id, f"/devices/{dev['id']}/certificates"), json={"csr": make(tmp_path)}), 400, "csr"
    )
    if make is _tampered_csr:
        assert "signature" in detail
    if make is _rsa_1024_csr:
        assert "2048" in detail
    assert certificates(tenant.admin, org_id)["total"] == 0
    assert device(tenant.admin, org_id, dev["id"])["endpoint"] is None


def test_issue_for_unknown_or_foreign_device_is_404(tenant: Tenant, other_tenant: Tenant) -> None:
    foreign = new_device(other_tenant.admin, other_tenant.org_id, name="theirs")
    for device_id in (foreign["id"], str(uuid.uuid4())):
        assert_native_error(tenant.admin.post(org_path(tenant.org_id, f"/devices/{device_id}/certificates")), 404)
    assert certificates(other_tenant.admin, other_tenant.org_id)["total"] == 0
    assert device(other_tenant.admin, other_tenant.org_id, foreign["id"])["endpoint"] is None


def test_viewer_lists_but_cannot_issue_or_revoke(tenant: Tenant) -> None:
    org_id = tenant.org_id
    dev = new_device(tenant.admin, org_id, name="meter")
    issued = issue(tenant.admin, org_id, dev["id"])
    assert certificate_ids(tenant.viewer, org_id) == {issued["id"]}
    assert tenant.viewer.get(org_path(org_id, f"/certificates/{issued['id']}")).status_code == 200
    assert tenant.viewer.get(org_path(org_id, f"/cas/{issued['ca_id']}/crl")).status_code == 200
    assert_native_error(tenant.viewer.post(org_path(org_id, f"/devices/{dev['id']}/certificates")), 403)
    assert_native_error(tenant.viewer.post(org_path(org_id, f"/certificates/{issued['id']}/revoke")), 403)
    assert certificate_ids(tenant.admin, org_id) == {issued["id"]}
    assert certificate_ids(tenant.admin, org_id, status="revoked") == set()


# --- revocation --------------------------------------------------------------------------------------


def test_revocation_and_crl(tenant: Tenant, tmp_path: Path) -> None:
    org_id = tenant.org_id
    dev = new_device(tenant.admin, org_id, name="meter")
    first, second = issue(tenant.admin, org_id, dev["id"]), issue(tenant.admin, org_id, dev["id"])
    ca_id = first["ca_id"]
    initial = crl_text(tenant.viewer, org_id, ca_id, tmp_path / "0")
    assert crl_serials(initial) == set()

    revoked = tenant.member.post(org_path(org_id, f"/certificates/{first['id']}/revoke"), json={"reason": "key_compromise"})
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked_at"] and revoked.json()["revocation_reason"] == "key_compromise"
    assert certificate_ids(tenant.admin, org_id, status="revoked") == {first["id"]}
    assert certificate_ids(tenant.admin, org_id, status="active") == {second["id"]}
    assert_native_error(tenant.admin.post(org_path(org_id, f"/certificates/{first['id']}/revoke")), 409)

    after_one = crl_text(tenant.viewer, org_id, ca_id, tmp_path / "1")
    assert crl_serials(after_one) == {int(first["serial"], 16)}
    assert "Key Compromise" in after_one
    assert crl_number(after_one) > crl_number(initial)

    assert tenant.admin.post(org_path(org_id, f"/certificates/{second['id']}/revoke")).status_code == 200
    after_two = crl_text(tenant.viewer, org_id, ca_id, tmp_path / "2")
    assert crl_serials(after_two) == {int(first["serial"], 16), int(second["serial"], 16)}
    assert crl_number(after_two) > crl_number(after_one)
    # The refused second revocation did not bump the number either.
    assert crl_number(crl_text(tenant.viewer, org_id, ca_id, tmp_path / "3")) == crl_number(after_two)
    kinds = [event["kind"] for event in org_events(tenant.admin, org_id, kind="certificate.revoked")]
    assert len(kinds) == 2


def test_revoke_refuses_bad_reason_and_unknown_certificate(tenant: Tenant, other_tenant: Tenant) -> None:
    org_id = tenant.org_id
    dev = new_device(tenant.admin, org_id, name="meter")
    issued = issue(tenant.admin, org_id, dev["id"])
    assert_native_error(tenant.admin.post(org_path(org_id, f"/certificates/{issued['id']}/revoke"), json={"reason": "bored"}), 400, "reason")
    assert_native_error(tenant.admin.post(org_path(org_id, f"/certificates/{uuid.uuid4()}/revoke")), 404)
    assert_native_error(other_tenant.admin.post(org_path(other_tenant.org_id, f"/certificates/{issued['id']}/revoke")), 404)
    assert_native_error(tenant.admin.get(org_path(org_id, f"/cas/{uuid.uuid4()}/crl")), 404)
    assert_native_error(other_tenant.admin.get(org_path(other_tenant.org_id, f"/cas/{issued['ca_id']}/crl")), 404)
    assert certificate_ids(tenant.admin, org_id, status="revoked") == set()


def test_deleting_a_device_revokes_its_certificates(tenant: Tenant, tmp_path: Path) -> None:
    org_id = tenant.org_id
    dev = new_device(tenant.admin, org_id, name="doomed")
    kept_dev = new_device(tenant.admin, org_id, name="stays")
    doomed = [issue(tenant.admin, org_id, dev["id"]) for _ in range(2)]
    other = issue(tenant.admin, org_id, kept_dev["id"])
    ca_id = other["ca_id"]
    before = crl_number(crl_text(tenant.admin, org_id, ca_id, tmp_path / "before"))

    assert tenant.admin.delete(org_path(org_id, f"/devices/{dev['id']}")).status_code == 204
    for issued in doomed:
        shown = tenant.admin.get(org_path(org_id, f"/certificates/{issued['id']}")).json()
        assert shown["device_id"] is None and shown["revoked_at"] is not None
    assert certificate_ids(tenant.admin, org_id, status="revoked") == {issued["id"] for issued in doomed}
    assert certificate_ids(tenant.admin, org_id, status="active") == {other["id"]}
    text = crl_text(tenant.admin, org_id, ca_id, tmp_path / "after")
    assert crl_serials(text) == {int(issued["serial"], 16) for issued in doomed}
    assert crl_number(text) > before


# --- expiry tracking and policy ------------------------------------------------------------------------


def test_expiry_filters(server: ServerProcess, tenant: Tenant) -> None:
    org_id = tenant.org_id
    dev = new_device(tenant.admin, org_id, name="meter")
    set_policy(tenant.admin, org_id, cert_validity_days=30)
    short = issue(tenant.admin, org_id, dev["id"])
    set_policy(tenant.admin, org_id, cert_validity_days=365)
    long = issue(tenant.admin, org_id, dev["id"])
    lapsed = issue(tenant.admin, org_id, dev["id"])
    set_recorded_expiry(server, lapsed["id"], datetime.now(UTC) - timedelta(days=1))
    soon = (datetime.now(UTC) + timedelta(days=60)).isoformat()

    assert certificate_ids(tenant.viewer, org_id, status="active") == {short["id"], long["id"]}
    assert certificate_ids(tenant.viewer, org_id, status="expired") == {lapsed["id"]}
    assert certificate_ids(tenant.viewer, org_id, expiring_before=soon) == {short["id"], lapsed["id"]}
    assert certificate_ids(tenant.viewer, org_id, expiring_before=soon, status="active") == {short["id"]}
    assert certificates(tenant.viewer, org_id, expiring_before=soon)["total"] == 2
    assert certificate_ids(tenant.viewer, org_id) == {short["id"], long["id"], lapsed["id"]}
    assert_native_error(tenant.viewer.get(org_path(org_id, "/certificates"), params={"status": "bogus"}), 400, "status")
    assert_native_error(tenant.viewer.get(org_path(org_id, "/certificates"), params={"expiring_before": "soon"}), 422, "expiring_before")


def test_policy_changes_need_an_org_admin_and_valid_values(tenant: Tenant) -> None:
    org_id = tenant.org_id
    for body, field in (({"cert_validity_days": 0}, "cert_validity_days"), ({"cert_validity_days": 3651}, "cert_validity_days"),
                        ({"keep_device_keys": "perhaps"}, "keep_device_keys"), ({"name": "renamed"}, "name")):
        assert_native_error(tenant.admin.patch(org_path(org_id), json=body), 422, field)
    for client in (tenant.member, tenant.viewer):
        assert_native_error(client.patch(org_path(org_id), json={"cert_validity_days": 7}), 403)
    org = tenant.admin.get(org_path(org_id)).json()
    assert (org["cert_validity_days"], org["keep_device_keys"]) == (365, False)
    changed = set_policy(tenant.admin, org_id, cert_validity_days=7)
    assert (changed["cert_validity_days"], changed["keep_device_keys"]) == (7, False)
    assert tenant.viewer.get(org_path(org_id)).json()["cert_validity_days"] == 7
    events = org_events(tenant.admin, org_id, kind="org.credential_policy_changed")
    assert [event["detail"] for event in events] == [{"cert_validity_days": 7}]
