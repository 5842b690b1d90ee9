"""Roles and what each may do inside one organisation. System administrators may do everything.

A membership has a role and, besides what the role gives, optional *grants*: single permissions given
to one user in one organisation (WebAccess/DMP sets per-company permissions this way).
"""

from enum import StrEnum


class Role(StrEnum):
    ADMIN = "admin"
    MEMBER = "member"
    VIEWER = "viewer"


class Permission(StrEnum):
    READ = "read"
    WRITE = "write"
    MANAGE_USERS = "manage_users"
    #: Import or replace the organisation's CA and set its credential policy.
    MANAGE_PKI = "manage_pki"
    #: Act as a device management server: read the deployment's trust store.
    DEVICE_MANAGEMENT_SERVER = "device_management_server"


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(Permission),
    Role.MEMBER: frozenset({Permission.READ, Permission.WRITE}),
    Role.VIEWER: frozenset({Permission.READ}),
}

#: Permissions that may be granted on top of a role (the others follow from roles only).
GRANTABLE: frozenset[Permission] = frozenset({Permission.DEVICE_MANAGEMENT_SERVER})
