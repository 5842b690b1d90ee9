"""Access tokens (short-lived JWTs signed with a key derived from the master key) and API keys.

A token names (``kid``) the master key its signing key was derived from, so tokens issued before a
master-key rotation stay valid until they expire.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass

import jwt

from pilotboat.security.sealing import Sealer, SealError

API_KEY_PREFIX = "pbk_"
_ALGORITHM = "HS256"
_AUDIENCE = "pilotboat-api"
_KEY_LABEL = "pilotboat access tokens v1"


class TokenError(ValueError):
    pass


@dataclass(frozen=True)
class TokenCodec:
    sealer: Sealer
    ttl_seconds: int

    def issue(self, user_id: str) -> str:
        now = int(time.time())
        claims = {"sub": user_id, "iat": now, "exp": now + self.ttl_seconds, "jti": uuid.uuid4().hex, "aud": _AUDIENCE}
        self.sealer.refresh()  # sign under the current sealing key after a rotation of the key file
        kid = self.sealer.key_id
        return jwt.encode(claims, self.sealer.derive(_KEY_LABEL, kid), algorithm=_ALGORITHM, headers={"kid": kid})

    def verify(self, token: str) -> str:
        """The user id inside a valid, unexpired token."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self.sealer.derive(_KEY_LABEL, kid if isinstance(kid, str) else None)
            claims = jwt.decode(
                token, key, algorithms=[_ALGORITHM], audience=_AUDIENCE, options={"require": ["exp", "sub"]}
            )
        except (jwt.PyJWTError, SealError) as exc:
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
