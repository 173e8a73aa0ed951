"""``sign_batch`` against a real daemon on a real SoftHSM token.

Every signature is checked with ``cryptography`` against the public key the
daemon published, never with signd's own code.  A result that came back in
the wrong order would fail those checks, since each item is verified against
its own digest or message.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from signd_client import AsyncClient, Client, SignBatchResult
from signd_client.errors import (
    Busy,
    ErrorCode,
    InvalidArgument,
    KeyExists,
    KeyNotFound,
    UnsupportedAlgorithm,
    WireError,
)
from signd_client.protocol import (
    FrameDecoder,
    SignArgs,
    SignBatchArgs,
    decode_response,
    encode_request,
)

if TYPE_CHECKING:
    from conftest import Daemon  # the root conftest.py

MAX_BATCH = 10000  # PROTOCOL.md: a sign_batch carries 1 to 10000 items
ECDSA_PREHASHED = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
VECTORS = json.loads((Path(__file__).parent / "vectors" / "frames.json").read_text())
BY_NAME: dict[str, dict[str, Any]] = {v["name"]: v for v in VECTORS["vectors"]}


def digests(n: int, tag: str = "item") -> list[bytes]:
    return [hashlib.sha256(f"{tag} {i}".encode()).digest() for i in range(n)]


def load_pem(pem: str) -> Any:
    return serialization.load_pem_public_key(pem.encode())


def public_key(client: Client, name: str, version: int | None = None) -> Any:
    return load_pem(client.public_key(name, version).public_key_pem)


def signatures(res: SignBatchResult) -> list[bytes]:
    """Every item's signature; fails if any item has an error."""
    sigs = []
    for i, item in enumerate(res.results):
        assert item.error is None, (i, item.error)
        assert item.signature is not None, i
        sigs.append(item.signature)
    return sigs


def pss(h: hashes.HashAlgorithm) -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.AUTO)


@pytest.fixture(scope="module")
def keys(signd: Daemon) -> dict[str, str]:
    """One key of each family, shared by this module's tests: key type -> name."""
    suffix = uuid.uuid4().hex[:8]
    names = {t: f"batch-{t}-{suffix}" for t in ("ec-p256", "ed25519", "rsa-2048")}
    with signd.client() as c:
        for key_type, name in names.items():
            c.create_key(name, key_type)
    return names


@pytest.fixture
def client(signd: Daemon) -> Iterator[Client]:
    with signd.client() as c:
        yield c


# --------------------------------------------------------------------------
# signing


def test_thousand_digests_in_one_request_verify_in_order(client: Client, key_name: str) -> None:
    client.create_key(key_name, "ec-p256")
    pub = public_key(client, key_name)
    items = digests(1000)
    res = client.sign_batch(key_name, digests=items, hash="sha256")
    assert (res.key, res.version, res.algorithm) == (key_name, 1, "ecdsa-p256-sha256")
    sigs = signatures(res)
    assert len(sigs) == len(items)
    for digest, sig in zip(items, sigs, strict=True):
        pub.verify(sig, digest, ECDSA_PREHASHED)
    # Each signature is bound to its own item: a neighbour's digest does not verify.
    with pytest.raises(InvalidSignature):
        pub.verify(sigs[0], items[1], ECDSA_PREHASHED)


def test_max_batch_is_accepted(client: Client, keys: dict[str, str]) -> None:
    name = keys["ec-p256"]
    items = digests(MAX_BATCH, "max")
    res = client.sign_batch(name, digests=items, hash="sha256", format="raw")
    sigs = signatures(res)
    assert len(sigs) == MAX_BATCH
    pub = public_key(client, name)
    for digest, sig in zip(items, sigs, strict=True):
        assert len(sig) == 64
        der = utils.encode_dss_signature(
            int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        )
        pub.verify(der, digest, ECDSA_PREHASHED)


def test_messages_ed25519(client: Client, keys: dict[str, str]) -> None:
    name = keys["ed25519"]
    messages = [b"", b"x", b"hello, world\n", bytes(range(256)) * 40] + [
        b"message %d" % i for i in range(50)
    ]
    res = client.sign_batch(name, messages)
    assert (res.key, res.version, res.algorithm) == (name, 1, "ed25519")
    pub = public_key(client, name)
    assert isinstance(pub, ed25519.Ed25519PublicKey)
    for msg, sig in zip(messages, signatures(res), strict=True):
        assert len(sig) == 64
        pub.verify(sig, msg)


