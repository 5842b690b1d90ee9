"""CoRE link-format (RFC 6690, content format 40): Register payloads and Discover responses.

Parsing is lenient because clients are: whitespace anywhere between tokens, empty or trailing links and
parameters (``,,`` ``;;``), unquoted values (``rt=oma.lwm2m``), a bare target without ``<>``, and
parameter names in any case (they are case-insensitive and come back lower-case). Escapes inside quoted
values are honoured. Output is strict: ``<target>;name=value`` with values quoted when they are not plain
tokens or the parameter is one RFC 6690 defines as a quoted string.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from pilotboat.lwm2m.model import CodecError, Path, check_size

#: Parameters whose value RFC 6690 / RFC 8288 write as a quoted string.
QUOTED_PARAMS = frozenset({"rt", "if", "rel", "rev", "anchor", "title"})
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'()*+\-./:?@\[\]^_`{|}~]+")
_NAME = re.compile(r"[A-Za-z0-9!#$&+\-.^_`|~]+")
_BAD_TARGET = re.compile(r"[\s<>\"\x00-\x1f\x7f]")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_SPACE = " \t\r\n"


@dataclass(frozen=True)
class Link:
    """One link: its target as written (without ``<>``) and its parameters in order; a parameter
    without ``=`` (a flag such as ``obs``) has the value None."""

    target: str
    params: tuple[tuple[str, str | None], ...] = ()

    def has(self, name: str) -> bool:
        return any(key == name.lower() for key, _ in self.params)

    def get(self, name: str) -> str | None:
        """The first value of ``name`` (None when absent or a flag)."""
        for key, value in self.params:
            if key == name.lower():
                return value
        return None

    @property
    def path(self) -> Path | None:
        """The target as an LwM2M path, or None when it is not one (``/rd``, ``/lwm2m``...)."""
        try:
            return Path.parse(self.target)
        except CodecError:
            return None


def decode(payload: bytes) -> tuple[Link, ...]:
    """The links of a link-format payload, read leniently (see the module docstring)."""
    check_size(payload, "link-format")
    try:
        text = bytes(payload).decode()
    except UnicodeDecodeError as exc:
        raise CodecError(f"link-format: the payload is not UTF-8 ({exc.reason})") from exc
    size = len(text)
    links: list[Link] = []
    pos = 0

    def skip(chars: str) -> None:
        nonlocal pos
        while pos < size and text[pos] in chars:
            pos += 1

    def until_separator() -> str:
        nonlocal pos
        start = pos
        while pos < size and text[pos] not in ";,":
            pos += 1
        return text[start:pos].strip()

    while True:
        skip(_SPACE + ",")
        if pos >= size:
            break
        if text[pos] == "<":
            end = text.find(">", pos + 1)
            if end < 0:
                raise CodecError(f"link-format: the target opened at offset {pos} has no '>'")
            target = text[pos + 1 : end].strip()
            pos = end + 1
        else:
            start = pos
            target = until_separator()
            if not target:
                raise CodecError(f"link-format: expected a link target at offset {start}")
        params: list[tuple[str, str | None]] = []
        while True:
            skip(_SPACE)
            if pos >= size or text[pos] == ",":
                break
            if text[pos] != ";":
                raise CodecError(f"link-format: unexpected {text[pos]!r} at offset {pos} in the link <{target}>")
            pos += 1
            skip(_SPACE)
            start = pos
            while pos < size and text[pos] not in "=;,":
                pos += 1
            name = text[start:pos].strip().lower()
            value: str | None = None
            if pos < size and text[pos] == "=":
                pos += 1
                skip(_SPACE)
                if pos < size and text[pos] == '"':
                    opened = pos
                    pos += 1
                    chars = []
                    while pos < size and text[pos] != '"':
                        if text[pos] == "\\" and pos + 1 < size:
                            pos += 1
                        chars.append(text[pos])
                        pos += 1
                    if pos >= size:
                        raise CodecError(f"link-format: the quoted value opened at offset {opened} is not closed")
                    pos += 1
                    value = "".join(chars)
                else:
                    value = until_separator()
            if not name:
                if value is not None:
                    raise CodecError(f"link-format: a parameter of <{target}> has a value but no name")
                continue  # an empty parameter (";;" or a trailing ";")
            params.append((name, value))
        links.append(Link(target, tuple(params)))
    return tuple(links)


def _param(name: str, value: str | None) -> str:
    if not _NAME.fullmatch(name):
        raise CodecError(f"link-format: {name!r} is not a valid parameter name")
    if value is None:
        return f";{name}"
    if _CONTROL.search(value):
        raise CodecError(f"link-format: the value of {name!r} contains control characters")
    if name.lower() in QUOTED_PARAMS or not _TOKEN.fullmatch(value):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f';{name}="{escaped}"'
    return f";{name}={value}"


def encode(links: Iterable[Link]) -> bytes:
    """Strict RFC 6690 link-format for ``links``."""
    parts = []
    for link in links:
        if _BAD_TARGET.search(link.target):
            raise CodecError(f"link-format: the target {link.target!r} contains spaces, quotes, '<' or '>'")
        parts.append(f"<{link.target}>" + "".join(_param(name, value) for name, value in link.params))
    return ",".join(parts).encode()
