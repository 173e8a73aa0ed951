"""Fuzzing in CI: the frame decoder, and the full request path of a real daemon.

Two layers get hypothesis-generated hostile input:

* the sans-IO codec (``FrameDecoder`` + ``decode_request``): arbitrary bytes
  and structured adversarial frames must only ever become a ``Request`` or a
  ``BadRequest`` (or raise ``FrameTooLarge`` from the decoder), and every
  ``BadRequest`` must encode into an answer a client can decode;
* a real ``signd`` on a real token: adversarial frames over a raw socket, while
  a long-lived well-behaved connection keeps getting signatures that verify.

The long runs (a million inputs and more) are ``scripts/fuzz_atheris.py``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signd.agent import wire as agent_wire
from signd_client import Client
from signd_client.errors import FrameTooLarge, WireError
from signd_client.protocol import (
    DEFAULT_MAX_FRAME,
    KEY_TYPES,
    OPS,
    BadRequest,
    FrameDecoder,
    Request,
    decode_request,
    decode_response,
    encode_error,
)

if TYPE_CHECKING:
    from conftest import Daemon, TokenEnv  # the root conftest.py

HEADER = struct.Struct(">I")
SLOW = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------
# Strategies: msgpack values, envelopes, per-op arguments

ints = st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(max_size=8), inner, max_size=5),
    ),
    max_leaves=20,
)
FIELD_NAMES = sorted(
    {f for spec in OPS.values() for f in getattr(spec.args, "__dataclass_fields__", {})}
)


def typed(tp: Any, *, hostile: bool) -> st.SearchStrategy[Any]:
    """Values of a field's own wire type, or (when ``hostile``) often anything at all."""
    text = str(tp)
    if "tuple" in text:
        right: st.SearchStrategy[Any] = st.lists(st.binary(max_size=64), max_size=4)
    elif "bytes" in text:
        right = st.binary(max_size=80)
    elif "bool" in text:
        right = st.booleans()
    elif "float" in text:
        right = st.one_of(st.floats(allow_nan=True), ints, st.integers(-1, 4000))
    elif "int" in text:
        right = st.one_of(ints, st.integers(min_value=-3, max_value=5))
    else:
        right = st.text(max_size=30)
    return st.one_of(right, values) if hostile else right


SCHEME_WORDS = ["sha256", "sha384", "sha512", "pss", "pkcs1v15", "der", "raw", "ieee-p1363"]


def args_for(
    op: str,
    key_names: st.SearchStrategy[str],
    key_types: st.SearchStrategy[str],
    *,
    hostile: bool = True,
) -> st.SearchStrategy[Any]:
    """Arguments for ``op``.  Not hostile: the required fields and some optional
    ones, each of its own type (the daemon then really works on them).  Hostile:
    any field may be missing or of the wrong type, an unknown field may be
    added, or the arguments may not be a map at all."""
    args_cls = OPS[op].args
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for name, tp in args_cls.__annotations__.items():
        if name == "key":
            strat = st.one_of(key_names, values) if hostile else key_names
        elif name == "type":
            strat = st.one_of(key_types, values) if hostile else key_types
        elif name in ("hash", "padding", "format"):
            words = st.one_of(st.sampled_from(SCHEME_WORDS), st.text(max_size=10))
            strat = st.one_of(words, values) if hostile else words
        else:
            strat = typed(tp, hostile=hostile)
        is_optional = "None" in str(tp)
        (optional if is_optional or hostile else required)[name] = strat
    shaped = st.fixed_dictionaries(required, optional=optional)
    if not hostile:
        return shaped
    extra = st.dictionaries(st.sampled_from([*FIELD_NAMES, "x"]), values, max_size=2)
    mixed = st.builds(lambda a, e: {**e, **a}, shaped, extra)
    return st.one_of(shaped, shaped, mixed, values)


def envelopes(
    key_names: st.SearchStrategy[str], key_types: st.SearchStrategy[str]
) -> st.SearchStrategy[Any]:
    """Request maps: every op with random args, half of them well-formed envelopes
    with well-typed args; the rest with v/id/op/args missing or of wrong types."""

    def build(op: str) -> st.SearchStrategy[Any]:
        clean = st.fixed_dictionaries(
            {
                "v": st.just(1),
                "id": st.one_of(st.integers(0, (1 << 64) - 1), st.integers(0, 9)),
                "op": st.just(op),
                "args": args_for(op, key_names, key_types, hostile=False),
            }
        )
        hostile = st.fixed_dictionaries(
            {},
            optional={
                "v": st.one_of(st.just(1), st.just(1), st.just(1), values),
                "id": st.one_of(st.integers(0, (1 << 64) - 1), st.integers(0, 9), values),
                "op": st.one_of(st.just(op), st.just(op), values),
                "args": args_for(op, key_names, key_types),
                "extra": values,
            },
        )
        return st.one_of(clean, hostile)

    return st.sampled_from(sorted(OPS)).flatmap(build)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def nested(depth: int, kind: int) -> bytes:
    """A msgpack body nested ``depth`` deep (arrays, maps, or a request's args)."""
    if kind == 0:
        return b"\x91" * depth + b"\xc0"
    if kind == 1:
        return b"\x81\xa1a" * depth + b"\xc0"
    head = pack({"v": 1, "id": 7, "op": "sign"})[1:]
    return bytes([0x84]) + head + pack("args") + b"\x81\xa3key" * depth + b"\xc0"


