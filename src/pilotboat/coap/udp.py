"""aiocoap wiring for plain CoAP over UDP: one server context per port."""

from __future__ import annotations

import errno
import logging
import socket

import aiocoap
import aiocoap.transports.udp6
from aiocoap.error import UnparsableMessage
from aiocoap.resource import Site



class PortInUse(RuntimeError):
    pass


def check_port_free(host: str, port: int) -> None:
    """Raise ``PortInUse`` when another socket holds ``host:port``.

    aiocoap binds with SO_REUSEPORT, so two servers would otherwise share the port silently and each
    receive a random half of the datagrams.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"UDP port {host}:{port} is already in use by another program or Pilotboat node") from exc
        raise
    finally:
        probe.close()


class _StrictlyDecodedMessage(aiocoap.Message):
    """aiocoap's Message whose ``decode`` reports every malformed datagram as unparsable.

    aiocoap 0.4.17 lets a string option with invalid UTF-8 escape ``Message.decode`` as a
    UnicodeDecodeError (upstream issue chrysn/aiocoap#176), which the UDP transport does not catch: the
    datagram is dropped with a traceback in the log. As UnparsableMessage it is ignored quietly.
    """

    @classmethod
    def decode(cls, rawdata: bytes, remote: object = None) -> aiocoap.Message:
        try:
            return super().decode(rawdata, remote)
        except ValueError as exc:
            raise UnparsableMessage(f"malformed option: {exc}") from None


def _decode_strictly() -> None:
    aiocoap.transports.udp6.Message = _StrictlyDecodedMessage  # type: ignore[attr-defined]


async def serve(site: Site, host: str, port: int, *, name: str) -> aiocoap.Context:
    """A CoAP server context bound to ``host:port`` that can also send requests to its peers."""
    check_port_free(host, port)
    _decode_strictly()
    logger = f"pilotboat.coap.{name}"
    # aiocoap reports every malformed datagram; a flood of them must not flood the log.
    logging.getLogger(logger).setLevel(max(logging.getLogger("pilotboat").getEffectiveLevel(), logging.ERROR))
    return await aiocoap.Context.create_server_context(site, bind=(host, port), transports=["udp6"], loggername=logger)

