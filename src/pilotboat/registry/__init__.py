"""LwM2M registrations held by the management server."""

from pilotboat.registry.store import (
    IndexStats,
    MemoryRegistrationStore,
    Registration,
    RegistrationStore,
)

__all__ = ["IndexStats", "MemoryRegistrationStore", "Registration", "RegistrationStore"]
