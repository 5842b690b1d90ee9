"""The client-initiated bootstrap session as a pure state machine: it turns a bootstrap plan into the
requests a bootstrap server sends after answering 2.04 to ``POST /bs``, and reads the answers.

Discover ``/0`` → Delete the server accounts (never the bootstrap account) and ``/1`` → Write each
Security and Server instance at free instance ids → Finish. No sockets here: a driver sends each
``Request`` and feeds back a ``Reply`` (see ``lwm2m.bootstrap_server``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from pilotboat.bootstrap.plan import BootstrapPlan, ServerAccount
from pilotboat.lwm2m import content, linkformat, objects
from pilotboat.lwm2m.messages import Reply
from pilotboat.lwm2m.model import CodecError, Path, Value

#: Formats a bootstrap write may use; anything else the client names in ``pct`` falls back to TLV.
WRITE_FORMATS = frozenset({content.TLV, content.TLV_LEGACY, content.SENML_JSON, content.SENML_CBOR})
#: First Security instance id used when the client's bootstrap account could not be seen (no Discover,
#: or Bootstrap-Pack): clients keep their bootstrap account at a low id (Wakaama 0, Anjay 1).
BLIND_SECURITY_IID = 10
#: Bytes of a client's diagnostic payload kept in a failure reason.
DIAGNOSTIC_CHARS = 120


@dataclass(frozen=True)
class Request:
    step: str
    method: str
    path: Path | None  # None: the bootstrap resource itself (Finish is ``POST /bs``)
    accept: int | None = None
    content_format: int | None = None
    payload: bytes = b""

    @property
    def uri_path(self) -> tuple[str, ...]:
        return ("bs",) if self.path is None else tuple(str(part) for part in self.path.ids)

    def __str__(self) -> str:
        return f"{self.method} {'/bs' if self.path is None else self.path}"


class BootstrapFailed(Exception):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


@dataclass(frozen=True)
class Discovery:
    """What Bootstrap-Discover of ``/0`` told about the client."""

    lwm2m_version: str | None
    #: Security instances without a Short Server ID: the bootstrap account (and anything we cannot classify).
    protected: frozenset[int]
    #: Security instances of management-server accounts, to be deleted.
    server_accounts: frozenset[int]


def read_discovery(payload: bytes) -> Discovery:
    """Classify the client's Security instances from a link-format Discover answer (leniently)."""
    version = None
    protected: set[int] = set()
    accounts: set[int] = set()
    for link in linkformat.decode(payload):
        if link.has("lwm2m") and version is None:
            version = (link.get("lwm2m") or "").strip('"') or None
        path = link.path
        if path is None or path.object_id != objects.SECURITY or path.depth != 2:
            continue
        assert path.instance_id is not None
        (accounts if link.get("ssid") else protected).add(path.instance_id)
    return Discovery(version, frozenset(protected), frozenset(accounts - protected))


def _free_ids(taken: frozenset[int], start: int) -> Iterator[int]:
    candidate = start
    while True:
        if candidate not in taken:
            yield candidate
        candidate += 1


def security_values(account: ServerAccount) -> dict[int, Value]:
    definition = account.definition
    return {
        objects.SECURITY_URI: definition.uri,
        objects.SECURITY_BOOTSTRAP: False,
        objects.SECURITY_MODE: int(definition.security_mode),
        objects.SECURITY_IDENTITY: account.identity,
        objects.SECURITY_SERVER_PUBLIC_KEY: account.server_public_key,
        objects.SECURITY_SECRET_KEY: account.secret_key,
        objects.SECURITY_SHORT_SERVER_ID: definition.short_server_id,
    }


def server_values(account: ServerAccount, lwm2m_version: str | None) -> dict[int, Value]:
    definition = account.definition
    values: dict[int, Value] = {
        objects.SERVER_SHORT_SERVER_ID: definition.short_server_id,
        objects.SERVER_LIFETIME: definition.lifetime,
        objects.SERVER_NOTIFICATION_STORING: False,
        objects.SERVER_BINDING: definition.binding,
    }
    if lwm2m_version is not None and lwm2m_version not in ("1.0", "1.0.1", "1.0.2"):
        # LwM2M 1.1+: fall back to the bootstrap server when the management server refuses the device.
        values[objects.SERVER_BOOTSTRAP_ON_FAILURE] = True
    return values


def instance_values(object_id: int, instance_id: int, values: dict[int, Value]) -> dict[Path, Value]:
    return {Path(object_id, instance_id, resource_id): value for resource_id, value in values.items()}


