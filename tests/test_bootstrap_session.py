"""The bootstrap session state machine and the plan, without sockets."""

from __future__ import annotations

import pytest

from pilotboat.bootstrap.plan import PlanRefused, build_plan
from pilotboat.lwm2m import content, objects
from pilotboat.lwm2m.bootstrap_session import (
    BLIND_SECURITY_IID,
    BootstrapFailed,
    BootstrapSession,
    Reply,
    pack_values,
    read_discovery,
)
from pilotboat.lwm2m.bootstrap_server import read_query
from pilotboat.lwm2m.model import ROOT, Path, as_dict
from pilotboat.model.management_server import DeploymentServer, SecurityMode, ServerDefinition

DEFINITION = ServerDefinition(id="s1", org_id="o", name="m", address="mgmt.example.com", port=5683, lifetime=300, binding="UQ",
                              short_server_id=7)
PLAN = build_plan("dev", "org", "ep-1", DEFINITION, authenticated=False)
CHANGED, DELETED = Reply("2.04"), Reply("2.02")


def discover(links: str) -> Reply:
    return Reply("2.05", content.LINK_FORMAT, links.encode())


def run(session: BootstrapSession, discovery: Reply, answer=lambda request: None) -> list:
    """Drive a session to its end, answering every request as a compliant client would."""
    sent = [session.first()]
    request = session.advance(discovery)
    while request is not None:
        sent.append(request)
        reply = answer(request) or (DELETED if request.method == "DELETE" else CHANGED)
        request = session.advance(reply)
    return sent


def steps(sent: list) -> list[str]:
    return [str(request) for request in sent]


def test_discover_first_then_deletes_spare_the_bootstrap_account_and_writes_at_free_ids() -> None:
    session = BootstrapSession(PLAN)
    sent = run(session, discover('</>;lwm2m=1.1,</0/0>;ssid=3;uri="coap://old:5683",</0/1>;uri="coap://bs:5783",</0/2>;ssid=4,</3/0>'))
    assert sent[0].method == "GET" and sent[0].accept == content.LINK_FORMAT and str(sent[0].path) == "/0"
    assert steps(sent)[1:] == ["DELETE /0/0", "DELETE /0/2", "DELETE /1", "PUT /0/0", "PUT /1/0", "POST /bs"]
    assert session.discovery is not None and session.discovery.protected == {1} and session.discovery.lwm2m_version == "1.1"


def test_write_payloads_hold_the_plan_in_tlv_by_default() -> None:
    session = BootstrapSession(PLAN)
    sent = run(session, discover("</0/0>"))  # Wakaama-style: bootstrap account at /0/0
    writes = [request for request in sent if request.method == "PUT"]
    assert [str(request.path) for request in writes] == ["/0/1", "/1/0"]
    assert all(request.content_format == content.TLV for request in writes)
    types = objects.resource_type
    security = as_dict(content.decode(content.TLV, writes[0].payload, writes[0].path, types))
    assert security[Path(0, 1, 0)] == "coap://mgmt.example.com:5683"
    assert security[Path(0, 1, 1)] is False
    assert security[Path(0, 1, 2)] == SecurityMode.NOSEC
    assert security[Path(0, 1, 10)] == 7
    assert security[Path(0, 1, 3)] == b"" and security[Path(0, 1, 5)] == b""
    server = as_dict(content.decode(content.TLV, writes[1].payload, writes[1].path, types))
    assert server[Path(1, 0, 0)] == 7 and server[Path(1, 0, 1)] == 300 and server[Path(1, 0, 7)] == "UQ"
    assert Path(1, 0, 16) not in server  # no LwM2M version seen: no 1.1 resources


@pytest.mark.parametrize("fmt", [content.SENML_JSON, content.SENML_CBOR, content.TLV, content.TLV_LEGACY])
def test_writes_use_the_clients_pct(fmt: int) -> None:
    sent = run(BootstrapSession(PLAN, fmt), discover("</>;lwm2m=1.1,</0/1>"))
    writes = [request for request in sent if request.method == "PUT"]
    assert {request.content_format for request in writes} == {fmt}
    server = as_dict(content.decode(fmt, writes[1].payload, writes[1].path, objects.resource_type))
    assert server[Path(1, 0, 16)] is True  # 1.1 client: bootstrap on registration failure


def test_unknown_pct_falls_back_to_tlv_and_415_retries_in_tlv() -> None:
    assert BootstrapSession(PLAN, 11543).write_format == content.TLV
    session = BootstrapSession(PLAN, content.SENML_CBOR)
    refused = []

    def answer(request):
        if request.method == "PUT" and request.content_format == content.SENML_CBOR:
            refused.append(request)
            return Reply("4.15")
        return None

    sent = run(session, discover("</0/1>"), answer)
    writes = [request for request in sent if request.method == "PUT"]
    assert [request.content_format for request in writes] == [content.SENML_CBOR, content.TLV, content.TLV]
    assert len(refused) == 1 and session.written == [Path(0, 0), Path(1, 0)]


