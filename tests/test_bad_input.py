"""Bad input gets its documented error, and the daemon goes on serving.

Malformed frames are built by hand (``struct`` + ``msgpack``) and sent over a
raw socket, because the client library would refuse to send them.  Every test
runs with a *bystander*: a connection opened before the bad input, used again
after it, and a background thread signing without pause the whole time.  Both
must see no error at all.
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from signd_client.errors import (
    InvalidArgument,
    InvalidDigest,
    KeyExists,
    KeyNotFound,
    UnsupportedAlgorithm,
    VersionNotFound,
)
from support import open_sockets, wait_until_released

if TYPE_CHECKING:
    from conftest import Daemon  # the root conftest.py

HEADER = struct.Struct(">I")
ECPublicKey = ec.EllipticCurvePublicKey
MAX_FRAME = 1 << 20  # the documented default limit


def body_frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def frame(obj: Any) -> bytes:
    return body_frame(msgpack.packb(obj, use_bin_type=True))


def request(rid: int, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"v": 1, "id": rid, "op": op, "args": {} if args is None else args}


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None on a clean EOF before the first byte."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            assert not buf, f"EOF in the middle of a frame ({len(buf)} of {n} bytes)"
            return None
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket) -> dict[str, Any] | None:
    """The next response frame as a map, or None at EOF."""
    head = recv_exact(sock, 4)
    if head is None:
        return None
    (length,) = HEADER.unpack(head)
    body = recv_exact(sock, length)
    assert body is not None, "EOF after a frame header"
    obj = msgpack.unpackb(body, raw=False)
    assert isinstance(obj, dict), obj
    assert obj.get("v") == 1, obj
    return obj


def expect_error(resp: dict[str, Any] | None, code: int, name: str, rid: int | None) -> str:
    """Check a wire error ``{code, name, message}``; return the message."""
    assert resp is not None, "the daemon closed the connection instead of answering"
    assert "result" not in resp, resp
    assert resp["id"] == rid, resp
    err = resp["error"]
    assert (err["code"], err["name"]) == (code, name), err
    assert isinstance(err["message"], str), err
    assert err["message"], err
    assert "Traceback" not in err["message"]
    return err["message"]


def expect_result(resp: dict[str, Any] | None, rid: int) -> dict[str, Any]:
    assert resp is not None, "the daemon closed the connection instead of answering"
    assert "error" not in resp, resp
    assert resp["id"] == rid, resp
    result = resp["result"]
    assert isinstance(result, dict)
    return result


def still_works(sock: socket.socket, rid: int = 424242) -> None:
    """The same connection answers a valid request after the bad one."""
    sock.sendall(frame(request(rid, "health")))
    assert expect_result(read_frame(sock), rid)["ready"] is True


# --------------------------------------------------------------------------
# Keys, the bystander and the background signer


@dataclass(frozen=True)
class Keys:
    ec: str
    ec_public: ECPublicKey
    ed: str
    rsa: str

    def resolve(self, value: Any) -> Any:
        """Replace the placeholders "$EC", "$ED" and "$RSA" by this module's key names."""
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if isinstance(value, str):
            return {"$EC": self.ec, "$ED": self.ed, "$RSA": self.rsa}.get(value, value)
        return value

    def verify(self, signature: bytes, message: bytes) -> None:
        self.ec_public.verify(signature, message, ec.ECDSA(hashes.SHA256()))


