"""Sealed bootstrap: the authenticated, replay-protected successor of the secure bootstrap cipher.

Same service-wide key as secure bootstrap (so a device needs nothing new), but AES-GCM instead of
unauthenticated AES-CFB, a timestamp and a nonce against replays, and the external id and request
nonce bound into the associated data so that neither request nor response can be moved to another
device or answered with another response.

Request header: ``Authorization: Sealed <base64url(nonce(12) ‖ AES-GCM(key, "<unix time>:<external key>",
aad=REQUEST_AAD ‖ external_id))>``.
Response body: ``nonce(12) ‖ AES-GCM(key, JSON, aad=RESPONSE_AAD ‖ external_id ‖ request nonce)``.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_SIZE = 12
REQUEST_AAD = b"pilotboat sealed bootstrap request v1:"
RESPONSE_AAD = b"pilotboat sealed bootstrap response v1:"
#: Requests whose timestamp is further than this from the server's clock are refused.
MAX_CLOCK_SKEW_SECONDS = 300


class SealedRequestError(ValueError):
    """The request token is malformed, forged, stale or replayed."""


@dataclass(frozen=True)
class OpenedRequest:
    external_key: str
    nonce: bytes
    timestamp: int


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def seal_request(key: bytes, external_id: str, external_key: str, *, now: float | None = None) -> tuple[str, bytes]:
    """Device side: the header token and the nonce to open the response with."""
    nonce = os.urandom(NONCE_SIZE)
    plaintext = f"{int(time.time() if now is None else now)}:{external_key}".encode()
    sealed = AESGCM(key).encrypt(nonce, plaintext, REQUEST_AAD + external_id.encode())
    return _b64encode(nonce + sealed), nonce


def open_response(key: bytes, external_id: str, request_nonce: bytes, body: bytes) -> bytes:
    """Device side: the JSON configuration inside a sealed response."""
    aad = RESPONSE_AAD + external_id.encode() + request_nonce
    return AESGCM(key).decrypt(body[:NONCE_SIZE], body[NONCE_SIZE:], aad)


class ReplayGuard:
    """Remembers request nonces for the clock-skew window; bounded, oldest forgotten first.

    In-process: on several nodes a captured request could be replayed once per node within the
    window. The timestamp still bounds it to a few minutes.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._capacity = capacity

    def first_use(self, nonce: bytes, now: float) -> bool:
        horizon = now - 2 * MAX_CLOCK_SKEW_SECONDS
        while self._seen and (len(self._seen) >= self._capacity or next(iter(self._seen.values())) < horizon):
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        self._seen[nonce] = now
        return True


def open_request(key: bytes, external_id: str, token: str, guard: ReplayGuard, *, now: float | None = None) -> OpenedRequest:
    """Server side: authenticate and decrypt a request token, refusing stale and replayed ones."""
    now = time.time() if now is None else now
    try:
        blob = _b64decode(token)
    except (binascii.Error, ValueError) as exc:
        raise SealedRequestError("token is not base64url") from exc
    if len(blob) < NONCE_SIZE + 16:
        raise SealedRequestError("token too short")
    nonce = blob[:NONCE_SIZE]
    try:
        plaintext = AESGCM(key).decrypt(nonce, blob[NONCE_SIZE:], REQUEST_AAD + external_id.encode())
    except InvalidTag as exc:
        raise SealedRequestError("token failed authentication") from exc
    stamp, sep, external_key = plaintext.partition(b":")
    if not sep or not stamp.isdigit():
        raise SealedRequestError("token has no timestamp")
    if abs(now - int(stamp)) > MAX_CLOCK_SKEW_SECONDS:
        raise SealedRequestError("token timestamp is outside the accepted window; check the device clock")
    if not guard.first_use(nonce, now):
        raise SealedRequestError("token was already used")
    try:
        return OpenedRequest(external_key.decode(), nonce, int(stamp))
    except UnicodeDecodeError as exc:
        raise SealedRequestError("external key is not UTF-8") from exc


def seal_response(key: bytes, external_id: str, request_nonce: bytes, body: bytes) -> bytes:
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, body, RESPONSE_AAD + external_id.encode() + request_nonce)
