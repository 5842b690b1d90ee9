"""Who is calling: a user, possibly through an API key restricted to one organisation."""

from __future__ import annotations

from dataclasses import dataclass, field

from pilotboat.model.roles import ROLE_PERMISSIONS, Permission, Role


@dataclass(frozen=True)
class Principal:
    user_id: str
    email: str
    is_system_admin: bool = False
    roles: dict[str, Role] = field(default_factory=dict)
    #: Set when authenticated by an API key bound to one organisation.
    key_org_id: str | None = None
    #: Set when authenticated by an API key (restricted to an organisation or not).
    via_api_key: bool = False
    #: The id of that API key.
    api_key_id: str | None = None
    #: Permissions granted per organisation on top of the role there.
    grants: dict[str, frozenset[Permission]] = field(default_factory=dict)

    @property
    def acts_as_system_admin(self) -> bool:
        """A system administrator not restricted to one organisation by an API key."""
        return self.is_system_admin and self.key_org_id is None

    def visible_org_ids(self) -> list[str]:
        if self.key_org_id is not None:
            return [self.key_org_id] if self.key_org_id in self.roles or self.is_system_admin else []
        return list(self.roles)

    def can(self, org_id: str, permission: Permission) -> bool:
        if self.key_org_id is not None and self.key_org_id != org_id:
            return False
        if self.is_system_admin:
            return True
        role = self.roles.get(org_id)
        if role is None:
            return False
        return permission in ROLE_PERMISSIONS[role] or permission in self.grants.get(org_id, frozenset())

    def can_anywhere(self, permission: Permission) -> bool:
        """Whether some organisation visible to the caller gives ``permission``."""
        if self.acts_as_system_admin:
            return True
        return any(self.can(org_id, permission) for org_id in self.visible_org_ids())

    def is_member(self, org_id: str) -> bool:
        if self.key_org_id is not None and self.key_org_id != org_id:
            return False
        return self.is_system_admin or org_id in self.roles
