"""Test peers of the notification channel: an SSE client for the event stream and an HTTP webhook
receiver that checks every signature."""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from harness import Api, ServerProcess

#: A receiver answer: an HTTP status, or SLOW (no answer before the server's timeout).
SLOW = "slow"


# --- an SSE client ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One SSE message: an event (id, event, data) or a comment."""

    id: str | None = None
    event: str | None = None
    data: str | None = None
    comment: str | None = None

    @property
    def json(self) -> dict[str, Any]:
        assert self.data is not None, self
        return json.loads(self.data)


class Stream:
    """Reads an event stream in a thread; ``close`` hangs up like a client that goes away."""

    def __init__(self, server_url: str, token: str | None, path: str, *, headers: dict[str, str] | None = None,
                 params: Any = None) -> None:
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=server_url, timeout=httpx.Timeout(30, read=None))
        self._context = self._client.stream("GET", path, headers={**auth, **(headers or {})}, params=params)
        self.response = self._context.__enter__()
        self.messages: queue.Queue[Message | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        if self.response.status_code == 200:
            self._thread.start()

    def _read(self) -> None:
        fields: dict[str, str] = {}
        try:
            for line in self.response.iter_lines():
                if line == "":
                    if fields:
                        self.messages.put(Message(**fields))
                    fields = {}
                elif line.startswith(":"):
                    self.messages.put(Message(comment=line[1:].strip()))
                else:
                    name, _, value = line.partition(":")
                    assert name in ("id", "event", "data"), line
                    fields[name] = value[1:] if value.startswith(" ") else value
        except (httpx.HTTPError, OSError):
            pass
        finally:
            self.messages.put(None)  # the stream ended

    def next(self, timeout: float = 10) -> Message | None:
        """The next message (comments included); None when the stream ended."""
        return self.messages.get(timeout=timeout)

    def events(self, count: int, timeout: float = 15) -> list[Message]:
        found: list[Message] = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            message = self.next(max(0.01, deadline - time.monotonic()))
            assert message is not None, f"the stream ended after {found}"
            if message.comment is None:
                found.append(message)
        return found

    def quiet(self, seconds: float) -> list[Message]:
        """Everything but comments received within ``seconds`` (the stream must stay open)."""
        found: list[Message] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = self.next(left)
            except queue.Empty:
                break
            assert message is not None, "the stream ended"
            if message.comment is None:
                found.append(message)
        return found

    def close(self) -> None:
        stream = self.response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=10) if self._thread.is_alive() else None
        try:
            self._context.__exit__(None, None, None)
        except (httpx.HTTPError, OSError):
            pass
        self._client.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def token_of(client: Api) -> str:
    return client.headers["Authorization"].removeprefix("Bearer ")


def open_stream(server: ServerProcess, client: Api | None, org_id: str | None, **kwargs: Any) -> Stream:
    path = f"/api/v1/orgs/{org_id}/events/stream" if org_id else "/api/v1/events/stream"
    return Stream(server.url, token_of(client) if client else None, path, **kwargs)


# --- a webhook receiver -------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    #: What the receiver answered (SLOW: nothing in time).
    answer: int | str

    def verified(self, secret: str) -> dict[str, Any]:
        """The body, after checking its signature as a receiver would."""
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(self.headers["x-pilotboat-signature"], expected), "bad signature"
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


class Receiver:
    """An HTTP server on loopback recording every request; answers follow a script, then 200."""

    def __init__(self, *answers: int | str, slow_seconds: float = 3.0) -> None:
        self.requests: list[Received] = []
        self.answers: deque[int | str] = deque(answers)
        self.always: int | str | None = None
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver._changed:
                    answer = receiver.answers.popleft() if receiver.answers else receiver.always or 200
                    receiver.requests.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic(), answer)
                    )
                    receiver._changed.notify_all()
                if answer == SLOW:
                    time.sleep(slow_seconds)
                    answer = 200
                self.send_response(int(answer))
                if answer in (301, 302, 307, 308):
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "2")
                self.end_headers()
                try:
                    self.wfile.write(b"ok")
                except OSError:
                    pass

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def wait_for(self, count: int, timeout: float = 20) -> list[Received]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.requests) >= count, timeout), (
                f"{len(self.requests)} of {count} requests arrived"
            )
            return list(self.requests)

    def events(self, secret: str, count: int, timeout: float = 20) -> list[dict[str, Any]]:
        """Wait until ``count`` events were delivered (answered 2xx; distinct ids), every request
        verified; oldest first."""
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                found = {
                    event["id"]: event for request in self.requests for event in request.verified(secret)["events"]
                    if request.answer in range(200, 300)
                }
                if len(found) >= count:
                    return [found[key] for key in sorted(found)]
                left = deadline - time.monotonic()
                assert left > 0, f"{len(found)} of {count} events arrived"
                self._changed.wait(left)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


