"""The object instances a simulated device holds: Security (0), Server (1) and Device (3).

The store applies what a bootstrap server asks, like a real client does, including a Write onto the
instance that holds the bootstrap-server account (so that tests can see a server that does that). The
only things it refuses are what compliant clients refuse: deleting the bootstrap account or the Device
object, values of the wrong type, and writes to executable resources.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from pilotboat import __version__
from pilotboat.lwm2m import objects
from pilotboat.lwm2m.model import CodecError, Entry, ObjLink, Path, ResourceType, Value
from pilotboat.model.management_server import SecurityMode

#: A resource: one value, or the instances of a multiple resource (instance id -> value).
Resource = Value | dict[int, Value]
Instance = dict[int, Resource]

SUPPORTED_OBJECTS = (objects.SECURITY, objects.SERVER, objects.DEVICE)
T = TypeVar("T")


class NotFound(LookupError):
    """No such object, instance or resource (CoAP 4.04)."""


class NotAllowed(Exception):
    """The operation does not apply to this path (CoAP 4.05)."""


class Refused(Exception):
    """A request the device refuses (CoAP 4.00), such as deleting its bootstrap account."""


@dataclass(frozen=True)
class AssignedServer:
    """A management server the device was given: its Security instance and the matching Server instance.

    This is what a device registers with once bootstrapped.
    """

    uri: str | None
    security_mode: int | None
    short_server_id: int
    lifetime: int | None
    binding: str | None
    security_instance: int
    server_instance: int | None
    identity: bytes = field(default=b"", repr=False)
    secret_key: bytes = field(default=b"", repr=False)
    server_public_key: bytes = field(default=b"", repr=False)


def device_defaults(endpoint: str) -> dict[int, Resource]:
    """The Device object (/3/0) of a simulated device."""
    return {
        0: "Pilotboat",  # Manufacturer
        1: "pilotboat-sim",  # Model Number
        2: endpoint,  # Serial Number
        3: __version__,  # Firmware Version
        11: {0: 0},  # Error Code: no error
        16: "U",  # Supported Binding and Modes
        17: "simulator",  # Device Type
        18: "1.0",  # Hardware Version
        19: __version__,  # Software Version
    }


def _is_executable(path: Path) -> bool:
    known = objects.RESOURCE_TYPES.get(path.object_id or 0, {})
    return path.resource_id in known and known[path.resource_id] is None


def check_type(entry: Entry) -> Value:
    """``entry.value`` as the resource's type, or a ``CodecError`` when it does not fit."""
    kind, value = objects.resource_type(entry.path), entry.value
    if kind is None:
        return value
    if kind in (ResourceType.INTEGER, ResourceType.TIME, ResourceType.UNSIGNED):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise CodecError(f"{entry.path}: an integer is expected, not {type(value).__name__}")
        if kind is ResourceType.UNSIGNED and value < 0:
            raise CodecError(f"{entry.path}: an unsigned integer is expected, not {value}")
        return value
    expected: dict[ResourceType, type | tuple[type, ...]] = {
        ResourceType.FLOAT: (int, float), ResourceType.BOOLEAN: bool, ResourceType.STRING: str,
        ResourceType.CORELNK: str, ResourceType.OPAQUE: bytes, ResourceType.OBJLNK: ObjLink,
    }
    wanted = expected[kind]
    if not isinstance(value, wanted) or (kind is ResourceType.FLOAT and isinstance(value, bool)):
        raise CodecError(f"{entry.path}: a {kind.value} value is expected, not {type(value).__name__}")
    return float(value) if kind is ResourceType.FLOAT else value