@pytest.mark.parametrize(
    ("pad", "algorithm"), [("pkcs1v15", "rsa-pkcs1v15-sha256"), ("pss", "rsa-pss-sha256")]
)
def test_messages_rsa(client: Client, keys: dict[str, str], pad: str, algorithm: str) -> None:
    name = keys["rsa-2048"]
    messages = [b"rsa %s message %d" % (pad.encode(), i) for i in range(40)]
    res = client.sign_batch(name, messages, padding=pad)
    assert (res.key, res.version, res.algorithm) == (name, 1, algorithm)
    pub = public_key(client, name)
    assert isinstance(pub, rsa.RSAPublicKey)
    sha256 = hashes.SHA256()
    wanted, other = (pss(sha256), padding.PKCS1v15())
    if pad == "pkcs1v15":
        wanted, other = other, wanted
    sigs = signatures(res)
    for msg, sig in zip(messages, sigs, strict=True):
        assert len(sig) == 256
        pub.verify(sig, msg, wanted, sha256)
    with pytest.raises(InvalidSignature):  # really the padding asked for
        pub.verify(sigs[0], messages[0], other, sha256)


def test_options_apply_to_every_item(client: Client, keys: dict[str, str]) -> None:
    """hash and format given once hold for each message of the batch."""
    name = keys["ec-p256"]
    messages = [b"sha384 raw %d" % i for i in range(30)]
    res = client.sign_batch(name, messages, hash="sha384", format="raw")
    assert res.algorithm == "ecdsa-p256-sha384"
    pub = public_key(client, name)
    for msg, sig in zip(messages, signatures(res), strict=True):
        assert len(sig) == 64
        der = utils.encode_dss_signature(
            int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        )
        pub.verify(der, msg, ec.ECDSA(hashes.SHA384()))


def test_rsa_batch_answer_larger_than_a_request_frame(client: Client, keys: dict[str, str]) -> None:
    """4000 RSA-2048 signatures make a ~1.1 MB answer, above the 1 MiB request limit.

    The request is small; the daemon does not limit its answers, and a client
    must accept the answers to the batches it may send (PROTOCOL.md, Framing).
    """
    name = keys["rsa-2048"]
    messages = [b"%d" % i for i in range(4000)]
    res = client.sign_batch(name, messages)
    sigs = signatures(res)
    assert len(sigs) == len(messages)
    pub = public_key(client, name)
    for msg, sig in zip(messages, sigs, strict=True):
        pub.verify(sig, msg, padding.PKCS1v15(), hashes.SHA256())


# --------------------------------------------------------------------------
# per-item errors


def test_wrong_length_digests_fail_alone(client: Client, keys: dict[str, str]) -> None:
    name = keys["ec-p256"]
    items = digests(20, "mixed")
    bad = {3: items[3][:31], 7: items[7] + b"\x00", 12: b"", 19: items[19][:16]}
    for i, digest in bad.items():
        items[i] = digest
    res = client.sign_batch(name, digests=items, hash="sha256")
    assert (res.key, res.version, res.algorithm) == (name, 1, "ecdsa-p256-sha256")
    assert len(res.results) == len(items)
    pub = public_key(client, name)
    for i, (digest, item) in enumerate(zip(items, res.results, strict=True)):
        if i in bad:
            assert item.signature is None, i
            assert item.error is not None, i
            assert item.error.code == ErrorCode.INVALID_DIGEST == 201
            assert item.error.name == "invalid_digest"
            assert item.error.message == f"a sha256 digest is 32 bytes, got {len(digest)}"
        else:
            assert item.error is None, (i, item.error)
            assert item.signature is not None
            pub.verify(item.signature, digest, ECDSA_PREHASHED)


def test_every_digest_wrong_still_names_the_algorithm(client: Client, keys: dict[str, str]) -> None:
    """key, version and algorithm are the batch's, even when no item could be signed."""
    name = keys["ec-p256"]
    res = client.sign_batch(name, digests=[b"\x01" * 31, b"\x02" * 33], hash="sha256")
    assert [item.error.code if item.error else None for item in res.results] == [201, 201]
    assert (res.key, res.version, res.algorithm) == (name, 1, "ecdsa-p256-sha256")


