"""aiocoap wiring for CoAP over DTLS: a DTLS port added to a server context, or a context of its own."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiocoap
from aiocoap import interfaces
from aiocoap.resource import Site

from pilotboat.coap.udp import check_port_free
from pilotboat.dtls.engine import ServerCredentials, ServerEngine
from pilotboat.dtls.mbedtls_engine import MbedtlsEngine
from pilotboat.dtls.transport import DtlsServerTransport, Limits

EngineFactory = Callable[..., ServerEngine]


def dtls_transport(context: aiocoap.Context) -> DtlsServerTransport:
    """The DTLS transport of a context (for its session counters and its engine)."""
    for token_manager in context.request_interfaces:
        transport = getattr(getattr(token_manager, "token_interface", None), "message_interface", None)
        if isinstance(transport, DtlsServerTransport):
            return transport
    raise LookupError("this context has no DTLS transport")


async def add_dtls_transport(
    context: aiocoap.Context, host: str, port: int, *, credentials: ServerCredentials, limits: Limits = Limits(),
    mtu: int = 1200, engine_factory: EngineFactory = MbedtlsEngine, log: logging.Logger | None = None,
) -> DtlsServerTransport:
    """Bind a DTLS port to ``context``: its site serves the requests that arrive over DTLS, and requests
    the context sends to a ``DtlsRemote`` go out over that peer's session (aiocoap picks the transport
    by the remote). ``PortInUse`` when another socket holds the port."""
    if port:
        check_port_free(host, port)
    engine = engine_factory(credentials, mtu=mtu)
    made: list[DtlsServerTransport] = []

    async def create(mman: interfaces.MessageManager) -> DtlsServerTransport:
        transport = await DtlsServerTransport.create(mman, engine, credentials, (host, port), limits, log or context.log)
        made.append(transport)
        return transport

    await context._append_tokenmanaged_messagemanaged_transport(create)
    return made[0]


async def serve_dtls(
    site: Site, host: str, port: int, *, name: str, credentials: ServerCredentials,
    limits: Limits = Limits(), mtu: int = 1200, engine_factory: EngineFactory = MbedtlsEngine,
    log: logging.Logger | None = None,
) -> aiocoap.Context:
    """A CoAP-over-DTLS server context bound to ``host:port`` that can also send requests to the peers
    it holds sessions with (give those requests the ``remote`` of a message the peer sent)."""
    logger = f"pilotboat.coap.{name}"
    context = aiocoap.Context(loop=asyncio.get_running_loop(), serversite=site, loggername=logger)
    await add_dtls_transport(
        context, host, port, credentials=credentials, limits=limits, mtu=mtu, engine_factory=engine_factory,
        log=log or logging.getLogger(logger),
    )
    return context
