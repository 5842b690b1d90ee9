"""Organisations, users, roles, access tokens and API keys."""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.model.principal import Principal
from pilotboat.model.roles import GRANTABLE, ROLE_PERMISSIONS, Permission, Role
from pilotboat.security.digests import digest_secret, verify_secret
from pilotboat.security.passwords import MIN_PASSWORD_LENGTH, hash_password, verify_password
from pilotboat.security.tokens import TokenCodec, TokenError, new_api_key, split_api_key
from pilotboat.services import events
from pilotboat.services.access import require, require_org
from pilotboat.services.authorities import AuthorityService
from pilotboat.security.throttle import FailureThrottle
from pilotboat.services.errors import Conflict, Forbidden, InvalidInput, NotFound, TooManyRequests, Unauthenticated
from pilotboat.services.transaction import writing
from pilotboat.store.tables import ApiKey, Membership, Organisation, User, utcnow

log = logging.getLogger("pilotboat.accounts")

DEFAULT_ORG_NAME = "default"
ADMIN_PASSWORD_FILE = "admin-password.txt"
#: ``last_used_at`` of an API key is written at most this often, to keep writes off the request path.
LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    expires_in: int


@dataclass(frozen=True)
class CreatedApiKey:
    key: ApiKey
    secret: str


@dataclass(frozen=True)
class FirstAdmin:
    email: str
    password_file: Path | None


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(f"password must have at least {MIN_PASSWORD_LENGTH} characters", field="password")


@dataclass(frozen=True)
class MembershipView:
    org: Organisation
    role: Role
    grants: frozenset[Permission]

    @property
    def permissions(self) -> frozenset[Permission]:
        return ROLE_PERMISSIONS[self.role] | self.grants


@dataclass(frozen=True)
class MembershipChange:
    """A change of one user's membership: a new role and/or the full set of granted permissions."""

    org_id: str
    role: Role | None = None
    grants: frozenset[Permission] | None = None


def _grants(values: list[str] | None) -> frozenset[Permission]:
    return frozenset(Permission(value) for value in values or () if value in Permission.__members__.values())