def test_bad_options_are_refused_even_when_every_digest_is_wrong(
    client: Client, keys: dict[str, str]
) -> None:
    """Options are the batch's: checked as a whole, not hidden behind item errors."""
    name = keys["ec-p256"]
    with pytest.raises(InvalidArgument):  # padding on an EC key
        client.sign_batch(name, digests=[b"\x01" * 31], hash="sha256", padding="pss")
    with pytest.raises(InvalidArgument):  # ... also when some digest is right
        client.sign_batch(name, digests=[b"\x01" * 32], hash="sha256", padding="pss")


# --------------------------------------------------------------------------
# whole-request errors

TOO_MANY = [bytes(32)] * (MAX_BATCH + 1)

WHOLE_REQUEST_ERRORS: list[Any] = [
    pytest.param("ec-p256", {"digests": [bytes(32)], "hash": "sha256"}, KeyNotFound, id="no-key"),
    pytest.param("ec-p256", {"digests": [], "hash": "sha256"}, InvalidArgument, id="no-digests"),
    pytest.param("ec-p256", {"messages": []}, InvalidArgument, id="no-messages"),
    pytest.param(
        "ec-p256",
        {"messages": [b"m"], "digests": [bytes(32)], "hash": "sha256"},
        InvalidArgument,
        id="both",
    ),
    pytest.param("ec-p256", {"hash": "sha256"}, InvalidArgument, id="neither"),
    pytest.param(
        "ec-p256", {"digests": TOO_MANY, "hash": "sha256"}, InvalidArgument, id="too-many"
    ),
    pytest.param(
        "ec-p256", {"messages": [b"m"] * (MAX_BATCH + 1)}, InvalidArgument, id="too-many-messages"
    ),
    pytest.param(
        "ed25519", {"digests": [bytes(32)], "hash": "sha256"}, InvalidArgument, id="ed25519-digest"
    ),
    pytest.param("ed25519", {"messages": [b"m"], "hash": "sha256"}, InvalidArgument, id="ed-hash"),
    pytest.param("ec-p256", {"digests": [bytes(32)]}, InvalidArgument, id="digest-without-hash"),
    pytest.param("ec-p256", {"messages": [b"m"], "hash": "md5"}, UnsupportedAlgorithm, id="md5"),
    pytest.param("ec-p256", {"messages": [b"m"], "padding": "pss"}, InvalidArgument, id="ec-pad"),
    pytest.param("ec-p256", {"messages": [b"m"], "format": "pem"}, InvalidArgument, id="format"),
    pytest.param("rsa-2048", {"messages": [b"m"], "format": "raw"}, InvalidArgument, id="rsa-fmt"),
    pytest.param("rsa-2048", {"messages": [b"m"], "padding": "x"}, InvalidArgument, id="rsa-pad"),
]


@pytest.mark.parametrize(("key_type", "kwargs", "error"), WHOLE_REQUEST_ERRORS)
def test_whole_request_errors(
    client: Client,
    keys: dict[str, str],
    key_type: str,
    kwargs: dict[str, Any],
    error: type[WireError],
) -> None:
    name = keys[key_type] + ("-absent" if error is KeyNotFound else "")
    with pytest.raises(error) as info:
        client.sign_batch(name, **kwargs)
    assert type(info.value) is error
    # The connection and the key still work afterwards.
    assert signatures(client.sign_batch(keys[key_type], [b"after"]))


def test_invalid_key_name_is_invalid_argument(client: Client) -> None:
    with pytest.raises(InvalidArgument):
        client.sign_batch("-not a name-", [b"m"])


def test_batch_larger_than_the_token_queue_is_refused(make_daemon: Any, key_name: str) -> None:
    """A batch that can never fit the token queue is refused as a whole, clearly,
    and not as a retryable ``busy``."""
    daemon = make_daemon("[limits]\ntoken_queue = 8\n")
    with Client(daemon.socket, retries=0) as c:
        c.create_key(key_name, "ec-p256")
        pub = public_key(c, key_name)
        fits = digests(8, "fits")  # exactly the queue's size: accepted
        res = c.sign_batch(key_name, digests=fits, hash="sha256")
        for digest, sig in zip(fits, signatures(res), strict=True):
            pub.verify(sig, digest, ECDSA_PREHASHED)
        with pytest.raises(InvalidArgument, match="token_queue"):
            c.sign_batch(key_name, digests=digests(9, "too-many"), hash="sha256")


