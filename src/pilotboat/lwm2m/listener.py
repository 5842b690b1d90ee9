"""The sockets of one LwM2M server: plain CoAP and/or CoAP over DTLS, in one aiocoap context.

One context carries both transports, so the server's own requests to a device (bootstrap writes, device
operations) go out over whichever transport the device came in on: aiocoap routes a request by its
``remote``, and a ``DtlsRemote`` is recognised only by the DTLS transport, and only while its session lives.

The DTLS credentials come from the identity service, for the server's door (bootstrap or management).
Client certificates are judged by the identity service alone (organisation CAs and the trust store as
they are at that moment, dates, revocation): the engine gets no trust anchors, so an organisation created
at run time is trusted at once and the CertificateRequest does not list every organisation's CA.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiocoap
from aiocoap.resource import Site

from pilotboat.coap import udp
from pilotboat.dtls.engine import ServerCredentials
from pilotboat.dtls.server import add_dtls_transport
from pilotboat.dtls.transport import DtlsServerTransport, Limits
from pilotboat.services.device_identity import DeviceIdentityService, Door

#: Datagram size the DTLS handshake flights are cut to.
DTLS_MTU = 1200


class DoorCredentials:
    """The DTLS credentials of one door, from the identity service: PSK look-ups and certificate checks for
    that door, and the deployment's server certificate."""

    def __init__(self, identity: DeviceIdentityService, door: Door) -> None:
        self._identity = identity
        self.door = door

    async def _psk_for(self, identity: bytes) -> bytes | None:
        return await self._identity.psk_key(identity, self.door)

    async def _accept_chain(self, chain: tuple[bytes, ...]) -> bool:
        return await self._identity.accept_chain(chain, self.door)

    async def load(self) -> ServerCredentials:
        pair = await self._identity.server_credentials()
        return ServerCredentials(
            psk_for=self._psk_for, certificate_chain=tuple(pair.certificate_chain), private_key=pair.private_key,
            accept_chain=self._accept_chain,
        )


@dataclass(frozen=True)
class Ports:
    """Where one server listens; a port of 0 is not opened."""

    host: str
    plain: int
    dtls: int

    def addresses(self) -> list[str]:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return [f"{scheme}://{host}:{port}" for scheme, port in (("coap", self.plain), ("coaps", self.dtls)) if port]


class Listener:
    """A running server's aiocoap context on its ports, and its DTLS transport when it has a DTLS port."""

    def __init__(self, context: aiocoap.Context, ports: Ports, dtls: DtlsServerTransport | None) -> None:
        self.context = context
        self.ports = ports
        self.dtls = dtls

    @classmethod
    async def open(
        cls, site: Site, ports: Ports, *, name: str, credentials: DoorCredentials | None, limits: Limits = Limits(),
    ) -> Listener:
        """Bind the ports (``PortInUse`` when one is taken: nothing stays open then). ``credentials`` are
        needed when ``ports.dtls`` is set."""
        if not ports.plain and not ports.dtls:
            raise ValueError("a listener needs a plain CoAP or a DTLS port")
        if ports.dtls:
            if credentials is None:
                raise ValueError("a DTLS port needs credentials")
            udp.check_port_free(ports.host, ports.dtls)  # before the plain port is bound: all or nothing
            server_credentials = await credentials.load()
        context: aiocoap.Context | None = None
        transport: DtlsServerTransport | None = None
        try:
            if ports.plain:
                context = await udp.serve(site, ports.host, ports.plain, name=name)
            else:
                context = aiocoap.Context(loop=asyncio.get_running_loop(), serversite=site, loggername=f"pilotboat.coap.{name}")
            if ports.dtls:
                transport = await add_dtls_transport(
                    context, ports.host, ports.dtls, credentials=server_credentials, limits=limits, mtu=DTLS_MTU,
                    log=logging.getLogger(f"pilotboat.dtls.{name}"),
                )
        except BaseException:
            if context is not None:
                await context.shutdown()
            raise
        return cls(context, ports, transport)

    async def close(self) -> None:
        await self.context.shutdown()
