"""Bootstrap: who may be bootstrapped, and with what.

Over HTTP a device presents its external id and key and receives its configuration; over LwM2M a
device names its endpoint and receives a plan (``bootstrap.plan``) that the CoAP door writes. Every
attempt is recorded as an event, successful or not, with the reason of a refusal. Inactive devices are
refused on both (upstream Magistrala serves them anyway; see docs/api.md).
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pilotboat.bootstrap.credentials import ManagementCredentials, Provisioned
from pilotboat.bootstrap.plan import BootstrapPlan, PlanRefused, build_plan, check_transport
from pilotboat.model.management_server import DeploymentServer, SecurityMode
from pilotboat.model.peer import PeerIdentity
from pilotboat.model.principal import Principal
from pilotboat.model.roles import Permission
from pilotboat.security import sealed_bootstrap, secure_bootstrap
from pilotboat.security.digests import verify_secret
from pilotboat.security.throttle import RateBudget
from pilotboat.services import events
from pilotboat.services.access import require
from pilotboat.services.device_identity import AuthenticatedDevice, DeviceIdentityService, Door, IdentityRefused
from pilotboat.services.devices import DeviceService
from pilotboat.services.management_servers import ManagementServerService
from pilotboat.services.errors import Forbidden, InvalidInput, NotFound, ServiceError, Unauthenticated, Unavailable
from pilotboat.store.tables import Channel, Device, DeviceChannel

MAX_EXTERNAL_ID_LENGTH = 256
#: LwM2M endpoint names are stored in a column of this size.
MAX_ENDPOINT_LENGTH = 256
INACTIVE_REASON = "device inactive"
OTHER_DEVICE_REASON = "credential of another device"
DTLS_ONLY_REASON = (
    "this deployment's management server is served over DTLS only (PILOTBOAT_ALLOW_NOSEC is false): "
    "bootstrap over DTLS with a PSK or a certificate"
)
#: Events recorded per second for LwM2M requests naming no known device (a flood must not fill the table).
UNKNOWN_ENDPOINT_EVENTS_PER_SECOND = 20


@dataclass(frozen=True)
class BootstrapConfig:
    client_id: str
    client_secret: str
    channels: list[dict[str, Any]]
    content: str
    client_cert: str
    client_key: str
    ca_cert: str


@dataclass(frozen=True)
class SecureKeys:
    """The service-wide secure-bootstrap key as each door family derives it."""

    magistrala: bytes
    mainflux: bytes

    @classmethod
    def from_setting(cls, configured: str) -> SecureKeys:
        return cls(secure_bootstrap.magistrala_key(configured), secure_bootstrap.mainflux_key(configured))


class BootstrapService:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], devices: DeviceService, secure_keys: SecureKeys | None,
        servers: ManagementServerService, *, deployment: DeploymentServer, identity: DeviceIdentityService,
        credentials: ManagementCredentials,
    ) -> None:
        self._sessions = sessions
        self._devices = devices
        self._servers = servers
        self._deployment = deployment
        self._identity = identity
        self._credentials = credentials
        self._secure_keys = secure_keys
        self._replay_guard = sealed_bootstrap.ReplayGuard()
        self._unknown_endpoint_events = RateBudget(UNKNOWN_ENDPOINT_EVENTS_PER_SECOND, burst=UNKNOWN_ENDPOINT_EVENTS_PER_SECOND)

    async def fetch(self, external_id: str, external_key: str | None, *, door: str) -> BootstrapConfig:
        """The configuration of the device with ``external_id`` if ``external_key`` is its key."""
        if not external_id or len(external_id) > MAX_EXTERNAL_ID_LENGTH:
            raise InvalidInput("external id must be 1 to 256 characters", field="external_id")
        if not external_key:
            raise Unauthenticated("missing external key: send 'Authorization: Client <external_key>'")
        async with self._sessions.begin() as session:
            rows = list(await session.execute(
                select(Device, Channel)
                .outerjoin(DeviceChannel, DeviceChannel.device_id == Device.id)
                .outerjoin(Channel, Channel.id == DeviceChannel.channel_id)
                .where(Device.external_id == external_id)
                .order_by(Channel.name, Channel.id)
            ))
            device = rows[0][0] if rows else None
            refusal = self._refusal(device, external_key)
            if refusal is not None:
                await self._refuse(session, device, external_id, door, refusal[0])
            else:
                assert device is not None
                config = self._render(device, [channel for _, channel in rows if channel is not None])
                events.record(
                    session, events.BOOTSTRAP_SUCCEEDED, org_id=device.org_id, device_id=device.id,
                    actor=f"device:{external_id[:64]}", door=door,
                )
        if refusal is not None:
            raise refusal[1]
        return config

    @staticmethod
    def _refusal(device: Device | None, external_key: str) -> tuple[str, ServiceError] | None:
        """(reason recorded in the event, error for the caller), or None when the device may bootstrap."""
        if device is None:
            return "unknown external_id", NotFound("no config with this external id")
        if not verify_secret(device.external_key_digest, external_key):
            return "wrong external key", Forbidden("wrong external key")
        if device.state != 1:
            return INACTIVE_REASON, Forbidden(
                "device is inactive: an operator must activate it (state 1) before it can bootstrap"
            )
        return None

    def _render(self, device: Device, channels: list[Channel]) -> BootstrapConfig:
        return BootstrapConfig(
            client_id=device.id,
            client_secret=self._devices.client_secret(device),
            channels=[{"id": channel.id, "name": channel.name, "metadata": channel.metadata_} for channel in channels],
            content=device.content,
            client_cert=device.client_cert,
            client_key=self._devices.client_key(device),
            ca_cert=device.ca_cert,
        )

    def _cipher_key(self, family: str) -> bytes:
        if self._secure_keys is None:
            raise Unavailable("secure bootstrap is not configured on this server (PILOTBOAT_BOOTSTRAP_ENCRYPT_KEY)")
        return self._secure_keys.mainflux if family == "mainflux" else self._secure_keys.magistrala

    async def fetch_secure(self, external_id: str, encrypted_key_hex: str | None, *, door: str, family: str) -> BootstrapConfig:
        """Like :meth:`fetch`, with the key sent as hex(IV ‖ AES-CFB(external_key))."""
        key = self._cipher_key(family)
        if not encrypted_key_hex:
            raise Unauthenticated("missing encrypted external key: send 'Authorization: Client <hex>'")
        try:
            external_key = secure_bootstrap.decrypt(key, binascii.unhexlify(encrypted_key_hex)).decode()
            if not external_key:  # an IV and nothing else: a key that does not decrypt, not a missing one
                raise ValueError("empty external key")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            await self._refuse_unreadable(external_id, door, "external key did not decrypt")
            raise Forbidden("the encrypted external key is not valid") from None
        return await self.fetch(external_id, external_key, door=door)

    def encrypt_response(self, body: bytes, *, family: str) -> bytes:
        return secure_bootstrap.encrypt(self._cipher_key(family), body)

    async def fetch_sealed(self, external_id: str, token: str | None, *, door: str) -> tuple[BootstrapConfig, bytes]:
        """Like :meth:`fetch`, with an authenticated, timestamped, single-use key token (see
        :mod:`pilotboat.security.sealed_bootstrap`). Returns the config and the request nonce."""
        key = self._cipher_key("magistrala")
        if not token:
            raise Unauthenticated("missing sealed token: send 'Authorization: Sealed <token>'")
        try:
            opened = sealed_bootstrap.open_request(key, external_id, token, self._replay_guard)
        except sealed_bootstrap.SealedRequestError as exc:
            await self._refuse_unreadable(external_id, door, f"sealed token refused: {exc}")
            raise Forbidden(f"the sealed token is not valid: {exc}") from None
        return await self.fetch(external_id, opened.external_key, door=door), opened.nonce

    def seal_response(self, body: bytes, external_id: str, request_nonce: bytes) -> bytes:
        return sealed_bootstrap.seal_response(self._cipher_key("magistrala"), external_id, request_nonce, body)

    async def _refuse_unreadable(self, external_id: str, door: str, reason: str) -> None:
        """Record a refusal whose credential could not even be read."""
        async with self._sessions.begin() as session:
            device = await session.scalar(select(Device).where(Device.external_id == external_id))
            await self._refuse(session, device, external_id, door, reason)

    @staticmethod
    async def _refuse(session: AsyncSession, device: Device | None, external_id: str, door: str, reason: str) -> None:
        events.record(
            session, events.BOOTSTRAP_FAILED, org_id=device.org_id if device else None, device_id=device.id if device else None,
            actor=f"device:{external_id[:64]}", outcome="refused", reason=reason, door=door,
        )

    # --- LwM2M ---------------------------------------------------------------------------------

    async def plan_for_endpoint(self, endpoint: str, *, peer: PeerIdentity | None, door: str) -> BootstrapPlan:
        """The plan of the active device with LwM2M ``endpoint``; ``PlanRefused`` (recorded as an
        event) when there is none or it may not be bootstrapped. ``peer`` is None on plain CoAP; over
        DTLS its credential must be a bootstrap credential of that very device (else a 4.03 refusal).
        Management credentials the plan carries are created in the transaction of the decision."""
        actor = f"device:{endpoint[:64]}"
        if not endpoint or len(endpoint) > MAX_ENDPOINT_LENGTH:
            raise PlanRefused(f"endpoint names are 1 to {MAX_ENDPOINT_LENGTH} characters")
        refusal: PlanRefused | None = None
        authenticated: AuthenticatedDevice | None = None
        anchor = b""
        if peer is not None:
            try:
                authenticated = await self._identity.resolve(peer, Door.BOOTSTRAP)
                # Read (or created) before the decision's transaction, which must not wait on another.
                anchor = (await self._identity.server_credentials()).trust_anchor
            except IdentityRefused as exc:
                refusal = PlanRefused(str(exc))
        async with self._sessions.begin() as session:
            device = await session.scalar(select(Device).where(Device.endpoint == endpoint))
            # The device a refusal is recorded for: the credential's own when it names another one.
            subject = device
            try:
                if refusal is not None:
                    raise refusal
                if device is None:
                    raise PlanRefused("unknown endpoint")
                if authenticated is not None:
                    if authenticated.endpoint is None:
                        raise PlanRefused("the credential's device has no endpoint name")
                    if authenticated.device_id != device.id:
                        subject = await session.get(Device, authenticated.device_id)
                        raise PlanRefused(OTHER_DEVICE_REASON, code="4.03")
                transport = authenticated.security_mode if authenticated is not None else SecurityMode.NOSEC
                return await self._decide(session, device, transport=transport, anchor=anchor, actor=actor)
            except PlanRefused as exc:
                refusal = exc
                if subject is not None:
                    events.record(
                        session, events.BOOTSTRAP_FAILED, org_id=subject.org_id, device_id=subject.id, actor=actor,
                        outcome="refused", reason=str(exc), door=door, endpoint=endpoint[:64],
                    )
                elif self._unknown_endpoint_events.allow():
                    events.record(
                        session, events.BOOTSTRAP_FAILED, org_id=None, actor=actor, outcome="refused", reason=str(exc),
                        door=door, endpoint=endpoint[:64], not_recorded_before=self._unknown_endpoint_events.take_refused(),
                    )
        raise refusal  # after the commit of the event

    async def preview(self, principal: Principal, org_id: str, device_id: str) -> BootstrapPlan:
        """The plan the device would get if it bootstrapped over plain CoAP now (nothing is recorded);
        ``PlanRefused`` says why it would be refused."""
        require(principal, org_id, Permission.READ)
        async with self._sessions() as session:
            device = await session.get(Device, device_id)
            if device is None or device.org_id != org_id:
                raise NotFound("device not found")
            if not device.endpoint:
                raise PlanRefused("the device has no LwM2M endpoint name")
            return await self._decide(session, device, transport=SecurityMode.NOSEC, anchor=None, actor="")

    async def _decide(
        self, session: AsyncSession, device: Device, *, transport: SecurityMode, anchor: bytes | None, actor: str,
    ) -> BootstrapPlan:
        """The one bootstrap decision for a known device: active, and sent to its management server in
        the mode its definition (the default one: the bootstrap transport) asks for, with new
        credentials. ``anchor`` None: a preview, which creates no credentials."""
        if device.state != 1:
            raise PlanRefused(INACTIVE_REASON)
        definition = await self._servers.definition_for_device(session, device)
        if definition.is_default:
            chosen = self._deployment.over(transport)
            if chosen is None:
                raise PlanRefused(DTLS_ONLY_REASON)
            definition = chosen
        authenticated = transport is not SecurityMode.NOSEC
        check_transport(definition, authenticated=authenticated)
        assert device.endpoint is not None
        provisioned: Provisioned | None = None
        if anchor is not None and definition.security_mode is SecurityMode.PSK:
            provisioned = await self._credentials.psk(session, device, actor=actor)
        elif anchor is not None and definition.security_mode is SecurityMode.CERTIFICATE:
            provisioned = await self._credentials.certificate(session, device, anchor, actor=actor)
        if provisioned is None:
            return build_plan(device.id, device.org_id, device.endpoint, definition, authenticated=authenticated)
        return build_plan(
            device.id, device.org_id, device.endpoint, definition, authenticated=authenticated,
            identity=provisioned.identity, server_public_key=provisioned.server_public_key, secret_key=provisioned.secret_key,
        )

    async def record_session(
        self, plan: BootstrapPlan, *, door: str, outcome: str, reason: str | None = None, **detail: object
    ) -> None:
        """Record how a bootstrap session for ``plan`` ended: outcome "ok" (the client accepted the
        configuration), or "failed" / "timeout" / "superseded" with the reason and step in ``detail``."""
        async with self._sessions.begin() as session:
            events.record(
                session, events.BOOTSTRAP_SUCCEEDED if outcome == "ok" else events.BOOTSTRAP_FAILED,
                org_id=plan.org_id, device_id=plan.device_id, actor=f"device:{plan.endpoint[:64]}", outcome=outcome,
                reason=reason, door=door, servers=plan.summary, **detail,
            )
