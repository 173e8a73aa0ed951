"""The ssh-agent codec (``signd.agent.wire``), with bytes alone.

Key blobs are checked against ``cryptography``'s own OpenSSH encoding, and
signatures by verifying them with ``cryptography`` after taking them apart as
RFC 4253 / 5656 / 8332 / 8709 say.
"""

from __future__ import annotations

import base64
import struct

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from signd.agent import wire
from signd.errors import InvalidArgument


def framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def s(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def string(self) -> bytes:
        (n,) = struct.unpack(">I", self.data[self.pos : self.pos + 4])
        self.pos += 4 + n
        assert self.pos <= len(self.data)
        return self.data[self.pos - n : self.pos]

    def done(self) -> bool:
        return self.pos == len(self.data)


# ---------------------------------------------------------------- framing


def test_messages_come_whole_whatever_the_cuts() -> None:
    stream = framed(b"\x0b") + framed(b"\x0d" + s(b"blob") + s(b"data") + b"\0\0\0\x02")
    for cut in range(len(stream) + 1):
        d = wire.MessageDecoder()
        d.feed(stream[:cut])
        got = list(d.messages())
        d.feed(stream[cut:])
        got += list(d.messages())
        assert got == [b"\x0b", b"\x0d" + s(b"blob") + s(b"data") + b"\0\0\0\x02"]
        assert d.buffered == 0


@pytest.mark.parametrize("length", [0, wire.MAX_MESSAGE + 1, 0xFFFFFFFF])
def test_a_bad_declared_length_is_an_error_at_once(length: int) -> None:
    d = wire.MessageDecoder()
    d.feed(framed(b"\x0b") + struct.pack(">I", length))
    messages = d.messages()
    assert next(messages) == b"\x0b"  # what came before is handed out
    with pytest.raises(wire.AgentWireError):
        next(messages)


def test_the_largest_message_is_taken() -> None:
    d = wire.MessageDecoder()
    body = b"\x11" + b"x" * (wire.MAX_MESSAGE - 1)
    d.feed(framed(body))
    assert list(d.messages()) == [body]


def test_a_partial_message_waits() -> None:
    d = wire.MessageDecoder()
    d.feed(struct.pack(">I", 10) + b"abc")
    assert list(d.messages()) == []
    assert d.buffered == 7


# ---------------------------------------------------------------- parsing


def test_parse_each_kind() -> None:
    assert wire.parse(b"\x0b") == wire.RequestIdentities()
    sign = wire.parse(b"\x0d" + s(b"blob") + s(b"data") + b"\0\0\0\x04")
    assert sign == wire.SignRequest(b"blob", b"data", wire.RSA_SHA2_512)
    ext = wire.parse(b"\x1b" + s(b"query"))
    assert ext == wire.Extension(b"query", b"")
    # An ADD_IDENTITY's contents (a private key) are not even looked at.
    assert wire.parse(b"\x11garbage") == wire.Other(17)
    assert wire.message_name(17) == "add_identity"
    assert wire.message_name(200) == "other"


@pytest.mark.parametrize(
    "body",
    [
        b"\x0bx",  # identities request with contents
        b"\x0d" + s(b"blob"),  # no data
        b"\x0d" + s(b"blob") + s(b"data"),  # no flags
        b"\x0d" + s(b"blob") + s(b"data") + b"\0\0\0\0\0",  # a byte too many
        b"\x0d\0\0\1\0abc",  # a string longer than the message
        b"\x1b\0\0",  # extension name truncated
    ],
)
def test_malformed_messages_are_errors(body: bytes) -> None:
    with pytest.raises(wire.AgentWireError):
        wire.parse(body)


def test_session_bind() -> None:
    contents = s(b"hostkey") + s(b"sid") + s(b"sig") + b"\x01"
    bound = wire.parse_session_bind(contents)
    assert bound == wire.SessionBind(b"hostkey", b"sid", b"sig", True)
    for bad in (contents[:-1], contents + b"\0", b""):
        with pytest.raises(wire.AgentWireError):
            wire.parse_session_bind(bad)


# ---------------------------------------------------------------- answers


def test_answers() -> None:
    assert wire.encode_failure() == framed(b"\x05")
    assert wire.encode_success() == framed(b"\x06")
    assert wire.encode_extension_failure() == framed(b"\x1c")
    ids = wire.encode_identities([wire.Identity(b"B1", "a:v1"), wire.Identity(b"B2", "b:v3")])
    assert ids == framed(b"\x0c\0\0\0\x02" + s(b"B1") + s(b"a:v1") + s(b"B2") + s(b"b:v3"))
    assert wire.encode_identities([]) == framed(b"\x0c\0\0\0\0")
    assert wire.encode_sign_response(b"SIG") == framed(b"\x0e" + s(b"SIG"))
    query = wire.encode_query_response(["query", "session-bind@openssh.com"])
    assert query == framed(b"\x1d" + s(b"query") + s(b"query") + s(b"session-bind@openssh.com"))


@pytest.mark.parametrize(
    ("n", "encoded"),
    [
        (0, b""),
        (1, b"\x01"),
        (0x7F, b"\x7f"),
        (0x80, b"\x00\x80"),
        (0x1234, b"\x12\x34"),
        (0xFFFF, b"\x00\xff\xff"),
    ],
)
def test_mpint(n: int, encoded: bytes) -> None:
    assert wire.mpint(n) == s(encoded)


# ---------------------------------------------------------------- keys


def openssh_blob(key: object) -> bytes:
    line = key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return base64.b64decode(line.split()[1])


@pytest.mark.parametrize(
    "make",
    [
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: ec.generate_private_key(ec.SECP384R1()),
        lambda: ed25519.Ed25519PrivateKey.generate(),
        lambda: rsa.generate_private_key(65537, 2048),
    ],
    ids=["p256", "p384", "ed25519", "rsa"],
)
def test_public_blobs_are_what_openssh_writes(make: object) -> None:
    pub = make().public_key()  # type: ignore[operator]
    assert wire.ssh_public_blob(pub) == openssh_blob(pub)


def test_keys_without_an_ssh_form() -> None:
    assert wire.ssh_public_blob(ec.generate_private_key(ec.SECP256K1()).public_key()) is None
    assert wire.ssh_public_blob(b"not a key") is None


def split_signature(blob: bytes) -> tuple[str, bytes]:
    r = Reader(blob)
    alg, inner = r.string().decode(), r.string()
    assert r.done()
    return alg, inner


@pytest.mark.parametrize(("curve", "size"), [(ec.SECP256R1(), 32), (ec.SECP384R1(), 48)])
def test_ecdsa_signature(curve: ec.EllipticCurve, size: int) -> None:
    priv = ec.generate_private_key(curve)
    h = hashes.SHA256() if size == 32 else hashes.SHA384()
    alg = "ecdsa-sha2-nistp256" if size == 32 else "ecdsa-sha2-nistp384"
    for _ in range(20):  # some r or s with the top bit set, or short
        r, s_ = decode_dss_signature(priv.sign(b"data", ec.ECDSA(h)))
        raw = r.to_bytes(size, "big") + s_.to_bytes(size, "big")
        name, inner = split_signature(wire.ssh_signature(alg, raw))
        assert name == alg
        ir = Reader(inner)
        r2 = int.from_bytes(ir.string(), "big", signed=True)
        s2 = int.from_bytes(ir.string(), "big", signed=True)
        assert ir.done()
        assert (r2, s2) == (r, s_)
        priv.public_key().verify(encode_dss_signature(r2, s2), b"data", ec.ECDSA(h))


def test_ed25519_and_rsa_signatures() -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    sig = ed.sign(b"data")
    assert split_signature(wire.ssh_signature("ssh-ed25519", sig)) == ("ssh-ed25519", sig)
    key = rsa.generate_private_key(65537, 2048)
    for alg, h in (("rsa-sha2-256", hashes.SHA256()), ("rsa-sha2-512", hashes.SHA512())):
        sig = key.sign(b"data", padding.PKCS1v15(), h)
        name, inner = split_signature(wire.ssh_signature(alg, sig))
        assert name == alg
        key.public_key().verify(inner, b"data", padding.PKCS1v15(), h)


@pytest.mark.parametrize(
    ("alg", "sig"),
    [
        ("ssh-rsa", b"x" * 256),  # SHA-1: never
        ("ssh-ed25519", b"x" * 63),
        ("ecdsa-sha2-nistp256", b"x" * 63),
        ("ecdsa-sha2-nistp256", b""),
        ("rsa-sha2-256", b""),
    ],
)
def test_signatures_of_the_wrong_shape_are_refused(alg: str, sig: bytes) -> None:
    with pytest.raises(InvalidArgument):
        wire.ssh_signature(alg, sig)
