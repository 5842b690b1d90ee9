"""Secure bootstrap (AES-CFB, IV prepended): the cipher against the known-answer vectors, the
Magistrala secure route through a real server, its events, and the ``pilotboat bootstrap`` CLI."""

from __future__ import annotations

import json
from typing import Any

import pytest

from compat_helpers import assert_error, by_device_actor, cli, device_get, load_vectors, new_channel, org_events, system_events, unique
from harness import ENCRYPT_KEY, Api, ServerProcess, Tenant
from pilotboat.security import secure_bootstrap
from pilotboat.security.secure_bootstrap import SecureBootstrapKeyError

VECTORS = load_vectors()
MAGISTRALA_KEY = ENCRYPT_KEY.encode()  # raw bytes of the configured string: AES-256


# --- the cipher ---------------------------------------------------------------------------------


def test_vector_file_is_the_one_the_server_key_matches() -> None:
    assert len(VECTORS) == 3
    assert {vector.get("key_env") for vector in VECTORS if "key_env" in vector} == {ENCRYPT_KEY}


@pytest.mark.parametrize("vector", VECTORS, ids=[vector["name"] for vector in VECTORS])
def test_known_answer_vectors(vector: dict[str, Any]) -> None:
    key = bytes.fromhex(vector["key_hex"])
    iv = bytes.fromhex(vector["iv_hex"])
    plaintext = vector["plaintext_utf8"].encode()
    expected = bytes.fromhex(vector["ciphertext_with_iv_hex"])
    produced = secure_bootstrap.encrypt(key, plaintext, iv)
    assert produced == expected
    assert produced[: secure_bootstrap.IV_SIZE] == iv
    assert len(produced) == secure_bootstrap.IV_SIZE + len(plaintext)  # stream mode: no padding
    assert secure_bootstrap.decrypt(key, expected) == plaintext
    if "authorization_header" in vector:
        assert vector["authorization_header"] == "Client " + produced.hex()


def test_key_derivations_match_the_vectors() -> None:
    magistrala, _, mainflux = VECTORS
    assert secure_bootstrap.magistrala_key(magistrala["key_env"]) == bytes.fromhex(magistrala["key_hex"])
    assert len(secure_bootstrap.magistrala_key(magistrala["key_env"])) == 32
    assert secure_bootstrap.mainflux_key(mainflux["key_env"]) == bytes.fromhex(mainflux["key_hex"])
    assert len(secure_bootstrap.mainflux_key(mainflux["key_env"])) == 16


@pytest.mark.parametrize(
    ("configured", "raw", "hex_decoded"),
    [
        ("p" * 16, b"p" * 16, b"p" * 16),
        ("0123456789abcdef" * 2, b"0123456789abcdef" * 2, bytes.fromhex("0123456789abcdef" * 2)),
        ("00112233445566778899aabbccddeeff0011223344556677", None,  # 48 characters: too long raw, AES-192 decoded
         bytes.fromhex("00112233445566778899aabbccddeeff0011223344556677")),
        ("k" * 24, b"k" * 24, b"k" * 24),  # not hex: Mainflux key falls back to the raw bytes
        ("f" * 64, None, b"\xff" * 32),  # 64 characters: too long raw, AES-256 once hex-decoded
    ],
    ids=["16-raw", "32-hex", "48-hex", "24-raw", "64-hex"],
)
def test_key_derivations(configured: str, raw: bytes | None, hex_decoded: bytes) -> None:
    if raw is None:
        with pytest.raises(SecureBootstrapKeyError):
            secure_bootstrap.magistrala_key(configured)
    else:
        assert secure_bootstrap.magistrala_key(configured) == raw
    assert secure_bootstrap.mainflux_key(configured) == hex_decoded


@pytest.mark.parametrize("configured", ["", "short", "x" * 15, "x" * 17, "x" * 31, "x" * 33, "é" * 9, "ab" * 20])
def test_bad_key_lengths_raise(configured: str) -> None:
    with pytest.raises(SecureBootstrapKeyError) as raised:
        secure_bootstrap.magistrala_key(configured)
    assert "16, 24 or 32" in str(raised.value)
    with pytest.raises(SecureBootstrapKeyError):
        secure_bootstrap.mainflux_key(configured)
    assert issubclass(SecureBootstrapKeyError, ValueError)


def test_multibyte_key_counts_bytes_not_characters() -> None:
    assert secure_bootstrap.magistrala_key("é" * 8) == ("é" * 8).encode()  # 8 characters, 16 bytes


def test_random_iv_and_round_trip() -> None:
    first = secure_bootstrap.encrypt(MAGISTRALA_KEY, b"same plaintext")
    second = secure_bootstrap.encrypt(MAGISTRALA_KEY, b"same plaintext")
    assert first[:16] != second[:16] and first[16:] != second[16:]
    assert secure_bootstrap.decrypt(MAGISTRALA_KEY, first) == secure_bootstrap.decrypt(MAGISTRALA_KEY, second) == b"same plaintext"
    assert secure_bootstrap.decrypt(MAGISTRALA_KEY, secure_bootstrap.encrypt(MAGISTRALA_KEY, b"")) == b""


