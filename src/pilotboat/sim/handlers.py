"""How a simulated device answers the requests an LwM2M server sends it.

From the bootstrap server: Bootstrap-Discover, Read, Write (replace and partial update), Execute, Delete
and Bootstrap-Finish. From a management server (``management=True``): Read, Discover (with attributes),
Write (only writable resources), Write-Attributes, Execute, Create and Delete (Temperature instances);
the Security object is out of its reach (4.01). Observe is the device's business (it needs the peer and
the token); the read it starts with is answered here.

Answers follow the LwM2M transport binding: 2.05 / 2.04 / 2.02 / 2.01 on success, 4.04 for a path the
device does not have, 4.05 for an operation the path does not support, 4.06 for a read in a format it
cannot produce, 4.15 for a write in a format it cannot read, 4.00 for a payload it cannot decode or a
request it refuses. Error answers carry a short diagnostic text.
"""

from __future__ import annotations

from collections.abc import Callable

import aiocoap
from aiocoap.numbers.codes import Code

from pilotboat.lwm2m import content, linkformat, objects
from pilotboat.lwm2m.model import CodecError, Entry, Path, UnsupportedFormat
from pilotboat.sim.attributes import AttributeStore
from pilotboat.sim.objects import (
    CREATABLE,
    RESOURCE_TYPES,
    NotAllowed,
    NotFound,
    ObjectStore,
    Refused,
    resource_type,
    writable,
)

#: Value formats every simulated device reads and writes.
BASE_FORMATS = frozenset({content.TLV, content.TLV_LEGACY, content.TEXT, content.OPAQUE})
#: LwM2M 1.1 added SenML.
SENML_FORMATS = frozenset({content.SENML_JSON, content.SENML_CBOR})
BOOTSTRAP_PATH = ("bs",)
VERSIONS = ("1.0", "1.1", "1.2")


def value_formats(lwm2m_version: str) -> frozenset[int]:
    """The content formats a device of ``lwm2m_version`` reads and writes resource values in."""
    return BASE_FORMATS if lwm2m_version == "1.0" else BASE_FORMATS | SENML_FORMATS


def _answer(code: Code, text: str = "") -> aiocoap.Message:
    return aiocoap.Message(code=code, payload=text.encode())


def _is_write_attributes(request: aiocoap.Message) -> bool:
    return bool(request.opt.uri_query) and request.opt.content_format is None and not request.payload


