"""Transport-neutral CoAP exchanges between an LwM2M server and a device: what the services ask a
device (``DeviceRequest``) and what it answered (``Reply``). The doors map them to CoAP messages."""

from __future__ import annotations

from dataclasses import dataclass

from pilotboat.lwm2m.model import Path


@dataclass(frozen=True)
class Reply:
    code: str  # "2.04", "4.06"…
    content_format: int | None = None
    payload: bytes = b""

    @property
    def ok(self) -> bool:
        return self.code.startswith("2.")


@dataclass(frozen=True)
class DeviceRequest:
    """A request to a registered device: ``method`` GET, PUT, POST or DELETE on ``path``."""

    method: str
    path: Path
    query: tuple[str, ...] = ()
    payload: bytes = b""
    content_format: int | None = None
    accept: int | None = None

    @property
    def uri_path(self) -> tuple[str, ...]:
        return tuple(str(part) for part in self.path.ids)

    def __str__(self) -> str:
        query = "?" + "&".join(self.query) if self.query else ""
        return f"{self.method} {self.path}{query}"


class DeviceUnreachable(Exception):
    """The request could not reach the device, or it did not answer in time (``timed_out``)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out
