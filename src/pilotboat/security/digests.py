"""Salted digests for secrets that only need comparing (device external keys, API keys).

These secrets are checked on hot paths (every bootstrap request), so they use a salted SHA-256
rather than a slow password hash; the salt defeats precomputed tables and the comparison is
constant-time. Format: ``sha256$<salt b64>$<digest b64>``.
"""

import base64
import hashlib
import hmac
import secrets

_SCHEME = "sha256"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def digest_secret(secret: str) -> str:
    salt = secrets.token_bytes(16)
    return f"{_SCHEME}${_b64(salt)}${_b64(hashlib.sha256(salt + secret.encode()).digest())}"


def verify_secret(stored: str | None, candidate: str) -> bool:
    """True when ``candidate`` matches ``stored``; compares in constant time."""
    if not stored:
        return False
    try:
        scheme, salt_text, digest_text = stored.split("$")
        salt, expected = _unb64(salt_text), _unb64(digest_text)
    except ValueError:
        return False
    if scheme != _SCHEME:
        return False
    return hmac.compare_digest(hashlib.sha256(salt + candidate.encode()).digest(), expected)


def random_token(nbytes: int = 32) -> str:
    """URL-safe random secret."""
    return secrets.token_urlsafe(nbytes)