@pytest.fixture(scope="module")
def keys(signd: Daemon) -> Keys:
    tag = uuid.uuid4().hex[:8]
    with signd.client() as c:
        ec_info = c.create_key(f"bad-ec-{tag}", "ec-p256")
        ed_info = c.create_key(f"bad-ed-{tag}", "ed25519")
        rsa_info = c.create_key(f"bad-rsa-{tag}", "rsa-2048")
    public = serialization.load_pem_public_key(ec_info.versions[0].public_key_pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return Keys(ec_info.name, public, ed_info.name, rsa_info.name)


class Bystander:
    """A raw connection opened before the bad input; it must keep being served."""

    def __init__(self, daemon: Daemon, keys: Keys) -> None:
        self.daemon = daemon
        self.sock = daemon.connect_raw()
        self.keys = keys
        self.next_id = 1
        self.answered = 0

    def check(self) -> None:
        rid = self.next_id
        self.next_id += 1
        msg = f"bystander {rid}".encode()
        try:
            self.sock.sendall(frame(request(rid, "sign", {"key": self.keys.ec, "message": msg})))
            resp = read_frame(self.sock)
        except OSError as exc:
            resp = None
            broken = repr(exc)
        else:
            broken = "EOF"
        if resp is None:
            assert self.daemon.proc is not None
            pytest.fail(
                f"the bystander connection broke ({broken}); signd exit code "
                f"{self.daemon.proc.poll()}; end of its log:\n{self.daemon.logs()[-4000:]}"
            )
        result = expect_result(resp, rid)
        self.keys.verify(result["signature"], msg)
        self.answered += 1


class BackgroundSigner(threading.Thread):
    """Signs (and independently verifies) without pause until stopped."""

    def __init__(self, daemon: Daemon, keys: Keys) -> None:
        super().__init__(name="background-signer", daemon=True)
        self.client = daemon.client(timeout=10.0, retries=0)
        self.keys = keys
        self.stopping = threading.Event()
        self.progress = threading.Condition()
        self.ok = 0
        self.errors: list[str] = []

    def run(self) -> None:
        i = 0
        with self.client as c:
            while not self.stopping.is_set():
                i += 1
                msg = f"background {i}".encode()
                try:
                    self.keys.verify(c.sign(self.keys.ec, msg).signature, msg)
                except Exception as exc:
                    with self.progress:
                        self.errors.append(repr(exc))
                        self.progress.notify_all()
                    return
                with self.progress:
                    self.ok += 1
                    self.progress.notify_all()

    def wait_for(self, count: int, timeout: float = 20.0) -> None:
        """Wait until ``count`` signatures succeeded (or one failed)."""
        with self.progress:
            self.progress.wait_for(lambda: self.ok >= count or bool(self.errors), timeout)
            assert not self.errors, self.errors
            assert self.ok >= count, f"background signer stalled at {self.ok}"

    def stop(self) -> None:
        self.stopping.set()
        self.join(20.0)
        assert not self.is_alive()


@contextlib.contextmanager
def served_throughout(daemon: Daemon, keys: Keys) -> Iterator[Bystander]:
    """A bystander connection and a signing thread that must see no error at all."""
    b = Bystander(daemon, keys)
    signer = BackgroundSigner(daemon, keys)
    try:
        b.check()
        signer.start()
        signer.wait_for(1)
        yield b
        # The signer still makes progress after the bad input, and never failed.
        signer.wait_for(signer.ok + 3)
        b.check()
    finally:
        if signer.ident is not None:
            signer.stop()
        b.sock.close()
    assert signer.errors == []
    assert b.answered >= 2
    assert daemon.proc is not None
    assert daemon.proc.poll() is None, "signd died"
    check_log(daemon)


def check_log(daemon: Daemon) -> None:
    """The daemon's log is JSON lines (no stray traceback) and never shows the PIN."""
    text = daemon.logs()
    assert daemon.token.pin not in text, "the PIN appears in the daemon's log"
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"a log line is not JSON: {line!r}\n{text[-4000:]}")
        assert {"ts", "level", "msg"} <= record.keys(), line


@pytest.fixture(autouse=True)
def bystander(signd: Daemon, keys: Keys) -> Iterator[Bystander]:
    """Every test here runs with the shared daemon serving others throughout."""
    with served_throughout(signd, keys) as b:
        yield b


@pytest.fixture
def raw(signd: Daemon) -> Iterator[socket.socket]:
    s = signd.connect_raw()
    yield s
    s.close()


# --------------------------------------------------------------------------
# Frames that cannot be decoded: code 100, id nil, the connection goes on

