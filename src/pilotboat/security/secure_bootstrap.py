"""Magistrala/Mainflux secure bootstrap cipher: AES-CFB-128, random 16-byte IV prepended, no MAC.

Kept byte-compatible with the Go implementation (``cipher.NewCFBEncrypter``) for devices in the
field. The scheme has neither integrity nor replay protection; see docs/api.md.
"""

from __future__ import annotations

import os
import string

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

IV_SIZE = 16
AES_KEY_SIZES = (16, 24, 32)


class SecureBootstrapKeyError(ValueError):
    """The configured secure-bootstrap key cannot be used."""


def magistrala_key(configured: str) -> bytes:
    """Magistrala uses the raw bytes of the configured string."""
    key = configured.encode()
    if len(key) not in AES_KEY_SIZES:
        raise SecureBootstrapKeyError(
            f"PILOTBOAT_BOOTSTRAP_ENCRYPT_KEY must be 16, 24 or 32 bytes long (got {len(key)}); "
            "generate one with: python3 -c 'import secrets; print(secrets.token_hex(16))'"
        )
    return key


def mainflux_key(configured: str) -> bytes:
    """Mainflux 0.13 hex-decodes the configured string; a non-hex string is used raw."""
    if len(configured) % 2 == 0 and all(c in string.hexdigits for c in configured):
        key = bytes.fromhex(configured)
        if len(key) in AES_KEY_SIZES:
            return key
    return magistrala_key(configured)


def encrypt(key: bytes, plaintext: bytes, iv: bytes | None = None) -> bytes:
    """IV ‖ AES-CFB128(plaintext)."""
    iv = os.urandom(IV_SIZE) if iv is None else iv
    encryptor = Cipher(algorithms.AES(key), CFB(iv)).encryptor()
    return iv + encryptor.update(plaintext) + encryptor.finalize()


def decrypt(key: bytes, data: bytes) -> bytes:
    """Inverse of :func:`encrypt`; raises ``ValueError`` when ``data`` is shorter than one IV."""
    if len(data) < IV_SIZE:
        raise ValueError("ciphertext shorter than the IV")
    decryptor = Cipher(algorithms.AES(key), CFB(data[:IV_SIZE])).decryptor()
    return decryptor.update(data[IV_SIZE:]) + decryptor.finalize()
