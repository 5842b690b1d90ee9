"""The core LwM2M objects a bootstrap server writes and a client holds: Security (0), Server (1) and
Device (3). Resource ids and types, so that untyped payloads (TLV, text) can be read."""

from __future__ import annotations

from pilotboat.lwm2m.model import Path, ResourceType

SECURITY = 0
SERVER = 1
DEVICE = 3

# Security (/0) resources.
SECURITY_URI = 0
SECURITY_BOOTSTRAP = 1
SECURITY_MODE = 2
SECURITY_IDENTITY = 3
SECURITY_SERVER_PUBLIC_KEY = 4
SECURITY_SECRET_KEY = 5
SECURITY_SHORT_SERVER_ID = 10
SECURITY_HOLD_OFF = 11

# Server (/1) resources.
SERVER_SHORT_SERVER_ID = 0
SERVER_LIFETIME = 1
SERVER_NOTIFICATION_STORING = 6
SERVER_BINDING = 7
SERVER_UPDATE_TRIGGER = 8
SERVER_BOOTSTRAP_TRIGGER = 9
SERVER_BOOTSTRAP_ON_FAILURE = 16

_S, _I, _U, _B, _O, _F, _T, _L = (
    ResourceType.STRING, ResourceType.INTEGER, ResourceType.UNSIGNED, ResourceType.BOOLEAN, ResourceType.OPAQUE,
    ResourceType.FLOAT, ResourceType.TIME, ResourceType.OBJLNK,
)

#: object id -> resource id -> type (None: executable, no value).
RESOURCE_TYPES: dict[int, dict[int, ResourceType | None]] = {
    SECURITY: {
        0: _S, 1: _B, 2: _I, 3: _O, 4: _O, 5: _O, 6: _I, 7: _O, 8: _O, 9: _S, 10: _I, 11: _I, 12: _I, 13: _U,
        14: _S, 15: _U, 16: _U, 17: _L,
    },
    SERVER: {
        0: _I, 1: _I, 2: _I, 3: _I, 4: None, 5: _I, 6: _B, 7: _S, 8: None, 9: None, 10: _L, 11: _I, 12: _T, 13: _U,
        14: _U, 15: _U, 16: _B, 17: _U, 18: _U, 19: _U, 20: _U, 21: _U, 22: _S, 23: _B,
    },
    DEVICE: {
        0: _S, 1: _S, 2: _S, 3: _S, 4: None, 5: None, 6: _I, 7: _I, 8: _I, 9: _I, 10: _I, 11: _I, 12: None, 13: _T,
        14: _S, 15: _S, 16: _S, 17: _S, 18: _S, 19: _S, 20: _I, 21: _I, 22: _S,
    },
}


def resource_type(path: Path) -> ResourceType | None:
    """The type of the resource at ``path`` (a resource or resource instance of a known object)."""
    if path.depth < 3:
        return None
    return RESOURCE_TYPES.get(path.object_id or 0, {}).get(path.resource_id or 0)