VALID_BODY = msgpack.packb(request(1, "health"), use_bin_type=True)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\x85\xa1v\x01\xa2id", id="truncated-map"),
        pytest.param(VALID_BODY[:-1], id="truncated-request"),
        pytest.param(VALID_BODY + b"\x00", id="trailing-bytes"),
        pytest.param(b"\xa5abc", id="short-str"),
        pytest.param(b"", id="empty-body"),
    ],
)
def test_malformed_msgpack(raw: socket.socket, bystander: Bystander, body: bytes) -> None:
    raw.sendall(body_frame(body))
    msg = expect_error(read_frame(raw), 100, "malformed_frame", None)
    assert "msgpack" in msg
    still_works(raw)  # the frame boundary was intact: this connection resynchronised
    bystander.check()


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param([1, 2, 3], id="array"),
        pytest.param("hello", id="str"),
        pytest.param(42, id="int"),
        pytest.param(None, id="nil"),
        pytest.param(b"\x01\x02", id="bin"),
    ],
)
def test_body_not_a_map(raw: socket.socket, bystander: Bystander, obj: Any) -> None:
    raw.sendall(frame(obj))
    expect_error(read_frame(raw), 100, "malformed_frame", None)
    still_works(raw)
    bystander.check()


def test_map_with_non_string_keys(raw: socket.socket, bystander: Bystander) -> None:
    raw.sendall(frame({1: 2, "v": 1, "id": 3}))
    expect_error(read_frame(raw), 100, "malformed_frame", None)
    still_works(raw)
    bystander.check()


def test_several_bad_frames_in_one_write(raw: socket.socket, bystander: Bystander) -> None:
    raw.sendall(
        body_frame(b"\xc1")
        + frame([1])
        + frame(request(5, "health"))
        + frame(request(6, "no_such_op"))
    )
    answers = [read_frame(raw) for _ in range(4)]
    by_id = collections.defaultdict(list)
    for a in answers:
        assert a is not None
        by_id[a["id"]].append(a)
    assert sorted(a["error"]["code"] for a in by_id[None]) == [100, 100]
    expect_result(by_id[5][0], 5)
    expect_error(by_id[6][0], 103, "unknown_operation", 6)
    bystander.check()


# --------------------------------------------------------------------------
# Oversized frames: code 101, id nil, then only this connection is closed


def test_oversized_frame_closes_only_that_connection(
    signd: Daemon, raw: socket.socket, bystander: Bystander
) -> None:
    raw.sendall(HEADER.pack(MAX_FRAME + 1))
    msg = expect_error(read_frame(raw), 101, "frame_too_large", None)
    assert str(MAX_FRAME + 1) in msg
    assert read_frame(raw) is None  # EOF: the stream cannot be resynchronised
    bystander.check()
    with signd.client() as c:  # new connections are still accepted
        assert c.health().ready


def test_huge_length_prefix(raw: socket.socket, bystander: Bystander) -> None:
    raw.sendall(HEADER.pack(0xFFFFFFFF) + b"\x00" * 16)
    expect_error(read_frame(raw), 101, "frame_too_large", None)
    try:
        assert read_frame(raw) is None
    except ConnectionResetError:
        pass  # also a close: the daemon dropped bytes it never read
    bystander.check()


def test_frame_at_the_limit_is_accepted(raw: socket.socket, keys: Keys) -> None:
    """A frame of exactly 1 MiB is not too large; it is an ordinary request."""

    def body(message: bytes) -> bytes:
        return msgpack.packb(request(9, "sign", {"key": keys.ec, "message": message}))

    overhead = len(body(b"m" * 70_000)) - 70_000  # with a bin 32 header, as below
    message = b"m" * (MAX_FRAME - overhead)
    assert len(body(message)) == MAX_FRAME
    raw.sendall(body_frame(body(message)))
    keys.verify(expect_result(read_frame(raw), 9)["signature"], message)


# --------------------------------------------------------------------------
# Envelope and argument errors: raw requests, documented codes