HOSTILE_HEADERS = [
    b"\xdc\xff\xff",  # array16 of 65535
    b"\xdd\xff\xff\xff\xff",  # array32 of 2**32-1
    b"\xdf\xff\xff\xff\xff",  # map32
    b"\xdb\xff\xff\xff\xff",  # str32
    b"\xc6\xff\xff\xff\xff",  # bin32
    b"\xc9\xff\xff\xff\xff\x01",  # ext32
    b"\xc1",  # never used
    b"\xd4\xff\x00",  # fixext1 type -1: a timestamp of the wrong size
    b"\xd6\xff\xff\xff\xff\xff",  # timestamp32
]


def bodies(
    key_names: st.SearchStrategy[str], key_types: st.SearchStrategy[str]
) -> st.SearchStrategy[bytes]:
    """Frame bodies: structured requests, random msgpack, deep nesting, hostile headers."""
    maps_with_int_keys = st.dictionaries(ints, values, min_size=1, max_size=3).map(pack)
    return st.one_of(
        envelopes(key_names, key_types).map(pack),
        envelopes(key_names, key_types).map(pack),
        envelopes(key_names, key_types).map(pack),
        values.map(pack),
        maps_with_int_keys,
        st.binary(max_size=200),
        st.builds(nested, st.integers(1, 5000), st.integers(0, 2)),
        st.builds(
            lambda h, tail: h + tail, st.sampled_from(HOSTILE_HEADERS), st.binary(max_size=20)
        ),
        # a valid request, then trailing garbage or cut short
        st.builds(
            lambda b, cut, tail: b[: max(1, len(b) - cut)] + tail,
            envelopes(key_names, key_types).map(pack),
            st.integers(0, 3),
            st.binary(max_size=4),
        ),
    )


def framed(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


any_key = st.one_of(st.sampled_from(["k", "x" * 64, "x" * 65, "../etc", ""]), st.text(max_size=70))
any_type = st.one_of(st.sampled_from(KEY_TYPES), st.text(max_size=12))

# --------------------------------------------------------------------------
# (a) the sans-IO codec


def check_event(event: object) -> None:
    assert isinstance(event, Request | BadRequest), repr(event)
    if isinstance(event, BadRequest):
        assert isinstance(event.error, WireError)
        answer = encode_error(event.id, event.error)
        (length,) = HEADER.unpack_from(answer)
        assert length == len(answer) - 4
        response = decode_response(answer[4:])
        assert response.id == event.id
        assert response.result is None
        assert response.error is not None
        assert response.error.code == event.error.code
    else:
        assert event.op in OPS
        assert isinstance(event.args, OPS[event.op].args)


def feed(stream: bytes, cuts: list[int], max_frame: int = DEFAULT_MAX_FRAME) -> int:
    """Feed ``stream`` in pieces; check every event.  Returns the frames seen."""
    decoder = FrameDecoder(max_frame)
    seen = 0
    pos = 0
    for cut in [*sorted(cuts), len(stream)]:
        decoder.receive_data(stream[pos:cut])
        pos = max(pos, cut)
        try:
            for body in decoder.frames():
                seen += 1
                check_event(decode_request(body))
        except FrameTooLarge as exc:
            check_event(BadRequest(None, exc))
            return seen
    return seen


@SLOW
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=6))
def test_arbitrary_bytes(stream: bytes, cuts: list[int]) -> None:
    feed(stream, cuts, max_frame=1024)


@SLOW
@given(st.lists(bodies(any_key, any_type), min_size=1, max_size=4), st.data())
def test_structured_frames(body_list: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(framed(b) for b in body_list)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=5))
    assert feed(stream, cuts) == len(body_list)


@SLOW
@given(bodies(any_key, any_type))
def test_every_body_decodes_to_an_event(body: bytes) -> None:
    check_event(decode_request(body))


