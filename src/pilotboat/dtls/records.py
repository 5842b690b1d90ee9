"""Just enough of the DTLS 1.2 record layer (RFC 6347) to route datagrams before any engine sees them.

Only plaintext (epoch 0) handshake messages are ever looked into: whether a datagram opens with a
ClientHello, and the PSK identity and certificate chain a client sends in its second flight, so that the
transport can look them up asynchronously before the engine needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RECORD_HEADER = 13
HANDSHAKE_HEADER = 12
CONTENT_HANDSHAKE = 22
CLIENT_HELLO = 1
CERTIFICATE = 11
CLIENT_KEY_EXCHANGE = 16
#: A handshake message larger than this is not reassembled (a chain of a few certificates fits easily).
MAX_HANDSHAKE_MESSAGE = 16_384
#: Messages reassembled at once per peer; only Certificate and ClientKeyExchange are collected.
MAX_PARTIAL_MESSAGES = 2
_COLLECTED = frozenset({CERTIFICATE, CLIENT_KEY_EXCHANGE})


@dataclass(frozen=True)
class Record:
    content_type: int
    epoch: int
    fragment: bytes


def split_records(data: bytes) -> list[Record]:
    """The records of a datagram or of an engine's output stream; a truncated tail is ignored."""
    return [Record(chunk[0], int.from_bytes(chunk[3:5], "big"), chunk[RECORD_HEADER:]) for chunk in record_chunks(data)]


def record_chunks(data: bytes) -> list[bytes]:
    """``data`` cut at record boundaries (each item one whole record, header included)."""
    chunks: list[bytes] = []
    offset = 0
    while offset + RECORD_HEADER <= len(data):
        end = offset + RECORD_HEADER + int.from_bytes(data[offset + 11:offset + 13], "big")
        if end > len(data):
            break
        chunks.append(data[offset:end])
        offset = end
    return chunks


def pack_datagrams(stream: bytes, mtu: int) -> list[bytes]:
    """Whole records from an engine's output packed into datagrams of at most ``mtu`` bytes (a record
    longer than that travels alone)."""
    datagrams: list[bytes] = []
    current = b""
    for chunk in record_chunks(stream):
        if current and len(current) + len(chunk) > mtu:
            datagrams.append(current)
            current = b""
        current += chunk
    if current:
        datagrams.append(current)
    return datagrams


def opens_with_client_hello(datagram: bytes) -> bool:
    """True when the first record is a plaintext handshake record carrying (the start of) a ClientHello."""
    return (
        len(datagram) >= RECORD_HEADER + HANDSHAKE_HEADER
        and datagram[0] == CONTENT_HANDSHAKE
        and datagram[1] == 0xFE
        and datagram[3:5] == b"\x00\x00"
        and datagram[RECORD_HEADER] == CLIENT_HELLO
    )


def client_hello_random(datagram: bytes) -> bytes:
    """The client random of the ClientHello opening ``datagram`` (same in a retransmission and in the
    hello that answers a HelloVerifyRequest, new when a client starts over)."""
    start = RECORD_HEADER + HANDSHAKE_HEADER + 2
    return datagram[start:start + 32]


@dataclass
class HandshakeReader:
    """Reassembles the Certificate and ClientKeyExchange messages a client sends in plaintext, by message
    sequence number; at most ``MAX_PARTIAL_MESSAGES`` incomplete ones are held."""

    _fragments: dict[int, tuple[int, int, bytearray, set[int]]] = field(default_factory=dict)
    _done: set[int] = field(default_factory=set)

    def feed(self, datagram: bytes) -> list[tuple[int, bytes]]:
        """Handshake messages (type, body) completed by this datagram."""
        completed: list[tuple[int, bytes]] = []
        for record in split_records(datagram):
            if record.content_type != CONTENT_HANDSHAKE or record.epoch != 0:
                continue
            fragment = record.fragment
            while len(fragment) >= HANDSHAKE_HEADER:
                msg_type = fragment[0]
                length = int.from_bytes(fragment[1:4], "big")
                seq = int.from_bytes(fragment[4:6], "big")
                offset = int.from_bytes(fragment[6:9], "big")
                size = int.from_bytes(fragment[9:12], "big")
                body = fragment[HANDSHAKE_HEADER:HANDSHAKE_HEADER + size]
                fragment = fragment[HANDSHAKE_HEADER + size:]
                if (
                    msg_type not in _COLLECTED or len(body) != size or offset + size > length
                    or length > MAX_HANDSHAKE_MESSAGE or seq in self._done
                    or (seq not in self._fragments and len(self._fragments) >= MAX_PARTIAL_MESSAGES)
                ):
                    continue
                entry = self._fragments.setdefault(seq, (msg_type, length, bytearray(length), set()))
                if entry[0] != msg_type or entry[1] != length:
                    continue
                entry[2][offset:offset + size] = body
                entry[3].update(range(offset, offset + size))
                if len(entry[3]) == length:
                    del self._fragments[seq]
                    self._done.add(seq)
                    completed.append((msg_type, bytes(entry[2])))
        return completed


def psk_identity(client_key_exchange: bytes) -> bytes | None:
    """The identity of a plain-PSK ClientKeyExchange body (``opaque psk_identity<0..2^16-1>`` filling the
    body exactly); None for other key exchanges."""
    if len(client_key_exchange) < 2:
        return None
    length = int.from_bytes(client_key_exchange[:2], "big")
    return client_key_exchange[2:] if len(client_key_exchange) == 2 + length else None


def certificate_chain(certificate_message: bytes) -> tuple[bytes, ...] | None:
    """The DER certificates of a Certificate message body, leaf first; None when malformed."""
    if len(certificate_message) < 3 or int.from_bytes(certificate_message[:3], "big") != len(certificate_message) - 3:
        return None
    chain: list[bytes] = []
    offset = 3
    while offset < len(certificate_message):
        if offset + 3 > len(certificate_message):
            return None
        length = int.from_bytes(certificate_message[offset:offset + 3], "big")
        offset += 3
        if length == 0 or offset + length > len(certificate_message):
            return None
        chain.append(certificate_message[offset:offset + length])
        offset += length
    return tuple(chain)
