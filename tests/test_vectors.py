"""The daemon's side of the golden frames in ``tests/vectors/frames.json``.

The file is the wire contract (see PROTOCOL.md).  Here the daemon's codec must
decode every request vector into the expected typed ``Request``, encode every
result and error into exactly the vector's bytes, and refuse every rejected
request with the stated code and id.  The last tests send vectors to a real
daemon on a real socket and compare its answers with the vectors, byte for
byte.  ``clients/python/tests/test_vectors.py`` checks the client's side of
the same file.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, utils

from signd import errors
from signd.protocol import (
    OPS,
    BadRequest,
    FrameDecoder,
    Request,
    decode_request,
    encode_error,
    encode_result,
)

if TYPE_CHECKING:
    from conftest import Daemon  # the root conftest.py

VECTORS = Path(__file__).resolve().parent / "vectors" / "frames.json"
DOC = json.loads(VECTORS.read_text())
BY_NAME: dict[str, dict[str, Any]] = {v["name"]: v for v in DOC["vectors"]}
REQUESTS = [v for v in DOC["vectors"] if v["direction"] == "request"]
RESULTS = [v for v in DOC["vectors"] if v["direction"] == "response" and "result" in v["message"]]
ERRORS = [v for v in DOC["vectors"] if v["direction"] == "response" and "error" in v["message"]]

#: Every wire error, named independently of the code under test.
ERROR_CLASSES: dict[str, type[errors.WireError]] = {
    "malformed_frame": errors.MalformedFrame,
    "frame_too_large": errors.FrameTooLarge,
    "unsupported_version": errors.UnsupportedVersion,
    "unknown_operation": errors.UnknownOperation,
    "invalid_request": errors.InvalidRequest,
    "invalid_argument": errors.InvalidArgument,
    "invalid_digest": errors.InvalidDigest,
    "unsupported_algorithm": errors.UnsupportedAlgorithm,
    "key_not_found": errors.KeyNotFound,
    "version_not_found": errors.VersionNotFound,
    "key_exists": errors.KeyExists,
    "version_not_usable": errors.VersionNotUsable,
    "deletion_not_allowed": errors.DeletionNotAllowed,
    "conflict": errors.Conflict,
    "position_used": errors.PositionUsed,
    "permission_denied": errors.PermissionDenied,
    "rate_limited": errors.RateLimited,
    "internal_error": errors.InternalError,
    "token_unavailable": errors.TokenUnavailable,
    "token_error": errors.TokenError,
    "busy": errors.Busy,
    "shutting_down": errors.ShuttingDown,
    "deadline_exceeded": errors.DeadlineExceeded,
}


def ids(vectors: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in vectors]


def from_json(value: Any) -> Any:
    """The vector file's JSON back into msgpack values: {"$bin": hex} is bytes."""
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def build(cls: type[Any], data: dict[str, Any]) -> Any:
    """A message dataclass from plain data, through its constructor only."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    assert set(data) <= names, f"{cls.__name__} has no field(s) {set(data) - names}"
    return cls(**{name: _field(hints[name], value) for name, value in data.items()})


def _field(tp: Any, value: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        return tuple(_field(item, v) for v in value)
    if dataclasses.is_dataclass(tp):
        return build(typing.cast(type[Any], tp), value)
    return value


def frame_of(vector: dict[str, Any]) -> bytes:
    return bytes.fromhex(vector["hex"])


def body_of(vector: dict[str, Any]) -> bytes:
    frame = frame_of(vector)
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4, "length prefix does not match the body"
    return frame[4:]


# ---------------------------------------------------------------- the file itself


def test_vector_names_are_unique() -> None:
    names = [v["name"] for v in DOC["vectors"] + DOC["rejected_requests"]]
    assert len(names) == len(set(names))


def test_vectors_cover_every_op_and_every_error_code() -> None:
    assert {v["op"] for v in REQUESTS} == set(OPS)
    assert {v["op"] for v in RESULTS} == set(OPS)
    codes = {v["message"]["error"]["code"] for v in ERRORS}
    assert codes == {int(c) for c in errors.ErrorCode}


def test_protocol_md_describes_every_op() -> None:
    """Adding an op means its PROTOCOL.md section, with its request shown."""
    text = (Path(__file__).resolve().parents[1] / "PROTOCOL.md").read_text()
    for op in OPS:
        assert f"### `{op}`" in text, f"PROTOCOL.md has no section for {op}"
        assert f"[{op}.request" in text, f"PROTOCOL.md shows no {op} request frame"


@pytest.mark.parametrize("vector", DOC["vectors"], ids=ids(DOC["vectors"]))
def test_hex_is_the_message(vector: dict[str, Any]) -> None:
    """(b) the bytes decode to the message, and (a) packing it gives the bytes again."""
    body = body_of(vector)
    message = from_json(vector["message"])
    assert msgpack.unpackb(body, raw=False) == message
    # The JSON keeps the encoder's key order, so plain msgpack reproduces the bytes.
    assert msgpack.packb(message, use_bin_type=True) == body


# ---------------------------------------------------------------- the daemon's codec


@pytest.mark.parametrize("vector", REQUESTS, ids=ids(REQUESTS))
def test_request_decodes_to_typed_request(vector: dict[str, Any]) -> None:
    message = from_json(vector["message"])
    decoder = FrameDecoder(DOC["max_frame"])
    decoder.receive_data(frame_of(vector))
    (body,) = decoder.frames()
    args_cls = OPS[message["op"]].args
    expected = Request(message["id"], message["op"], build(args_cls, message["args"]))
    assert decode_request(body) == expected


@pytest.mark.parametrize("vector", RESULTS, ids=ids(RESULTS))
def test_result_encodes_to_exact_bytes(vector: dict[str, Any]) -> None:
    message = from_json(vector["message"])
    result = build(OPS[vector["op"]].result, message["result"])
    assert encode_result(message["id"], result) == frame_of(vector)


@pytest.mark.parametrize("vector", ERRORS, ids=ids(ERRORS))
def test_error_encodes_to_exact_bytes(vector: dict[str, Any]) -> None:
    message = vector["message"]
    err = message["error"]
    cls = ERROR_CLASSES[err["name"]]
    assert int(cls.code) == err["code"]
    exc = errors.error_from_wire(err["code"], err["name"], err["message"], err.get("retry_after"))
    assert type(exc) is cls
    assert encode_error(message["id"], exc) == frame_of(vector)


REJECTED = DOC["rejected_requests"]


@pytest.mark.parametrize("vector", REJECTED, ids=ids(REJECTED))
def test_rejected_request_gets_its_error(vector: dict[str, Any]) -> None:
    expected = vector["error"]
    cls = ERROR_CLASSES[expected["name"]]
    assert int(cls.code) == expected["code"]
    decoder = FrameDecoder(DOC["max_frame"])
    decoder.receive_data(frame_of(vector))
    if cls is errors.FrameTooLarge:
        with pytest.raises(errors.FrameTooLarge) as info:
            list(decoder.frames())
        exc: errors.WireError = info.value
        rid = None
    else:
        (body,) = decoder.frames()
        event = decode_request(body)
        assert isinstance(event, BadRequest), event
        exc, rid = event.error, event.id
    assert type(exc) is cls
    assert rid == expected["id"]
    if vector["signd_response"] is not None:
        assert encode_error(rid, exc) == frame_of(BY_NAME[vector["signd_response"]])


ACCEPTED = DOC["accepted_requests"]


@pytest.mark.parametrize("vector", ACCEPTED, ids=ids(ACCEPTED))
def test_accepted_request_decodes(vector: dict[str, Any]) -> None:
    want = from_json(vector["request"])
    event = decode_request(frame_of(vector)[4:])
    assert event == Request(want["id"], want["op"], build(OPS[want["op"]].args, want["args"]))


def test_signatures_in_the_vectors_verify() -> None:
    """The examples are real: each signature verifies against the example's public key."""
    sign = from_json(BY_NAME["sign.request.message"]["message"])["args"]
    der = from_json(BY_NAME["sign.result.der"]["message"])["result"]["signature"]
    raw = from_json(BY_NAME["sign.result.raw"]["message"])["result"]["signature"]
    pem = BY_NAME["public_key.result"]["message"]["result"]["public_key_pem"]
    ec_key = serialization.load_pem_public_key(pem.encode())
    assert isinstance(ec_key, ec.EllipticCurvePublicKey)
    ec_key.verify(der, sign["message"], ec.ECDSA(hashes.SHA256()))
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    assert utils.encode_dss_signature(r, s) == der
    p256_order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    assert s <= p256_order // 2  # signd answers low-S
    ed = from_json(BY_NAME["sign.result.ed25519"]["message"])["result"]["signature"]
    ed_pem = BY_NAME["public_key.result.ed25519"]["message"]["result"]["public_key_pem"]
    ed_key = serialization.load_pem_public_key(ed_pem.encode())
    assert isinstance(ed_key, ed25519.Ed25519PublicKey)
    ed_key.verify(ed, sign["message"])