def test_decrypt_shorter_than_an_iv_raises() -> None:
    with pytest.raises(ValueError):
        secure_bootstrap.decrypt(MAGISTRALA_KEY, b"\x00" * 15)


def test_wrong_key_does_not_give_the_plaintext() -> None:
    vector = VECTORS[0]
    other = bytes.fromhex(VECTORS[2]["key_hex"])
    assert secure_bootstrap.decrypt(other, bytes.fromhex(vector["ciphertext_with_iv_hex"])) != vector["plaintext_utf8"].encode()


# --- the secure route ---------------------------------------------------------------------------


def make_config(tenant: Tenant, *, state: int = 1, **fields: Any) -> tuple[str, str, str]:
    """A config (Magistrala API) in ``state``; returns (config id, external id, external key)."""
    org = tenant.org_id
    channel = new_channel(tenant.admin, org, metadata={"kind": "telemetry"})
    body = {"external_id": unique(), "external_key": unique("key"), "channels": [channel["id"]], **fields}
    created = tenant.admin.post(f"/{org}/clients/configs", json=body)
    assert created.status_code == 201, created.text
    config_id = created.headers["location"].rsplit("/", 1)[1]
    if state:
        assert tenant.admin.put(f"/{org}/clients/state/{config_id}", json={"state": state}).status_code == 200
    return config_id, body["external_id"], body["external_key"]


def secure_header(external_key: str, key: bytes = MAGISTRALA_KEY, scheme: str = "Client") -> str:
    return f"{scheme} {secure_bootstrap.encrypt(key, external_key.encode()).hex()}"


def secure_get(server: ServerProcess, external_id: str, authorization: str | None) -> Any:
    return device_get(server.url, f"/clients/bootstrap/secure/{external_id}", authorization)


def test_secure_route_matches_the_plain_route(server: ServerProcess, tenant: Tenant) -> None:
    config_id, ext, key = make_config(tenant, content='{"a":1}', client_cert="CC", client_key="CK", ca_cert="CA")
    plain = device_get(server.url, f"/clients/bootstrap/{ext}", f"Client {key}")
    assert plain.status_code == 200, plain.text
    response = secure_get(server, ext, secure_header(key))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    body = response.content
    # Not the plaintext: none of its values shows (the body starts with a random IV, which may be "{").
    assert plain.content not in body and b'"client_key"' not in body and config_id.encode() not in body
    decrypted = json.loads(secure_bootstrap.decrypt(MAGISTRALA_KEY, body))
    assert decrypted == plain.json()
    assert decrypted["client_id"] == config_id and decrypted["client_key"] == "CK"
    assert decrypted["channels"][0]["metadata"] == {"kind": "telemetry"}
    # Each response has its own IV, prepended; the plaintext is the same.
    second = secure_get(server, ext, secure_header(key)).content
    assert body[:16] != second[:16]
    assert len(body) == len(second) == 16 + len(secure_bootstrap.decrypt(MAGISTRALA_KEY, body))
    assert json.loads(secure_bootstrap.decrypt(MAGISTRALA_KEY, second)) == decrypted
    # The response cannot be read with the Mainflux (hex-decoded) key.
    try:
        garbled = json.loads(secure_bootstrap.decrypt(secure_bootstrap.mainflux_key(ENCRYPT_KEY), body))
    except ValueError:
        garbled = None
    assert garbled != decrypted


def test_secure_route_refusals(server: ServerProcess, tenant: Tenant) -> None:
    _, ext, key = make_config(tenant)
    wrong_cipher_key = b"another key of thirty-two bytes!"
    refusals = {
        "non-hex": f"Client {'zz' * 40}",
        "odd-length hex": "Client " + secure_bootstrap.encrypt(MAGISTRALA_KEY, key.encode()).hex()[:-1],
        "too short": f"Client {'00' * 10}",
        "IV only": f"Client {'00' * 16}",
        "plain key": f"Client {key}",
        "wrong cipher key": secure_header(key, wrong_cipher_key),
        "mainflux key": secure_header(key, secure_bootstrap.mainflux_key(ENCRYPT_KEY)),
        "right cipher, wrong key": secure_header(key + "x"),
        "right cipher, empty-ish key": secure_header(" "),
    }
    for name, header in refusals.items():
        response = secure_get(server, ext, header)
        assert_error(response, 403, "message")
        assert "client_secret" not in response.text, name
    assert_error(secure_get(server, ext, None), 401, "message")
    assert_error(secure_get(server, ext, "Client"), 401, "message")
    assert_error(secure_get(server, unique(), secure_header(key)), 404, "message")
    assert_error(device_get(server.url, "/clients/bootstrap/secure/", secure_header(key)), 400, "message")
    assert secure_get(server, ext, secure_header(key)).status_code == 200


