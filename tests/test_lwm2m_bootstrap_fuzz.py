"""The bootstrap server against hostile input: thousands of random and mutated datagrams on the wire,
random client answers fed to the session, and Debian's libcoap client as an independent peer."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import Api, ServerProcess
from pilotboat.bootstrap.plan import build_plan
from pilotboat.lwm2m.bootstrap_session import BootstrapFailed, BootstrapSession
from pilotboat.lwm2m.messages import Reply
from pilotboat.model.management_server import DeploymentServer

PLAN = build_plan("d", "o", "ep", DeploymentServer("127.0.0.1", 5683).listed, authenticated=False)
CODES = ["2.01", "2.02", "2.04", "2.05", "4.00", "4.04", "4.05", "4.06", "4.15", "5.00"]


@settings(max_examples=400, deadline=None)
@given(
    pct=st.one_of(st.none(), st.sampled_from([0, 40, 110, 112, 1542, 11542, 11543, 65535])),
    replies=st.lists(
        st.builds(Reply, st.sampled_from(CODES), st.one_of(st.none(), st.integers(0, 65535)), st.binary(max_size=200)),
        max_size=20,
    ),
)
def test_random_client_answers_end_the_session_cleanly(pct: int | None, replies: list[Reply]) -> None:
    """Whatever a client answers, the session either goes on, ends, or fails with a step and reason."""
    session = BootstrapSession(PLAN, pct)
    request = session.first()
    for reply in replies:
        try:
            request = session.advance(reply)
        except BootstrapFailed as failed:
            assert failed.step in {"delete", "write", "finish"} and failed.reason
            return
        if request is None:
            assert reply.ok
            return


def _coap(code: Code, path: tuple[str, ...], query: tuple[str, ...] = (), payload: bytes = b"", mid: int = 1) -> bytes:
    message = aiocoap.Message(code=code, uri_path=path, uri_query=query, payload=payload)
    message.mid, message.token = mid, mid.to_bytes(2, "big")
    message.mtype = aiocoap.CON
    return message.encode()


def _mutations(rng: random.Random, count: int) -> list[bytes]:
    seeds = [
        _coap(Code.POST, ("bs",), ("ep=fuzz",)),
        _coap(Code.POST, ("bs",), ("pct=112", "ep=" + "x" * 300)),
        _coap(Code.GET, ("bspack",), ("ep=fuzz",)),
        _coap(Code.PUT, ("bs",), ("ep=fuzz",), b"\x00" * 64),
        _coap(Code.POST, ("rd",), ("ep=fuzz", "lt=60"), b"</1/0>,</3/0>"),
    ]
    out = []
    for index in range(count):
        kind = index % 4
        if kind == 0:
            out.append(rng.randbytes(rng.randint(0, 300)))
        else:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 8)):
                position = rng.randrange(len(data))
                if kind == 1:
                    data[position] = rng.randrange(256)
                elif kind == 2:
                    del data[position:position + rng.randint(1, 4)]
                    if not data:
                        data = bytearray(b"\x40")
                else:
                    data[position:position] = rng.randbytes(rng.randint(1, 16))
            out.append(bytes(data))
    return out


def _post_bs(port: int, endpoint: str, timeout: float = 5) -> aiocoap.Message:
    """A well-formed Bootstrap-Request from a fresh socket; the answer. A server that is still busy
    may first acknowledge it with an empty ACK and send the answer separately: that is read too."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(_coap(Code.POST, ("bs",), (f"ep={endpoint}",), mid=4242), ("127.0.0.1", port))
        while True:
            answer = aiocoap.Message.decode(sock.recv(2048))
            if answer.code != Code.EMPTY:
                return answer


def test_thousands_of_garbage_datagrams_do_not_hurt_the_server(server: ServerProcess, root: Api) -> None:
    rng = random.Random(20261124)
    datagrams = _mutations(rng, 4000)
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(16)]
    try:
        for index, datagram in enumerate(datagrams):
            sockets[index % len(sockets)].sendto(datagram, ("127.0.0.1", server.bootstrap_port))
            if index % 200 == 0:
                time.sleep(0.02)  # keep the loopback queue from dropping most of them before they are read
    finally:
        for sock in sockets:
            sock.close()
    assert server.process is not None and server.process.poll() is None
    # The server works through what it received (about a thousand well-formed requests among the
    # garbage), then answers a new client promptly.
    started = time.monotonic()
    answer = None
    while answer is None and time.monotonic() - started < 30:
        try:
            answer = _post_bs(server.bootstrap_port, "nobody-after-fuzz", timeout=2)
        except TimeoutError:
            continue
    assert answer is not None, "the bootstrap server did not answer within 30 s of the flood"
    assert answer.code == Code.BAD_REQUEST
    assert root.get("/health").status_code == 200
    assert "Traceback" not in server.log()


@pytest.mark.skipif(shutil.which("coap-client-notls") is None, reason="libcoap's coap-client-notls is not installed")
def test_libcoap_bootstrap_request_is_answered_204(server: ServerProcess, root: Api, tenant) -> None:
    endpoint = f"libcoap-{random.randrange(10**9)}"
    created = tenant.admin.post(f"/api/v1/orgs/{tenant.org_id}/devices", json={"name": "libcoap", "endpoint": endpoint, "state": 1})
    assert created.status_code == 201, created.text
    result = subprocess.run(
        ["coap-client-notls", "-m", "post", "-v", "6", "-B", "3", f"{server.bootstrap_uri}/bs?ep={endpoint}"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    output = result.stdout + result.stderr
    assert "c:2.04" in output, output
    unknown = subprocess.run(
        ["coap-client-notls", "-m", "post", "-v", "6", "-B", "3", f"{server.bootstrap_uri}/bs?ep=unknown-{endpoint}"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert "c:4.00" in unknown.stdout + unknown.stderr
    # libcoap does not answer the server's Discover like an LwM2M client: the session ends failed or timed out.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        events = tenant.admin.get(f"/api/v1/orgs/{tenant.org_id}/events", params={"kind": "bootstrap.failed"}).json()["events"]
        if any(event["device_id"] == created.json()["id"] for event in events):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the libcoap session was not recorded as failed")