@SLOW
@given(
    st.one_of(st.integers(DEFAULT_MAX_FRAME + 1, (1 << 32) - 1), st.just((1 << 32) - 1)),
    st.binary(max_size=64),
    st.lists(bodies(any_key, any_type), max_size=2),
)
def test_huge_declared_length(length: int, tail: bytes, before: list[bytes]) -> None:
    """Frames before the huge one are decoded; the huge one raises FrameTooLarge."""
    decoder = FrameDecoder()
    decoder.receive_data(b"".join(framed(b) for b in before) + HEADER.pack(length) + tail)
    got: list[bytes] = []

    def drain() -> None:
        for body in decoder.frames():
            got.append(body)
            check_event(decode_request(body))

    with pytest.raises(FrameTooLarge):
        drain()
    assert got == before


@SLOW
@given(st.integers(0, DEFAULT_MAX_FRAME), st.binary(max_size=64))
def test_declared_length_within_the_limit_waits(length: int, tail: bytes) -> None:
    """A header announcing more than has arrived yields nothing (yet)."""
    decoder = FrameDecoder()
    decoder.receive_data(HEADER.pack(length) + tail[:length])
    frames = list(decoder.frames())
    if length <= len(tail):
        assert frames == [tail[:length]]
    else:
        assert frames == []
        assert decoder.buffered == 4 + len(tail)


@pytest.mark.parametrize("op", sorted(OPS))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_op_with_random_args(op: str, data: st.DataObject) -> None:
    args = data.draw(args_for(op, any_key, any_type))
    rid = data.draw(st.integers(0, (1 << 64) - 1))
    event = decode_request(pack({"v": 1, "id": rid, "op": op, "args": args}))
    check_event(event)
    assert event.id == rid


# --------------------------------------------------------------------------
# (a') the ssh-agent decoder (signd.agent.wire); the agent socket of a real
# daemon is fuzzed in test_ssh_agent.py

AGENT_MAX = 1024  # a small limit, so that hypothesis reaches it


def agent_feed(stream: bytes, cuts: list[int]) -> int:
    """Feed ``stream`` to an agent decoder in pieces, parsing every message:
    only ``AgentWireError`` may come out, and the decoder never holds more
    than one message and one piece.  Returns the messages seen."""
    decoder = agent_wire.MessageDecoder(AGENT_MAX)
    seen = 0
    pos = 0
    for cut in [*sorted(cuts), len(stream)]:
        piece = stream[pos:cut]
        decoder.feed(piece)
        pos = max(pos, cut)
        try:
            for body in decoder.messages():
                seen += 1
                assert 1 <= len(body) <= AGENT_MAX
                try:
                    msg = agent_wire.parse(body)
                except agent_wire.AgentWireError:
                    return seen  # the connection is closed here
                check_agent_message(msg)
        except agent_wire.AgentWireError:
            return seen
        assert decoder.buffered <= 4 + AGENT_MAX + len(piece)
    return seen


def check_agent_message(msg: object) -> None:
    if isinstance(msg, agent_wire.Extension) and msg.name == b"session-bind@openssh.com":
        with contextlib.suppress(agent_wire.AgentWireError):
            agent_wire.parse_session_bind(msg.contents)
    assert isinstance(
        msg,
        agent_wire.RequestIdentities
        | agent_wire.SignRequest
        | agent_wire.Extension
        | agent_wire.Other,
    )


def ssh_string(b: bytes) -> bytes:
    return HEADER.pack(len(b)) + b


agent_bodies = st.one_of(
    st.just(b"\x0b"),
    st.builds(
        lambda blob, data, flags: b"\x0d" + ssh_string(blob) + ssh_string(data) + flags,
        st.binary(max_size=80),
        st.binary(max_size=200),
        st.binary(min_size=4, max_size=4),
    ),
    st.builds(
        lambda name, rest: b"\x1b" + ssh_string(name) + rest,
        st.sampled_from([b"query", b"session-bind@openssh.com", b"x@y"]) | st.binary(max_size=20),
        st.binary(max_size=100),
    ),
    st.builds(lambda kind, rest: bytes([kind]) + rest, st.integers(0, 255), st.binary(max_size=60)),
)


@SLOW
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=6))
def test_agent_arbitrary_bytes(stream: bytes, cuts: list[int]) -> None:
    agent_feed(stream, cuts)


@SLOW
@given(st.lists(agent_bodies, min_size=1, max_size=5), st.data())
def test_agent_structured_messages(body_list: list[bytes], data: st.DataObject) -> None:
    """Well-framed messages, each cut anywhere: every one comes out whole."""
    stream = b"".join(HEADER.pack(len(b)) + b for b in body_list)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=5))
    decoder = agent_wire.MessageDecoder(AGENT_MAX)
    got = []
    pos = 0
    for cut in [*sorted(cuts), len(stream)]:
        decoder.feed(stream[pos:cut])
        pos = max(pos, cut)
        got += list(decoder.messages())
    assert got == body_list
    for body in got:
        with contextlib.suppress(agent_wire.AgentWireError):
            check_agent_message(agent_wire.parse(body))