# ---------------------------------------------------------------- a real daemon


def _read_frames(sock: socket.socket, count: int) -> list[bytes]:
    """Read ``count`` whole frames (length prefix included) from ``sock``."""
    buf = b""
    frames: list[bytes] = []
    while len(frames) < count:
        while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
            end = 4 + struct.unpack(">I", buf[:4])[0]
            frames.append(buf[:end])
            buf = buf[end:]
        if len(frames) >= count:
            break
        data = sock.recv(65536)
        assert data, f"daemon closed the connection after {len(frames)} of {count} answers"
        buf += data
    assert not buf
    return frames


def _error_of(frame: bytes) -> tuple[Any, int, str]:
    msg = msgpack.unpackb(frame[4:], raw=False)
    assert set(msg) == {"v", "id", "error"}
    assert msg["v"] == 1
    return msg["id"], msg["error"]["code"], msg["error"]["name"]


def test_daemon_answers_rejected_requests_as_the_vectors_say(signd: Daemon) -> None:
    """Pipelined on one connection: each gets its error, and the connection stays open."""
    vectors = [v for v in REJECTED if v["error"]["code"] != errors.ErrorCode.FRAME_TOO_LARGE]
    with signd.connect_raw() as sock:
        sock.sendall(b"".join(frame_of(v) for v in vectors))
        answers = _read_frames(sock, len(vectors))
        # None of these reach the service, so they are answered in order.
        for vector, answer in zip(vectors, answers, strict=True):
            e = vector["error"]
            assert _error_of(answer) == (e["id"], e["code"], e["name"]), vector["name"]
            if vector["signd_response"] is not None:
                assert answer == frame_of(BY_NAME[vector["signd_response"]]), vector["name"]
        # Still open and still serving after all that.
        sock.sendall(frame_of(BY_NAME["health.request"]))
        (health,) = _read_frames(sock, 1)
        msg = msgpack.unpackb(health[4:], raw=False)
        assert msg["id"] == (1 << 64) - 1
        assert msg["result"]["ready"] is True


