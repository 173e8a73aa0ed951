"""A token worker's op table and error edge, fed frames in-process: a session
that never opened a token, so only what needs no token (verifications) works,
and everything else must come back as a signd error through the one map."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signd import errors
from signd.keys.algorithms import Scheme
from signd.token import ipc
from signd.token.session import TokenSession, map_error
from signd.token.verify import Verifier
from signd.token.worker import Worker


def answer_to(worker: Worker, msg: list[Any]) -> ipc.Answer:
    decoder = ipc.IpcDecoder()
    decoder.receive_data(worker.handle(msg))
    (reply,) = decoder.messages()
    answer = ipc.decode_answer(reply)
    assert isinstance(answer, ipc.Answer)
    return answer


@pytest.fixture
def worker() -> Worker:
    return Worker(TokenSession(), Verifier())


def verify_job(message: bytes, signed: bytes) -> ipc.VerifyJob:
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signature = key.sign(signed, ec.ECDSA(hashes.SHA256()))
    return ipc.VerifyJob("ec-p256", ((1, spki),), message, None, None, None, None, signature)


def test_a_batch_answers_each_job_through_the_error_map(worker: Worker) -> None:
    jobs: list[ipc.SignJob | ipc.VerifyJob] = [
        verify_job(b"hello", b"hello"),
        ipc.SignJob(b"\x01" * 16, Scheme.ECDSA, None, b"d" * 32),
        verify_job(b"hello", b"other"),
    ]
    answer = answer_to(worker, [5, "jobs", [[job.to_ipc() for job in jobs]]])
    assert answer.tag == 5
    assert answer.error is None
    batch = ipc.RunJobs.decode_result(answer.value)
    valid, signed, invalid = batch.outcomes
    assert valid[0] is True
    assert valid[1][0] == 1  # version 1 verifies
    assert signed == [False, int(errors.ErrorCode.TOKEN_UNAVAILABLE), "no session to the token"]
    assert invalid == [True, None]
    assert batch.seconds >= 0


def test_a_failed_call_is_answered_with_its_signd_error(worker: Worker) -> None:
    answer = answer_to(worker, [6, "revisions", ["k"]])
    assert answer.tag == 6
    assert isinstance(answer.error, errors.TokenUnavailable)


def test_an_unknown_op_is_answered_not_fatal(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, "signd.token"):
        answer = answer_to(worker, [7, "fly", []])
    assert answer.tag == 7
    assert isinstance(answer.error, errors.InternalError)
    assert "unknown worker operation" in answer.error.message


def test_every_call_has_a_handler(worker: Worker) -> None:
    assert set(worker._table) == set(ipc.CALLS.values())


class Pkcs11Like(Exception):
    pass


def test_the_map_keeps_signd_errors_and_hides_everything_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conflict = errors.Conflict("taken")
    assert map_error(conflict, "generate") is conflict
    with caplog.at_level(logging.ERROR, "signd.token"):
        err = map_error(Pkcs11Like("secret detail"), "sign")
    assert isinstance(err, errors.InternalError)
    assert "secret detail" not in err.message
