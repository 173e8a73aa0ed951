"""The worker protocol (``signd.token.ipc``) with bytes alone: no token, no process."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from signd import errors
from signd.keys.algorithms import Scheme
from signd.protocol import HEADER
from signd.token import ipc
from signd.token.ipc import (
    CALLS,
    LOST_TAG,
    Answer,
    Batch,
    IpcDecoder,
    IpcError,
    Lost,
    MetadataBlob,
    SignJob,
    TokenInfo,
    VerifyJob,
)
from signd_client.errors import UnknownWireError

SIGN = SignJob(b"\x01" * 16, Scheme.ECDSA, None, b"d" * 32)
PSS = SignJob(b"\x02" * 16, Scheme.RSA_PSS, "sha256", b"e" * 32)
VERIFY = VerifyJob(
    "ec-p256",
    ((2, b"spki-2"), (1, b"spki-1")),
    b"message",
    None,
    "sha256",
    None,
    "raw",
    b"s",
    b"d" * 32,
)
INFO = TokenInfo("signd-test", "SoftHSM", "SoftHSM v2", "1234", ["CKM_ECDSA"], {"ec-p256": None})

#: One value of every call, as the daemon would send it.
CALL_EXAMPLES: list[ipc.Call[Any]] = [
    ipc.Open("/usr/lib/softhsm/libsofthsm2.so", "signd-test", "1234", "info", 0.0, "softhsm"),
    ipc.RunJobs([SIGN, PSS, VERIFY]),
    ipc.PublicKeys([b"\x01" * 16, b"\x02" * 16]),
    ipc.LoadMetadata(None),
    ipc.LoadMetadata("k"),
    ipc.Revisions("k"),
    ipc.CreateMetadata("k", 3, b"record"),
    ipc.DropCreated(),
    ipc.DropOlder("k", 3),
    ipc.Generate("ec-p256", b"\x03" * 16, "k/1"),
    ipc.DestroyKeys(b"\x03" * 16, True),
    ipc.Probe(),
    ipc.WrapPrivate(b"\x03" * 16),
    ipc.WrapCheckValue(),
    ipc.BackupMac(b"header"),
    ipc.VerifyBackupMac(b"header", b"m" * 32),
    ipc.RestoreKeypair("ec-p256", b"\x04" * 16, "k/v2", b"spki", b"wrapped"),
    ipc.RestoreKeypair("ec-p256", b"\x05" * 16, "k/v1", b"spki", None),
    ipc.ImportPublic(),
    ipc.ImportKeypair(
        "ec-p256", b"\x06" * 16, "k/v1", "ab" * 32, b"rsa-oaep", b"aes-kwp", b"spki", False
    ),
]

#: A result of every call, as the worker would answer it.
RESULT_EXAMPLES: dict[str, Any] = {
    "open": INFO,
    "jobs": Batch(0.25, [[True, b"sig"], [False, 502, "token failed sign"], [True, [2, "ES256"]]]),
    "public_keys": {b"\x01" * 16: (b"spki", True), b"\x02" * 16: (b"spki2", False)},
    "load_metadata": [MetadataBlob("a", 1, b"x"), MetadataBlob("b", 7, b"y")],
    "revisions": [3, 4],
    "create_metadata": None,
    "drop_created": None,
    "drop_older": None,
    "generate": b"spki",
    "destroy_keys": 2,
    "probe": None,
    "wrap_private": b"wrapped",
    "wrap_check_value": "0f3a5c7e9b1d2f40",
    "backup_mac": b"m" * 32,
    "verify_backup_mac": True,
    "restore_keypair": None,
    "import_public": (b"spki", "ab" * 32),
    "import_keypair": b"spki",
}


def messages(data: bytes, cut: int | None = None) -> list[list[Any]]:
    """Feed ``data`` whole, or ``cut`` bytes at a time; every message decoded."""
    decoder = IpcDecoder()
    out: list[list[Any]] = []
    step = cut or len(data) or 1
    for i in range(0, len(data), step):
        decoder.receive_data(data[i : i + step])
        out.extend(decoder.messages())
    return out


def test_every_call_has_an_example() -> None:
    assert {type(c) for c in CALL_EXAMPLES} == set(CALLS.values())
    assert set(RESULT_EXAMPLES) == set(CALLS)


@pytest.mark.parametrize("call", CALL_EXAMPLES, ids=lambda c: type(c).__name__)
def test_request_round_trip(call: ipc.Call[Any]) -> None:
    (msg,) = messages(ipc.encode_request(7, call))
    request = ipc.decode_request(msg)
    assert request.tag == 7
    assert request.call == call


@pytest.mark.parametrize("call", CALL_EXAMPLES, ids=lambda c: type(c).__name__)
def test_answer_round_trip(call: ipc.Call[Any]) -> None:
    result = RESULT_EXAMPLES[call.OP]
    (msg,) = messages(ipc.encode_answer(9, call, result))
    answer = ipc.decode_answer(msg)
    assert answer == Answer(9, answer.value)
    assert isinstance(answer, Answer)
    assert call.decode_result(answer.value) == result


def test_jobs_frame_is_the_calls_frame() -> None:
    jobs = [SIGN, VERIFY]
    assert ipc.encode_jobs(3, jobs) == ipc.encode_request(3, ipc.RunJobs(jobs))


def test_the_workers_hot_path_reads_and_answers_jobs_as_the_table_does() -> None:
    """``decode_jobs`` / ``encode_batch`` (the worker's shortcut) agree with
    ``decode_request`` / ``encode_answer``, and leave every other call to them."""
    (msg,) = messages(ipc.encode_jobs(4, [SIGN, VERIFY, PSS]))
    assert ipc.decode_jobs(msg) == (4, list(ipc.decode_request(msg).call.jobs))
    batch = RESULT_EXAMPLES["jobs"]
    assert ipc.encode_batch(4, batch) == ipc.encode_answer(4, ipc.RunJobs([]), batch)
    for call in CALL_EXAMPLES:
        if not isinstance(call, ipc.RunJobs):
            (other,) = messages(ipc.encode_request(2, call))
            assert ipc.decode_jobs(other) is None


def test_rows_that_are_no_jobs_name_their_tag_on_the_hot_path() -> None:
    with pytest.raises(IpcError, match="not a list of jobs") as caught:
        ipc.decode_jobs([6, "jobs", [[["s", b"id"]]]])
    assert caught.value.tag == 6


def test_jobs_travel_as_short_rows() -> None:
    """The hot path's layout: positional rows, no field names on the wire."""
    (msg,) = messages(ipc.encode_jobs(5, [SIGN]))
    assert msg == [5, "jobs", [[["s", SIGN.object_id, "ecdsa", None, SIGN.data]]]]


def test_a_verification_travels_as_its_values() -> None:
    """No request in wire form: what was signed, the options, the signature,
    the public keys as the SPKI DER the daemon holds, and the message's
    SHA-256 if the daemon has it."""
    (msg,) = messages(ipc.encode_jobs(5, [VERIFY]))
    spkis = [[2, b"spki-2"], [1, b"spki-1"]]
    row = ["v", "ec-p256", spkis, b"message", None, "sha256", None, "raw", b"s", b"d" * 32]
    assert msg == [5, "jobs", [[row]]]
    (job,) = ipc.RunJobs.from_args(msg[2]).jobs
    assert job == VERIFY


def test_partial_frames_fed_byte_by_byte() -> None:
    stream = b"".join(ipc.encode_request(i + 1, c) for i, c in enumerate(CALL_EXAMPLES))
    whole = messages(stream)
    assert len(whole) == len(CALL_EXAMPLES)
    assert messages(stream, cut=1) == whole
    assert messages(stream, cut=7) == whole


def test_nothing_before_a_frame_is_complete() -> None:
    frame = ipc.encode_request(1, ipc.Probe())
    decoder = IpcDecoder()
    decoder.receive_data(frame[:-1])
    assert list(decoder.messages()) == []
    assert decoder.buffered == len(frame) - 1
    decoder.receive_data(frame[-1:])
    assert list(decoder.messages()) == [[1, "probe", []]]


def test_oversized_frame_is_refused_from_its_header() -> None:
    decoder = IpcDecoder(max_frame=64)
    decoder.receive_data(HEADER.pack(65))
    with pytest.raises(errors.FrameTooLarge):
        list(decoder.messages())


def test_a_frame_at_the_limit_is_read() -> None:
    body = msgpack.packb([1, "revisions", ["x" * 40]], use_bin_type=True)
    decoder = IpcDecoder(max_frame=len(body))
    decoder.receive_data(HEADER.pack(len(body)) + body)
    assert list(decoder.messages()) == [[1, "revisions", ["x" * 40]]]


@pytest.mark.parametrize("body", [b"\xc1", msgpack.packb(5), msgpack.packb([1])])
def test_a_body_that_is_not_a_message(body: bytes) -> None:
    decoder = IpcDecoder()
    decoder.receive_data(HEADER.pack(len(body)) + body)
    with pytest.raises(IpcError):
        list(decoder.messages())


def test_unknown_op_names_its_tag() -> None:
    with pytest.raises(IpcError, match="unknown worker operation 'fly'") as info:
        ipc.decode_request([12, "fly", []])
    assert info.value.tag == 12
    assert info.value.code == errors.ErrorCode.INTERNAL_ERROR


@pytest.mark.parametrize(
    "msg",
    [
        [4, "revisions", []],
        [4, "revisions", ["a", "b"]],
        [4, "jobs", [[["x", b"id"]]]],
        [4, "jobs", [[["s", b"id", "no-such-scheme", None, b""]]]],
        [4, "jobs", [[["s", b"id"]]]],
        [4, "jobs", 5],
    ],
)
def test_wrong_arguments_name_their_tag(msg: list[Any]) -> None:
    with pytest.raises(IpcError) as info:
        ipc.decode_request(msg)
    assert info.value.tag == 4


def test_not_a_request() -> None:
    with pytest.raises(IpcError):
        ipc.decode_request([1, "probe"])


def test_not_an_answer() -> None:
    with pytest.raises(IpcError):
        ipc.decode_answer([1, False, 500])


@pytest.mark.parametrize(
    "error",
    [
        errors.TokenUnavailable("gone"),
        errors.TokenError("token failed sign: GeneralError"),
        errors.Conflict("object id 01 is taken"),
        errors.UnsupportedAlgorithm("this token cannot generate rsa-4096 keys"),
        errors.InternalError("internal error during sign"),
        errors.InvalidArgument("bad"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_keep_their_class_and_message(error: errors.WireError) -> None:
    (msg,) = messages(ipc.encode_failure(3, error))
    answer = ipc.decode_answer(msg)
    assert isinstance(answer, Answer)
    assert type(answer.error) is type(error)
    assert answer.error is not None
    assert answer.error.message == error.message
    code, message = ipc.error_to_ipc(error)
    assert type(ipc.error_from_ipc(code, message)) is type(error)
    assert ipc.failed(error) == [False, code, message]


def test_an_unknown_error_code_still_decodes() -> None:
    err = ipc.error_from_ipc(999, "from the future")
    assert isinstance(err, UnknownWireError)
    assert err.raw_code == 999
    assert err.message == "from the future"


def test_token_lost_is_not_an_answer() -> None:
    (msg,) = messages(ipc.encode_lost("DeviceRemoved from C_GetTokenInfo"))
    assert msg[0] == LOST_TAG
    assert ipc.decode_answer(msg) == Lost("token lost: DeviceRemoved from C_GetTokenInfo")


def test_a_failed_open_is_an_answer_not_a_loss() -> None:
    """``Open`` has a tag of its own, so its failure is never taken for ``Lost``."""
    (msg,) = messages(ipc.encode_failure(ipc.OPEN_TAG, errors.TokenUnavailable("wrong PIN")))
    answer = ipc.decode_answer(msg)
    assert isinstance(answer, Answer)
    assert isinstance(answer.error, errors.TokenUnavailable)


def test_the_pin_is_not_in_the_open_calls_repr() -> None:
    call = ipc.Open("/lib.so", "label", "s3cret-pin", "info", 0.0, "softhsm")
    assert "s3cret-pin" not in repr(call)