def test_daemon_answers_oversized_frame_then_closes(signd: Daemon) -> None:
    (vector,) = [v for v in REJECTED if v["name"] == "frame_too_large"]
    with signd.connect_raw() as sock:
        sock.sendall(frame_of(vector))
        (answer,) = _read_frames(sock, 1)
        assert answer == frame_of(BY_NAME["error.frame_too_large"])
        assert sock.recv(1) == b"", "the connection must be closed after frame_too_large"


def test_daemon_sends_the_key_errors_of_the_vectors(signd: Daemon) -> None:
    """key_not_found, invalid_digest, version_not_usable and deletion_not_allowed,
    byte for byte, for the vectors' requests."""
    with signd.client() as c:
        # The vectors' app-signing: two versions, every setting off.
        try:
            c.create_key("app-signing", "ec-p256")
        except errors.KeyExists:
            pass
        if c.key_info("app-signing").current_version < 2:
            c.rotate("app-signing")
        info = c.key_info("app-signing")
    assert [v.state for v in info.versions] == ["verify-only", "active"]
    assert (info.min_sign_version, info.deletion_allowed) == (0, False)
    vectors = [v for v in REQUESTS if "signd_response" in v]
    assert {v["name"] for v in vectors} == {
        "key_info.request.missing",
        "sign.request.short_digest",
        "sign.request.version_not_active",
        "destroy.request.not_allowed",
    }
    with signd.connect_raw() as sock:
        sock.sendall(b"".join(frame_of(v) for v in vectors))
        answers = _read_frames(sock, len(vectors))
    # Answers may come back in any order; they are matched by id.
    assert sorted(answers) == sorted(frame_of(BY_NAME[v["signd_response"]]) for v in vectors)
