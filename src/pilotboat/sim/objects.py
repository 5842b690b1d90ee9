"""The object instances a simulated device holds: Security (0), Server (1), Device (3) and Temperature
(3303, IPSO).

The store applies what a bootstrap server asks, like a real client does, including a Write onto the
instance that holds the bootstrap-server account (so that tests can see a server that does that). The
only things it refuses are what compliant clients refuse: deleting the bootstrap account or the Device
object, values of the wrong type, and writes to executable resources. A management server may also
create and delete Temperature instances, and write only the resources that are writable (``writable``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from pilotboat import __version__
from pilotboat.lwm2m import objects
from pilotboat.lwm2m.model import CodecError, Entry, ObjLink, Path, ResourceType, Value
from pilotboat.dtls.client import ClientCredentials
from pilotboat.model.management_server import BINDING_LETTERS, DEFAULT_BINDING, DEFAULT_LIFETIME
from pilotboat.sim.security import security_resources

#: A resource: one value, or the instances of a multiple resource (instance id -> value).
Resource = Value | dict[int, Value]
Instance = dict[int, Resource]

# Server (/1) resources beyond the ones the bootstrap server writes.
SERVER_DEFAULT_PMIN = 2
SERVER_DEFAULT_PMAX = 3
SERVER_LAST_BOOTSTRAPPED = 12
# Device (/3) executables.
DEVICE_REBOOT = 4
DEVICE_FACTORY_RESET = 5
# Temperature (IPSO 3303) resources.
TEMPERATURE = 3303
MIN_MEASURED = 5601
MAX_MEASURED = 5602
MIN_RANGE = 5603
MAX_RANGE = 5604
RESET_MIN_MAX = 5605
SENSOR_VALUE = 5700
SENSOR_UNITS = 5701
APPLICATION_TYPE = 5750

SUPPORTED_OBJECTS = (objects.SECURITY, objects.SERVER, objects.DEVICE, TEMPERATURE)
#: Resource types of every object a simulated device holds (None: executable).
RESOURCE_TYPES: dict[int, dict[int, ResourceType | None]] = {
    **objects.RESOURCE_TYPES,
    TEMPERATURE: {
        MIN_MEASURED: ResourceType.FLOAT, MAX_MEASURED: ResourceType.FLOAT, MIN_RANGE: ResourceType.FLOAT,
        MAX_RANGE: ResourceType.FLOAT, RESET_MIN_MAX: None, SENSOR_VALUE: ResourceType.FLOAT,
        SENSOR_UNITS: ResourceType.STRING, APPLICATION_TYPE: ResourceType.STRING,
    },
}
#: Resources a management server may write; the other resources of these objects are read-only.
WRITABLE: dict[int, frozenset[int]] = {
    objects.SERVER: frozenset(rid for rid, kind in RESOURCE_TYPES[objects.SERVER].items()
                              if kind is not None and rid not in (objects.SERVER_SHORT_SERVER_ID,
                                                                  SERVER_LAST_BOOTSTRAPPED)),
    objects.DEVICE: frozenset({13, 14, 15}),  # Current Time, UTC Offset, Timezone
    TEMPERATURE: frozenset({APPLICATION_TYPE}),
}
#: Objects whose instances a management server may create and delete.
CREATABLE = frozenset({TEMPERATURE})
T = TypeVar("T")


def resource_type(path: Path) -> ResourceType | None:
    """The type of the resource at ``path`` (a resource or resource instance of a known object)."""
    if path.depth < 3:
        return None
    return RESOURCE_TYPES.get(path.object_id or 0, {}).get(path.resource_id or 0)


def writable(path: Path) -> bool:
    """Whether a management server may write the resource at ``path``."""
    return path.resource_id in WRITABLE.get(path.object_id or 0, frozenset())


class NotFound(LookupError):
    """No such object, instance or resource (CoAP 4.04)."""


class NotAllowed(Exception):
    """The operation does not apply to this path (CoAP 4.05)."""


class Refused(Exception):
    """A request the device refuses (CoAP 4.00), such as deleting its bootstrap account."""


@dataclass(frozen=True)
class ServerAccount:
    """A management-server account a device holds from the factory (no bootstrap needed)."""

    uri: str
    short_server_id: int = 1
    lifetime: int = DEFAULT_LIFETIME
    binding: str = DEFAULT_BINDING

    def __post_init__(self) -> None:
        if not 1 <= self.short_server_id <= 65534:
            raise ValueError("the Short Server ID is 1 to 65534")
        if self.lifetime < 1:
            raise ValueError("the lifetime is at least 1 second")
        if not self.binding or not set(self.binding) <= BINDING_LETTERS:
            raise ValueError(f"binding {self.binding!r}: letters from U, T, S, N, Q")


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


def temperature_defaults(value: float) -> Instance:
    """A Temperature instance (/3303/x) reading ``value`` degrees Celsius."""
    return {
        SENSOR_VALUE: value, SENSOR_UNITS: "Cel", MIN_MEASURED: value, MAX_MEASURED: value, MIN_RANGE: -40.0,
        MAX_RANGE: 85.0, APPLICATION_TYPE: "simulated",
    }


def _is_executable(path: Path) -> bool:
    known = RESOURCE_TYPES.get(path.object_id or 0, {})
    return path.resource_id in known and known[path.resource_id] is None


def check_type(entry: Entry) -> Value:
    """``entry.value`` as the resource's type, or a ``CodecError`` when it does not fit."""
    kind, value = resource_type(entry.path), entry.value
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
    def initial(cls, endpoint: str, bootstrap_uri: str | None, bootstrap_instance: int,
                device_info: Mapping[int, Resource] | None = None, *, server: ServerAccount | None = None,
                temperatures: Iterable[float] = (20.0,), bootstrap_credentials: ClientCredentials | None = None,
                server_credentials: ClientCredentials | None = None) -> ObjectStore:
        """A factory-fresh device: the bootstrap-server account when there is a bootstrap server, a
        management-server account (at the lowest free Security instance and /1/0) when given one, each
        in NoSec or with its DTLS credentials, the Device object and one Temperature instance per
        initial reading."""
        store = cls()
        security = store._objects[objects.SECURITY]
        if bootstrap_uri is not None:
            security[bootstrap_instance] = {
                objects.SECURITY_URI: bootstrap_uri,
                objects.SECURITY_BOOTSTRAP: True,
                **security_resources(bootstrap_credentials),
                objects.SECURITY_HOLD_OFF: 0,
            }
        if server is not None:
            iid = next(candidate for candidate in range(len(security) + 1) if candidate not in security)
            security[iid] = {
                objects.SECURITY_URI: server.uri,
                objects.SECURITY_BOOTSTRAP: False,
                **security_resources(server_credentials),
                objects.SECURITY_SHORT_SERVER_ID: server.short_server_id,
            }
            store._objects[objects.SERVER][0] = {
                objects.SERVER_SHORT_SERVER_ID: server.short_server_id,
                objects.SERVER_LIFETIME: server.lifetime,
                objects.SERVER_NOTIFICATION_STORING: False,
                objects.SERVER_BINDING: server.binding,
            }
        store._objects[objects.DEVICE][0] = {**device_defaults(endpoint), **(device_info or {})}
        for iid, reading in enumerate(temperatures):
            store._objects[TEMPERATURE][iid] = temperature_defaults(reading)
        return store

    # --- inspection ---------------------------------------------------------------------------------

    def object_ids(self) -> tuple[int, ...]:
        return tuple(self._objects)

    def instance_ids(self, object_id: int) -> list[int]:
        """The instance ids of ``object_id`` in order (empty for an unsupported object)."""
        return sorted(self._objects.get(object_id, {}))

    def has(self, path: Path) -> bool:
        """Whether the object (supported), instance or resource at ``path`` exists (``/`` always does)."""
        if not path.depth:
            return True
        instances = self._objects.get(path.object_id or 0)
        if instances is None or path.depth == 1:
            return instances is not None
        instance = instances.get(path.instance_id or 0)
        if instance is None or path.depth == 2:
            return instance is not None
        value = instance.get(path.resource_id or 0)
        if path.depth == 3:
            return value is not None or _is_executable(path)
        return isinstance(value, dict) and path.resource_instance_id in value

    def value(self, path: Path) -> Value | None:
        """The single value at a resource (or resource instance) path, None when there is none."""
        if path.depth < 3:
            return None
        resource = self._objects.get(path.object_id or 0, {}).get(path.instance_id or 0, {}).get(path.resource_id or 0)
        if isinstance(resource, dict):
            return resource.get(path.resource_instance_id or 0) if path.depth == 4 else None
        return resource if path.depth == 3 else None

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

    def write(self, target: Path, entries: Iterable[Entry], *, replace: bool,
              allowed: Callable[[Path], bool] | None = None) -> None:
        """Write ``entries`` (all within ``target``). ``replace``: a Write-Replace (PUT), which creates
        missing instances and replaces instances and resources as a whole; else a Partial Update (POST),
        which needs the instance to exist and keeps the resources it does not name. With ``allowed`` (a
        management server's write), a resource it refuses fails the write (``NotAllowed``), instances
        are not created, and a replaced instance keeps the resources it refuses."""
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
            if allowed is not None and not allowed(path):
                raise NotAllowed(f"{path} is read-only")
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
        if not replace or allowed is not None:
            for object_id, iid in grouped:
                if iid not in self._objects[object_id]:
                    raise NotFound(f"/{object_id}/{iid} does not exist")
        for (object_id, iid), resources in grouped.items():
            instance = self._objects[object_id].setdefault(iid, {})
            if target.depth <= 2:
                if replace:
                    for rid in [rid for rid in instance if allowed is None or allowed(Path(object_id, iid, rid))]:
                        del instance[rid]
                instance.update(resources)
                continue
            for rid, value in resources.items():
                existing = instance.get(rid)
                merge = isinstance(value, dict) and isinstance(existing, dict) and (target.depth == 4 or not replace)
                instance[rid] = {**existing, **value} if merge else value  # type: ignore[dict-item]

    def set_value(self, path: Path, value: Value) -> None:
        """Set one resource of an existing instance (the device itself measuring, not a server)."""
        if path.depth != 3:
            raise NotAllowed(f"{path} is not a single resource")
        instances = self._object(path.object_id)
        if path.instance_id not in instances:
            raise NotFound(f"{path.parent} does not exist")
        if _is_executable(path):
            raise NotAllowed(f"{path} is executable")
        instances[path.instance_id][path.resource_id] = check_type(Entry(path, value))  # type: ignore[index]

    def create(self, object_id: int, entries: Iterable[Entry], instance_id: int) -> None:
        """Create ``/object_id/instance_id`` from its defaults and ``entries`` (all within it)."""
        if object_id not in CREATABLE:
            self._object(object_id)
            raise NotAllowed(f"instances of /{object_id} cannot be created")
        instances = self._objects[object_id]
        if instance_id in instances:
            raise Refused(f"/{object_id}/{instance_id} already exists")
        base = Path(object_id, instance_id)
        values: dict[Path, Value] = {}
        for entry in entries:
            if not entry.path.is_within(base) or entry.path.depth != 3:
                raise CodecError(f"{entry.path} does not belong to the new instance {base}")
            if _is_executable(entry.path):
                raise NotAllowed(f"{entry.path} is executable, not writable")
            values[entry.path] = check_type(entry)
        instance = temperature_defaults(20.0)
        instance.update({path.resource_id: value for path, value in values.items()})  # type: ignore[misc]
        instances[instance_id] = instance

    def free_instance_id(self, object_id: int) -> int:
        """The lowest instance id not in use."""
        taken = self._object(object_id)
        return next(candidate for candidate in range(len(taken) + 1) if candidate not in taken)

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
