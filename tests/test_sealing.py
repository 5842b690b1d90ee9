"""Sealing secrets at rest with the master keyring, and access tokens across a key rotation (no server)."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from pilotboat.security.sealing import (
    KEY_FILE_NAME,
    RELOAD_INTERVAL,
    Sealer,
    SealError,
    encode_key,
    key_id,
    load_master_keys,
    new_master_key,
    read_key_file,
    sealed_key_id,
    write_key_file,
)
from pilotboat.security.tokens import TokenCodec, TokenError

PURPOSE = "test.secret"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def changed(path: Path, before: int) -> None:
    """Make sure the file's modification time differs from ``before`` (coarse file system clocks)."""
    if path.stat().st_mtime_ns == before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


def rewrite(path: Path, keys: tuple[bytes, ...]) -> None:
    """Replace the key file, as a rotation does."""
    before = path.stat().st_mtime_ns
    write_key_file(path, keys)
    changed(path, before)


# --- sealing and opening ---------------------------------------------------------------------------


def test_seal_and_open() -> None:
    key = new_master_key()
    sealer = Sealer((key,))
    sealed = sealer.seal("the secret", PURPOSE)
    assert sealed.startswith(f"pbs1.{key_id(key)}.") and "the secret" not in sealed
    assert sealed_key_id(sealed) == key_id(key) == sealer.key_id
    assert sealer.open(sealed, PURPOSE) == "the secret"
    assert sealer.open_bytes(sealer.seal(b"\x00\xff", PURPOSE), PURPOSE) == b"\x00\xff"
    assert sealer.seal("the secret", PURPOSE) != sealed  # a fresh nonce each time
    assert sealed_key_id("plain text") is None


def test_value_sealed_under_another_key_does_not_open() -> None:
    key_a, key_b = new_master_key(), new_master_key()
    sealed = Sealer((key_a,)).seal("secret", PURPOSE)
    with pytest.raises(SealError, match=key_id(key_a)):
        Sealer((key_b,)).open(sealed, PURPOSE)
    # Even relabelled with B's id, A's ciphertext fails authentication under B.
    relabelled = sealed.replace(key_id(key_a), key_id(key_b), 1)
    with pytest.raises(SealError, match="authentication"):
        Sealer((key_b,)).open(relabelled, PURPOSE)


def test_wrong_purpose_does_not_open() -> None:
    sealer = Sealer((new_master_key(),))
    sealed = sealer.seal("secret", "psk.key")
    with pytest.raises(SealError):
        sealer.open(sealed, "device_certificate.key")
    assert sealer.open(sealed, "psk.key") == "secret"


def test_tampered_or_malformed_values_do_not_open() -> None:
    sealer = Sealer((new_master_key(),))
    sealed = sealer.seal("secret", PURPOSE)
    prefix, kid, body = sealed.split(".", 2)
    blob = bytearray(base64.b64decode(body))
    for position in (0, 12, len(blob) - 1):  # nonce, ciphertext, tag
        tampered = bytearray(blob)
        tampered[position] ^= 0x01
        with pytest.raises(SealError, match="authentication"):
            sealer.open(f"{prefix}.{kid}.{base64.b64encode(bytes(tampered)).decode()}", PURPOSE)
    for malformed in ("", "secret", f"pbs2.{kid}.{body}", f"pbs1.{kid}", f"pbs1.{kid}.not*base64",
                      f"pbs1.{kid}.{base64.b64encode(bytes(blob[:20])).decode()}"):
        with pytest.raises(SealError):
            sealer.open(malformed, PURPOSE)


# --- the keyring -----------------------------------------------------------------------------------


def test_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = load_master_keys(None, data_dir)
    path = data_dir / KEY_FILE_NAME
    assert first.path == path and first.source == str(path) and len(first.keys) == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert encode_key(first.keys[0]) in path.read_text()
    assert load_master_keys(None, data_dir).keys == first.keys
    assert read_key_file(path) == first.keys


def test_sealer_follows_a_rotated_key_file(tmp_path: Path) -> None:
    clock = Clock()
    master = load_master_keys(None, tmp_path)
    old = master.keys[0]
    sealer = Sealer(master, clock=clock)
    sealed_old = sealer.seal("before rotation", PURPOSE)

    new = new_master_key()
    rewrite(master.path, (new, old))  # type: ignore[arg-type]
    assert stat.S_IMODE(master.path.stat().st_mode) == 0o600  # type: ignore[union-attr]
    # Within the reload interval the node keeps sealing under the key it has ...
    assert sealed_key_id(sealer.seal("x", PURPOSE)) == key_id(old)
    sealer.refresh(force=True)
    # ... and once it re-read the file, seals under the new first key and still opens the old values.
    assert sealer.key_id == key_id(new) and set(sealer.key_ids) == {key_id(new), key_id(old)}
    assert sealed_key_id(sealer.seal("after rotation", PURPOSE)) == key_id(new)
    assert sealer.open(sealed_old, PURPOSE) == "before rotation"

    # Without a forced refresh, the next seal after the interval picks up a change too.
    newest = new_master_key()
    rewrite(master.path, (newest,))  # type: ignore[arg-type]
    clock.now += RELOAD_INTERVAL + 0.1
    assert sealed_key_id(sealer.seal("x", PURPOSE)) == key_id(newest)
    with pytest.raises(SealError):
        sealer.open(sealed_old, PURPOSE)  # the old key left the ring