def pack_values(plan: BootstrapPlan) -> dict[Path, Value]:
    """The whole configuration for a Bootstrap-Pack (LwM2M 1.2), at ids clear of the bootstrap account."""
    values: dict[Path, Value] = {}
    for index, account in enumerate(plan.servers):
        values.update(instance_values(objects.SECURITY, BLIND_SECURITY_IID + index, security_values(account)))
        values.update(instance_values(objects.SERVER, index, server_values(account, "1.2")))
    return values


def _diagnostic(reply: Reply) -> str:
    text = reply.payload[:DIAGNOSTIC_CHARS].decode("utf-8", "replace").strip()
    return f" ({text})" if text else ""


@dataclass
class BootstrapSession:
    """One device's bootstrap. ``first()`` gives the first request; ``advance(reply)`` checks the reply
    to the last request and gives the next one, or None once Finish succeeded. Failures raise
    ``BootstrapFailed`` naming the step."""

    plan: BootstrapPlan
    #: The client's ``pct`` from the Bootstrap-Request, if any.
    preferred_format: int | None = None
    discovery: Discovery | None = None
    #: Instances written so far, in order.
    written: list[Path] = field(default_factory=list)
    #: Steps still to send: ("delete" | "write", path).
    _pending: list[tuple[str, Path]] = field(default_factory=list)
    #: The values of each instance to write.
    _instances: dict[Path, dict[Path, Value]] = field(default_factory=dict)
    _last: Request | None = None
    _tlv_fallback: bool = False

    @property
    def write_format(self) -> int:
        if self._tlv_fallback or self.preferred_format not in WRITE_FORMATS:
            return content.TLV
        assert self.preferred_format is not None
        return self.preferred_format

    def first(self) -> Request:
        return self._send(Request("discover", "GET", Path(objects.SECURITY), accept=content.LINK_FORMAT))

    def advance(self, reply: Reply) -> Request | None:
        last = self._last
        if last is None:
            raise BootstrapFailed("start", "advance() before first() or after the end")
        if last.step == "discover":
            self._plan_steps(self._discovered(reply))
        elif last.step == "delete":
            if not reply.ok and reply.code != "4.04":  # 4.04: nothing there to delete
                raise BootstrapFailed("delete", f"the client answered {reply.code} to {last}{_diagnostic(reply)}")
        elif last.step == "write":
            assert last.path is not None
            if reply.code == "4.15" and last.content_format != content.TLV:
                self._tlv_fallback = True  # the client's pct was optimistic: write again in TLV
                return self._send(self._write(last.path))
            if not reply.ok:
                raise BootstrapFailed("write", f"the client answered {reply.code} to {last}{_diagnostic(reply)}")
            self.written.append(last.path)
        elif last.step == "finish":
            if not reply.ok:
                raise BootstrapFailed("finish", f"the client answered {reply.code}{_diagnostic(reply)}")
            self._last = None
            return None
        if not self._pending:
            return self._send(Request("finish", "POST", None))
        step, path = self._pending.pop(0)
        return self._send(Request("delete", "DELETE", path) if step == "delete" else self._write(path))

    def _send(self, request: Request) -> Request:
        self._last = request
        return request

    def _discovered(self, reply: Reply) -> Discovery | None:
        if not reply.ok:
            return None  # e.g. a 1.0 client without Bootstrap-Discover
        try:
            return read_discovery(reply.payload)
        except CodecError:
            return None  # unreadable: proceed as without Discover

    def _plan_steps(self, discovery: Discovery | None) -> None:
        self.discovery = discovery
        if discovery is not None:
            deletes = [Path(objects.SECURITY, iid) for iid in sorted(discovery.server_accounts)]
            security_ids = _free_ids(discovery.protected, 0)
        else:
            # No view of the client: compliant clients spare their bootstrap account on Delete /0.
            deletes = [Path(objects.SECURITY)]
            security_ids = _free_ids(frozenset(), BLIND_SECURITY_IID)
        deletes.append(Path(objects.SERVER))
        self._pending = [("delete", path) for path in deletes]
        version = discovery.lwm2m_version if discovery else None
        for server_iid, account in enumerate(self.plan.servers):
            for object_id, instance_id, values in (
                (objects.SECURITY, next(security_ids), security_values(account)),
                (objects.SERVER, server_iid, server_values(account, version)),
            ):
                path = Path(object_id, instance_id)
                self._instances[path] = instance_values(object_id, instance_id, values)
                self._pending.append(("write", path))

    def _write(self, path: Path) -> Request:
        fmt = self.write_format
        return Request("write", "PUT", path, content_format=fmt, payload=content.encode(fmt, self._instances[path], path))
