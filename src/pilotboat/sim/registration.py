"""The client side of the LwM2M registration interface as messages: Register (``POST /rd?ep&lt&lwm2m&b``
with the link-format list of objects), Update (``POST /rd/<id>`` with only what changed) and De-register
(``DELETE /rd/<id>``), and when the next Update is due. No sockets here.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiocoap
from aiocoap.numbers.codes import Code

from pilotboat.lwm2m import content, linkformat, objects
from pilotboat.model.management_server import DEFAULT_BINDING, DEFAULT_LIFETIME
from pilotboat.sim.objects import AssignedServer, ObjectStore

REGISTRATION_PATH = "rd"


@dataclass(frozen=True)
class Announced:
    """What a registration tells the server: the parameters and the object list (link-format)."""

    lifetime: int
    #: Binding letters without ``Q``.
    binding: str
    queue_mode: bool
    links: bytes


def announced(store: ObjectStore, account: AssignedServer, *, lwm2m_version: str, content_format: int | None,
              queue_mode: bool) -> Announced:
    """The registration parameters for ``account`` (its lifetime and binding; ``Q`` in a 1.0 binding,
    or ``queue_mode``, ask for queue mode) and the device's current object list."""
    letters = (account.binding or DEFAULT_BINDING).upper()
    return Announced(
        lifetime=account.lifetime if account.lifetime and account.lifetime > 0 else DEFAULT_LIFETIME,
        binding=letters.replace("Q", "") or DEFAULT_BINDING,
        queue_mode=queue_mode or "Q" in letters,
        links=object_links(store, lwm2m_version=lwm2m_version, content_format=content_format),
    )


def object_links(store: ObjectStore, *, lwm2m_version: str, content_format: int | None) -> bytes:
    """The Register payload: from 1.1 a root link ``</>;rt="oma.lwm2m";ct=<format>``, then every object
    instance (``</3/0>``), or the object alone when it has none; never the Security object."""
    links = []
    if lwm2m_version != "1.0":
        fmt = content_format if content_format is not None else content.TLV
        links.append(linkformat.Link("/", (("rt", "oma.lwm2m"), ("ct", str(fmt)))))
    for object_id in sorted(store.object_ids()):
        if object_id == objects.SECURITY:
            continue
        instance_ids = store.instance_ids(object_id)
        if not instance_ids:
            links.append(linkformat.Link(f"/{object_id}"))
        links.extend(linkformat.Link(f"/{object_id}/{iid}") for iid in instance_ids)
    return linkformat.encode(links)


def _binding_query(now: Announced, lwm2m_version: str) -> list[str]:
    """``b=UQ`` in 1.0; ``b=U`` and a separate ``Q`` from 1.1."""
    if lwm2m_version == "1.0":
        return [f"b={now.binding}{'Q' if now.queue_mode else ''}"]
    return [f"b={now.binding}", *(["Q"] if now.queue_mode else [])]


def register_message(endpoint: str, now: Announced, *, lwm2m_version: str) -> aiocoap.Message:
    query = [f"ep={endpoint}", f"lt={now.lifetime}", f"lwm2m={lwm2m_version}", *_binding_query(now, lwm2m_version)]
    return aiocoap.Message(code=Code.POST, uri_path=(REGISTRATION_PATH,), uri_query=tuple(query),
                           content_format=content.LINK_FORMAT, payload=now.links)


def update_message(location: str, before: Announced, now: Announced, *, lwm2m_version: str) -> aiocoap.Message:
    """An Update carrying ``lt`` when the lifetime changed, ``b`` (and ``Q``) when the binding or queue
    mode did, and the object list when it changed."""
    query = [f"lt={now.lifetime}"] if now.lifetime != before.lifetime else []
    if (now.binding, now.queue_mode) != (before.binding, before.queue_mode):
        query += _binding_query(now, lwm2m_version)
    message = aiocoap.Message(code=Code.POST, uri_path=tuple(location.split("/")), uri_query=tuple(query))
    if now.links != before.links:
        message.opt.content_format = content.LINK_FORMAT
        message.payload = now.links
    return message


def deregister_message(location: str) -> aiocoap.Message:
    return aiocoap.Message(code=Code.DELETE, uri_path=tuple(location.split("/")))


def update_delay(lifetime: float, margin: float) -> float:
    """Seconds from a registration (or Update) to the next Update: ``margin`` before the lifetime ends,
    or at half the lifetime when that is later."""
    return max(lifetime - margin, lifetime / 2)


def location_of(response: aiocoap.Message) -> str | None:
    """The ``rd/<id>`` location of a Register answer (None when it names none)."""
    segments = tuple(segment for segment in response.opt.location_path if segment)
    return "/".join(segments) or None
