"""Sealing secrets at rest with the deployment's master key (AES-256-GCM).

A sealed value is ``pbs1.<key id>.<base64(nonce ‖ ciphertext ‖ tag)>``. The key id (first bytes of a
hash of the key) says which master key sealed it; the *purpose* string is bound as associated data,
so a value sealed as one kind of secret cannot be replayed as another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = "pbs1"
KEY_FILE_NAME = "master.key"


class SealError(ValueError):
    """A sealed value is malformed or was sealed under another key."""


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"pilotboat-key-id" + key).hexdigest()[:8]


class Sealer:
    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise ValueError("the master key must be 32 bytes")
        self._key = master_key
        self._aead = AESGCM(master_key)
        self.key_id = key_id(master_key)

    def seal(self, plaintext: str | bytes, purpose: str) -> str:
        data = plaintext.encode() if isinstance(plaintext, str) else plaintext
        nonce = os.urandom(12)
        blob = nonce + self._aead.encrypt(nonce, data, purpose.encode())
        return f"{PREFIX}.{self.key_id}.{base64.b64encode(blob).decode()}"

    def open_bytes(self, sealed: str, purpose: str) -> bytes:
        try:
            prefix, kid, body = sealed.split(".", 2)
            blob = base64.b64decode(body, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise SealError("not a sealed value") from exc
        if prefix != PREFIX or kid != self.key_id or len(blob) < 28:
            raise SealError("sealed under another master key or malformed")
        try:
            return self._aead.decrypt(blob[:12], blob[12:], purpose.encode())
        except InvalidTag as exc:
            raise SealError("sealed value failed authentication") from exc

    def open(self, sealed: str, purpose: str) -> str:
        return self.open_bytes(sealed, purpose).decode()

    def derive(self, label: str, length: int = 32) -> bytes:
        """A sub-key for another purpose (e.g. signing access tokens)."""
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label.encode()).derive(self._key)


def load_master_key(configured: str | None, data_dir: Path) -> tuple[bytes, str]:
    """The master key and where it came from: ``PILOTBOAT_MASTER_KEY`` or a 0600 key file."""
    if configured:
        try:
            key = base64.b64decode(configured, validate=True)
        except binascii.Error as exc:
            raise ValueError("PILOTBOAT_MASTER_KEY must be base64 of 32 random bytes") from exc
        if len(key) != 32:
            raise ValueError(
                "PILOTBOAT_MASTER_KEY must be base64 of 32 random bytes; "
                "generate one with: python3 -c 'import os,base64; print(base64.b64encode(os.urandom(32)).decode())'"
            )
        return key, "environment"
    path = data_dir / KEY_FILE_NAME
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.b64encode(os.urandom(32)).decode() + "\n")
    key = base64.b64decode(path.read_text().strip())
    if len(key) != 32:
        raise ValueError(f"{path} does not hold a 32-byte base64 key")
    return key, str(path)