# (op, args, code, name, words the message must contain)
ENVELOPE_CASES = [
    pytest.param(
        {"v": 2, "id": 7, "op": "health", "args": {}},
        102,
        "unsupported_version",
        7,
        "2",
        id="protocol-version-2",
    ),
    pytest.param(
        {"id": 7, "op": "health", "args": {}},
        102,
        "unsupported_version",
        7,
        "version",
        id="protocol-version-missing",
    ),
    pytest.param(
        {"v": "1", "id": 7, "op": "health", "args": {}},
        102,
        "unsupported_version",
        7,
        "1",
        id="protocol-version-str",
    ),
    pytest.param(
        request(8, "launch_missiles"),
        103,
        "unknown_operation",
        8,
        "launch_missiles",
        id="unknown-op",
    ),
    pytest.param(
        {"v": 1, "op": "health", "args": {}},
        104,
        "invalid_request",
        None,
        "id",
        id="id-missing",
    ),
    pytest.param(
        {"v": 1, "id": -1, "op": "health", "args": {}},
        104,
        "invalid_request",
        None,
        "id",
        id="id-negative",
    ),
    pytest.param(
        {"v": 1, "id": "9", "op": "health", "args": {}},
        104,
        "invalid_request",
        None,
        "id",
        id="id-str",
    ),
    pytest.param(
        {"v": 1, "id": 9, "op": 3, "args": {}},
        104,
        "invalid_request",
        9,
        "op",
        id="op-int",
    ),
    pytest.param(
        {"v": 1, "id": 9, "op": "health", "args": {}, "extra": 1},
        104,
        "invalid_request",
        9,
        "extra",
        id="unknown-envelope-field",
    ),
    pytest.param(
        {"v": 1, "id": 9, "op": "sign", "args": ["$EC"]},
        200,
        "invalid_argument",
        9,
        "args",
        id="args-not-a-map",
    ),
]


@pytest.mark.parametrize(("obj", "code", "name", "rid", "needle"), ENVELOPE_CASES)
def test_bad_envelope(
    raw: socket.socket,
    bystander: Bystander,
    keys: Keys,
    obj: dict[str, Any],
    code: int,
    name: str,
    rid: int | None,
    needle: str,
) -> None:
    raw.sendall(frame(keys.resolve(obj)))
    msg = expect_error(read_frame(raw), code, name, rid)
    assert needle in msg
    still_works(raw)
    bystander.check()


#: The documented name of each wire error code.
NAMES = {
    100: "malformed_frame",
    101: "frame_too_large",
    102: "unsupported_version",
    103: "unknown_operation",
    104: "invalid_request",
    200: "invalid_argument",
    201: "invalid_digest",
    202: "unsupported_algorithm",
    300: "key_not_found",
    301: "version_not_found",
    302: "key_exists",
}