def test_without_discover_deletes_objects_and_writes_clear_of_low_ids() -> None:
    session = BootstrapSession(PLAN)
    sent = run(session, Reply("4.04"))
    assert steps(sent)[1:] == ["DELETE /0", "DELETE /1", f"PUT /0/{BLIND_SECURITY_IID}", "PUT /1/0", "POST /bs"]
    assert session.discovery is None
    garbage = BootstrapSession(PLAN)
    assert steps(run(garbage, Reply("2.05", 40, b"\xff\xfe<<")))[1] == "DELETE /0"


def test_every_security_instance_without_ssid_is_protected() -> None:
    found = read_discovery(b'</>;lwm2m="1.0",</0/0>,</0/1>;ssid=101,</0/4>,</1/0>;ssid=101')
    assert found.protected == {0, 4} and found.server_accounts == {1} and found.lwm2m_version == "1.0"
    sent = run(BootstrapSession(PLAN), discover('</0/0>,</0/1>;ssid=101,</0/4>'))
    assert steps(sent)[1:4] == ["DELETE /0/1", "DELETE /1", "PUT /0/1"]


@pytest.mark.parametrize(("step", "code"), [("delete", "4.00"), ("write", "4.00"), ("finish", "4.06")])
def test_a_refusal_fails_the_session_at_its_step(step: str, code: str) -> None:
    session = BootstrapSession(PLAN)

    def answer(request):
        return Reply(code, 0, b"inconsistent configuration") if request.step == step else None

    with pytest.raises(BootstrapFailed) as failed:
        run(session, discover("</0/1>"), answer)
    assert failed.value.step == step and code in failed.value.reason
    if step == "finish":
        assert "inconsistent configuration" in failed.value.reason


def test_delete_of_nothing_is_fine() -> None:
    sent = run(BootstrapSession(PLAN), discover("</0/1>"), lambda request: Reply("4.04") if request.method == "DELETE" else None)
    assert str(sent[-1]) == "POST /bs"


def test_bootstrap_pack_holds_the_same_configuration() -> None:
    values = pack_values(PLAN)
    payload = content.encode(content.SENML_CBOR, values, ROOT)
    back = as_dict(content.decode(content.SENML_CBOR, payload, ROOT))
    assert back[Path(0, BLIND_SECURITY_IID, 0)] == "coap://mgmt.example.com:5683"
    assert back[Path(1, 0, 1)] == 300 and back[Path(1, 0, 0)] == 7


def test_plan_refuses_secure_modes_over_an_unauthenticated_transport() -> None:
    secure = ServerDefinition(id="s2", org_id="o", name="m", address="h", port=5684, uri_scheme="coaps",
                              security_mode=SecurityMode.PSK)
    with pytest.raises(PlanRefused, match="DTLS"):
        build_plan("d", "o", "ep", secure, authenticated=False)
    assert "secret" not in repr(build_plan("d", "o", "ep", DEFINITION, authenticated=False).servers[0])


def test_default_definition_and_uri_forms() -> None:
    default = DeploymentServer("lwm2m.example.net", 5683).listed
    assert default.is_default and default.uri == "coap://lwm2m.example.net:5683"
    assert ServerDefinition(id="x", org_id=None, name="", address="2001:db8::1", port=5684, uri_scheme="coaps").uri == "coaps://[2001:db8::1]:5684"


def test_query_reading_is_lenient() -> None:
    assert read_query(("aid=7", "pct=112", "ep=dev-1", "ep=other")) == read_query(("ep=dev-1", "pct=112"))
    assert read_query(("ep=dev-1", "pct=abc")).preferred_format is None
    assert read_query(("pct=110",)).endpoint is None
    assert read_query(tuple(f"x{i}=1" for i in range(100)) + ("ep=late",)).endpoint is None  # bounded work


def test_loop_lag_rises_when_the_loop_is_blocked_and_decays() -> None:
    import asyncio
    import time

    from pilotboat.coap.load import SHED_LAG_SECONDS, LoopLag

    async def run() -> tuple[float, bool, bool]:
        lag = LoopLag(interval=0.01, decay=0.98)
        lag.start()
        await asyncio.sleep(0.05)
        calm = lag.overloaded
        time.sleep(SHED_LAG_SECONDS + 0.2)  # a blocked loop, as under overload
        await asyncio.sleep(0.005)
        busy = lag.overloaded
        await asyncio.sleep(0.8)
        await lag.close()
        return lag.seconds, calm, busy

    after, calm, busy = asyncio.run(run())
    assert (calm, busy) == (False, True)
    assert after < SHED_LAG_SECONDS  # decays once the loop runs freely again
