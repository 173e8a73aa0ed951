"""The Python client's side of the golden frames in ``tests/vectors/frames.json``.

The client's call builders must encode every request vector to exactly its
bytes, and the client must decode every response vector into the expected
result dataclass or exception.  This file imports only ``signd_client``: the
client is checked against the contract, not against the daemon's code.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import struct
import types
import typing
from pathlib import Path
from typing import Any

import msgpack
import pytest

from signd_client import _calls, errors
from signd_client.protocol import (
    OPS,
    FrameDecoder,
    Response,
    decode_response,
    encode_request,
)

ROOT = Path(__file__).resolve().parents[3]
DOC = json.loads((ROOT / "tests" / "vectors" / "frames.json").read_text())
REQUESTS = [v for v in DOC["vectors"] if v["direction"] == "request"]
RESULTS = [v for v in DOC["vectors"] if v["direction"] == "response" and "result" in v["message"]]
ERRORS = [v for v in DOC["vectors"] if v["direction"] == "response" and "error" in v["message"]]

#: name -> (class, retryable), written out here, independently of the code under test.
ERROR_CLASSES: dict[str, tuple[type[errors.WireError], bool]] = {
    "malformed_frame": (errors.MalformedFrame, False),
    "frame_too_large": (errors.FrameTooLarge, False),
    "unsupported_version": (errors.UnsupportedVersion, False),
    "unknown_operation": (errors.UnknownOperation, False),
    "invalid_request": (errors.InvalidRequest, False),
    "invalid_argument": (errors.InvalidArgument, False),
    "invalid_digest": (errors.InvalidDigest, False),
    "unsupported_algorithm": (errors.UnsupportedAlgorithm, False),
    "key_not_found": (errors.KeyNotFound, False),
    "version_not_found": (errors.VersionNotFound, False),
    "key_exists": (errors.KeyExists, False),
    "version_not_usable": (errors.VersionNotUsable, False),
    "deletion_not_allowed": (errors.DeletionNotAllowed, False),
    "conflict": (errors.Conflict, True),
    "position_used": (errors.PositionUsed, False),
    "permission_denied": (errors.PermissionDenied, False),
    "rate_limited": (errors.RateLimited, True),
    "internal_error": (errors.InternalError, False),
    "token_unavailable": (errors.TokenUnavailable, True),
    "token_error": (errors.TokenError, False),
    "busy": (errors.Busy, True),
    "shutting_down": (errors.ShuttingDown, True),
    "deadline_exceeded": (errors.DeadlineExceeded, True),
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


def call_for(op: str, args: dict[str, Any]) -> _calls.Call[Any]:
    """The client's own builder for ``op``, called the way a user calls it.

    The builders name the key ``name`` where the wire says ``key``, and the
    keys ``names`` where it says ``keys``.
    """
    builder = getattr(_calls, op)
    renamed = {"key": "name", "keys": "names"}
    kwargs = {renamed.get(k, k): v for k, v in args.items()}
    return typing.cast(_calls.Call[Any], builder(**kwargs))


def receive(frame: bytes) -> Response:
    """Decode one response frame the way the client does: framing, then body."""
    decoder = FrameDecoder(DOC["max_frame"])
    decoder.receive_data(frame)
    (body,) = decoder.frames()
    assert decoder.buffered == 0
    return decode_response(body)


# ---------------------------------------------------------------- requests


def test_every_client_operation_has_a_request_vector() -> None:
    builders = {
        name
        for name, fn in inspect.getmembers(_calls, inspect.isfunction)
        if fn.__module__ == _calls.__name__
    }
    assert builders == set(OPS)
    assert {v["op"] for v in REQUESTS} == builders
    assert {v["op"] for v in RESULTS} == builders


@pytest.mark.parametrize("vector", REQUESTS, ids=ids(REQUESTS))
def test_request_encodes_to_exact_bytes(vector: dict[str, Any]) -> None:
    message = from_json(vector["message"])
    call = call_for(message["op"], message["args"])
    assert call.op == vector["op"]
    frame = bytes.fromhex(vector["hex"])
    assert encode_request(message["id"], call.op, call.args) == frame
    # (b) and the bytes are the message.
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert msgpack.unpackb(frame[4:], raw=False) == message


# ---------------------------------------------------------------- responses


@pytest.mark.parametrize("vector", RESULTS, ids=ids(RESULTS))
def test_result_decodes_to_dataclass(vector: dict[str, Any]) -> None:
    message = from_json(vector["message"])
    resp = receive(bytes.fromhex(vector["hex"]))
    assert resp.id == message["id"]
    assert resp.error is None
    assert resp.result == message["result"]
    result_cls = OPS[vector["op"]].result
    expected = build(result_cls, message["result"])
    assert result_cls.from_wire(resp.result, strict=False) == expected


@pytest.mark.parametrize("vector", ERRORS, ids=ids(ERRORS))
def test_error_decodes_to_exception(vector: dict[str, Any]) -> None:
    message = vector["message"]
    err = message["error"]
    cls, retryable = ERROR_CLASSES[err["name"]]
    resp = receive(bytes.fromhex(vector["hex"]))
    assert resp.id == message["id"]
    assert resp.result is None
    assert type(resp.error) is cls
    assert int(resp.error.code) == err["code"]
    assert resp.error.name == err["name"]
    assert resp.error.message == err["message"]
    assert resp.error.retryable is retryable


def test_every_error_code_has_a_vector() -> None:
    assert {v["message"]["error"]["code"] for v in ERRORS} == {int(c) for c in errors.ErrorCode}
    assert {cls.code for cls, _ in ERROR_CLASSES.values()} == set(errors.ErrorCode)


def _with_unknown_fields(value: Any) -> Any:
    """Add a field a newer daemon might send to every map, nested ones too."""
    if isinstance(value, dict):
        return {**{k: _with_unknown_fields(v) for k, v in value.items()}, "x_future": [1, "a"]}
    if isinstance(value, list):
        return [_with_unknown_fields(v) for v in value]
    return value


@pytest.mark.parametrize("vector", RESULTS, ids=ids(RESULTS))
def test_unknown_result_fields_are_ignored(vector: dict[str, Any]) -> None:
    message = from_json(vector["message"])
    grown = {**message, "result": _with_unknown_fields(message["result"]), "trace": "abc"}
    body = msgpack.packb(grown, use_bin_type=True)
    resp = receive(struct.pack(">I", len(body)) + body)
    result_cls = OPS[vector["op"]].result
    assert result_cls.from_wire(resp.result, strict=False) == build(result_cls, message["result"])


def test_unknown_error_code_is_kept() -> None:
    body = msgpack.packb(
        {"v": 1, "id": 9, "error": {"code": 599, "name": "future_thing", "message": "later"}}
    )
    resp = receive(struct.pack(">I", len(body)) + body)
    assert isinstance(resp.error, errors.WireError)
    assert resp.error.name == "future_thing"
    assert "599" in str(resp.error)
    assert resp.error.message == "later"