class AccountService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], tokens: TokenCodec, authorities: AuthorityService) -> None:
        self._sessions = sessions
        self._tokens = tokens
        self._authorities = authorities
        self._login_failures = FailureThrottle()

    # --- start-up -----------------------------------------------------------------------------

    async def ensure_first_admin(self, email: str | None, password: str | None, data_dir: Path) -> FirstAdmin | None:
        """On a deployment without users, create a system administrator and the ``default`` org.

        Without a configured password a random one is written to a 0600 file in ``data_dir``.
        Returns what was created, or None when users already existed.
        """
        async with self._sessions.begin() as session:
            if await session.scalar(select(User.id).limit(1)) is not None:
                return None
            email = (email or "admin@pilotboat.local").strip().lower()
            password_file = None
            if not password:
                password = secrets.token_urlsafe(18)
                data_dir.mkdir(parents=True, exist_ok=True)
                password_file = data_dir / ADMIN_PASSWORD_FILE
                password_file.unlink(missing_ok=True)
                with open(password_file, "x", opener=_open_private) as handle:
                    handle.write(f"{email}\n{password}\n")
            user = User(email=email, password_hash=hash_password(password), is_system_admin=True)
            org = await session.scalar(select(Organisation).where(Organisation.name == DEFAULT_ORG_NAME))
            if org is None:
                org = Organisation(name=DEFAULT_ORG_NAME)
                session.add(org)
                await session.flush()
                self._authorities.create_for(session, org)
            session.add(user)
            await session.flush()
            session.add(Membership(user_id=user.id, org_id=org.id, role=Role.ADMIN))
            events.record(session, "org.created", org_id=org.id, actor="system", name=org.name)
            events.record(session, "user.created", org_id=org.id, actor="system", email=email, system_admin=True)
            return FirstAdmin(email=email, password_file=password_file)

    # --- authentication -----------------------------------------------------------------------

    async def login(self, email: str, password: str) -> IssuedToken:
        """Password log-in. After repeated failures an email is refused for a while (per node), which
        bounds online password guessing; client addresses are not used (proxies share them)."""
        email = email.strip().lower()
        wait = self._login_failures.retry_after(email)
        if wait:
            raise TooManyRequests(f"too many failed log-ins for this account; try again in {wait} s", retry_after=wait)
        async with self._sessions() as session:
            user = await session.scalar(select(User).where(User.email == email))
        if not verify_password(user.password_hash if user else None, password) or user is None:
            self._login_failures.failed(email)
            raise Unauthenticated("wrong email or password")
        self._login_failures.succeeded(email)
        return IssuedToken(self._tokens.issue(user.id), self._tokens.ttl_seconds)

    async def authenticate(self, credential: str) -> Principal:
        """Resolve a bearer credential (access token or API key) to a principal."""
        key_org_id: str | None = None
        parts = split_api_key(credential)
        via_api_key = parts is not None
        async with self._sessions() as session:
            if parts is not None:
                key = await session.get(ApiKey, parts[0])
                now = utcnow()
                if (
                    key is None
                    or not verify_secret(key.secret_digest, parts[1])
                    or key.revoked_at is not None
                    or (key.expires_at is not None and key.expires_at <= now)
                ):
                    raise Unauthenticated("invalid, revoked or expired API key")
                user_id, key_org_id = key.user_id, key.org_id
                if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
                    await session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
                    await session.commit()
            else:
                try:
                    user_id = self._tokens.verify(credential)
                except TokenError as exc:
                    raise Unauthenticated("invalid or expired access token; get a new one at POST /api/v1/auth/token") from exc
            user = await session.get(User, user_id)
            if user is None:
                raise Unauthenticated("the account behind this credential no longer exists")
            rows = list(await session.execute(
                select(Membership.org_id, Membership.role, Membership.grants).where(Membership.user_id == user.id)
            ))
        roles = {org_id: Role(role) for org_id, role, _ in rows}
        grants = {org_id: _grants(granted) for org_id, _, granted in rows if granted}
        return Principal(
            user.id, user.email, user.is_system_admin, roles, key_org_id, via_api_key, parts[0] if parts else None, grants
        )

    # --- organisations ------------------------------------------------------------------------

    async def list_orgs(self, principal: Principal) -> list[Organisation]:
        async with self._sessions() as session:
            query = select(Organisation).order_by(Organisation.name)
            if not principal.acts_as_system_admin:
                query = query.where(Organisation.id.in_(principal.visible_org_ids()))
            return list(await session.scalars(query))

    async def get_org(self, principal: Principal, org_id: str) -> Organisation:
        require(principal, org_id, Permission.READ)
        async with self._sessions() as session:
            org = await session.get(Organisation, org_id)
        if org is None:
            raise NotFound("organisation not found")
        return org

    async def create_org(self, principal: Principal, name: str) -> Organisation:
        if not principal.acts_as_system_admin:
            raise Forbidden("only system administrators create organisations")
        name = name.strip()
        if not name:
            raise InvalidInput("name must not be empty", field="name")
        async with writing(self._sessions, f"an organisation named '{name}' already exists") as session:
            if await session.scalar(select(Organisation.id).where(Organisation.name == name)) is not None:
                raise Conflict(f"an organisation named '{name}' already exists", field="name")
            org = Organisation(name=name)
            session.add(org)
            await session.flush()
            self._authorities.create_for(session, org)
            events.record(session, "org.created", org_id=org.id, actor=principal.email, name=name)
        return org

    # --- users --------------------------------------------------------------------------------

    async def list_members(self, principal: Principal, org_id: str) -> list[tuple[User, Role, frozenset[Permission]]]:
        await self.get_org(principal, org_id)
        async with self._sessions() as session:
            rows = await session.execute(
                select(User, Membership.role, Membership.grants)
                .join(Membership, Membership.user_id == User.id)
                .where(Membership.org_id == org_id)
                .order_by(User.email)
            )
            return [(user, Role(role), _grants(grants)) for user, role, grants in rows]

    async def add_member(self, principal: Principal, org_id: str, email: str, password: str, role: Role) -> User:
        """Create a user in ``org_id``. A system administrator may also add an existing user."""
        require(principal, org_id, Permission.MANAGE_USERS)
        email = email.strip().lower()
        _check_password(password)
        async with writing(self._sessions, f"a user with email '{email}' already exists") as session:
            if await session.get(Organisation, org_id) is None:
                raise NotFound("organisation not found")
            user = await session.scalar(select(User).where(User.email == email))
            if user is not None:
                # Only an unrestricted system administrator may attach an existing user of another org.
                attach = principal.acts_as_system_admin
                if not attach or await session.get(Membership, (user.id, org_id)):
                    raise Conflict(f"a user with email '{email}' already exists", field="email")
            else:
                user = User(email=email, password_hash=hash_password(password))
                session.add(user)
                await session.flush()
            session.add(Membership(user_id=user.id, org_id=org_id, role=role))
            events.record(session, "user.added", org_id=org_id, actor=principal.email, email=email, role=role.value)
            return user

    async def set_role(self, principal: Principal, org_id: str, user_id: str, role: Role | None,
                       grants: frozenset[Permission] | None = None) -> None:
        await self.change_memberships(principal, user_id, [MembershipChange(org_id, role, grants)])

    async def change_memberships(self, principal: Principal, user_id: str, changes: list[MembershipChange]) -> None:
        """Change a user's role and granted permissions in several organisations, all or nothing.

        The caller needs ``manage_users`` in each, and may grant only permissions it holds there.
        """
        for change in changes:
            require(principal, change.org_id, Permission.MANAGE_USERS)
            if change.role is None and change.grants is None:
                raise InvalidInput("give a role, granted permissions or both", field="role")
            for permission in change.grants or ():
                if permission not in GRANTABLE:
                    raise InvalidInput(f"'{permission.value}' comes with a role and cannot be granted alone", field="grants")
                if not principal.can(change.org_id, permission):
                    raise Forbidden(f"you cannot grant '{permission.value}', which you do not hold yourself")
        async with self._sessions.begin() as session:
            for change in changes:
                membership = await session.get(Membership, (user_id, change.org_id))
                if membership is None:
                    raise NotFound("user not found in this organisation")
                if change.role is not None:
                    if membership.role == Role.ADMIN and change.role != Role.ADMIN:
                        await self._keep_one_admin(session, change.org_id, user_id)
                    membership.role = change.role
                if change.grants is not None:
                    membership.grants = sorted(grant.value for grant in change.grants)
                detail: dict[str, object] = {"user_id": user_id}
                if change.role is not None:
                    detail["role"] = change.role.value
                if change.grants is not None:
                    detail["grants"] = list(membership.grants)
                kind = "user.role_changed" if change.role is not None else "user.permissions_changed"
                events.record(session, kind, org_id=change.org_id, actor=principal.email, **detail)

    async def get_user(self, principal: Principal, user_id: str) -> tuple[User, list[MembershipView]]:
        """A user and the memberships the caller may see: all of its own, those in organisations where
        the caller manages users, or all for a system administrator."""
        async with self._sessions() as session:
            user = await session.get(User, user_id)
            rows = list(await session.execute(
                select(Organisation, Membership.role, Membership.grants)
                .join(Membership, Membership.org_id == Organisation.id)
                .where(Membership.user_id == user_id).order_by(Organisation.name)
            ))
        myself = user_id == principal.user_id and principal.key_org_id is None
        visible = [
            MembershipView(org, Role(role), _grants(grants)) for org, role, grants in rows
            if myself or principal.can(org.id, Permission.MANAGE_USERS)
        ]
        if user is None or not (visible or myself or principal.acts_as_system_admin):
            raise NotFound("user not found")
        return user, visible

    async def remove_member(self, principal: Principal, org_id: str, user_id: str) -> None:
        """Remove a user from an organisation; the account goes too when it belongs nowhere else."""
        require(principal, org_id, Permission.MANAGE_USERS)
        async with self._sessions.begin() as session:
            membership = await session.get(Membership, (user_id, org_id))
            if membership is None:
                raise NotFound("user not found in this organisation")
            if membership.role == Role.ADMIN:
                await self._keep_one_admin(session, org_id, user_id)
            await session.delete(membership)
            await session.flush()
            user = await session.get(User, user_id)
            remaining = await session.scalar(select(Membership.org_id).where(Membership.user_id == user_id).limit(1))
            if user is not None and remaining is None and not user.is_system_admin:
                await session.delete(user)
            events.record(session, "user.removed", org_id=org_id, actor=principal.email, user_id=user_id)

    async def _keep_one_admin(self, session: AsyncSession, org_id: str, leaving_user_id: str) -> None:
        other = await session.scalar(
            select(Membership.user_id).where(
                Membership.org_id == org_id, Membership.role == Role.ADMIN, Membership.user_id != leaving_user_id
            )
        )
        if other is None:
            raise Conflict("an organisation must keep at least one admin; promote another user first")

    async def set_password(self, email: str, password: str) -> None:
        """Operator command (CLI): reset a user's password."""
        _check_password(password)
        async with self._sessions.begin() as session:
            user = await session.scalar(select(User).where(User.email == email.strip().lower()))
            if user is None:
                raise NotFound(f"no user with email '{email}'")
            user.password_hash = hash_password(password)
            events.record(session, "user.password_reset", org_id=None, actor="cli", user_id=user.id)

    # --- API keys -----------------------------------------------------------------------------

    async def create_api_key(
        self, principal: Principal, name: str, org_id: str | None, expires_in_days: int | None
    ) -> CreatedApiKey:
        """A key acting as the caller, optionally restricted to one organisation. Shown once."""
        if principal.via_api_key or principal.key_org_id is not None:
            raise Forbidden("API keys cannot create API keys; log in with a password")
        if org_id is not None and not principal.is_member(org_id):
            raise NotFound("organisation not found")
        key_id, secret, full = new_api_key()
        expires_at = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
        async with self._sessions.begin() as session:
            if org_id is not None:
                await require_org(session, org_id)
            key = ApiKey(
                id=key_id, user_id=principal.user_id, name=name, org_id=org_id,
                secret_digest=digest_secret(secret), expires_at=expires_at,
            )
            session.add(key)
            events.record(session, "apikey.created", org_id=org_id, actor=principal.email, key_id=key_id, name=name)
        return CreatedApiKey(key=key, secret=full)

    async def list_api_keys(self, principal: Principal) -> list[ApiKey]:
        async with self._sessions() as session:
            rows = await session.scalars(
                select(ApiKey).where(ApiKey.user_id == principal.user_id).order_by(ApiKey.created_at)
            )
            return list(rows)

    async def revoke_api_key(self, principal: Principal, key_id: str) -> None:
        """Revoke one of the caller's keys (any key, for an unrestricted system administrator). Through
        an API key, only that key itself may be revoked."""
        async with self._sessions.begin() as session:
            key = await session.get(ApiKey, key_id)
            # A system administrator may revoke anyone's key, but not through a key restricted to one org.
            any_key = principal.acts_as_system_admin
            if key is None or (key.user_id != principal.user_id and not any_key):
                raise NotFound("API key not found")
            if principal.via_api_key and principal.api_key_id != key_id:
                raise Forbidden("an API key may revoke only itself; log in with a password to revoke others")
            if key.revoked_at is None:
                key.revoked_at = utcnow()
                events.record(session, "apikey.revoked", org_id=key.org_id, actor=principal.email, key_id=key_id)


def _open_private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)