class ServerRequests:
    """Turns a server's request into the device's answer, applying it to ``store``.

    ``on_finish`` is called for each Bootstrap-Finish with None (the configuration is consistent) or
    the reason it is not; ``on_execute`` with the path of each Execute that succeeded; ``on_change``
    with the path of each successful Write, Create and Delete.
    """

    def __init__(self, store: ObjectStore, *, lwm2m_version: str, on_finish: Callable[[str | None], None],
                 on_execute: Callable[[Path], None], attributes: AttributeStore | None = None,
                 on_change: Callable[[Path], None] | None = None) -> None:
        if lwm2m_version not in VERSIONS:
            raise ValueError(f"LwM2M version {lwm2m_version!r} is not one of {', '.join(VERSIONS)}")
        self.store = store
        self.lwm2m_version = lwm2m_version
        self.formats = value_formats(lwm2m_version)
        self.attributes = attributes if attributes is not None else AttributeStore()
        self._on_finish = on_finish
        self._on_execute = on_execute
        self._on_change = on_change or (lambda path: None)

    def handle(self, request: aiocoap.Message, *, management: bool = False) -> aiocoap.Message:
        """The answer to ``request``, from the bootstrap server or (``management``) a management server."""
        segments = tuple(request.opt.uri_path)
        if segments == BOOTSTRAP_PATH:
            if management:
                return _answer(Code.NOT_FOUND, "Bootstrap-Finish is for the bootstrap server")
            if request.code != Code.POST:
                return _answer(Code.METHOD_NOT_ALLOWED, "only POST (Bootstrap-Finish) on /bs")
            return self._finish()
        try:
            path = Path.parse("/" + "/".join(segments))
        except CodecError:
            return _answer(Code.NOT_FOUND, "not an LwM2M path")
        if management and path.object_id == objects.SECURITY:
            return _answer(Code.UNAUTHORIZED, "the Security object is for the bootstrap server only")
        if management and not path.depth:
            return _answer(Code.METHOD_NOT_ALLOWED, "a management server cannot operate on /")
        try:
            if request.code == Code.GET:
                return self._get(request, path, management)
            if request.code == Code.PUT:
                if _is_write_attributes(request):
                    if not self.store.has(path):
                        raise NotFound(f"{path} does not exist")
                    self.attributes.write(path, request.opt.uri_query)
                    return _answer(Code.CHANGED)
                return self._write(request, path, replace=True, management=management)
            if request.code == Code.POST:
                return self._post(request, path, management)
            if request.code == Code.DELETE:
                return self._delete(path, management)
            return _answer(Code.METHOD_NOT_ALLOWED, f"{request.code} is not supported")
        except NotFound as exc:
            return _answer(Code.NOT_FOUND, str(exc))
        except NotAllowed as exc:
            return _answer(Code.METHOD_NOT_ALLOWED, str(exc))
        except Refused as exc:
            return _answer(Code.BAD_REQUEST, str(exc))

    # --- operations -------------------------------------------------------------------------------------

    def _finish(self) -> aiocoap.Message:
        problem = self.store.inconsistency()
        self._on_finish(problem)
        if problem is not None:
            return _answer(Code.NOT_ACCEPTABLE, f"inconsistent configuration: {problem}")
        return _answer(Code.CHANGED)

    def _get(self, request: aiocoap.Message, path: Path, management: bool) -> aiocoap.Message:
        accept = int(request.opt.accept) if request.opt.accept is not None else None
        if accept == content.LINK_FORMAT:
            links = self.discover_resources(path) if management else self.discover(path)
            return aiocoap.Message(code=Code.CONTENT, content_format=content.LINK_FORMAT, payload=links)
        return self.read(path, accept)

    def read(self, path: Path, accept: int | None = None) -> aiocoap.Message:
        """A Read of ``path`` in ``accept`` (TLV when None): 2.05, or the error answer."""
        fmt = content.TLV if accept is None else accept
        if fmt not in self.formats:
            return _answer(Code.NOT_ACCEPTABLE, f"{content.format_name(fmt)} is not supported")
        try:
            entries = self.store.read(path)
        except NotFound as exc:
            return _answer(Code.NOT_FOUND, str(exc))
        except NotAllowed as exc:
            return _answer(Code.METHOD_NOT_ALLOWED, str(exc))
        try:
            payload = content.encode(fmt, entries, path)
        except CodecError as exc:
            return _answer(Code.NOT_ACCEPTABLE, str(exc))
        return aiocoap.Message(code=Code.CONTENT, content_format=fmt, payload=payload)

    def _post(self, request: aiocoap.Message, path: Path, management: bool) -> aiocoap.Message:
        if path.depth == 3 and (not request.payload or resource_type(path) is None):
            self.store.execute(path)
            self._on_execute(path)
            return _answer(Code.CHANGED)
        if path.depth == 1:
            return self._create(request, path)
        if path.depth < 2:
            raise NotAllowed(f"POST {path} is not an operation")
        return self._write(request, path, replace=False, management=management)

    def _decode(self, request: aiocoap.Message, path: Path) -> tuple[Entry, ...] | aiocoap.Message:
        """The entries of a write's payload, or the error answer (4.00 / 4.15)."""
        fmt = request.opt.content_format
        if fmt is None:
            return _answer(Code.BAD_REQUEST, "a write needs a Content-Format")
        if int(fmt) not in self.formats:
            return _answer(Code.UNSUPPORTED_CONTENT_FORMAT, f"{content.format_name(int(fmt))} is not supported")
        try:
            return content.decode(int(fmt), request.payload, path, resource_type)
        except UnsupportedFormat as exc:
            return _answer(Code.UNSUPPORTED_CONTENT_FORMAT, str(exc))
        except CodecError as exc:
            return _answer(Code.BAD_REQUEST, str(exc))

    def _write(self, request: aiocoap.Message, path: Path, *, replace: bool, management: bool) -> aiocoap.Message:
        entries = self._decode(request, path)
        if isinstance(entries, aiocoap.Message):
            return entries
        try:
            self.store.write(path, entries, replace=replace, allowed=writable if management else None)
        except CodecError as exc:
            return _answer(Code.BAD_REQUEST, str(exc))
        self._on_change(path)
        return _answer(Code.CHANGED)

    def _create(self, request: aiocoap.Message, path: Path) -> aiocoap.Message:
        """Create: ``POST /oid`` with one instance (TLV with or without its instance wrapper, or SenML
        naming it); the device picks the lowest free id when the payload names none. 2.01 with the new
        instance's path as Location-Path."""
        object_id = path.object_id
        assert object_id is not None
        if object_id not in CREATABLE:
            if object_id not in self.store.object_ids():
                raise NotFound(f"object {path} is not supported by this device")
            raise NotAllowed(f"instances of {path} cannot be created")
        fmt = request.opt.content_format
        wrapped = fmt is None or int(fmt) not in (content.TLV, content.TLV_LEGACY) or (
            bool(request.payload) and request.payload[0] >> 6 == 0)  # a TLV object-instance wrapper
        base = path if wrapped else path.child(self.store.free_instance_id(object_id))
        entries = self._decode(request, base)
        if isinstance(entries, aiocoap.Message):
            return entries
        named = {entry.path.instance_id for entry in entries}
        if len(named) > 1:
            return _answer(Code.BAD_REQUEST, "a Create makes one instance")
        instance_id = named.pop() if named else self.store.free_instance_id(object_id)
        try:
            self.store.create(object_id, entries, instance_id)
        except CodecError as exc:
            return _answer(Code.BAD_REQUEST, str(exc))
        self._on_change(Path(object_id, instance_id))
        return aiocoap.Message(code=Code.CREATED, location_path=(str(object_id), str(instance_id)))

    def _delete(self, path: Path, management: bool) -> aiocoap.Message:
        if management:
            if not self.store.has(path):
                raise NotFound(f"{path} does not exist")
            if path.depth != 2 or path.object_id not in CREATABLE:
                raise NotAllowed(f"{path} cannot be deleted")
        self.store.delete(path)
        self.attributes.forget(path)
        self._on_change(path)
        return _answer(Code.DELETED)

    def discover_resources(self, path: Path) -> bytes:
        """Discover by a management server: the object (with ``/oid``), instance or resource at ``path``
        and everything below it, each link with the attributes attached to it; multiple resources also
        carry ``dim`` (their number of instances)."""
        if not self.store.has(path):
            raise NotFound(f"{path} does not exist")
        assert path.object_id is not None
        links = []
        if path.depth == 1:
            links.append(linkformat.Link(str(path), self.attributes.link_params(path)))
        executables = [rid for rid, kind in RESOURCE_TYPES.get(path.object_id, {}).items() if kind is None]
        for iid, instance in self.store.instances(path.object_id).items():
            if path.depth >= 2 and iid != path.instance_id:
                continue
            instance_path = Path(path.object_id, iid)
            if path.depth <= 2:
                links.append(linkformat.Link(str(instance_path), self.attributes.link_params(instance_path)))
            for rid in sorted({*instance, *executables}):
                resource = instance_path.child(rid)
                if path.depth >= 3 and rid != path.resource_id:
                    continue
                params = self.attributes.link_params(resource)
                value = instance.get(rid)
                if isinstance(value, dict):
                    params = (("dim", str(len(value))), *params)
                links.append(linkformat.Link(str(resource), params))
        return linkformat.encode(links)

    def discover(self, path: Path) -> bytes:
        """Bootstrap-Discover of ``/`` or an object: ``</>;lwm2m=…`` then each instance (an object with
        none as ``</oid>``). Server accounts carry ``ssid`` (Security instances from 1.1 also ``uri``);
        the bootstrap account carries neither."""
        if path.depth > 1:
            raise Refused("Bootstrap-Discover applies to / or an object")
        if path.depth and path.object_id not in self.store.object_ids():
            raise NotFound(f"object {path} is not supported by this device")
        bootstrap = set(self.store.bootstrap_instances())
        links = [linkformat.Link("/", (("lwm2m", self.lwm2m_version),))]
        for object_id in [path.object_id] if path.depth else self.store.object_ids():
            assert object_id is not None
            instances = self.store.instances(object_id)
            if not instances:
                links.append(linkformat.Link(f"/{object_id}"))
            for iid, instance in instances.items():
                params: list[tuple[str, str | None]] = []
                if object_id == objects.SECURITY and iid not in bootstrap:
                    ssid = instance.get(objects.SECURITY_SHORT_SERVER_ID)
                    uri = instance.get(objects.SECURITY_URI)
                    if isinstance(ssid, int) and not isinstance(ssid, bool):
                        params.append(("ssid", str(ssid)))
                    if isinstance(uri, str) and self.lwm2m_version != "1.0":
                        params.append(("uri", uri))
                elif object_id == objects.SERVER:
                    ssid = instance.get(objects.SERVER_SHORT_SERVER_ID)
                    if isinstance(ssid, int) and not isinstance(ssid, bool):
                        params.append(("ssid", str(ssid)))
                links.append(linkformat.Link(f"/{object_id}/{iid}", tuple(params)))
        return linkformat.encode(links)