def test_full_token_queue_answers_busy_for_the_whole_request(
    make_daemon: Any, key_name: str
) -> None:
    """While the queue is full, a request is refused whole with a retryable
    ``busy``, not answered with failed items; the request that filled it is served."""
    daemon = make_daemon("[limits]\ntoken_queue = 1000\n")
    with Client(daemon.socket) as c:
        c.create_key(key_name, "ec-p256")
        pub = public_key(c, key_name)
    full = SignBatchArgs(key=key_name, digests=tuple(digests(1000, "full")), hash="sha256")
    more = SignBatchArgs(key=key_name, digests=tuple(digests(2, "more")), hash="sha256")
    one = SignArgs(key=key_name, digest=digests(1, "one")[0], hash="sha256")
    s = daemon.connect_raw()
    try:
        # One write: the 1,000 fill the queue before any can be signed.
        s.sendall(
            encode_request(1, "sign_batch", full)
            + encode_request(2, "sign_batch", more)
            + encode_request(3, "sign", one)
        )
        decoder = FrameDecoder(64 << 20)
        answers: dict[int, Any] = {}
        while len(answers) < 3:
            data = s.recv(1 << 20)
            assert data, "signd closed the connection"
            decoder.receive_data(data)
            for body in decoder.frames():
                resp = decode_response(body)
                assert resp.id is not None
                answers[resp.id] = resp
    finally:
        s.close()
    first = SignBatchResult.from_wire(answers[1].result, strict=False)
    for digest, item in zip(full.digests or (), first.results, strict=True):
        assert item.signature is not None
        pub.verify(item.signature, digest, ECDSA_PREHASHED)
    for rid in (2, 3):
        assert isinstance(answers[rid].error, Busy), answers[rid]
        assert answers[rid].error.retryable


# --------------------------------------------------------------------------
# versions


def test_answer_carries_the_current_version_after_rotate(client: Client, key_name: str) -> None:
    client.create_key(key_name, "ec-p256")
    items = digests(10, "rotate")
    before = client.sign_batch(key_name, digests=items, hash="sha256")
    assert before.version == 1
    info = client.rotate(key_name)
    assert info.current_version == 2
    after = client.sign_batch(key_name, digests=items, hash="sha256")
    assert (after.key, after.version, after.algorithm) == (key_name, 2, "ecdsa-p256-sha256")
    v1, v2 = public_key(client, key_name, 1), public_key(client, key_name, 2)
    for digest, old, new in zip(items, signatures(before), signatures(after), strict=True):
        v1.verify(old, digest, ECDSA_PREHASHED)
        v2.verify(new, digest, ECDSA_PREHASHED)
        with pytest.raises(InvalidSignature):  # signed by version 2, not by version 1
            v1.verify(new, digest, ECDSA_PREHASHED)


# --------------------------------------------------------------------------
# the async client


async def test_async_client_under_trio(signd: Daemon, keys: dict[str, str]) -> None:
    name = keys["ec-p256"]
    items = digests(200, "trio")
    async with AsyncClient(signd.socket) as c:
        res = await c.sign_batch(name, digests=items, hash="sha256")
        mixed = await c.sign_batch(name, digests=[items[0], items[1][:31]], hash="sha256")
        with pytest.raises(KeyNotFound):
            await c.sign_batch(name + "-absent", [b"m"])
        pem = (await c.public_key(name)).public_key_pem
    pub = load_pem(pem)
    assert (res.key, res.version, res.algorithm) == (name, 1, "ecdsa-p256-sha256")
    for digest, sig in zip(items, signatures(res), strict=True):
        pub.verify(sig, digest, ECDSA_PREHASHED)
    first, second = mixed.results
    assert first.signature is not None
    pub.verify(first.signature, items[0], ECDSA_PREHASHED)
    assert second.signature is None
    assert second.error is not None
    assert second.error.code == 201