D32 = bytes(range(32))
SIG = b"not a signature"
# (op, args, code, a word the message must contain, e.g. the field's name)
# fmt: off
ARG_CASES: list[tuple[str, dict[str, Any], int, str]] = [
    # wrong field types: 200, and the message names the field
    ("sign", {"key": 5, "message": b"x"}, 200, "key"),
    ("sign", {"key": "$EC", "digest": D32.hex(), "hash": "sha256"}, 200, "digest"),
    ("sign", {"key": "$EC", "message": "text, not bin"}, 200, "message"),
    ("sign", {"key": "$EC", "message": b"x", "hash": 256}, 200, "hash"),
    ("verify", {"key": "$EC", "message": b"x", "signature": "sig"}, 200, "signature"),
    ("public_key", {"key": "$EC", "version": "1"}, 200, "version"),
    ("create_key", {"key": "x", "type": 256}, 200, "type"),
    # missing and unknown fields
    ("sign", {"message": b"x"}, 200, "key"),
    ("verify", {"key": "$EC", "message": b"x"}, 200, "signature"),
    ("create_key", {"key": "x"}, 200, "type"),
    ("sign", {"key": "$EC", "message": b"x", "colour": "red"}, 200, "colour"),
    ("health", {"verbose": True}, 200, "verbose"),
    # message, digest and options that do not fit the request or the key
    ("sign", {"key": "$EC"}, 200, "message"),
    ("sign", {"key": "$EC", "message": b"x", "digest": D32, "hash": "sha256"}, 200, "digest"),
    ("sign", {"key": "$EC", "digest": D32}, 200, "hash"),
    ("sign", {"key": "$ED", "digest": D32, "hash": "sha256"}, 200, "digest"),
    ("sign", {"key": "$ED", "message": b"x", "hash": "sha256"}, 200, "hash"),
    ("verify", {"key": "$ED", "digest": D32, "signature": SIG}, 200, "digest"),
    ("sign", {"key": "$EC", "message": b"x", "padding": "pss"}, 200, "padding"),
    ("sign", {"key": "$EC", "message": b"x", "format": "jose"}, 200, "format"),
    ("sign", {"key": "$RSA", "message": b"x", "padding": "oaep"}, 200, "padding"),
    ("sign", {"key": "$RSA", "message": b"x", "format": "raw"}, 200, "format"),
    # digests of the wrong length: 201
    ("sign", {"key": "$EC", "digest": D32[:31], "hash": "sha256"}, 201, "32"),
    ("sign", {"key": "$EC", "digest": D32 + b"!", "hash": "sha256"}, 201, "32"),
    ("sign", {"key": "$EC", "digest": D32, "hash": "sha384"}, 201, "48"),
    ("sign", {"key": "$RSA", "digest": D32, "hash": "sha512"}, 201, "64"),
    ("verify", {"key": "$EC", "digest": b"", "hash": "sha256", "signature": SIG}, 201, "32"),
    # unsupported algorithms: 202
    ("sign", {"key": "$EC", "message": b"x", "hash": "md5"}, 202, "md5"),
    ("create_key", {"key": "new-key-x", "type": "rsa-1024"}, 202, "rsa-1024"),
    ("create_key", {"key": "new-key-y", "type": "dsa"}, 202, "dsa"),
    # invalid key names: 200
    ("sign", {"key": "../etc/passwd", "message": b"x"}, 200, "name"),
    ("sign", {"key": "", "message": b"x"}, 200, "name"),
    ("key_info", {"key": "-leading-dash"}, 200, "name"),
    ("public_key", {"key": "has space"}, 200, "name"),
    ("create_key", {"key": "a" * 65, "type": "ec-p256"}, 200, "name"),
    ("create_key", {"key": "slash/inside", "type": "ec-p256"}, 200, "name"),
    ("rotate", {"key": "\u00fcn\u00efcode"}, 200, "name"),
    # versions out of range (1 to 2**31 - 1): 200, naming the field
    ("public_key", {"key": "$EC", "version": 0}, 200, "version"),
    # keys and versions that do not exist: 300, 301
    ("sign", {"key": "no-such-key", "message": b"x"}, 300, "no-such-key"),
    ("verify", {"key": "no-such-key", "message": b"x", "signature": SIG}, 300, "no-such-key"),
    ("key_info", {"key": "no-such-key"}, 300, "no-such-key"),
    ("public_key", {"key": "no-such-key"}, 300, "no-such-key"),
    ("rotate", {"key": "no-such-key"}, 300, "no-such-key"),
    ("public_key", {"key": "$EC", "version": 99}, 301, "99"),
    ("verify", {"key": "$EC", "message": b"x", "signature": SIG, "version": 2}, 301, "2"),
    # an existing key: 302
    ("create_key", {"key": "$EC", "type": "ec-p256"}, 302, "$EC"),
    ("create_key", {"key": "$ED", "type": "rsa-2048"}, 302, "$ED"),
]
# fmt: on


@pytest.mark.parametrize(
    ("op", "args", "code", "needle"),
    ARG_CASES,
    ids=[f"{op}-{code}-{needle[:12]}" for op, _, code, needle in ARG_CASES],
)
def test_bad_arguments(
    raw: socket.socket,
    bystander: Bystander,
    keys: Keys,
    op: str,
    args: dict[str, Any],
    code: int,
    needle: str,
) -> None:
    rid = 1000 + code
    raw.sendall(frame(request(rid, op, keys.resolve(args))))
    msg = expect_error(read_frame(raw), code, NAMES[code], rid)
    assert keys.resolve(needle) in msg
    still_works(raw)
    bystander.check()


