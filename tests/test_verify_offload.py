"""Verifications that arrive together go to the token workers; same answers as inline."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from signd_client.protocol import FrameDecoder, VerifyArgs, decode_response, encode_request

if TYPE_CHECKING:
    from conftest import Daemon


def _pipeline(daemon: Daemon, requests: list[VerifyArgs]) -> dict[int, Any]:
    """Send every request in one write (so the daemon sees them together)."""
    s = daemon.connect_raw()
    try:
        s.sendall(b"".join(encode_request(i, "verify", a) for i, a in enumerate(requests)))
        decoder = FrameDecoder(64 << 20)
        answers: dict[int, Any] = {}
        while len(answers) < len(requests):
            data = s.recv(1 << 20)
            assert data, "signd closed the connection"
            decoder.receive_data(data)
            for body in decoder.frames():
                resp = decode_response(body)
                assert resp.id is not None
                assert resp.id not in answers
                answers[resp.id] = resp
        return answers
    finally:
        s.close()


def test_pipelined_verifications_are_answered_like_inline_ones(
    signd: Daemon, key_name: str
) -> None:
    msg = b"verify me"
    digest = hashlib.sha256(msg).digest()
    with signd.client() as c:
        c.create_key(key_name, "ec-p256")
        v1 = c.sign(key_name, msg).signature
        c.rotate(key_name)
        v2 = c.sign(key_name, digest=digest, hash="sha256").signature
        raw = c.sign(key_name, msg, format="raw").signature
    bad = bytearray(v2)
    bad[-1] ^= 1
    cases: list[tuple[VerifyArgs, Any]] = []
    for _ in range(10):
        cases += [
            (VerifyArgs(key=key_name, signature=v1, message=msg), (True, 1)),
            (VerifyArgs(key=key_name, signature=v2, digest=digest, hash="sha256"), (True, 2)),
            (VerifyArgs(key=key_name, signature=raw, message=msg, format="raw"), (True, 2)),
            (VerifyArgs(key=key_name, signature=bytes(bad), message=msg), (False, None)),
            (VerifyArgs(key=key_name, signature=v1, message=msg, version=2), (False, None)),
            (VerifyArgs(key=key_name, signature=v1, message=msg, version=9), 301),
        ]
    answers = _pipeline(signd, [a for a, _ in cases])
    for i, (_, expected) in enumerate(cases):
        resp = answers[i]
        if isinstance(expected, int):
            assert resp.error is not None
            assert int(resp.error.code) == expected
            continue
        assert resp.error is None, resp.error
        assert (resp.result["valid"], resp.result.get("version")) == expected, i
        if expected[0]:
            assert resp.result["algorithm"] == "ecdsa-p256-sha256"