# --------------------------------------------------------------------------
# the golden frames


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def test_signatures_in_the_batch_vectors_verify() -> None:
    """The examples in PROTOCOL.md are real signatures over the request's items."""
    ec_pub = load_pem(BY_NAME["public_key.result"]["message"]["result"]["public_key_pem"])
    req = _from_json(BY_NAME["sign_batch.request.digests"]["message"])["args"]
    res = _from_json(BY_NAME["sign_batch.result.item_error"]["message"])["result"]
    ok, failed = res["results"]
    ec_pub.verify(ok["signature"], req["digests"][0], ECDSA_PREHASHED)
    assert len(req["digests"][1]) == 31
    assert failed == {
        "error": {
            "code": 201,
            "name": "invalid_digest",
            "message": "a sha256 digest is 32 bytes, got 31",
        }
    }

    ed_pub = load_pem(BY_NAME["public_key.result.ed25519"]["message"]["result"]["public_key_pem"])
    req = _from_json(BY_NAME["sign_batch.request.messages"]["message"])["args"]
    res = _from_json(BY_NAME["sign_batch.result.ed25519"]["message"])["result"]
    for msg, item in zip(req["messages"], res["results"], strict=True):
        ed_pub.verify(item["signature"], msg)


def _exchange(sock: socket.socket, frame: bytes) -> dict[str, Any]:
    sock.sendall(frame)
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
        data = sock.recv(65536)
        assert data, "the daemon closed the connection"
        buf += data
    assert len(buf) == 4 + struct.unpack(">I", buf[:4])[0]
    answer: dict[str, Any] = msgpack.unpackb(buf[4:], raw=False)
    return answer


def _ensure_key(daemon: Daemon, name: str, key_type: str) -> tuple[Any, int]:
    """The vectors' key on this token (made if absent): its current public key and version."""
    with daemon.client() as c:
        try:
            c.create_key(name, key_type)
        except KeyExists:
            pass
        info = c.key_info(name)
    assert info.type == key_type
    current = info.versions[-1]
    assert current.version == info.current_version
    return load_pem(current.public_key_pem), current.version


@pytest.mark.parametrize(
    ("request_name", "result_name", "key_type"),
    [
        ("sign_batch.request.digests", "sign_batch.result.item_error", "ec-p256"),
        ("sign_batch.request.messages", "sign_batch.result.ed25519", "ed25519"),
    ],
)
def test_daemon_answers_the_batch_vectors(
    signd: Daemon, request_name: str, result_name: str, key_type: str
) -> None:
    """The request vectors' bytes, sent to a real daemon, get answers shaped like the
    result vectors: same fields in the same order, same item errors, and signatures
    that verify (ECDSA signatures from the token are randomized, so not the same bytes)."""
    request = BY_NAME[request_name]
    want = _from_json(BY_NAME[result_name]["message"])
    args = _from_json(request["message"])["args"]
    pub, version = _ensure_key(signd, args["key"], key_type)
    with signd.connect_raw() as sock:
        got = _exchange(sock, bytes.fromhex(request["hex"]))
    assert list(got) == list(want) == ["v", "id", "result"]
    assert got["id"] == want["id"]
    result, expected = got["result"], want["result"]
    assert list(result) == list(expected)
    assert result["key"] == expected["key"]
    assert result["version"] == version
    assert result["algorithm"] == expected["algorithm"]
    items: Sequence[bytes] = args.get("digests") or args["messages"]
    for item, answer, example in zip(items, result["results"], expected["results"], strict=True):
        assert list(answer) == list(example)
        if "error" in example:
            assert answer == example
        elif key_type == "ed25519":
            pub.verify(answer["signature"], item)
        else:
            pub.verify(answer["signature"], item, ECDSA_PREHASHED)


def test_a_bulk_worker_signs_batches_right(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    """``[token] bulk_workers = 1``: a second signing worker starts, and the
    batch's items, split between the workers (the scheduler's tests show
    which takes what), all come back right and in order."""
    d = make_daemon(token_extra="workers = 1\nbulk_workers = 1")
    assert len(d.token_workers("sign")) == 2
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
        pub = public_key(c, key_name)
        items = digests(3000, "bulk")
        res = c.sign_batch(key_name, digests=items, hash="sha256")
        for digest, sig in zip(items, signatures(res), strict=True):
            pub.verify(sig, digest, ECDSA_PREHASHED)
        single = hashlib.sha256(b"alone").digest()
        pub.verify(
            c.sign(key_name, digest=single, hash="sha256").signature, single, ECDSA_PREHASHED
        )