def test_bad_key_name_is_not_created(signd: Daemon, raw: socket.socket) -> None:
    raw.sendall(frame(request(1, "create_key", {"key": "../escape", "type": "ec-p256"})))
    expect_error(read_frame(raw), 200, "invalid_argument", 1)
    with signd.client() as c:
        assert "../escape" not in {k.name for k in c.list_keys().keys}


# --------------------------------------------------------------------------
# The same errors through the Python client's typed exceptions


def test_typed_exceptions(signd: Daemon, keys: Keys, bystander: Bystander) -> None:
    with signd.client(retries=0) as c:
        with pytest.raises(KeyNotFound) as e1:
            c.sign("no-such-key-at-all", b"x")
        assert e1.value.code == 300
        bystander.check()
        with pytest.raises(InvalidDigest) as e2:
            c.sign(keys.ec, digest=b"\x00" * 20, hash="sha256")
        assert e2.value.code == 201
        bystander.check()
        with pytest.raises(InvalidArgument, match="digest") as e3:
            c.sign(keys.ed, digest=b"\x00" * 32, hash="sha256")
        assert e3.value.code == 200
        with pytest.raises(InvalidArgument, match="name"):
            c.key_info("bad name")
        bystander.check()
        with pytest.raises(UnsupportedAlgorithm) as e4:
            c.create_key(f"typed-{uuid.uuid4().hex[:8]}", "ec-p521")
        assert e4.value.code == 202
        with pytest.raises(KeyExists) as e5:
            c.create_key(keys.ec, "ec-p256")
        assert e5.value.code == 302
        with pytest.raises(VersionNotFound) as e6:
            c.public_key(keys.ec, version=7)
        assert e6.value.code == 301
        bystander.check()
        # The client's connection is fine after all of that.
        msg = b"after the errors"
        keys.verify(c.sign(keys.ec, msg).signature, msg)


def test_failed_create_leaves_existing_key_intact(signd: Daemon, keys: Keys) -> None:
    with signd.client() as c:
        before = c.key_info(keys.ed)
        with pytest.raises(KeyExists):
            c.create_key(keys.ed, "ed25519")
        assert c.key_info(keys.ed) == before
        pem = before.versions[0].public_key_pem
        public = serialization.load_pem_public_key(pem.encode())
        assert isinstance(public, ed25519.Ed25519PublicKey)
        public.verify(c.sign(keys.ed, b"still mine").signature, b"still mine")


# --------------------------------------------------------------------------
# Pipelining and half frames


def test_pipelined_requests_each_answered_once(
    raw: socket.socket, keys: Keys, bystander: Bystander
) -> None:
    n = 200
    ids = [10_000 + 7 * i for i in range(n)]
    messages = {rid: f"pipelined {rid}".encode() for rid in ids}
    raw.sendall(
        b"".join(
            frame(request(rid, "sign", {"key": keys.ec, "message": messages[rid]})) for rid in ids
        )
    )
    seen: collections.Counter[int] = collections.Counter()
    answers = 0
    while set(seen) != set(ids):
        resp = read_frame(raw)
        assert resp is not None, f"EOF after {answers} answers"
        answers += 1
        assert answers <= n, "more answers than requests"
        rid = resp["id"]
        assert rid in messages, resp
        seen[rid] += 1
        keys.verify(expect_result(resp, rid)["signature"], messages[rid])
    assert answers == n
    assert all(count == 1 for count in seen.values())
    # Nothing else is pending: the next frame is the answer to the next request.
    still_works(raw, rid=1)
    bystander.check()