class ObjectStore:
    """Object id -> instance id -> resource id -> value."""

    def __init__(self) -> None:
        self._objects: dict[int, dict[int, Instance]] = {object_id: {} for object_id in SUPPORTED_OBJECTS}

    @classmethod
    def initial(cls, endpoint: str, bootstrap_uri: str, bootstrap_instance: int,
                device_info: Mapping[int, Resource] | None = None) -> ObjectStore:
        """A factory-fresh device: the bootstrap-server account (NoSec) and the Device object."""
        store = cls()
        store._objects[objects.SECURITY][bootstrap_instance] = {
            objects.SECURITY_URI: bootstrap_uri,
            objects.SECURITY_BOOTSTRAP: True,
            objects.SECURITY_MODE: int(SecurityMode.NOSEC),
            objects.SECURITY_IDENTITY: b"",
            objects.SECURITY_SERVER_PUBLIC_KEY: b"",
            objects.SECURITY_SECRET_KEY: b"",
            objects.SECURITY_HOLD_OFF: 0,
        }
        store._objects[objects.DEVICE][0] = {**device_defaults(endpoint), **(device_info or {})}
        return store

    # --- inspection ---------------------------------------------------------------------------------

    def object_ids(self) -> tuple[int, ...]:
        return tuple(self._objects)

    def instances(self, object_id: int) -> dict[int, Instance]:
        """A copy of the instances of ``object_id`` (empty for an unsupported object)."""
        return {iid: {rid: dict(value) if isinstance(value, dict) else value for rid, value in instance.items()}
                for iid, instance in sorted(self._objects.get(object_id, {}).items())}

    def bootstrap_instances(self) -> list[int]:
        """Security instances that hold a bootstrap-server account (Bootstrap-Server = true)."""
        return sorted(iid for iid, instance in self._objects[objects.SECURITY].items()
                      if instance.get(objects.SECURITY_BOOTSTRAP) is True)

    def servers(self) -> list[AssignedServer]:
        """The management-server accounts: each non-bootstrap Security instance with a Short Server ID,
        with the Server instance of the same Short Server ID (if any), ordered by Short Server ID."""
        bootstrap = set(self.bootstrap_instances())
        server_by_ssid = {instance.get(objects.SERVER_SHORT_SERVER_ID): (iid, instance)
                          for iid, instance in sorted(self._objects[objects.SERVER].items())}
        found = []
        for iid, security in sorted(self._objects[objects.SECURITY].items()):
            ssid = security.get(objects.SECURITY_SHORT_SERVER_ID)
            if iid in bootstrap or not isinstance(ssid, int):
                continue
            server_iid, server = server_by_ssid.get(ssid, (None, {}))
            found.append(AssignedServer(
                uri=_as(security.get(objects.SECURITY_URI), str),
                security_mode=_as(security.get(objects.SECURITY_MODE), int),
                short_server_id=ssid,
                lifetime=_as(server.get(objects.SERVER_LIFETIME), int),
                binding=_as(server.get(objects.SERVER_BINDING), str),
                security_instance=iid,
                server_instance=server_iid,
                identity=_as(security.get(objects.SECURITY_IDENTITY), bytes) or b"",
                secret_key=_as(security.get(objects.SECURITY_SECRET_KEY), bytes) or b"",
                server_public_key=_as(security.get(objects.SECURITY_SERVER_PUBLIC_KEY), bytes) or b"",
            ))
        return sorted(found, key=lambda server: server.short_server_id)

    def inconsistency(self) -> str | None:
        """Why the configuration is not usable (the Bootstrap-Finish check), or None when it is: every
        Security instance needs a URI, a Bootstrap-Server flag and a Security Mode, every non-bootstrap
        one a Short Server ID, and at least one of them a Server instance with the same Short Server ID."""
        bootstrap = set(self.bootstrap_instances())
        required = (objects.SECURITY_URI, objects.SECURITY_BOOTSTRAP, objects.SECURITY_MODE)
        account_ssids = set()
        for iid, security in sorted(self._objects[objects.SECURITY].items()):
            missing = [rid for rid in required if rid not in security]
            if iid not in bootstrap and objects.SECURITY_SHORT_SERVER_ID not in security:
                missing.append(objects.SECURITY_SHORT_SERVER_ID)
            if missing:
                return f"/0/{iid} lacks resource(s) {', '.join(map(str, missing))}"
            if iid not in bootstrap:
                account_ssids.add(security[objects.SECURITY_SHORT_SERVER_ID])
        server_ssids = {server.get(objects.SERVER_SHORT_SERVER_ID) for server in self._objects[objects.SERVER].values()}
        if not account_ssids & server_ssids:
            return (f"no server account: Short Server IDs of Security instances {sorted(account_ssids)} "
                    f"match none of the Server instances {sorted(s for s in server_ssids if isinstance(s, int))}")
        return None

    # --- operations ---------------------------------------------------------------------------------

    def read(self, path: Path) -> list[Entry]:
        """The values at ``path``, in id order."""
        if path.depth >= 3 and _is_executable(path):
            raise NotAllowed(f"{path} is executable, not readable")
        entries = []
        for object_id in [path.object_id] if path.depth else list(self._objects):
            instances = self._object(object_id)
            if path.depth >= 2 and path.instance_id not in instances:
                raise NotFound(f"{path} does not exist")
            for iid, instance in sorted(instances.items()):
                if path.depth >= 2 and iid != path.instance_id:
                    continue
                for rid, value in sorted(instance.items()):
                    base = Path(object_id, iid, rid)
                    if isinstance(value, dict):
                        entries.extend(Entry(base.child(riid), item) for riid, item in sorted(value.items()))
                    else:
                        entries.append(Entry(base, value))
        found = [entry for entry in entries if entry.path.is_within(path)]
        if path.depth >= 3 and not found:
            raise NotFound(f"{path} does not exist")
        return found

    def write(self, target: Path, entries: Iterable[Entry], *, replace: bool) -> None:
        """Write ``entries`` (all within ``target``). ``replace``: a Write-Replace (PUT), which creates
        missing instances and replaces instances and resources as a whole; else a Partial Update (POST),
        which needs the instance to exist and keeps the resources it does not name."""
        entries = list(entries)
        if not entries:
            raise CodecError("the payload holds no values")
        grouped: dict[tuple[int, int], dict[int, Resource]] = {}
        for entry in entries:
            path = entry.path
            assert path.object_id is not None and path.instance_id is not None and path.resource_id is not None
            self._object(path.object_id)
            if _is_executable(path):
                raise NotAllowed(f"{path} is executable, not writable")
            value = check_type(entry)
            resources = grouped.setdefault((path.object_id, path.instance_id), {})
            current = resources.get(path.resource_id)
            if path.depth == 4:
                if current is not None and not isinstance(current, dict):
                    raise CodecError(f"{path.parent} is given both as one value and as resource instances")
                resources.setdefault(path.resource_id, {})[path.resource_instance_id] = value  # type: ignore[index]
            elif current is not None:
                raise CodecError(f"{path} is given more than once")
            else:
                resources[path.resource_id] = value
        if not replace:
            for object_id, iid in grouped:
                if iid not in self._objects[object_id]:
                    raise NotFound(f"/{object_id}/{iid} does not exist")
        for (object_id, iid), resources in grouped.items():
            instance = self._objects[object_id].setdefault(iid, {})
            if target.depth <= 2:
                if replace:
                    instance.clear()
                instance.update(resources)
                continue
            for rid, value in resources.items():
                existing = instance.get(rid)
                merge = isinstance(value, dict) and isinstance(existing, dict) and (target.depth == 4 or not replace)
                instance[rid] = {**existing, **value} if merge else value  # type: ignore[dict-item]

    def execute(self, path: Path) -> None:
        """Check that ``path`` is an executable resource of an existing instance."""
        if path.depth != 3:
            raise NotAllowed(f"{path} is not a resource, so it cannot be executed")
        instances = self._object(path.object_id)
        if path.instance_id not in instances:
            raise NotFound(f"{path.parent} does not exist")
        if not _is_executable(path):
            raise NotAllowed(f"{path} is not executable")

    def delete(self, target: Path) -> None:
        """Bootstrap-Delete of ``/``, an object or an instance. ``/`` and ``/0`` spare the bootstrap
        account (and ``/`` the Device object); deleting it by name is refused. Deleting a Security
        instance also deletes the Server instances of its Short Server ID."""
        if target.depth > 2:
            raise NotAllowed(f"{target}: only objects and object instances can be deleted")
        if target.depth == 0:
            for object_id in self._objects:
                if object_id != objects.DEVICE:
                    self._delete_all(object_id)
            return
        if target.object_id == objects.DEVICE:
            self._object(target.object_id)
            raise Refused("the Device object cannot be deleted")
        instances = self._object(target.object_id)
        if target.depth == 1:
            self._delete_all(target.object_id)
            return
        if target.instance_id not in instances:
            raise NotFound(f"{target} does not exist")
        if target.object_id == objects.SECURITY and target.instance_id in self.bootstrap_instances():
            raise Refused(f"{target} is the bootstrap-server account")
        self._delete_instance(target.object_id, target.instance_id)

    # --- helpers --------------------------------------------------------------------------------

    def _object(self, object_id: int | None) -> dict[int, Instance]:
        instances = self._objects.get(object_id if object_id is not None else -1)
        if instances is None:
            raise NotFound(f"object /{object_id} is not supported by this device")
        return instances

    def _delete_all(self, object_id: int) -> None:
        spared = set(self.bootstrap_instances()) if object_id == objects.SECURITY else set()
        for iid in list(self._objects[object_id]):
            if iid not in spared:
                self._delete_instance(object_id, iid)

    def _delete_instance(self, object_id: int, iid: int) -> None:
        instance = self._objects[object_id].pop(iid, None)
        if object_id != objects.SECURITY or instance is None:
            return
        ssid = instance.get(objects.SECURITY_SHORT_SERVER_ID)
        if isinstance(ssid, int):
            servers = self._objects[objects.SERVER]
            for server_iid, server in list(servers.items()):
                if server.get(objects.SERVER_SHORT_SERVER_ID) == ssid:
                    del servers[server_iid]


def _as(value: object, kind: type[T]) -> T | None:
    """``value`` when it is a ``kind`` (booleans are not integers here), else None."""
    if isinstance(value, bool) and kind is not bool:
        return None
    return value if isinstance(value, kind) else None
