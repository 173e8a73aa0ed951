"""Rate limits: token buckets per peer and per key, refusing with ``rate_limited``."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from signd_client.errors import InvalidArgument, RateLimited
from signd_client.protocol import (
    FrameDecoder,
    SignArgs,
    SignBatchArgs,
    decode_response,
    encode_request,
)

if TYPE_CHECKING:
    from conftest import Daemon


def _pipeline(d: Daemon, frames: list[bytes]) -> list[Any]:
    """Send every frame in one write; the answers, in request-id order."""
    s = d.connect_raw()
    try:
        s.sendall(b"".join(frames))
        decoder = FrameDecoder(64 << 20)
        answers: dict[int, Any] = {}
        while len(answers) < len(frames):
            data = s.recv(1 << 20)
            assert data
            decoder.receive_data(data)
            for body in decoder.frames():
                resp = decode_response(body)
                assert resp.id is not None
                answers[resp.id] = resp
        return [answers[i] for i in sorted(answers)]
    finally:
        s.close()


def _signs(key: str, n: int, start: int = 0) -> list[bytes]:
    digest = hashlib.sha256(b"rate").digest()
    return [
        encode_request(start + i, "sign", SignArgs(key=key, digest=digest, hash="sha256"))
        for i in range(n)
    ]


def test_per_peer_bucket(make_daemon: Callable[..., Daemon], key_name: str) -> None:
    d = make_daemon("[rate_limits]\nper_principal = 5\nper_principal_burst = 5\n")
    with d.client() as c:
        c.create_key(key_name, "ec-p256")  # not limited: only sign, sign_batch, verify
    answers = _pipeline(d, _signs(key_name, 10))
    ok = [a for a in answers if a.error is None]
    limited = [a.error for a in answers if a.error is not None]
    assert len(ok) == 5
    assert len(limited) == 5
    for err in limited:
        assert isinstance(err, RateLimited)
        assert err.retryable
        assert err.retry_after is not None
        assert 0 < err.retry_after <= 1.0  # one token at 5/s is 0.2 s away
    # Waiting as told is enough (the subject: real time refills the daemon's bucket).
    time.sleep(max(e.retry_after or 0 for e in limited) + 0.1)
    with d.client(retries=0) as c:
        assert c.sign(key_name, b"later").version == 1


def test_per_key_bucket_leaves_other_keys_alone(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon("[rate_limits]\nper_key = 3\nper_key_burst = 3\n")
    other = key_name + "-b"
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
        c.create_key(other, "ec-p256")
    answers = _pipeline(d, _signs(key_name, 5) + _signs(other, 3, start=5))
    assert [a.error is None for a in answers[:5]] == [True] * 3 + [False] * 2
    assert "over its rate limit" in str(answers[3].error)
    assert all(a.error is None for a in answers[5:])


def test_sign_batch_costs_its_items(make_daemon: Callable[..., Daemon], key_name: str) -> None:
    d = make_daemon("[rate_limits]\nper_principal = 1\nper_principal_burst = 10\n")
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
    digests = tuple(hashlib.sha256(b"%d" % i).digest() for i in range(8))
    batch = SignBatchArgs(key=key_name, digests=digests, hash="sha256")
    first, second = _pipeline(
        d, [encode_request(0, "sign_batch", batch), encode_request(1, "sign_batch", batch)]
    )
    assert first.error is None
    assert isinstance(second.error, RateLimited)


@pytest.mark.parametrize(
    ("table", "setting"),
    [
        ("per_principal = 2\n", "rate_limits.per_principal_burst"),
        ("per_key = 2\n", "rate_limits.per_key_burst"),
    ],
)
def test_a_batch_larger_than_the_burst_is_refused(
    make_daemon: Callable[..., Daemon], key_name: str, table: str, setting: str
) -> None:
    """A 2/s principal (burst 2) once signed 4,000 items at once with two batches
    of 2,000: the cost was capped at the burst.  Now such a batch is refused, not
    retryably (it could never fit), and it takes nothing from the bucket."""
    d = make_daemon("[rate_limits]\n" + table)
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
    digests = tuple(hashlib.sha256(b"%d" % i).digest() for i in range(2000))
    batch = SignBatchArgs(key=key_name, digests=digests, hash="sha256")
    answers = _pipeline(
        d, [encode_request(0, "sign_batch", batch), encode_request(1, "sign_batch", batch)]
    )
    signed = sum(
        1
        for a in answers
        if a.result is not None
        for item in a.result["results"]
        if item.get("signature")
    )
    assert signed == 0
    for a in answers:
        assert isinstance(a.error, InvalidArgument), a
        assert not a.error.retryable
        assert setting in a.error.message
        assert "2000" in a.error.message
    # The refused batches took nothing: the whole burst is still there.
    two = SignBatchArgs(key=key_name, digests=digests[:2], hash="sha256")
    (ok,) = _pipeline(d, [encode_request(2, "sign_batch", two)])
    assert ok.error is None, ok.error


def test_the_client_raises_rate_limited(make_daemon: Callable[..., Daemon], key_name: str) -> None:
    d = make_daemon("[rate_limits]\nper_principal = 0.5\nper_principal_burst = 1\n")
    with d.client(retries=0) as c:
        c.create_key(key_name, "ec-p256")
        c.sign(key_name, b"one")
        with pytest.raises(RateLimited) as info:
            c.sign(key_name, b"two")
    assert info.value.retry_after is not None
    assert info.value.retry_after > 0.5


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ("per_key = -1\n", "rate_limits.per_key"),
        ('per_principal = "fast"\n', "rate_limits.per_principal"),
        ("per_key = 5\nper_key_burst = 0\n", "rate_limits.per_key_burst"),
        ("everyone = 1\n", "rate_limits.everyone"),
    ],
)
def test_bad_rate_limits_name_the_field(
    make_daemon: Callable[..., Daemon], table: str, field: str
) -> None:
    out = make_daemon("[rate_limits]\n" + table, start=False).check_config()
    assert out.returncode == 2
    assert field in out.stderr, out.stderr


def test_the_client_waits_as_told_before_retrying(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    """A retry after ``rate_limited`` waits ``retry_after`` (0.2 s here), not only the
    short back-off (50 ms, then 100 ms), so back-to-back calls all get through."""
    d = make_daemon("[rate_limits]\nper_principal = 5\nper_principal_burst = 1\n")
    with d.client(retries=2) as c:
        c.create_key(key_name, "ec-p256")
        for i in range(3):
            assert c.sign(key_name, b"%d" % i).version == 1
