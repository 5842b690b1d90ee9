"""CoAP response codes from their dotted form, as the services name them ("4.03")."""

from __future__ import annotations

from aiocoap.numbers.codes import Code


def code(dotted: str) -> Code:
    """The code written ``class.detail``, e.g. ``code("4.03") is Code.FORBIDDEN``."""
    major, minor = dotted.split(".")
    return Code(int(major) * 32 + int(minor))
