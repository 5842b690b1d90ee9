"""Sealing secrets at rest with the deployment's master keys (AES-256-GCM).

A sealed value is ``pbs1.<key id>.<base64(nonce ‖ ciphertext ‖ tag)>``. The key id (first bytes of a
hash of the key) says which master key sealed it; the *purpose* string is bound as associated data,
so a value sealed as one kind of secret cannot be replayed as another.

The master keys form a *keyring*: the first key seals, every key opens. Rotation puts a new key first,
re-seals every stored value under it, then drops the old key (``pilotboat keys``). A keyring read from
the key file is re-read when the file changes, so running nodes follow a rotation without a restart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = "pbs1"
KEY_FILE_NAME = "master.key"
KEY_ID_LENGTH = 8
#: How often (seconds) a node checks whether the key file changed.
RELOAD_INTERVAL = 2.0
KEY_HINT = "generate one with: python3 -c 'import os,base64; print(base64.b64encode(os.urandom(32)).decode())'"


class SealError(ValueError):
    """A sealed value is malformed or was sealed under a key this node does not have."""


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"pilotboat-key-id" + key).hexdigest()[:KEY_ID_LENGTH]


def sealed_key_id(sealed: str) -> str | None:
    """The id of the master key a value was sealed under (None when it is no sealed value)."""
    prefix, _, rest = sealed.partition(".")
    kid = rest.partition(".")[0]
    return kid if prefix == PREFIX and len(kid) == KEY_ID_LENGTH else None


def new_master_key() -> bytes:
    return os.urandom(32)


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode()


def decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"{where} must hold base64 of 32 random bytes; {KEY_HINT}") from exc
    if len(key) != 32:
        raise ValueError(f"{where} must hold base64 of 32 random bytes; {KEY_HINT}")
    return key


@dataclass(frozen=True)
class MasterKeys:
    """Where the keyring came from: the environment (fixed) or a key file (re-read when it changes)."""

    keys: tuple[bytes, ...]
    source: str
    path: Path | None = None


def read_key_file(path: Path) -> tuple[bytes, ...]:
    """One base64 key per line, the sealing key first; blank lines and ``#`` comments are ignored."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    keys = tuple(decode_key(line, str(path)) for line in lines if line and not line.startswith("#"))
    if not keys:
        raise ValueError(f"{path} holds no key")
    return keys


def write_key_file(path: Path, keys: tuple[bytes, ...]) -> None:
    """Replace the key file atomically (0600), so a node re-reading it never sees half of it."""
    temporary = path.with_name(path.name + ".new")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("# Pilotboat master keys: the first seals, the others only open. Keep this file secret.\n")
        handle.writelines(encode_key(key) + "\n" for key in keys)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def load_master_keys(configured: str | None, data_dir: Path) -> MasterKeys:
    """The keyring: ``PILOTBOAT_MASTER_KEY`` (comma-separated, sealing key first) or the 0600 key file
    in the data dir, created with one fresh key on first start."""
    if configured:
        keys = tuple(decode_key(part, "PILOTBOAT_MASTER_KEY") for part in configured.split(",") if part.strip())
        if not keys:
            raise ValueError(f"PILOTBOAT_MASTER_KEY is empty; {KEY_HINT}")
        return MasterKeys(keys, "environment")
    path = data_dir / KEY_FILE_NAME
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        write_key_file(path, (new_master_key(),))
    return MasterKeys(read_key_file(path), str(path), path)


class Sealer:
    """Seals under the keyring's first key and opens under any of its keys."""

    def __init__(self, keys: tuple[bytes, ...] | MasterKeys, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = keys.path if isinstance(keys, MasterKeys) else None
        self._clock = clock
        self._lock = threading.Lock()
        self._checked_at = clock()
        self._mtime = self._path.stat().st_mtime_ns if self._path else 0
        self._install(keys.keys if isinstance(keys, MasterKeys) else keys)

    def _install(self, keys: tuple[bytes, ...]) -> None:
        for key in keys:
            if len(key) != 32:
                raise ValueError("a master key must be 32 bytes")
        self._keys = {key_id(key): key for key in keys}
        self._aeads = {kid: AESGCM(key) for kid, key in self._keys.items()}
        self._derived: dict[tuple[str, str], bytes] = {}
        self.key_id = key_id(keys[0])
        self.key_ids = tuple(self._keys)

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the key file when it changed (checked at most every ``RELOAD_INTERVAL`` seconds)."""
        if self._path is None:
            return
        now = self._clock()
        if not force and now - self._checked_at < RELOAD_INTERVAL:
            return
        with self._lock:
            self._checked_at = now
            try:
                mtime = self._path.stat().st_mtime_ns
                if mtime != self._mtime:
                    self._install(read_key_file(self._path))
                    self._mtime = mtime
            except (OSError, ValueError):
                return  # keep the keys we have; a broken file must not take reads down

    def seal(self, plaintext: str | bytes, purpose: str) -> str:
        self.refresh()
        data = plaintext.encode() if isinstance(plaintext, str) else plaintext
        nonce = os.urandom(12)
        blob = nonce + self._aeads[self.key_id].encrypt(nonce, data, purpose.encode())
        return f"{PREFIX}.{self.key_id}.{base64.b64encode(blob).decode()}"

    def open_bytes(self, sealed: str, purpose: str) -> bytes:
        self.refresh()  # a key dropped from the file stops opening here too
        try:
            prefix, kid, body = sealed.split(".", 2)
            blob = base64.b64decode(body, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise SealError("not a sealed value") from exc
        if prefix != PREFIX or len(blob) < 28:
            raise SealError("not a sealed value")
        if kid not in self._aeads:
            self.refresh(force=True)
            if kid not in self._aeads:
                raise SealError(f"sealed under master key {kid}, which this node does not have")
        try:
            return self._aeads[kid].decrypt(blob[:12], blob[12:], purpose.encode())
        except InvalidTag as exc:
            raise SealError("sealed value failed authentication") from exc

    def open(self, sealed: str, purpose: str) -> str:
        return self.open_bytes(sealed, purpose).decode()

    def reseal(self, sealed: str, purpose: str) -> str:
        """The same secret sealed under the current key."""
        return self.seal(self.open_bytes(sealed, purpose), purpose)

    def derive(self, label: str, kid: str | None = None) -> bytes:
        """A sub-key for another purpose (e.g. signing access tokens), from the key ``kid`` (default: the
        sealing key)."""
        self.refresh()
        kid = kid or self.key_id
        if kid not in self._keys:
            self.refresh(force=True)
            if kid not in self._keys:
                raise SealError(f"unknown master key {kid}")
        derived = self._derived.get((label, kid))
        if derived is None:
            derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label.encode()).derive(self._keys[kid])
            self._derived[(label, kid)] = derived
        return derived
