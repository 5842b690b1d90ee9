"""The DTLS transport against real peers over loopback: libcoap's OpenSSL and GnuTLS clients and a
python-mbedtls client."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket

import aiocoap
import pytest
from aiocoap.numbers.codes import GET

from pilotboat.dtls import records
from pilotboat.dtls.engine import ServerCredentials
from pilotboat.dtls.mbedtls_engine import CERTIFICATE_SUITES, PSK_SUITES
from pilotboat.dtls.transport import Limits
from dtls_helpers import PSK_IDENTITY, PSK_KEY, MbedtlsClient, Pki, coap_client, dtls_server, psk_credentials

LIBCOAP = [name for name in ("coap-client-openssl", "coap-client-gnutls") if shutil.which(name)]
needs_libcoap = pytest.mark.skipif(os.environ.get("CI") != "true" and not LIBCOAP, reason="libcoap clients missing")


def run(coroutine: object) -> None:
    asyncio.run(coroutine)  # type: ignore[arg-type]


def certificate_credentials(material: Pki, verdicts: list[tuple[bytes, ...]] | None = None, accept: bool = True) -> ServerCredentials:
    async def accept_chain(chain: tuple[bytes, ...]) -> bool:
        if verdicts is not None:
            verdicts.append(chain)
        return accept

    return ServerCredentials(
        certificate_chain=material.server_chain, private_key=material.server_key_der(),
        trust_anchors=material.anchors, accept_chain=accept_chain,
    )


@needs_libcoap
@pytest.mark.parametrize("client", LIBCOAP)
def test_libcoap_psk(client: str) -> None:
    async def scenario() -> None:
        lookups: list[bytes] = []
        async with dtls_server(psk_credentials(lookups=lookups)) as (_, transport, who, port):
            code, out = await coap_client(client, port, "-u", PSK_IDENTITY.decode(), "-k", PSK_KEY.decode())
            assert out.strip().endswith(PSK_IDENTITY.decode()), out
            assert lookups == [PSK_IDENTITY]
            assert who.requests[0].remote.peer_identity.psk_identity == PSK_IDENTITY

            code, out = await coap_client(client, port, "-u", PSK_IDENTITY.decode(), "-k", "wrong-key-0123456", timeout=2)
            assert PSK_IDENTITY.decode() not in out
            code, out = await coap_client(client, port, "-u", "nobody", "-k", PSK_KEY.decode(), timeout=2)
            assert "nobody" not in out and len(who.requests) == 1
            assert lookups == [PSK_IDENTITY, PSK_IDENTITY, b"nobody"]
            assert transport.session_count == 0  # the good client said goodbye; the failed ones left nothing
    run(scenario())


@needs_libcoap
@pytest.mark.parametrize("client", LIBCOAP)
def test_libcoap_x509(client: str, tmp_path) -> None:
    async def scenario() -> None:
        material, stranger = Pki("Trusted"), Pki("Stranger")
        verdicts: list[tuple[bytes, ...]] = []
        async with dtls_server(certificate_credentials(material, verdicts)) as (_, transport, who, port):
            files = material.write_client_files(tmp_path)
            code, out = await coap_client(client, port, "-c", str(files["cert"]), "-j", str(files["key"]), "-n")
            assert out.strip().endswith(f"chain:{len(verdicts[0])}"), out
            assert len(verdicts) == 1 and verdicts[0][0] == material.client_chain[0]
            assert who.requests[0].remote.peer_identity.certificate_chain == verdicts[0]

            other = tmp_path / "stranger"
            other.mkdir()
            files = stranger.write_client_files(other)
            code, out = await coap_client(client, port, "-c", str(files["cert"]), "-j", str(files["key"]), "-n", timeout=2)
            assert "chain:" not in out and len(who.requests) == 1
    run(scenario())


@needs_libcoap
def test_libcoap_x509_refused_by_callback(tmp_path) -> None:
    async def scenario() -> None:
        material = Pki()
        async with dtls_server(certificate_credentials(material, accept=False)) as (_, transport, who, port):
            files = material.write_client_files(tmp_path)
            code, out = await coap_client(LIBCOAP[0], port, "-c", str(files["cert"]), "-j", str(files["key"]), "-n", timeout=2)
            assert "chain:" not in out and who.requests == [] and transport.session_count == 0
    run(scenario())


def test_identity_and_server_to_client_request() -> None:
    async def scenario() -> None:
        material = Pki()
        both = ServerCredentials(
            psk_for=psk_credentials().psk_for, certificate_chain=material.server_chain,
            private_key=material.server_key_der(), trust_anchors=material.anchors,
        )
        async with dtls_server(both) as (context, transport, who, port):
            psk_client, cert_client = MbedtlsClient.psk(), MbedtlsClient.certificate(material)
            await psk_client.connect(port)
            await cert_client.connect(port)
            for client, expected in ((psk_client, PSK_IDENTITY), (cert_client, b"chain:2")):
                for _ in range(2):
                    answer = await client.request(aiocoap.Message(code=GET, uri_path=["who"]))
                    assert answer.payload == expected
            assert [r.remote.peer_identity.psk_identity for r in who.requests] == [PSK_IDENTITY] * 2 + [None] * 2
            assert who.requests[3].remote.peer_identity.certificate_chain == material.client_chain

            # The server asks the client over the stored session; the client answers.
            remote = who.requests[0].remote
            outgoing = aiocoap.Message(code=GET, uri_path=["3", "0", "0"])
            outgoing.remote = remote
            pending = asyncio.ensure_future(context.request(outgoing).response)
            raw = await asyncio.wait_for(psk_client.received.get(), 5)
            request = aiocoap.Message.decode(raw)
            assert request.opt.uri_path == ("3", "0", "0")
            reply = aiocoap.Message(code=aiocoap.CONTENT, payload=b"Pilotboat")
            reply.mtype, reply.mid, reply.token = aiocoap.ACK, request.mid, request.token
            psk_client.send_message(reply)
            response = await asyncio.wait_for(pending, 5)
            assert response.payload == b"Pilotboat" and response.remote is remote
            psk_client.close()
            cert_client.close()
    run(scenario())


@pytest.mark.parametrize("suite", PSK_SUITES + CERTIFICATE_SUITES)
def test_every_offered_suite(suite: str) -> None:
    async def scenario() -> None:
        material = Pki()
        both = ServerCredentials(
            psk_for=psk_credentials().psk_for, certificate_chain=material.server_chain,
            private_key=material.server_key_der(), trust_anchors=material.anchors,
        )
        async with dtls_server(both) as (context, transport, who, port):
            client = MbedtlsClient.psk(suite=suite) if "PSK" in suite else MbedtlsClient.certificate(material, suite)
            await client.connect(port)
            assert client.cipher_suite == suite
            answer = await client.request(aiocoap.Message(code=GET, uri_path=["who"]))
            assert answer.payload == (PSK_IDENTITY if "PSK" in suite else b"chain:2")
            client.close()
    run(scenario())


def test_new_client_hello_from_known_address_starts_fresh_session() -> None:
    async def scenario() -> None:
        async with dtls_server(psk_credentials()) as (context, transport, who, port):
            first = MbedtlsClient.psk()
            await first.connect(port)
            await first.request(aiocoap.Message(code=GET, uri_path=["who"]))
            local_port = first.local_port
            first.close()
            await asyncio.sleep(0.05)
            second = MbedtlsClient.psk()  # a restarted client on the same port
            await second.connect(port, local_port=local_port)
            answer = await second.request(aiocoap.Message(code=GET, uri_path=["who"]))
            assert answer.payload == PSK_IDENTITY
            assert transport.session_count == 1
            assert who.requests[0].remote is not who.requests[1].remote
            assert not await transport.recognize_remote(who.requests[0].remote)
            second.close()
    run(scenario())


def test_session_cap_and_idle_eviction() -> None:
    async def scenario() -> None:
        limits = Limits(max_sessions=2, idle_timeout=0.6, handshake_timeout=2.0)
        async with dtls_server(psk_credentials(), limits) as (context, transport, who, port):
            clients = [MbedtlsClient.psk() for _ in range(3)]
            for client in clients:
                await client.connect(port)
            assert transport.session_count == 2  # the least recently active one made room
            answer = await clients[2].request(aiocoap.Message(code=GET, uri_path=["who"]))
            assert answer.payload == PSK_IDENTITY
            await asyncio.sleep(1.2)
            assert transport.session_count == 0
            for client in clients:
                client.close()
    run(scenario())


def test_hello_flood_and_garbage_keep_no_state_and_do_not_stop_service() -> None:
    async def scenario() -> None:
        async with dtls_server(psk_credentials()) as (context, transport, who, port):
            client = MbedtlsClient.psk()
            await client.connect(port)
            client_hello = MbedtlsClient.psk().first_flight()
            senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(200)]
            try:
                for index, sender in enumerate(senders):
                    sender.sendto(client_hello, ("127.0.0.1", port))
                    sender.sendto(os.urandom(index % 90 + 1), ("127.0.0.1", port))
                    sender.sendto(b"\x16\xfe\xfd" + os.urandom(60), ("127.0.0.1", port))
                    if index % 50 == 0:
                        answer = await client.request(aiocoap.Message(code=GET, uri_path=["who"]))
                        assert answer.payload == PSK_IDENTITY
                await asyncio.sleep(0.2)
                assert transport.session_count == 1
                answer = await client.request(aiocoap.Message(code=GET, uri_path=["who"]))
                assert answer.payload == PSK_IDENTITY
                # Every flooding port got a HelloVerifyRequest and nothing else.
                senders[0].settimeout(1)
                reply = senders[0].recv(2048)
                assert reply[0] == 22 and reply[13] == 3  # handshake record, hello_verify_request
            finally:
                for sender in senders:
                    sender.close()
            client.close()
    run(scenario())


def test_lost_flight_is_retransmitted_in_mtu_sized_datagrams() -> None:
    async def scenario() -> None:
        material = Pki()
        async with dtls_server(certificate_credentials(material)) as (context, transport, who, port):
            client = MbedtlsClient.certificate(material)
            client.lose_first_flight_for = 0.5
            await client.connect(port, timeout=6)
            flights = [data for _, data in client.datagrams if data[0] == 22 and data[13] == 2]
            assert len(flights) >= 2  # the ServerHello came again after the loss
            first_at = next(at for at, data in client.datagrams if data[0] == 22 and data[13] == 2)
            again_at = [at for at, data in client.datagrams if data[0] == 22 and data[13] == 2][1]
            assert 0.7 < again_at - first_at < 3.0
            assert all(len(data) <= 1200 for _, data in client.datagrams)
            assert max(len(data) for _, data in client.datagrams) > 1000  # the certificate flight needed the room
            answer = await client.request(aiocoap.Message(code=GET, uri_path=["who"]))
            assert answer.payload.startswith(b"chain:")
            client.close()
    run(scenario())


def test_forged_datagrams_to_a_session_do_not_break_it() -> None:
    async def scenario() -> None:
        async with dtls_server(psk_credentials()) as (context, transport, who, port):
            client = MbedtlsClient.psk()
            await client.connect(port)
            assert client._socket is not None
            for size in (1, 12, 13, 40, 300):
                client._socket.sendto(os.urandom(size))
                client._socket.sendto(b"\x17\xfe\xfd\x00\x01" + os.urandom(6) + size.to_bytes(2, "big") + os.urandom(size))
            client._socket.sendto(b"\x15\xfe\xfd\x00\x01" + os.urandom(6) + b"\x00\x02\x02\x28")  # a forged alert
            client._socket.sendto(client.last_hello)  # a replayed copy of the hello that opened the session
            await asyncio.sleep(0.1)
            answer = await client.request(aiocoap.Message(code=GET, uri_path=["who"]))
            assert answer.payload == PSK_IDENTITY and transport.session_count == 1
            client.close()
    run(scenario())


def test_credentials_must_be_complete() -> None:
    material = Pki()
    with pytest.raises(ValueError, match="PSK lookup or a server certificate"):
        ServerCredentials()
    with pytest.raises(ValueError, match="private key"):
        ServerCredentials(certificate_chain=material.server_chain, trust_anchors=material.anchors)
    with pytest.raises(ValueError, match="trust anchors"):
        ServerCredentials(certificate_chain=material.server_chain, private_key=material.server_key_der())
    assert "secret" not in repr(psk_credentials())


def _handshake_record(msg_type: int, seq: int, total: int, offset: int, body: bytes) -> bytes:
    fragment = bytes([msg_type]) + total.to_bytes(3, "big") + seq.to_bytes(2, "big") + offset.to_bytes(3, "big")
    fragment += len(body).to_bytes(3, "big") + body
    return b"\x16\xfe\xfd\x00\x00" + seq.to_bytes(6, "big") + len(fragment).to_bytes(2, "big") + fragment


def test_record_helpers() -> None:
    chain = (b"\x30\x82leaf-der", b"\x30\x82ca-der")
    body = b"".join(len(der).to_bytes(3, "big") + der for der in chain)
    message = len(body).to_bytes(3, "big") + body
    reader = records.HandshakeReader()
    # A fragmented Certificate message, its halves in reverse order, the second half sent twice.
    half = len(message) // 2
    assert reader.feed(_handshake_record(records.CERTIFICATE, 3, len(message), half, message[half:])) == []
    assert reader.feed(_handshake_record(records.CERTIFICATE, 3, len(message), half, message[half:])) == []
    done = reader.feed(_handshake_record(records.CERTIFICATE, 3, len(message), 0, message[:half]))
    assert done == [(records.CERTIFICATE, message)] and records.certificate_chain(message) == chain
    assert reader.feed(_handshake_record(records.CERTIFICATE, 3, len(message), 0, message)) == []  # already done
    assert records.certificate_chain(message[:-1]) is None and records.certificate_chain(b"\x00\x00\x05\x00\x00\x09ab") is None

    identity = b"device-7"
    exchange = len(identity).to_bytes(2, "big") + identity
    assert reader.feed(_handshake_record(records.CLIENT_KEY_EXCHANGE, 4, len(exchange), 0, exchange)) == [
        (records.CLIENT_KEY_EXCHANGE, exchange)
    ]
    assert records.psk_identity(exchange) == identity
    assert records.psk_identity(b"\x41\x04" + bytes(63)) is None  # an ECDHE public key, not an identity

    # Partial messages held per peer are bounded, and other handshake messages are not collected.
    bounded = records.HandshakeReader()
    for seq in range(10, 20):
        bounded.feed(_handshake_record(records.CERTIFICATE, seq, 16_000, 0, b"x"))
    bounded.feed(_handshake_record(20, 30, 16_000, 0, b"x"))
    assert len(bounded._fragments) == records.MAX_PARTIAL_MESSAGES

    stream = b"".join(_handshake_record(records.CERTIFICATE, seq, 500, 0, bytes(500)) for seq in range(5))
    datagrams = records.pack_datagrams(stream + b"\x16\xfe", 1200)
    assert [len(d) for d in datagrams] == [1050, 1050, 525] and b"".join(datagrams) == stream