def test_secure_route_refuses_inactive_devices(server: ServerProcess, tenant: Tenant) -> None:
    config_id, ext, key = make_config(tenant, state=0)
    assert "inactive" in assert_error(secure_get(server, ext, secure_header(key)), 403, "message")
    assert tenant.admin.put(f"/{tenant.org_id}/clients/state/{config_id}", json={"state": 1}).status_code == 200
    assert secure_get(server, ext, secure_header(key)).status_code == 200


def test_secure_route_events(server: ServerProcess, root: Api, tenant: Tenant) -> None:
    org = tenant.org_id
    config_id, ext, key = make_config(tenant, state=0, client_key="PRIVATE-PEM-SECURE")
    inactive = secure_get(server, ext, secure_header(key))
    undecryptable = secure_get(server, ext, f"Client {'zz' * 32}")
    wrong = secure_get(server, ext, secure_header("not-the-key"))
    assert tenant.admin.put(f"/{org}/clients/state/{config_id}", json={"state": 1}).status_code == 200
    good = secure_get(server, ext, secure_header(key))
    assert [r.status_code for r in (inactive, undecryptable, wrong, good)] == [403, 403, 403, 200]
    secret = json.loads(secure_bootstrap.decrypt(MAGISTRALA_KEY, good.content))["client_secret"]
    unknown = unique()
    assert secure_get(server, unknown, secure_header(key)).status_code == 404
    unknown_garbled = unique()
    assert secure_get(server, unknown_garbled, "Client 00").status_code == 403

    attempts = org_events(tenant.admin, org, kind="bootstrap.", device_id=config_id)
    assert [(e["kind"], e["outcome"], e["reason"]) for e in reversed(attempts)] == [
        ("bootstrap.failed", "refused", "device inactive"),
        ("bootstrap.failed", "refused", "external key did not decrypt"),
        ("bootstrap.failed", "refused", "wrong external key"),
        ("bootstrap.succeeded", "ok", None),
    ]
    assert {e["detail"].get("door") for e in attempts} == {"magistrala-secure"}
    assert all(e["actor"] == f"device:{ext}" for e in attempts)
    stray = system_events(root, kind="bootstrap.failed")
    assert [(e["org_id"], e["reason"]) for e in by_device_actor(stray, unknown)] == [(None, "unknown external_id")]
    assert [(e["org_id"], e["reason"]) for e in by_device_actor(stray, unknown_garbled)] == [
        (None, "external key did not decrypt")
    ]
    everything = json.dumps(org_events(tenant.admin, org)) + json.dumps(system_events(root))
    for value in (key, secret, "PRIVATE-PEM-SECURE", "not-the-key"):
        assert value not in everything
        assert value not in server.log()


# --- the CLI ------------------------------------------------------------------------------------



def one_line(text: str) -> str:
    return " ".join(text.split())


def test_cli_get_and_secure(server: ServerProcess, tenant: Tenant) -> None:
    config_id, ext, key = make_config(tenant, content="cli-content")
    expected = device_get(server.url, f"/clients/bootstrap/{ext}", f"Client {key}").json()

    got = cli("get", ext, key, "--url", server.url)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == expected
    assert json.loads(got.stdout)["client_id"] == config_id

    secure = cli("secure", ext, key, ENCRYPT_KEY, "--url", server.url)
    assert secure.returncode == 0, secure.stderr
    assert json.loads(secure.stdout) == expected


def test_cli_errors(server: ServerProcess, tenant: Tenant) -> None:
    _, ext, key = make_config(tenant)
    wrong = cli("get", ext, "wrong-key", "--url", server.url)
    assert wrong.returncode != 0
    assert wrong.stdout.strip() == ""
    assert "error" in wrong.stderr and "403" in wrong.stderr and "wrong external key" in one_line(wrong.stderr)
    assert "Traceback" not in wrong.stderr

    unknown = cli("get", unique(), key, "--url", server.url)
    assert unknown.returncode != 0 and "404" in unknown.stderr and "Traceback" not in unknown.stderr

    secure_wrong = cli("secure", ext, "wrong-key", ENCRYPT_KEY, "--url", server.url)
    assert secure_wrong.returncode != 0 and "403" in secure_wrong.stderr and "Traceback" not in secure_wrong.stderr

    other_cipher = cli("secure", ext, key, "k" * 32, "--url", server.url)
    assert other_cipher.returncode != 0 and "403" in other_cipher.stderr and "Traceback" not in other_cipher.stderr

    bad_length = cli("secure", ext, key, "too-short", "--url", server.url)
    assert bad_length.returncode != 0
    assert "16, 24 or 32" in one_line(bad_length.stderr) and "Traceback" not in bad_length.stderr

    unreachable = cli("get", ext, key, "--url", "http://127.0.0.1:9")
    assert unreachable.returncode != 0 and "cannot reach" in one_line(unreachable.stderr)
    assert "Traceback" not in unreachable.stderr
