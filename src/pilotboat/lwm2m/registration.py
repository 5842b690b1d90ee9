"""The LwM2M registration interface as pure parsing: the query of Register (``POST /rd``) and Update
(``POST /rd/<id>``) and the link-format list of objects a client registers. No sockets: the CoAP door
maps ``RegistrationError`` to its CoAP code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pilotboat.lwm2m import linkformat
from pilotboat.lwm2m.model import CodecError
from pilotboat.model.management_server import BINDING_LETTERS, DEFAULT_BINDING, DEFAULT_LIFETIME, MAX_LIFETIME

#: Versions this server registers (``lwm2m=``); others get 4.12 so that clients retry one version lower.
SUPPORTED_VERSIONS = ("1.0", "1.1", "1.2")
DEFAULT_VERSION = "1.0"  # a client that sends no ``lwm2m`` speaks 1.0
#: Shortest lifetime accepted (a zero or negative lifetime would expire at once).
MIN_LIFETIME = 1
MAX_ENDPOINT_CHARS = 256
#: Query options read per request (extra ones, such as Pelion's, are ignored).
MAX_QUERY_OPTIONS = 16
#: Objects a registration may list; larger lists are refused rather than stored.
MAX_OBJECT_LINKS = 1024


class RegistrationError(ValueError):
    """A request the registration interface refuses; ``code`` is the CoAP answer."""

    def __init__(self, code: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        #: Seconds the client should wait (sent as Max-Age with 4.29 and 5.03).
        self.retry_after = retry_after


def _bad(message: str) -> RegistrationError:
    return RegistrationError("4.00", message)


@dataclass(frozen=True)
class RegisterQuery:
    endpoint: str
    lifetime: int
    lwm2m_version: str
    binding: str
    #: Queue mode: ``b=UQ`` (1.0) or the ``Q`` flag (1.1+).
    queue_mode: bool
    sms: str | None


@dataclass(frozen=True)
class UpdateQuery:
    """What an Update changes; None (False for ``queue_mode``) where the client sent nothing."""

    lifetime: int | None
    binding: str | None
    queue_mode: bool
    sms: str | None


def _options(options: Iterable[str]) -> dict[str, str | None]:
    """``name=value`` options (a bare ``Q`` is a flag: None); the first occurrence of a name wins."""
    found: dict[str, str | None] = {}
    for index, option in enumerate(options):
        if index >= MAX_QUERY_OPTIONS:
            break
        name, sep, value = option.partition("=")
        found.setdefault(name, value if sep else None)
    return found


def _lifetime(value: str | None) -> int:
    if value is None or not (value.isascii() and value.isdecimal()) or len(value) > 10:
        raise _bad(f"lt must be a number of seconds, not {value!r}")
    lifetime = int(value)
    if not MIN_LIFETIME <= lifetime <= MAX_LIFETIME:
        raise _bad(f"lt must be {MIN_LIFETIME} to {MAX_LIFETIME} seconds, not {lifetime}")
    return lifetime


def _binding(value: str | None) -> tuple[str, bool]:
    """The binding without ``Q``, and whether ``Q`` was in it (1.0 queue mode)."""
    letters = (value or "").upper()
    if not letters or not set(letters) <= BINDING_LETTERS or len(set(letters)) != len(letters):
        raise _bad(f"b must be binding letters from U, T, S, N, Q, not {value!r}")
    queue = "Q" in letters
    return letters.replace("Q", "") or DEFAULT_BINDING, queue


def _version(value: str | None) -> str:
    version = (value or DEFAULT_VERSION).strip('"')
    if version not in SUPPORTED_VERSIONS:
        raise RegistrationError("4.12", f"LwM2M version {version!r} is not supported; this server speaks {', '.join(SUPPORTED_VERSIONS)}")
    return version


def read_register(options: Iterable[str]) -> RegisterQuery:
    """The query of a Register request; ``RegistrationError`` 4.00 for a missing or bad parameter, 4.12
    for an unsupported LwM2M version."""
    query = _options(options)
    endpoint = query.get("ep")
    if not endpoint:
        raise _bad("missing ep: send POST /rd?ep=<endpoint name>")
    if len(endpoint) > MAX_ENDPOINT_CHARS:
        raise _bad(f"ep is longer than {MAX_ENDPOINT_CHARS} characters")
    version = _version(query.get("lwm2m"))
    lifetime = _lifetime(query["lt"]) if "lt" in query else DEFAULT_LIFETIME
    binding, queue_in_binding = _binding(query["b"]) if "b" in query else (DEFAULT_BINDING, False)
    return RegisterQuery(endpoint, lifetime, version, binding, queue_in_binding or "Q" in query, query.get("sms") or None)


def read_update(options: Iterable[str]) -> UpdateQuery:
    """The query of an Update request (every parameter optional)."""
    query = _options(options)
    lifetime = _lifetime(query["lt"]) if "lt" in query else None
    binding, queue_in_binding = _binding(query["b"]) if "b" in query else (None, False)
    return UpdateQuery(lifetime, binding, queue_in_binding or "Q" in query, query.get("sms") or None)


@dataclass(frozen=True)
class RegisteredObjects:
    """The objects and instances of a registration, and what its root link said."""

    #: Object and instance links as given, e.g. ``("/1/0", "/3/0", "/3303")``.
    links: tuple[str, ...]
    #: The alternate path from a ``</path>;rt="oma.lwm2m"`` link ("" when none).
    root_path: str
    #: Content formats the client announced (``ct`` on the root link), empty when it said nothing.
    content_formats: tuple[int, ...]


def read_objects(payload: bytes) -> RegisteredObjects:
    """The registration payload (link-format), read leniently; 4.00 when it is not link-format at all
    or lists too many links."""
    if not payload:
        return RegisteredObjects((), "", ())
    try:
        links = linkformat.decode(payload)
    except CodecError as exc:
        raise _bad(f"the registration payload is not link-format: {exc}") from None
    if len(links) > MAX_OBJECT_LINKS:
        raise _bad(f"a registration lists at most {MAX_OBJECT_LINKS} objects and instances")
    root, formats, objects = "", (), []
    for link in links:
        rt = (link.get("rt") or "").strip('"')
        path = link.path
        if rt == "oma.lwm2m" or (path is not None and path.depth == 0):
            root = "" if link.target == "/" else link.target
            formats = _formats(link.get("ct"))
            continue
        if path is None and root and link.target.startswith(root + "/"):
            path = linkformat.Link(link.target[len(root):]).path
        if path is not None and 1 <= path.depth <= 2:
            objects.append(str(path))
    return RegisteredObjects(tuple(dict.fromkeys(objects)), root, formats)


def _formats(value: str | None) -> tuple[int, ...]:
    """``ct=110`` or ``ct="110 112"``; numbers only (anything else is ignored)."""
    parts = (value or "").strip('"').split()
    return tuple(int(part) for part in parts if part.isascii() and part.isdecimal() and len(part) <= 5)
