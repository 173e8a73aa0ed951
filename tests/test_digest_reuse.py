"""Each message hashed once with audit on: the SHA-256 the transport computed
for a request's audit record is what a SHA-256 algorithm signs or verifies.

In process: ``Service.handle`` on a token in memory, handed a SHA-256 for a
request's message.  To prove the service uses the digest it was given and
does not hash again, each test hands it the SHA-256 of *another* message:
the signature then verifies over that other message and not over the one
sent.  In the daemon the two are the same by construction: the last test
checks with ``cryptography`` that what a daemon with audit on signs verifies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from fakes import Replies, open_harness, principal
from signd.keys import algorithms
from signd.protocol import (
    CreateKeyArgs,
    Message,
    PublicKeyArgs,
    Request,
    SignArgs,
    VerifyArgs,
)

if TYPE_CHECKING:
    from conftest import Daemon

ROOT = principal(0, user="root")


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


SENT = b"the message sent"
OTHER = b"the message the digest is of"


def load_pem(pem: str) -> Any:
    return serialization.load_pem_public_key(pem.encode())


def check(pub: Any, signature: bytes, message: bytes, h: hashes.HashAlgorithm, pss: bool) -> None:
    """Raises: InvalidSignature."""
    if isinstance(pub, ec.EllipticCurvePublicKey):
        pub.verify(signature, message, ec.ECDSA(h))
    else:
        assert isinstance(pub, rsa.RSAPublicKey)
        pad: padding.AsymmetricPadding = (
            padding.PSS(padding.MGF1(h), padding.PSS.DIGEST_LENGTH) if pss else padding.PKCS1v15()
        )
        pub.verify(signature, message, pad, h)


_ids = iter(range(1, 1 << 30))


def handle(h: Any, requests: list[tuple[str, Message, bytes | None]]) -> tuple[Replies, list[int]]:
    """``requests`` (op, args, the SHA-256 handed along) as one read."""
    batch = [Request(next(_ids), op, args) for op, args, _ in requests]
    replies = Replies()
    for work in h.service.handle(batch, replies, object(), ROOT, [d for _, _, d in requests]):
        h.nursery.start_soon(work)
    return replies, [r.id for r in batch]


@pytest.mark.parametrize(
    ("kt", "padding_name"),
    [("ec-p256", None), ("rsa-2048", None), ("rsa-2048", "pss")],
)
async def test_a_sha256_signature_signs_the_digest_it_is_handed(
    autojump_clock: Any, kt: str, padding_name: str | None
) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        await c.call("create_key", CreateKeyArgs(key="k", type=kt))
        pub = load_pem((await c.call("public_key", PublicKeyArgs(key="k"))).public_key_pem)
        args = SignArgs(key="k", message=SENT, padding=padding_name)
        replies, (given, right) = handle(
            h,
            [
                ("sign", args, hashlib.sha256(OTHER).digest()),
                ("sign", args, hashlib.sha256(SENT).digest()),
            ],
        )
        signed = await replies.answer(given, "sign")
        pss = padding_name == "pss"
        check(pub, signed.signature, OTHER, hashes.SHA256(), pss)  # the digest handed along
        with pytest.raises(InvalidSignature):
            check(pub, signed.signature, SENT, hashes.SHA256(), pss)
        check(pub, (await replies.answer(right, "sign")).signature, SENT, hashes.SHA256(), pss)


async def test_another_hash_ignores_the_sha256_and_hashes_the_message(
    autojump_clock: Any,
) -> None:
    async with open_harness() as h:
        c = h.connect(ROOT)
        await c.call("create_key", CreateKeyArgs(key="k", type="ec-p384"))
        pub = load_pem((await c.call("public_key", PublicKeyArgs(key="k"))).public_key_pem)
        wrong = hashlib.sha256(OTHER).digest()
        replies, (p384, sha512) = handle(
            h,
            [
                ("sign", SignArgs(key="k", message=SENT), wrong),
                ("sign", SignArgs(key="k", message=SENT, hash="sha512"), wrong),
            ],
        )
        check(pub, (await replies.answer(p384, "sign")).signature, SENT, hashes.SHA384(), False)
        check(pub, (await replies.answer(sha512, "sign")).signature, SENT, hashes.SHA512(), False)


@pytest.mark.parametrize("lone", [True, False], ids=["inline", "on-the-workers"])
async def test_a_verification_verifies_the_digest_it_is_handed(
    autojump_clock: Any, lone: bool
) -> None:
    """Inline (a lone request) and on the token workers (two in one read)."""
    async with open_harness() as h:
        c = h.connect(ROOT)
        await c.call("create_key", CreateKeyArgs(key="k", type="ec-p256"))
        sig = (await c.call("sign", SignArgs(key="k", message=OTHER))).signature
        args = VerifyArgs(key="k", signature=sig, message=SENT)
        digest = hashlib.sha256(OTHER).digest()
        before = h.pool.jobs_done
        if lone:
            replies, (rid,) = handle(h, [("verify", args, digest)])
            assert (await replies.answer(rid, "verify")).valid is True
            assert h.pool.jobs_done == before
            return
        replies, (rid, unhanded) = handle(h, [("verify", args, digest), ("verify", args, None)])
        assert (await replies.answer(rid, "verify")).valid is True
        assert (await replies.answer(unhanded, "verify")).valid is False  # SENT, hashed
        assert h.pool.jobs_done == before + 2


def test_a_verification_takes_the_sha256_for_sha256_only() -> None:
    """``verify_any`` (inline, and in a worker) verifies the SHA-256 it is
    handed for a SHA-256 algorithm and hashes the message for any other."""
    for kt, h in (("ec-p256", hashes.SHA256()), ("ec-p384", hashes.SHA384())):
        private = ec.generate_private_key(ec.SECP256R1() if kt == "ec-p256" else ec.SECP384R1())
        sig = private.sign(OTHER, ec.ECDSA(h))
        pairs = [(1, private.public_key())]
        args = VerifyArgs(key="k", signature=sig, message=SENT)
        given = algorithms.verify_any(algorithms.key_type(kt), pairs, args, sha256(OTHER))
        assert (given is not None) == (kt == "ec-p256")
        assert algorithms.verify_any(algorithms.key_type(kt), pairs, args) is None


@pytest.mark.parametrize(
    ("kt", "options", "h", "pss"),
    [
        ("ec-p256", {}, hashes.SHA256(), False),  # ES256
        ("rsa-2048", {}, hashes.SHA256(), False),  # RS256
        ("rsa-2048", {"padding": "pss"}, hashes.SHA256(), True),  # PS256
        ("ec-p384", {}, hashes.SHA384(), False),  # ES384: the message is hashed
        ("rsa-2048", {"hash": "sha512"}, hashes.SHA512(), False),  # RS512
    ],
    ids=["ES256", "RS256", "PS256", "ES384", "RS512"],
)
def test_with_audit_on_the_daemons_signatures_verify(
    make_daemon: Callable[..., Daemon],
    key_name: str,
    kt: str,
    options: dict[str, str],
    h: hashes.HashAlgorithm,
    pss: bool,
) -> None:
    d = make_daemon('[audit]\ndir = "audit"\n')
    with d.client() as c:
        c.create_key(key_name, kt)
        pub = load_pem(c.public_key(key_name).public_key_pem)
        signature = c.sign(key_name, SENT, **options).signature
        check(pub, signature, SENT, h, pss)
        with pytest.raises(InvalidSignature):
            check(pub, signature, OTHER, h, pss)
        assert c.verify(key_name, signature, SENT, **options).valid is True
        assert c.verify(key_name, signature, OTHER, **options).valid is False
    assert d.stop() == 0, d.logs()
