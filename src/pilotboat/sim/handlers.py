"""How a simulated device answers the requests an LwM2M server sends it: Bootstrap-Discover, Read,
Write (replace and partial update), Execute, Delete and Bootstrap-Finish.

Answers follow the LwM2M transport binding: 2.05 / 2.04 / 2.02 on success, 4.04 for a path the device
does not have, 4.05 for an operation the path does not support, 4.06 for a read in a format it cannot
produce, 4.15 for a write in a format it cannot read, 4.00 for a payload it cannot decode or a request it
refuses. Error answers carry a short diagnostic text.
"""

from __future__ import annotations

from collections.abc import Callable

import aiocoap
from aiocoap.numbers.codes import Code

from pilotboat.lwm2m import content, linkformat, objects
from pilotboat.lwm2m.model import CodecError, Path, UnsupportedFormat
from pilotboat.sim.objects import NotAllowed, NotFound, ObjectStore, Refused

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


class ServerRequests:
    """Turns a server's request into the device's answer, applying it to ``store``.

    ``on_finish`` is called for each Bootstrap-Finish with None (the configuration is consistent) or
    the reason it is not; ``on_execute`` with the path of each Execute that succeeded.
    """

    def __init__(self, store: ObjectStore, *, lwm2m_version: str, on_finish: Callable[[str | None], None],
                 on_execute: Callable[[Path], None]) -> None:
        if lwm2m_version not in VERSIONS:
            raise ValueError(f"LwM2M version {lwm2m_version!r} is not one of {', '.join(VERSIONS)}")
        self.store = store
        self.lwm2m_version = lwm2m_version
        self.formats = value_formats(lwm2m_version)
        self._on_finish = on_finish
        self._on_execute = on_execute

    def handle(self, request: aiocoap.Message) -> aiocoap.Message:
        segments = tuple(request.opt.uri_path)
        if segments == BOOTSTRAP_PATH:
            if request.code != Code.POST:
                return _answer(Code.METHOD_NOT_ALLOWED, "only POST (Bootstrap-Finish) on /bs")
            return self._finish()
        try:
            path = Path.parse("/" + "/".join(segments))
        except CodecError:
            return _answer(Code.NOT_FOUND, "not an LwM2M path")
        try:
            if request.code == Code.GET:
                return self._get(request, path)
            if request.code == Code.PUT:
                return self._write(request, path, replace=True)
            if request.code == Code.POST:
                return self._post(request, path)
            if request.code == Code.DELETE:
                self.store.delete(path)
                return _answer(Code.DELETED)
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

    def _get(self, request: aiocoap.Message, path: Path) -> aiocoap.Message:
        accept = int(request.opt.accept) if request.opt.accept is not None else None
        if accept == content.LINK_FORMAT:
            return aiocoap.Message(code=Code.CONTENT, content_format=content.LINK_FORMAT, payload=self.discover(path))
        fmt = content.TLV if accept is None else accept
        if fmt not in self.formats:
            return _answer(Code.NOT_ACCEPTABLE, f"{content.format_name(fmt)} is not supported")
        entries = self.store.read(path)
        try:
            payload = content.encode(fmt, entries, path)
        except CodecError as exc:
            return _answer(Code.NOT_ACCEPTABLE, str(exc))
        return aiocoap.Message(code=Code.CONTENT, content_format=fmt, payload=payload)

    def _post(self, request: aiocoap.Message, path: Path) -> aiocoap.Message:
        if path.depth == 3 and (not request.payload or objects.resource_type(path) is None):
            self.store.execute(path)
            self._on_execute(path)
            return _answer(Code.CHANGED)
        if path.depth < 2:
            raise NotAllowed(f"POST {path}: creating instances is not supported")
        return self._write(request, path, replace=False)

    def _write(self, request: aiocoap.Message, path: Path, *, replace: bool) -> aiocoap.Message:
        fmt = request.opt.content_format
        if fmt is None:
            return _answer(Code.BAD_REQUEST, "a write needs a Content-Format")
        if int(fmt) not in self.formats:
            return _answer(Code.UNSUPPORTED_CONTENT_FORMAT, f"{content.format_name(int(fmt))} is not supported")
        try:
            entries = content.decode(int(fmt), request.payload, path, objects.resource_type)
            self.store.write(path, entries, replace=replace)
        except UnsupportedFormat as exc:
            return _answer(Code.UNSUPPORTED_CONTENT_FORMAT, str(exc))
        except CodecError as exc:
            return _answer(Code.BAD_REQUEST, str(exc))
        return _answer(Code.CHANGED)

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