@SLOW
@given(st.integers(AGENT_MAX + 1, (1 << 32) - 1) | st.just(0), st.binary(max_size=64))
def test_agent_bad_declared_length(length: int, tail: bytes) -> None:
    decoder = agent_wire.MessageDecoder(AGENT_MAX)
    decoder.feed(HEADER.pack(length) + tail)
    with pytest.raises(agent_wire.AgentWireError):
        list(decoder.messages())


# --------------------------------------------------------------------------
# (b) the full request path of a real daemon


@pytest.fixture(scope="module")
def signd(module_daemon: Callable[..., Daemon], module_token: TokenEnv) -> Daemon:
    """This module's daemon, on a token of its own: the fuzzer makes and
    rotates keys by the hundred."""
    return module_daemon(module_token)


@pytest.fixture(scope="module")
def fuzz_keys(signd: Daemon) -> tuple[str, str, ec.EllipticCurvePublicKey]:
    """A victim key the fuzzer may do anything to, and a good key it never names."""
    victim = f"fuzz-victim-{uuid.uuid4().hex[:8]}"
    good = f"fuzz-good-{uuid.uuid4().hex[:8]}"
    with signd.client(timeout=30.0) as c:
        c.create_key(victim, "ec-p256")
        info = c.create_key(good, "ec-p256")
    public = serialization.load_pem_public_key(info.versions[0].public_key_pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return victim, good, public


@pytest.fixture(scope="module")
def good_client(signd: Daemon) -> Iterator[Client]:
    """One long-lived well-behaved connection, kept across every example."""
    with signd.client(timeout=30.0) as c:
        yield c


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_answer(sock: socket.socket) -> bytes | None:
    head = recv_exact(sock, 4)
    if head is None:
        return None
    (length,) = HEADER.unpack(head)
    return recv_exact(sock, length)


@contextlib.contextmanager
def raw(signd: Daemon) -> Iterator[socket.socket]:
    sock = signd.connect_raw()
    try:
        yield sock
    finally:
        sock.close()


# Keys the fuzzer may create: cheap types and a prefix of their own.
fresh_name = st.builds(lambda: f"fuzz-new-{uuid.uuid4().hex[:8]}")
cheap_type = st.one_of(st.sampled_from(["ec-p256", "ed25519"]), st.text(max_size=12))


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_daemon_survives_adversarial_frames(
    signd: Daemon,
    fuzz_keys: tuple[str, str, ec.EllipticCurvePublicKey],
    good_client: Client,
    data: st.DataObject,
) -> None:
    victim, good, public = fuzz_keys
    key_names = st.one_of(st.just(victim), st.just(victim), fresh_name, any_key).filter(
        lambda k: k != good
    )
    body_list = data.draw(st.lists(bodies(key_names, cheap_type), min_size=1, max_size=3))
    raw_tail = data.draw(st.one_of(st.just(b""), st.binary(max_size=64)))
    with raw(signd) as sock:
        sock.sendall(b"".join(framed(b) for b in body_list))
        # One answer per complete frame, each a well-formed response.
        for _ in body_list:
            answer = read_answer(sock)
            assert answer is not None, "the daemon closed the connection early"
            decode_response(answer)
        if raw_tail:
            # Then unframed bytes: the daemon answers, waits, or closes; never dies.
            sock.sendall(raw_tail)
            sock.shutdown(socket.SHUT_WR)
            while (answer := read_answer(sock)) is not None:
                decode_response(answer)
    assert signd.proc is not None
    assert signd.proc.poll() is None, signd.logs()[-4000:]
    msg = f"good {uuid.uuid4()}".encode()
    sig = good_client.sign(good, msg).signature
    public.verify(sig, msg, ec.ECDSA(hashes.SHA256()))


def test_daemon_survives_huge_declared_lengths(
    signd: Daemon,
    fuzz_keys: tuple[str, str, ec.EllipticCurvePublicKey],
    good_client: Client,
) -> None:
    """Over the limit: frame_too_large and a close; within it: the daemon just waits."""
    _, good, public = fuzz_keys
    for length in (DEFAULT_MAX_FRAME + 1, (1 << 32) - 1):
        with raw(signd) as sock:
            sock.sendall(HEADER.pack(length) + b"\x80" * 16)
            answer = read_answer(sock)
            assert answer is not None
            err = decode_response(answer).error
            assert isinstance(err, FrameTooLarge)
            assert read_answer(sock) is None
    with raw(signd) as sock:
        sock.sendall(HEADER.pack(DEFAULT_MAX_FRAME) + b"\x80" * 16)
        sock.shutdown(socket.SHUT_WR)
        assert read_answer(sock) is None  # EOF mid-frame: closed, nothing to answer
    msg = b"after huge lengths"
    sig = good_client.sign(good, msg).signature
    public.verify(sig, msg, ec.ECDSA(hashes.SHA256()))