def test_sealer_reads_the_file_for_a_key_it_does_not_know_yet(tmp_path: Path) -> None:
    """Another node rotated first: a value sealed under the new key opens here without waiting."""
    master = load_master_keys(None, tmp_path)
    here = Sealer(master, clock=Clock())
    new = new_master_key()
    rewrite(master.path, (new, master.keys[0]))  # type: ignore[arg-type]
    elsewhere = Sealer(load_master_keys(None, tmp_path))
    assert elsewhere.key_id == key_id(new)
    assert here.open(elsewhere.seal("from the other node", PURPOSE), PURPOSE) == "from the other node"


def test_broken_key_file_keeps_the_keys_in_use(tmp_path: Path) -> None:
    master = load_master_keys(None, tmp_path)
    sealer = Sealer(master, clock=Clock())
    sealed = sealer.seal("secret", PURPOSE)
    before = master.path.stat().st_mtime_ns  # type: ignore[union-attr]
    master.path.write_text("not base64 at all\n")  # type: ignore[union-attr]
    changed(master.path, before)  # type: ignore[arg-type]
    sealer.refresh(force=True)
    assert sealer.key_id == key_id(master.keys[0])
    assert sealer.open(sealed, PURPOSE) == "secret"
    with pytest.raises(ValueError, match="base64 of 32 random bytes"):
        load_master_keys(None, tmp_path)


def test_environment_keyring_seals_under_the_first_and_opens_both(tmp_path: Path) -> None:
    first, second = new_master_key(), new_master_key()
    master = load_master_keys(f"{encode_key(first)}, {encode_key(second)}", tmp_path)
    assert master.keys == (first, second) and master.source == "environment" and master.path is None
    assert not (tmp_path / KEY_FILE_NAME).exists()
    sealer = Sealer(master)
    assert sealer.key_id == key_id(first)
    assert sealed_key_id(sealer.seal("x", PURPOSE)) == key_id(first)
    for key in (first, second):
        assert sealer.open(Sealer((key,)).seal("old value", PURPOSE), PURPOSE) == "old value"
    sealer.refresh(force=True)  # nothing to re-read
    assert sealer.key_ids == (key_id(first), key_id(second))


@pytest.mark.parametrize(
    "configured",
    ["not base64!", base64.b64encode(b"short").decode(), base64.b64encode(os.urandom(33)).decode(),
     f"{encode_key(new_master_key())},bad", " , "],
    ids=["not-base64", "too-short", "too-long", "one-bad-of-two", "empty"],
)
def test_bad_environment_key_is_a_helpful_error(tmp_path: Path, configured: str) -> None:
    with pytest.raises(ValueError) as refused:
        load_master_keys(configured, tmp_path)
    message = str(refused.value)
    assert "PILOTBOAT_MASTER_KEY" in message and "base64" in message and "os.urandom(32)" in message
    assert not (tmp_path / KEY_FILE_NAME).exists()


def test_bad_key_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    path.write_text(f"# comment\n{base64.b64encode(b'sixteen bytes!!!').decode()}\n")
    with pytest.raises(ValueError, match=str(path)):
        load_master_keys(None, tmp_path)
    path.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_master_keys(None, tmp_path)


def test_sealer_refuses_keys_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Sealer((b"x" * 16,))


# --- access tokens -----------------------------------------------------------------------------------


def test_tokens_survive_a_key_rotation() -> None:
    old, new = new_master_key(), new_master_key()
    issued_before = TokenCodec(Sealer((old,)), 300).issue("user-1")
    rotated = TokenCodec(Sealer((new, old)), 300)
    assert rotated.verify(issued_before) == "user-1"
    issued_after = rotated.issue("user-2")
    assert rotated.verify(issued_after) == "user-2"
    assert TokenCodec(Sealer((new,)), 300).verify(issued_after) == "user-2"
    # Once the old key left the ring, its tokens are no longer accepted.
    with pytest.raises(TokenError):
        TokenCodec(Sealer((new,)), 300).verify(issued_before)
    with pytest.raises(TokenError):
        TokenCodec(Sealer((new_master_key(),)), 300).verify(issued_after)


def test_expired_or_altered_tokens_are_refused() -> None:
    codec = TokenCodec(Sealer((new_master_key(),)), 300)
    with pytest.raises(TokenError):
        codec.verify(TokenCodec(codec.sealer, -10).issue("user-1"))
    token = codec.issue("user-1")
    header, payload, signature = token.split(".")
    altered = ("B" if signature[0] == "A" else "A") + signature[1:]
    with pytest.raises(TokenError):
        codec.verify(f"{header}.{payload}.{altered}")
    with pytest.raises(TokenError):
        codec.verify("not a token")
