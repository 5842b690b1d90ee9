"""LwM2M support: content-format codecs (``content``, ``tlv``, ``senml``, ``linkformat``) over the
value types of ``model``. Every decoder takes untrusted bytes and raises only ``CodecError``."""

from pilotboat.lwm2m.model import (
    CodecError,
    Entry,
    ObjLink,
    Path,
    Payload,
    ResourceType,
    UnsupportedFormat,
    Value,
)

__all__ = ["CodecError", "Entry", "ObjLink", "Path", "Payload", "ResourceType", "UnsupportedFormat", "Value"]