def test_pipelined_mixed_good_and_bad(raw: socket.socket, keys: Keys, bystander: Bystander) -> None:
    frames: list[bytes] = []
    expected: dict[int, int | None] = {}  # id -> error code, None for a result
    for i in range(60):
        rid = 500 + i
        kind = i % 4
        if kind == 0:
            frames.append(frame(request(rid, "sign", {"key": keys.ec, "message": b"m"})))
            expected[rid] = None
        elif kind == 1:
            frames.append(frame(request(rid, "no_such_op")))
            expected[rid] = 103
        elif kind == 2:
            frames.append(
                frame(request(rid, "sign", {"key": keys.ec, "digest": b"short", "hash": "sha256"}))
            )
            expected[rid] = 201
        else:
            frames.append(frame(request(rid, "key_info", {"key": "missing-" + str(i)})))
            expected[rid] = 300
    raw.sendall(b"".join(frames))
    got: dict[int, int | None] = {}
    for _ in expected:
        resp = read_frame(raw)
        assert resp is not None
        assert resp["id"] not in got, f"answered twice: {resp}"
        got[resp["id"]] = resp["error"]["code"] if "error" in resp else None
    assert got == expected
    bystander.check()


@pytest.mark.parametrize(
    "partial",
    [
        pytest.param(b"\x00\x00", id="half-header"),
        pytest.param(HEADER.pack(100) + b"\x84\xa1v\x01", id="header-and-part-of-body"),
        pytest.param(frame(request(1, "health"))[:-1], id="all-but-one-byte"),
    ],
)
def test_half_frame_then_close(signd: Daemon, bystander: Bystander, partial: bytes) -> None:
    baseline = open_sockets(signd)
    s = signd.connect_raw()
    s.sendall(partial)
    bystander.check()  # a half frame on one connection does not hold up another
    s.close()
    wait_until_released(signd, baseline, 10.0)
    bystander.check()
    with signd.client() as c:
        assert c.health().ready


def test_many_half_frames_at_once(signd: Daemon, bystander: Bystander) -> None:
    baseline = open_sockets(signd)
    socks = [signd.connect_raw() for _ in range(20)]
    for i, s in enumerate(socks):
        s.sendall(HEADER.pack(50 + i) + b"\x80" * (i % 5))
    bystander.check()
    for s in socks:
        s.shutdown(socket.SHUT_WR)  # EOF mid-frame
    for s in socks:
        assert s.recv(1) == b""  # the daemon closes, and says nothing
        s.close()
    wait_until_released(signd, baseline, 10.0)
    bystander.check()


# A client that goes away while its answers are being written must cost the
# daemon that one connection only.  These run on a daemon of their own so that
# a failure cannot take the shared one down with it.


@pytest.fixture
def own_daemon(make_daemon: Callable[..., Daemon], keys: Keys) -> Daemon:
    return make_daemon()


def test_client_that_closes_without_reading(own_daemon: Daemon, keys: Keys) -> None:
    with served_throughout(own_daemon, keys) as bystander:
        baseline = open_sockets(own_daemon)
        for op, args in (("health", {}), ("sign", {"key": keys.ec, "message": b"x"})):
            s = own_daemon.connect_raw()
            s.sendall(b"".join(frame(request(i, op, args)) for i in range(200)))
            s.close()  # never reads a single answer
            wait_until_released(own_daemon, baseline, 10.0)
            bystander.check()
        with own_daemon.client() as c:
            assert c.health().ready


def test_client_that_never_reads(own_daemon: Daemon, keys: Keys) -> None:
    """A client that pipelines without ever reading is slowed down, and holds up no one.

    Each ``public_key`` answer (an RSA PEM) is ten times the size of its request,
    so the daemon's buffers for this connection fill up: it must stop reading
    from it (the socket then refuses more bytes) instead of buffering without bound.
    """
    with served_throughout(own_daemon, keys) as bystander:
        baseline = open_sockets(own_daemon)
        s = own_daemon.connect_raw()
        s.setblocking(False)
        batch = b"".join(frame(request(i, "public_key", {"key": keys.rsa})) for i in range(1000))
        cap = 64 * len(batch)  # answers to this many requests would be ~30 MiB
        sent = 0
        blocked = False
        while sent < cap:
            try:
                sent += s.send(batch)
            except BlockingIOError:
                blocked = True
                break
        assert blocked, f"the daemon read {sent} bytes of requests without being read from"
        bystander.check()
        with own_daemon.client() as c:
            assert c.health().ready
        s.close()
        wait_until_released(own_daemon, baseline, 10.0)
        bystander.check()
