"""The wire protocol, sans-IO: bytes in, events and errors out; no socket anywhere.

Frames are built here by hand (``struct`` and ``msgpack``), not with the
encoder under test, so a mistake in the encoder cannot hide a mistake in the
decoder.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signd import errors
from signd.protocol import (
    DEFAULT_MAX_FRAME,
    IDEMPOTENCY_KEY_OPS,
    IDEMPOTENT_OPS,
    MAX_VERSION,
    OPS,
    BadRequest,
    CreateKeyArgs,
    Empty,
    FrameDecoder,
    KeyGrant,
    KeyRefArgs,
    OpSpec,
    PublicKeyArgs,
    Request,
    Response,
    Retry,
    RotateArgs,
    SignArgs,
    VerifyArgs,
    Whoami,
    decode_request,
    decode_response,
    encode_request,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
U64_MAX = (1 << 64) - 1


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def req(op: str = "health", args: Any = None, rid: Any = 7, **envelope: Any) -> dict[str, Any]:
    """A request map; pass ``args=...`` and envelope overrides to break it."""
    obj: dict[str, Any] = {"v": 1, "id": rid, "op": op, "args": {} if args is None else args}
    obj.update(envelope)
    return obj


def drain(decoder: FrameDecoder) -> list[bytes]:
    return list(decoder.frames())


# ---------------------------------------------------------------- framing

BODIES = [b"", b"\x80", b"x" * 300, bytes(range(256)), b"\x00\x00\x00\x05", b"abc"]
STREAM = b"".join(frame(b) for b in BODIES)


def test_one_frame() -> None:
    d = FrameDecoder()
    d.receive_data(frame(b"hello"))
    assert drain(d) == [b"hello"]
    assert d.buffered == 0
    assert drain(d) == []


@pytest.mark.parametrize("split", range(len(STREAM) + 1))
def test_split_at_every_byte_boundary(split: int) -> None:
    d = FrameDecoder()
    d.receive_data(STREAM[:split])
    got = drain(d)
    d.receive_data(STREAM[split:])
    got += drain(d)
    assert got == BODIES
    assert d.buffered == 0


def test_fed_one_byte_at_a_time() -> None:
    d = FrameDecoder()
    got: list[bytes] = []
    for i in range(len(STREAM)):
        d.receive_data(STREAM[i : i + 1])
        got += drain(d)
    assert got == BODIES


def test_every_pair_of_splits() -> None:
    small = b"".join(frame(b) for b in (b"", b"ab", b"\x81\xa1k\x01", b"z"))
    for i in range(len(small) + 1):
        for j in range(i, len(small) + 1):
            d = FrameDecoder()
            got: list[bytes] = []
            for chunk in (small[:i], small[i:j], small[j:]):
                d.receive_data(chunk)
                got += drain(d)
            assert got == [b"", b"ab", b"\x81\xa1k\x01", b"z"], (i, j)


def test_many_frames_in_one_chunk() -> None:
    bodies = [pack(req(rid=i)) for i in range(2000)]
    d = FrameDecoder()
    d.receive_data(b"".join(frame(b) for b in bodies) + b"\x00\x00")
    assert drain(d) == bodies
    assert d.buffered == 2  # half a length prefix waits for more


def test_incomplete_frame_waits() -> None:
    d = FrameDecoder()
    d.receive_data(frame(b"0123456789")[:-1])
    assert drain(d) == []
    assert d.buffered == 13
    d.receive_data(b"9")
    assert drain(d) == [b"0123456789"]


def test_frame_at_the_limit_is_accepted() -> None:
    d = FrameDecoder(max_frame=1024)
    d.receive_data(frame(b"a" * 1024))
    assert drain(d) == [b"a" * 1024]


def test_default_limit_is_one_mebibyte() -> None:
    assert DEFAULT_MAX_FRAME == 1048576
    assert FrameDecoder().max_frame == 1048576


def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    """The body is never waited for (or buffered): 4 bytes are enough to refuse."""
    d = FrameDecoder(max_frame=1024)
    d.receive_data(struct.pack(">I", 1025))
    with pytest.raises(errors.FrameTooLarge) as info:
        drain(d)
    assert info.value.code == 101
    assert "1025" in info.value.message
    assert "1024" in info.value.message


def test_frames_before_an_oversized_one_are_delivered_first() -> None:
    d = FrameDecoder(max_frame=16)
    d.receive_data(frame(b"ok1") + frame(b"ok2") + struct.pack(">I", 17) + b"x" * 17)
    frames = d.frames()
    assert next(frames) == b"ok1"
    assert next(frames) == b"ok2"
    with pytest.raises(errors.FrameTooLarge):
        next(frames)


def test_decoder_does_not_resynchronise_after_an_oversized_frame() -> None:
    """The stream is lost: later bytes must not be read as frames."""
    d = FrameDecoder(max_frame=16)
    d.receive_data(struct.pack(">I", 0xFFFFFFFF))
    with pytest.raises(errors.FrameTooLarge):
        drain(d)
    d.receive_data(frame(b"looks fine"))
    with pytest.raises(errors.FrameTooLarge):
        drain(d)


# ---------------------------------------------------------------- decode_request: good


def test_valid_request_decodes_to_typed_args() -> None:
    body = pack(req("sign", {"key": "k", "digest": b"\x01" * 32, "hash": "sha256"}, rid=99))
    assert decode_request(body) == Request(
        99, "sign", SignArgs(key="k", digest=b"\x01" * 32, hash="sha256")
    )


ACCEPTED: list[tuple[str, dict[str, Any], Request]] = [
    ("list_keys", req("list_keys"), Request(7, "list_keys", Empty())),
    ("args-omitted", {"v": 1, "id": 7, "op": "health"}, Request(7, "health", Empty())),
    (
        "any-key-order",
        {"args": {"type": "ed25519", "key": "a"}, "op": "create_key", "id": 7, "v": 1},
        Request(7, "create_key", CreateKeyArgs("a", "ed25519")),
    ),
    ("id-zero", req("key_info", {"key": "a"}, rid=0), Request(0, "key_info", KeyRefArgs("a"))),
    (
        "id-u64-max",
        req("rotate", {"key": "a"}, rid=U64_MAX),
        Request(U64_MAX, "rotate", RotateArgs("a")),
    ),
    (
        "optional-nil-is-absent",
        req("public_key", {"key": "a", "version": None}),
        Request(7, "public_key", PublicKeyArgs("a")),
    ),
    (
        "public_key-version",
        req("public_key", {"key": "a", "version": 3}),
        Request(7, "public_key", PublicKeyArgs("a", 3)),
    ),
    (
        "verify-all-optionals",
        req(
            "verify",
            {
                "key": "a",
                "signature": b"s",
                "digest": b"d",
                "hash": "sha512",
                "padding": "pss",
                "format": "der",
                "version": 1,
            },
        ),
        Request(7, "verify", VerifyArgs("a", b"s", None, b"d", "sha512", "pss", "der", 1)),
    ),
]


@pytest.mark.parametrize(
    ("obj", "expected"), [a[1:] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED]
)
def test_accepted_requests(obj: dict[str, Any], expected: Request) -> None:
    assert decode_request(pack(obj)) == expected


# ---------------------------------------------------------------- decode_request: bad

MALFORMED = errors.MalformedFrame
BAD_VERSION = errors.UnsupportedVersion
UNKNOWN_OP = errors.UnknownOperation
BAD_REQUEST = errors.InvalidRequest
BAD_ARG = errors.InvalidArgument

SIGN = {"key": "a", "message": b"m"}
VERIFY = {"key": "a", "signature": b"s", "message": b"m"}


def args(op: str, **fields: Any) -> bytes:
    """A request body for ``op`` with these arguments."""
    return pack(req(op, fields))


# (test id, body, error class, id the answer must carry, text the message must contain)
BAD: list[tuple[str, bytes, type[errors.WireError], int | None, str]] = [
    # The body is not a msgpack map: nothing can be trusted, not even the id.
    ("not-msgpack", b"\xc1", MALFORMED, None, ""),
    ("empty-body", b"", MALFORMED, None, ""),
    ("truncated", pack(req())[:-3], MALFORMED, None, ""),
    ("trailing-bytes", pack(req()) + b"\xc0", MALFORMED, None, ""),
    ("array", pack([1, "id", 7]), MALFORMED, None, "map"),
    ("int", pack(7), MALFORMED, None, "map"),
    ("str", pack("hello"), MALFORMED, None, "map"),
    ("nil", pack(None), MALFORMED, None, "map"),
    ("int-map-key", pack({1: 1, "id": 7}), MALFORMED, None, ""),
    ("invalid-utf8-str", b"\x81\xa1v\xa2\xff\xfe", MALFORMED, None, ""),
    # The id must be a uint64 so the answer can carry it.
    ("id-missing", pack({"v": 1, "op": "health", "args": {}}), BAD_REQUEST, None, "id"),
    ("id-nil", pack(req(rid=None)), BAD_REQUEST, None, "id"),
    ("id-negative", pack(req(rid=-1)), BAD_REQUEST, None, "id"),
    ("id-int64-min", pack(req(rid=-(1 << 63))), BAD_REQUEST, None, "id"),
    ("id-true", pack(req(rid=True)), BAD_REQUEST, None, "id"),
    ("id-false", pack(req(rid=False)), BAD_REQUEST, None, "id"),
    ("id-float", pack(req(rid=7.0)), BAD_REQUEST, None, "id"),
    ("id-huge-float", pack(req(rid=1e30)), BAD_REQUEST, None, "id"),
    ("id-str", pack(req(rid="7")), BAD_REQUEST, None, "id"),
    ("id-bin", pack(req(rid=b"\x07")), BAD_REQUEST, None, "id"),
    ("id-bad-and-v-bad", pack(req(rid=-1, v=2)), BAD_REQUEST, None, "id"),
    # The protocol version: checked before anything but the id.
    ("v-2", pack(req(v=2)), BAD_VERSION, 7, "2"),
    ("v-0", pack(req(v=0)), BAD_VERSION, 7, ""),
    ("v-missing", pack({"id": 7, "op": "health", "args": {}}), BAD_VERSION, 7, ""),
    ("v-nil", pack(req(v=None)), BAD_VERSION, 7, ""),
    ("v-str", pack(req(v="1")), BAD_VERSION, 7, ""),
    # true and 1.0 equal 1 in Python, but on the wire they are a bool and a float, not int 1.
    ("v-true", pack(req(v=True)), BAD_VERSION, 7, ""),
    ("v-float", pack(req(v=1.0)), BAD_VERSION, 7, ""),
    ("v-bad-and-op-unknown", pack(req("nope", v=2)), BAD_VERSION, 7, ""),
    # The operation.
    ("op-missing", pack({"v": 1, "id": 7, "args": {}}), BAD_REQUEST, 7, "op"),
    ("op-int", pack(req(op=3)), BAD_REQUEST, 7, "op"),
    ("op-bin", pack(req(op=b"sign")), BAD_REQUEST, 7, "op"),
    ("op-unknown", pack(req("frobnicate")), UNKNOWN_OP, 7, "frobnicate"),
    ("op-empty", pack(req("")), UNKNOWN_OP, 7, ""),
    ("op-wrong-case", pack(req("Sign")), UNKNOWN_OP, 7, "Sign"),
    # The envelope has exactly v, id, op and args.
    ("envelope-extra", pack(req(deadline=5)), BAD_REQUEST, 7, "deadline"),
    ("envelope-extra-nil", pack(req(trace=None)), BAD_REQUEST, 7, "trace"),
    ("envelope-bin-key", pack({**req(), b"op": "x"}), BAD_REQUEST, 7, ""),
    # args: a map of the op's fields, strictly typed.
    ("args-array", pack(req("key_info", ["a"])), BAD_ARG, 7, "args"),
    ("args-str", pack(req("key_info", "a")), BAD_ARG, 7, "args"),
    ("args-omitted-but-required", pack({"v": 1, "id": 7, "op": "key_info"}), BAD_ARG, 7, "key"),
    ("unknown-arg", pack(req("key_info", {"key": "a", "kye": "b"})), BAD_ARG, 7, "kye"),
    ("unknown-arg-nil", pack(req("key_info", {"key": "a", "opt": None})), BAD_ARG, 7, "opt"),
    ("unknown-arg-empty-op", pack(req("health", {"verbose": True})), BAD_ARG, 7, "verbose"),
    ("unknown-arg-bin-key", pack(req("key_info", {"key": "a", b"key": "b"})), BAD_ARG, 7, ""),
    ("missing-key", pack(req("key_info", {})), BAD_ARG, 7, "key"),
    ("missing-type", pack(req("create_key", {"key": "a"})), BAD_ARG, 7, "type"),
    ("missing-signature", args("verify", key="a", message=b"m"), BAD_ARG, 7, "signature"),
    ("required-nil", pack(req("sign", {"key": None, "message": b"m"})), BAD_ARG, 7, "key"),
    ("key-int", pack(req("key_info", {"key": 5})), BAD_ARG, 7, "key"),
    ("key-bin", pack(req("key_info", {"key": b"a"})), BAD_ARG, 7, "key"),
    ("key-array", pack(req("key_info", {"key": ["a"]})), BAD_ARG, 7, "key"),
    ("message-str", pack(req("sign", {"key": "a", "message": "m"})), BAD_ARG, 7, "message"),
    ("digest-str", args("sign", key="a", digest="00" * 32, hash="sha256"), BAD_ARG, 7, "digest"),
    ("signature-str", args("verify", **{**VERIFY, "signature": "s"}), BAD_ARG, 7, "signature"),
    ("hash-bin", args("sign", **SIGN, hash=b"sha256"), BAD_ARG, 7, "hash"),
    ("padding-bool", args("sign", **SIGN, padding=True), BAD_ARG, 7, "padding"),
    ("format-int", args("sign", **SIGN, format=1), BAD_ARG, 7, "format"),
    ("version-true", pack(req("public_key", {"key": "a", "version": True})), BAD_ARG, 7, "version"),
    ("version-false", args("verify", **VERIFY, version=False), BAD_ARG, 7, "version"),
    ("version-0", args("verify", **VERIFY, version=0), BAD_ARG, 7, "version"),
    ("version-2**31", args("sign", key="k", message=b"m", version=1 << 31), BAD_ARG, 7, "version"),
    ("version-float", pack(req("public_key", {"key": "a", "version": 1.0})), BAD_ARG, 7, "version"),
    ("version-str", pack(req("public_key", {"key": "a", "version": "1"})), BAD_ARG, 7, "version"),
    ("type-map", pack(req("create_key", {"key": "a", "type": {}})), BAD_ARG, 7, "type"),
]


@pytest.mark.parametrize(
    ("body", "cls", "rid", "mentions"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_request_gets_its_error_class(
    body: bytes, cls: type[errors.WireError], rid: int | None, mentions: str
) -> None:
    event = decode_request(body)
    assert isinstance(event, BadRequest), event
    assert type(event.error) is cls, event.error
    assert event.id == rid
    assert mentions in event.error.message
    # Every message is plain text for a human; no Python reprs of classes.
    assert "<class" not in event.error.message
    assert "Traceback" not in event.error.message


def test_every_arguments_type_rejects_unknown_fields() -> None:
    for op, spec in OPS.items():
        args_cls = spec.args
        event = decode_request(pack(req(op, {"no_such_field": 1})))
        assert isinstance(event, BadRequest), op
        assert type(event.error) is errors.InvalidArgument, (op, args_cls)


def test_retry_classes_give_the_idempotent_sets() -> None:
    assert {op for op, spec in OPS.items() if spec.retry is Retry.SAFE} == IDEMPOTENT_OPS
    assert {op for op, spec in OPS.items() if spec.retry is Retry.WITH_KEY} == IDEMPOTENCY_KEY_OPS
    assert IDEMPOTENCY_KEY_OPS == {"create_key", "rotate", "import_key"}
    for op, spec in OPS.items():
        # "with_key" only where the arguments can carry one
        takes_key = "idempotency_key" in getattr(spec.args, "__dataclass_fields__", {})
        assert (spec.retry is Retry.WITH_KEY) == takes_key, op
    assert OPS["whoami"] == OpSpec(Empty, Whoami, Retry.SAFE)


def test_whoami_takes_no_arguments() -> None:
    assert decode_request(pack(req("whoami"))) == Request(7, "whoami", Empty())
    event = decode_request(pack(req("whoami", {"key": "k"})))
    assert isinstance(event, BadRequest)
    assert type(event.error) is errors.InvalidArgument


def test_whoami_result_fields_are_checked() -> None:
    wire = {"uid": 5, "gid": 6, "groups": [6], "keys": [{"name": "k", "verbs": ["read"]}]}
    who = Whoami.from_wire(wire, strict=False)
    assert who == Whoami(uid=5, gid=6, groups=(6,), user=None, keys=(KeyGrant("k", ("read",)),))
    assert who.to_wire() == wire  # user absent, not nil
    with pytest.raises(errors.InvalidArgument, match=r"keys\[0\]\.verbs"):
        Whoami.from_wire({**wire, "keys": [{"name": "k", "verbs": "read"}]}, strict=False)
    with pytest.raises(errors.InvalidArgument, match="'groups' is required"):
        Whoami.from_wire({"uid": 5, "gid": 6, "keys": []}, strict=False)


# ---------------------------------------------------------------- fuzzing


def _feed(data: bytes, max_frame: int) -> list[Request | BadRequest]:
    """What a connection does with ``data``: frames, then requests."""
    d = FrameDecoder(max_frame)
    d.receive_data(data)
    return [decode_request(body) for body in d.frames()]


PROTOCOL_LAYER_CODES = {100, 102, 103, 104, 200}


def _check_events(events: list[Request | BadRequest]) -> None:
    for event in events:
        if isinstance(event, BadRequest):
            assert int(event.error.code) in PROTOCOL_LAYER_CODES
            assert event.id is None or 0 <= event.id <= U64_MAX
        else:
            assert isinstance(event, Request)
            assert isinstance(event.args, OPS[event.op].args)


@FUZZ
@given(data=st.binary(max_size=512), max_frame=st.sampled_from([0, 8, 64, DEFAULT_MAX_FRAME]))
def test_arbitrary_bytes_only_ever_raise_frame_too_large(data: bytes, max_frame: int) -> None:
    try:
        events = _feed(data, max_frame)
    except errors.FrameTooLarge:
        return
    _check_events(events)


@FUZZ
@given(bodies=st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_bodies_in_valid_frames_never_raise(bodies: list[bytes]) -> None:
    events = _feed(b"".join(frame(b) for b in bodies), DEFAULT_MAX_FRAME)
    assert len(events) == len(bodies)
    _check_events(events)


FIELD_NAMES = ["v", "id", "op", "args", "key", "type", "message", "digest", "hash", "padding"]
FIELD_NAMES += ["format", "signature", "version"]
_keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=4)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), U64_MAX)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=3),
    max_leaves=8,
)
_envelopes = st.fixed_dictionaries(
    {},
    optional={
        "v": st.just(1) | _values,
        "id": st.integers(0, U64_MAX) | _values,
        "op": st.sampled_from(sorted(OPS)) | _values,
        "args": st.dictionaries(_keys, _values, max_size=5) | _values,
        "extra": _values,
    },
)


@FUZZ
@given(obj=_envelopes | _values)
def test_structured_garbage_never_raises(obj: Any) -> None:
    _check_events(_feed(frame(pack(obj)), DEFAULT_MAX_FRAME))


@FUZZ
@given(data=st.binary(max_size=256))
def test_decode_response_raises_only_protocol_violation(data: bytes) -> None:
    try:
        resp = decode_response(data)
    except errors.ProtocolViolation:
        return
    assert isinstance(resp, Response)
    assert (resp.result is None) != (resp.error is None)


# ---------------------------------------------------------------- round trips

_opt_bytes = st.none() | st.binary(max_size=80)
_opt_str = st.none() | st.text(max_size=12)
_sign_args = st.builds(
    SignArgs,
    key=st.text(max_size=70),
    message=_opt_bytes,
    digest=_opt_bytes,
    hash=_opt_str,
    padding=_opt_str,
    format=_opt_str,
)
_verify_args = st.builds(
    VerifyArgs,
    key=st.text(max_size=70),
    signature=st.binary(max_size=600),
    message=_opt_bytes,
    digest=_opt_bytes,
    hash=_opt_str,
    padding=_opt_str,
    format=_opt_str,
    version=st.none() | st.integers(1, MAX_VERSION),
)


@FUZZ
@given(
    rid=st.integers(0, U64_MAX),
    args=_sign_args | _verify_args,
    split=st.integers(0, 1 << 16),
)
def test_sign_and_verify_args_round_trip(rid: int, args: SignArgs | VerifyArgs, split: int) -> None:
    op = "sign" if isinstance(args, SignArgs) else "verify"
    data = encode_request(rid, op, args)
    split %= len(data) + 1
    d = FrameDecoder()
    d.receive_data(data[:split])
    bodies = list(d.frames())
    d.receive_data(data[split:])
    bodies += d.frames()
    assert [decode_request(b) for b in bodies] == [Request(rid, op, args)]


def test_nil_args_means_no_arguments() -> None:
    req = decode_request(pack({"v": 1, "id": 7, "op": "list_keys", "args": None}))
    assert isinstance(req, Request)
    assert req.args == Empty()
