"""What a device credential (PSK identity or certificate) is for, and where it stands in its life."""

from __future__ import annotations

import enum


class Purpose(enum.StrEnum):
    """A bootstrap credential (the factory one) opens the bootstrap DTLS port only; a management
    credential (written at a bootstrap, or pre-provisioned by an operator) the management DTLS port only."""

    BOOTSTRAP = "bootstrap"
    MANAGEMENT = "management"


class CredentialState(enum.StrEnum):
    #: Written to the device at a bootstrap, not used yet: the device's older management credential still works.
    ISSUED = "issued"
    #: In use. Bootstrap credentials and credentials created by operators are active from the start.
    ACTIVE = "active"


PURPOSES = tuple(purpose.value for purpose in Purpose)


def parse_purpose(value: str) -> Purpose:
    """The purpose named ``value``; ``ValueError`` with a message for the caller otherwise."""
    try:
        return Purpose(value)
    except ValueError:
        raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}") from None
