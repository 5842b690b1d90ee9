"""Access tokens (short-lived JWTs signed with a key derived from the master key) and API keys."""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass

import jwt

API_KEY_PREFIX = "pbk_"
_ALGORITHM = "HS256"
_AUDIENCE = "pilotboat-api"


class TokenError(ValueError):
    pass


@dataclass(frozen=True)
class TokenCodec:
    signing_key: bytes
    ttl_seconds: int

    def issue(self, user_id: str) -> str:
        now = int(time.time())
        claims = {"sub": user_id, "iat": now, "exp": now + self.ttl_seconds, "jti": uuid.uuid4().hex, "aud": _AUDIENCE}
        return jwt.encode(claims, self.signing_key, algorithm=_ALGORITHM)

    def verify(self, token: str) -> str:
        """The user id inside a valid, unexpired token."""
        try:
            claims = jwt.decode(
                token, self.signing_key, algorithms=[_ALGORITHM], audience=_AUDIENCE, options={"require": ["exp", "sub"]}
            )
        except jwt.PyJWTError as exc:
            raise TokenError(str(exc)) from exc
        return str(claims["sub"])


def new_api_key() -> tuple[str, str, str]:
    """(key id, secret, full key shown once). The full key is ``pbk_<id>_<secret>``."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{API_KEY_PREFIX}{key_id}_{secret}"


def split_api_key(value: str) -> tuple[str, str] | None:
    if not value.startswith(API_KEY_PREFIX):
        return None
    key_id, sep, secret = value[len(API_KEY_PREFIX):].partition("_")
    if not sep or not key_id or not secret:
        return None
    return key_id, secret
