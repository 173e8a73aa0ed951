#!/usr/bin/env python3
"""Write ``tests/vectors/frames.json``, the golden frames of signd's wire protocol.

The frames are made by the real encoder (``signd_client.protocol``), once.
After that the JSON file *is* the contract: the daemon's tests
(``tests/test_vectors.py``) and the Python client's tests
(``clients/python/tests/test_client_vectors.py``) check that encoding each message
gives exactly these bytes and that decoding these bytes gives the message.
Every other client should run the same checks against the same file.

Run it only when the wire format changes on purpose, and then change
PROTOCOL.md and every client together::

    .venv/bin/python tests/vectors/generate.py          # rewrite frames.json
    .venv/bin/python tests/vectors/generate.py --check  # exit 1 if it differs

Everything here is deterministic: the keys are derived from fixed seeds, the
ECDSA signatures are RFC 6979 deterministic and Ed25519 is deterministic by
design, so each signature in the file verifies against the public key PEM in
the file.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

import coincurve
import msgpack
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, utils

from signd.keys.eth import address as eth_address
from signd.keys.eth import keccak256
from signd_client import errors as e
from signd_client.protocol import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    AuditHead,
    BackupArgs,
    BackupResult,
    BatchItem,
    CreateKeyArgs,
    DestroyArgs,
    Empty,
    ErrorInfo,
    Health,
    ImportKeyArgs,
    ImportParamsArgs,
    ImportParamsResult,
    Jwk,
    Jwks,
    JwksArgs,
    KeyGrant,
    KeyInfo,
    KeyList,
    KeyRefArgs,
    KeySummary,
    Message,
    PublicKey,
    PublicKeyArgs,
    RestoreArgs,
    RestoreResult,
    RotateArgs,
    SignArgs,
    SignBatchArgs,
    SignBatchResult,
    SignResult,
    TokenStatus,
    UpdateKeyArgs,
    VerifyArgs,
    VerifyResult,
    VersionInfo,
    VersionRefArgs,
    Whoami,
    encode_error,
    encode_request,
    encode_result,
)

HERE = Path(__file__).resolve().parent
OUT = HERE / "frames.json"

# ---------------------------------------------------------------- example data

KEY = "app-signing"  # an ec-p256 key with two versions
ED_KEY = "release-ed25519"
RSA_KEY = "legacy-rsa"
T1 = 1735689600.25  # 2025-01-01T00:00:00.25Z
T2 = 1738368000.5  # 2025-02-01T00:00:00.5Z
T3 = 1740787200.0  # 2025-03-01T00:00:00Z
MESSAGE = b"hello, world\n"
SHA256 = hashlib.sha256(MESSAGE).digest()
SHA384 = hashlib.sha384(MESSAGE).digest()


def _seed(label: str) -> bytes:
    return hashlib.sha256(b"signd test vectors: " + label.encode()).digest()


def _ec_key(label: str) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(_seed(label), "big"), ec.SECP256R1())


def _pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


EC_V1 = _ec_key("app-signing v1")
EC_V2 = _ec_key("app-signing v2")
ED_V1 = ed25519.Ed25519PrivateKey.from_private_bytes(_seed("release-ed25519 v1"))

_r, _s = utils.decode_dss_signature(
    EC_V2.sign(SHA256, ec.ECDSA(utils.Prehashed(hashes.SHA256()), deterministic_signing=True))
)
# signd answers every ECDSA signature low-S (s <= n/2; issue 16): so do its frames.
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_s = min(_s, P256_N - _s)
SIG_DER = utils.encode_dss_signature(_r, _s)
SIG_RAW = _r.to_bytes(32, "big") + _s.to_bytes(32, "big")
SIG_ED = ED_V1.sign(MESSAGE)
SIG_ED_EMPTY = ED_V1.sign(b"")

V1 = VersionInfo(version=1, state="active", created=T1, public_key_pem=_pem(EC_V1))
V1_OLD = VersionInfo(version=1, state="verify-only", created=T1, public_key_pem=_pem(EC_V1))
V2 = VersionInfo(version=2, state="active", created=T2, public_key_pem=_pem(EC_V2))
INFO_V1 = KeyInfo(name=KEY, type="ec-p256", created=T1, current_version=1, versions=(V1,))
INFO_V2 = KeyInfo(name=KEY, type="ec-p256", created=T1, current_version=2, versions=(V1_OLD, V2))

# An ec-secp256k1 key (Ethereum), two versions.  The signature is libsecp256k1's
# (RFC 6979, low-S, with its recovery id), through coincurve.
K1_KEY = "eth-signing"
K1_V1 = ec.derive_private_key(int.from_bytes(_seed("eth-signing v1"), "big"), ec.SECP256K1())
K1_V2 = ec.derive_private_key(int.from_bytes(_seed("eth-signing v2"), "big"), ec.SECP256K1())
ETH_DIGEST = keccak256(b"\x19Ethereum Signed Message:\n%d" % len(MESSAGE) + MESSAGE)
SIG_ETH = coincurve.PrivateKey(_seed("eth-signing v2")).sign_recoverable(ETH_DIGEST, hasher=None)
INFO_K1 = KeyInfo(
    name=K1_KEY,
    type="ec-secp256k1",
    created=T1,
    current_version=2,
    versions=(
        VersionInfo(
            version=1,
            state="verify-only",
            created=T1,
            public_key_pem=_pem(K1_V1),
            eth_address=eth_address(K1_V1.public_key()),
        ),
        VersionInfo(
            version=2,
            state="active",
            created=T2,
            public_key_pem=_pem(K1_V2),
            eth_address=eth_address(K1_V2.public_key()),
        ),
    ),
)

# The key lifecycle.  Since update_key, disable, enable and destroy came, signd
# always sends a KeyInfo's settings; the vectors above keep the short form an
# older daemon sends, which every client must still decode.
DAY = 86400.0
GRACE = 7 * DAY  # verify_grace: 604800 seconds
PERIOD = 90 * DAY  # auto_rotate_period: 7776000 seconds
OFF: dict[str, Any] = {
    "auto_rotate_period": 0.0,
    "verify_grace": 0.0,
    "min_sign_version": 0,
    "min_verify_version": 0,
    "deletion_allowed": False,
}
ON: dict[str, Any] = {
    **OFF,
    "auto_rotate_period": PERIOD,
    "verify_grace": GRACE,
    "deletion_allowed": True,
}
V1_GRACE = VersionInfo(
    version=1,
    state="verify-only",
    created=T1,
    public_key_pem=_pem(EC_V1),
    verify_until=T2 + GRACE,
)
INFO_ON = KeyInfo(
    name=KEY,
    type="ec-p256",
    created=T1,
    current_version=2,
    versions=(V1_GRACE, V2),
    **ON,
    next_rotation=T2 + PERIOD,
)

# build-signing: five versions, one in each state, as key_info shows them on
# 2025-05-02 (a day after version 5 was made).
KEY5 = "build-signing"
T4 = 1743465600.0  # 2025-04-01T00:00:00Z
T5 = 1746057600.0  # 2025-05-01T00:00:00Z
MONTH = 30 * DAY
B = [_ec_key(f"build-signing v{n}") for n in range(1, 6)]
INFO_5 = KeyInfo(
    name=KEY5,
    type="ec-p256",
    created=T1,
    current_version=5,
    versions=(
        VersionInfo(version=1, state="destroyed", created=T1, public_key_pem=_pem(B[0])),
        VersionInfo(version=2, state="retired", created=T2, public_key_pem=_pem(B[1])),
        VersionInfo(version=3, state="disabled", created=T3, public_key_pem=_pem(B[2])),
        VersionInfo(
            version=4,
            state="verify-only",
            created=T4,
            public_key_pem=_pem(B[3]),
            verify_until=T5 + GRACE,
        ),
        VersionInfo(version=5, state="active", created=T5, public_key_pem=_pem(B[4])),
    ),
    **{**ON, "auto_rotate_period": MONTH},
    next_rotation=T5 + MONTH,
)

# ---------------------------------------------------------------- the vectors

vectors: list[dict[str, Any]] = []


def _json(value: Any) -> Any:
    """A decoded msgpack value as JSON: bin becomes {"$bin": hex}."""
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json(v) for v in value]
    return value


def _body_json(frame: bytes) -> Any:
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    return _json(msgpack.unpackb(frame[4:], raw=False))


def request(
    name: str,
    description: str,
    rid: int,
    op: str,
    args: Message,
    signd_response: str | None = None,
) -> None:
    frame = encode_request(rid, op, args)
    vector = {
        "name": name,
        "description": description,
        "direction": "request",
        "op": op,
        "hex": frame.hex(),
        "message": _body_json(frame),
    }
    if signd_response is not None:
        vector["signd_response"] = signd_response
    vectors.append(vector)


def result(name: str, description: str, rid: int, op: str, res: Message) -> None:
    frame = encode_result(rid, res)
    vectors.append(
        {
            "name": name,
            "description": description,
            "direction": "response",
            "op": op,
            "hex": frame.hex(),
            "message": _body_json(frame),
        }
    )


def error(name: str, description: str, rid: int | None, err: e.WireError) -> None:
    frame = encode_error(rid, err)
    vectors.append(
        {
            "name": name,
            "description": description,
            "direction": "response",
            "op": None,
            "hex": frame.hex(),
            "message": _body_json(frame),
        }
    )


# ---- requests: one or more for every operation

request(
    "create_key.request",
    "create_key: generate an ec-p256 key named app-signing.",
    1,
    "create_key",
    CreateKeyArgs(key=KEY, type="ec-p256"),
)
request("list_keys.request", "list_keys takes no arguments: args is {}.", 2, "list_keys", Empty())
request("key_info.request", "key_info of one key.", 3, "key_info", KeyRefArgs(key=KEY))
request(
    "public_key.request",
    "public_key without version: the current version.",
    4,
    "public_key",
    PublicKeyArgs(key=KEY),
)
request(
    "public_key.request.version",
    "public_key of version 1.",
    5,
    "public_key",
    PublicKeyArgs(key=KEY, version=1),
)
request(
    "jwks.request",
    "jwks of two keys: every version of each that may still verify, in one JWK Set.",
    63,
    "jwks",
    JwksArgs(keys=(KEY, ED_KEY)),
)
request(
    "sign.request.message",
    "sign a message; the daemon hashes it with the key type's default hash (sha256 for "
    "ec-p256) and answers a DER ECDSA signature.",
    6,
    "sign",
    SignArgs(key=KEY, message=MESSAGE),
)
request(
    "sign.request.digest_raw",
    "sign a precomputed sha256 digest (32 bytes) and ask for the raw r||s format (JOSE).",
    7,
    "sign",
    SignArgs(key=KEY, digest=SHA256, hash="sha256", format="raw"),
)
request(
    "sign.request.digest_pss",
    "sign a precomputed sha384 digest (48 bytes) with an RSA key, PSS padding.",
    8,
    "sign",
    SignArgs(key=RSA_KEY, digest=SHA384, hash="sha384", padding="pss"),
)
request(
    "sign.request.ed25519",
    "sign with an ed25519 key: always the message, never hash, padding or format.",
    9,
    "sign",
    SignArgs(key=ED_KEY, message=MESSAGE),
)
request(
    "sign_batch.request.digests",
    "sign_batch of two precomputed sha256 digests with one ec-p256 key; the second is 31 "
    "bytes, so that item fails alone (see sign_batch.result.item_error).",
    14,
    "sign_batch",
    SignBatchArgs(key=KEY, digests=(SHA256, SHA256[:31]), hash="sha256"),
)
request(
    "sign_batch.request.messages",
    "sign_batch of two messages with an ed25519 key (the second is empty); no options.",
    15,
    "sign_batch",
    SignBatchArgs(key=ED_KEY, messages=(MESSAGE, b"")),
)
request(
    "verify.request.version",
    "verify a DER signature over a message against version 2 only.",
    10,
    "verify",
    VerifyArgs(key=KEY, signature=SIG_DER, message=MESSAGE, version=2),
)
request(
    "verify.request.digest",
    "verify a raw r||s signature over a sha256 digest against every version, newest first.",
    11,
    "verify",
    VerifyArgs(key=KEY, signature=SIG_RAW, digest=SHA256, hash="sha256", format="raw"),
)
request(
    "key_info.request.missing",
    "key_info of a key that does not exist; signd answers error.key_not_found.",
    27,
    "key_info",
    KeyRefArgs(key="no-such-key"),
    "error.key_not_found",
)
request(
    "sign.request.short_digest",
    "a well-formed sign request whose digest is 31 bytes where sha256 needs 32; signd "
    "answers error.invalid_digest.",
    25,
    "sign",
    SignArgs(key=KEY, digest=SHA256[:31], hash="sha256"),
    "error.invalid_digest",
)
request(
    "rotate.request",
    "rotate: add version 2 and make it current.",
    12,
    "rotate",
    KeyRefArgs(key=KEY),
)
request(
    "health.request",
    "health, with the largest request id there is (2**64 - 1, a msgpack uint 64).",
    (1 << 64) - 1,
    "health",
    Empty(),
)

# ---- requests of the key lifecycle

request(
    "create_key.request.settings",
    "create_key with lifecycle settings: rotate every 90 days (7776000 s), older versions "
    "verify for 7 days (604800 s) after the next version is made, deletion allowed. "
    "Durations are float 64 seconds.",
    16,
    "create_key",
    CreateKeyArgs(
        key=KEY5,
        type="ec-p256",
        auto_rotate_period=PERIOD,
        verify_grace=GRACE,
        deletion_allowed=True,
    ),
)
request(
    "update_key.request",
    "update_key: set three settings; every setting left out (here min_sign_version and "
    "min_verify_version) keeps its value.",
    17,
    "update_key",
    UpdateKeyArgs(key=KEY, auto_rotate_period=PERIOD, verify_grace=GRACE, deletion_allowed=True),
)
request(
    "update_key.request.min_versions",
    "update_key: turn automatic rotation off (0) and retire every version below 2, "
    "which may then neither sign nor verify.",
    18,
    "update_key",
    UpdateKeyArgs(key=KEY, auto_rotate_period=0.0, min_verify_version=2),
)
request(
    "disable.request",
    "disable version 1: it neither signs nor verifies until enabled again.",
    19,
    "disable",
    VersionRefArgs(key=KEY, version=1),
)
request(
    "enable.request",
    "enable version 1 again: it gets back the state its settings give it.",
    20,
    "enable",
    VersionRefArgs(key=KEY, version=1),
)
request(
    "destroy.request.version",
    "destroy version 1: delete its private key from the token, for good (the key's "
    "deletion_allowed must be on).",
    35,
    "destroy",
    DestroyArgs(key=KEY, version=1),
)
request(
    "destroy.request.all",
    "destroy every version of the key: 'all' must be true and 'version' absent.",
    36,
    "destroy",
    DestroyArgs(key=KEY5, all=True),
)
request(
    "destroy.request.not_allowed",
    "destroy version 1 of a key whose deletion_allowed is off (the default); signd "
    "answers error.deletion_not_allowed.",
    37,
    "destroy",
    DestroyArgs(key=KEY, version=1),
    "error.deletion_not_allowed",
)
request(
    "sign.request.version",
    "sign with a named version, which must be active; answered like sign.result.der.",
    38,
    "sign",
    SignArgs(key=KEY, message=MESSAGE, version=2),
)
request(
    "sign.request.version_not_active",
    "sign with version 1 of a key at version 2 whose min_sign_version is 0: version 1 is "
    "verify-only and may not sign; signd answers error.version_not_usable.",
    39,
    "sign",
    SignArgs(key=KEY, message=MESSAGE, version=1),
    "error.version_not_usable",
)
request(
    "sign_batch.request.version",
    "sign_batch with a named version, which must be active.",
    54,
    "sign_batch",
    SignBatchArgs(key=KEY, digests=(SHA256,), hash="sha256", version=2),
)

# ---- requests with an idempotency key

IDEM_CREATE = "5e0a8f4c2d1b4e6f9a7c3b2d1e0f4a5b"  # what the Python client makes: uuid4 hex
IDEM_ROTATE = "deploy-2025-02-01/rotate-app-signing"  # any 1-128 printable ASCII, no spaces
request(
    "create_key.request.idempotent",
    "create_key with an idempotency key: sent again with the same key and arguments, it "
    "is answered as the first one was (create_key.result.idempotent), not with key_exists.",
    61,
    "create_key",
    CreateKeyArgs(key=KEY, type="ec-p256", idempotency_key=IDEM_CREATE),
)
request(
    "rotate.request.idempotent",
    "rotate with an idempotency key: if a version of the key was made by a rotate with "
    "this idempotency key, nothing is rotated and the answer names that version.",
    62,
    "rotate",
    RotateArgs(key=KEY, idempotency_key=IDEM_ROTATE),
)

# ---- requests with version retention (max_versions)

request(
    "create_key.request.max_versions",
    "create_key with a version cap: at most 5 versions not destroyed; with deletion "
    "allowed, versions past their 7-day grace are destroyed by the daemon to keep under it.",
    63,
    "create_key",
    CreateKeyArgs(
        key=KEY5, type="ec-p256", verify_grace=GRACE, deletion_allowed=True, max_versions=5
    ),
)
request(
    "update_key.request.max_versions",
    "update_key: set the version cap to 10 (0 would mean the daemon's default).",
    64,
    "update_key",
    UpdateKeyArgs(key=KEY, max_versions=10),
)

# ---- requests with backup-able keys

request(
    "create_key.request.backup",
    "create_key for a backup-able key: every version's private key may be exported "
    "wrapped under the token's wrap key, and under nothing else; fixed for the key's life.",
    100,
    "create_key",
    CreateKeyArgs(key=KEY, type="ec-p256", backup=True),
)

# ---- requests with ec-secp256k1 keys (Ethereum)

request(
    "create_key.request.secp256k1",
    "create_key of an ec-secp256k1 key, for Ethereum.",
    110,
    "create_key",
    CreateKeyArgs(key=K1_KEY, type="ec-secp256k1"),
)
request(
    "sign.request.eth",
    "sign an EIP-191 personal message's Keccak-256 digest (of 'hello, world\\n') with format "
    "eth: the answer is r || s || v.",
    111,
    "sign",
    SignArgs(key=K1_KEY, digest=ETH_DIGEST, hash="keccak256", format="eth"),
)
request(
    "verify.request.eth",
    "verify sign.result.eth's signature, format eth.",
    112,
    "verify",
    VerifyArgs(key=K1_KEY, signature=SIG_ETH, digest=ETH_DIGEST, hash="keccak256", format="eth"),
)

# ---- results: one or more for every operation

result(
    "create_key.result",
    "the new key: version 1, active and current.",
    1,
    "create_key",
    INFO_V1,
)
result(
    "list_keys.result",
    "every key, sorted by name, without versions.",
    2,
    "list_keys",
    KeyList(
        keys=(
            KeySummary(name=KEY, type="ec-p256", created=T1, current_version=2),
            KeySummary(name=RSA_KEY, type="rsa-2048", created=T2, current_version=1),
            KeySummary(name=ED_KEY, type="ed25519", created=T3, current_version=1),
        )
    ),
)
result("list_keys.result.empty", "no keys on the token.", 2, "list_keys", KeyList(keys=()))
result(
    "key_info.result",
    "a key after one rotation: version 1 verify-only, version 2 active and current; "
    "versions in ascending order.",
    3,
    "key_info",
    INFO_V2,
)
result(
    "public_key.result",
    "the current version's public key as SubjectPublicKeyInfo PEM.",
    4,
    "public_key",
    PublicKey(name=KEY, version=2, type="ec-p256", public_key_pem=_pem(EC_V2)),
)
result(
    "public_key.result.ed25519",
    "an Ed25519 public key; sign.result.ed25519 verifies against it.",
    13,
    "public_key",
    PublicKey(name=ED_KEY, version=1, type="ed25519", public_key_pem=_pem(ED_V1)),
)
result(
    "sign.result.der",
    "an ECDSA P-256 signature in DER by version 2; it verifies against public_key.result.",
    6,
    "sign",
    SignResult(signature=SIG_DER, key=KEY, version=2, algorithm="ecdsa-p256-sha256"),
)
result(
    "sign.result.raw",
    "the same signature as raw r||s, 64 bytes (32 each, big-endian, zero-padded).",
    7,
    "sign",
    SignResult(signature=SIG_RAW, key=KEY, version=2, algorithm="ecdsa-p256-sha256"),
)
result(
    "sign.result.ed25519",
    "a pure Ed25519 signature, 64 bytes.",
    9,
    "sign",
    SignResult(signature=SIG_ED, key=ED_KEY, version=1, algorithm="ed25519"),
)
result(
    "sign_batch.result.item_error",
    "the answer to sign_batch.request.digests: one result per item, in the request's "
    "order; item 0 is signed (the signature of sign.result.der), item 1 has its own "
    "invalid_digest error. key, version and algorithm are the batch's.",
    14,
    "sign_batch",
    SignBatchResult(
        key=KEY,
        version=2,
        algorithm="ecdsa-p256-sha256",
        results=(
            BatchItem(signature=SIG_DER),
            BatchItem(
                error=ErrorInfo(
                    code=int(e.ErrorCode.INVALID_DIGEST),
                    name="invalid_digest",
                    message="a sha256 digest is 32 bytes, got 31",
                )
            ),
        ),
    ),
)
result(
    "sign_batch.result.ed25519",
    "the answer to sign_batch.request.messages: two Ed25519 signatures, each verifies "
    "against public_key.result.ed25519.",
    15,
    "sign_batch",
    SignBatchResult(
        key=ED_KEY,
        version=1,
        algorithm="ed25519",
        results=(BatchItem(signature=SIG_ED), BatchItem(signature=SIG_ED_EMPTY)),
    ),
)
result(
    "verify.result.valid",
    "a valid signature: the version that verified it and the algorithm.",
    10,
    "verify",
    VerifyResult(valid=True, key=KEY, version=2, algorithm="ecdsa-p256-sha256"),
)
result(
    "verify.result.invalid",
    "an invalid signature is an answer, not an error: valid is false and version and "
    "algorithm are absent.",
    11,
    "verify",
    VerifyResult(valid=False, key=KEY),
)
result(
    "rotate.result",
    "rotate answers the key's KeyInfo with the new current_version.",
    12,
    "rotate",
    INFO_V2,
)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> Jwk:
    nums = key.public_key().public_numbers()
    return Jwk(
        kty="EC",
        kid=kid,
        use="sig",
        alg="ES256",
        crv="P-256",
        x=_b64url(nums.x.to_bytes(32, "big")),
        y=_b64url(nums.y.to_bytes(32, "big")),
    )


ED_RAW = ED_V1.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
result(
    "jwks.result",
    "the JWK Set for jwks.request: app-signing after one rotation (version 2 active, version 1 "
    "verify-only, newest first) and release-ed25519 version 1. kid is NAME:VERSION; binary "
    "members are base64url strings without padding, so the result as JSON is a JWK Set.",
    63,
    "jwks",
    Jwks(
        keys=(
            _ec_jwk(EC_V2, f"{KEY}:2"),
            _ec_jwk(EC_V1, f"{KEY}:1"),
            Jwk(
                kty="OKP",
                kid=f"{ED_KEY}:1",
                use="sig",
                alg="EdDSA",
                crv="Ed25519",
                x=_b64url(ED_RAW),
            ),
        )
    ),
)
result(
    "health.result.ready",
    "a ready daemon with its token.",
    (1 << 64) - 1,
    "health",
    Health(
        status="ok",
        live=True,
        ready=True,
        daemon_version="0.1.0",
        protocol_version=PROTOCOL_VERSION,
        uptime=3600.5,
        keys=3,
        token=TokenStatus(
            label="signd",
            manufacturer="SoftHSM project",
            model="SoftHSM v2",
            serial="8d3c0f5a1b2e4c67",
            logged_in=True,
        ),
    ),
)
result(
    "health.result.capabilities",
    "a ready daemon on a token without Ed25519: its profile, the key types it can make "
    "(read from its mechanisms) and its mechanisms, as CKM_ names.",
    64,
    "health",
    Health(
        status="ok",
        live=True,
        ready=True,
        daemon_version="0.1.0",
        protocol_version=PROTOCOL_VERSION,
        uptime=12.25,
        keys=0,
        token=TokenStatus(
            label="signd",
            manufacturer="IBM",
            model="Soft",
            serial="123",
            logged_in=True,
            profile="generic",
            key_types=("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096"),
            mechanisms=(
                "CKM_ECDSA",
                "CKM_EC_KEY_PAIR_GEN",
                "CKM_RSA_PKCS",
                "CKM_RSA_PKCS_KEY_PAIR_GEN",
                "CKM_RSA_PKCS_PSS",
            ),
        ),
    ),
)
result(
    "health.result.tokens",
    "a ready daemon serving one key set from two tokens ([[token]]), one of them away: "
    "status degraded; token is the primary; tokens lists each one in config order with "
    "its state (serving, catching_up or unavailable).",
    69,
    "health",
    Health(
        status="degraded",
        live=True,
        ready=True,
        daemon_version="0.1.0",
        protocol_version=PROTOCOL_VERSION,
        uptime=40.5,
        keys=3,
        token=TokenStatus(
            label="hsm-b",
            manufacturer="SoftHSM project",
            model="SoftHSM v2",
            serial="b2",
            logged_in=True,
            profile="softhsm",
            key_types=("ec-p256",),
            mechanisms=("CKM_ECDSA",),
        ),
        detail="token 1 of 2 not serving",
        tokens=(
            TokenStatus(
                label="hsm-a",
                manufacturer="SoftHSM project",
                model="SoftHSM v2",
                serial="a1",
                logged_in=False,
                profile="softhsm",
                key_types=("ec-p256",),
                mechanisms=("CKM_ECDSA",),
                state="unavailable",
            ),
            TokenStatus(
                label="hsm-b",
                manufacturer="SoftHSM project",
                model="SoftHSM v2",
                serial="b2",
                logged_in=True,
                profile="softhsm",
                key_types=("ec-p256",),
                mechanisms=("CKM_ECDSA",),
                state="serving",
            ),
        ),
    ),
)
result(
    "health.result.audit",
    "a ready daemon with an audit log, to a peer that may read signd.audit: the chain "
    "head its newest checkpoint signed.",
    66,
    "health",
    Health(
        status="ok",
        live=True,
        ready=True,
        daemon_version="0.1.0",
        protocol_version=PROTOCOL_VERSION,
        uptime=30.5,
        keys=2,
        token=None,
        audit=AuditHead(
            chain="6f1c2a9e0b7d4e53",
            seq=1042,
            hash="9" * 64,
            file="audit-000001.jsonl",
            time=1796600000.25,
        ),
    ),
)
result(
    "health.result.unavailable",
    "a live daemon that is not ready: token absent, detail present.",
    0,
    "health",
    Health(
        status="unavailable",
        live=True,
        ready=False,
        daemon_version="0.1.0",
        protocol_version=PROTOCOL_VERSION,
        uptime=0.75,
        keys=0,
        detail="the token is not open or the keys are not loaded",
    ),
)

# ---- whoami: who the daemon takes the caller to be, and what it may do

request("whoami.request", "whoami takes no arguments: args is {}.", 67, "whoami", Empty())
result(
    "whoami.result",
    "the caller as the kernel reports it (uid, gid, groups sorted with the primary group "
    "in them) and its user name, then every existing key on which it has at least one "
    "verb, sorted by name, each with its verbs sorted.",
    67,
    "whoami",
    Whoami(
        uid=1001,
        gid=1001,
        groups=(27, 1001, 1002),
        user="deploy",
        keys=(
            KeyGrant(name=KEY, verbs=("read", "sign", "verify")),
            KeyGrant(name=RSA_KEY, verbs=("verify",)),
            KeyGrant(name=ED_KEY, verbs=("admin", "create", "read", "rotate", "sign", "verify")),
        ),
    ),
)
result(
    "whoami.result.nothing",
    "a caller whose uid has no user name (user absent) and who may use no key: keys is "
    "an empty array.",
    68,
    "whoami",
    Whoami(uid=64055, gid=64055, groups=(64055,), user=None, keys=()),
)

# ---- backup and restore (BACKUP.md has the bundle's format)

_BUNDLE_HEADER = bytes.fromhex("86a6666f726d617401")  # the first bytes of a header map
_MAC = hashlib.sha256(b"a MAC the token made").digest()
_ENTRY = bytes.fromhex("83a46e616d65ab6170702d7369676e696e67")  # {"name": "app-signing", ...

request(
    "backup.request",
    "backup takes no arguments for every backup-able key: args is {}.",
    80,
    "backup",
    BackupArgs(),
)
request(
    "backup.request.keys",
    "backup of the keys named (keys is an array of key names).",
    81,
    "backup",
    BackupArgs(keys=(KEY, RSA_KEY)),
)
result(
    "backup.result",
    "bundle is the file to write (bin; here cut short); keys are the keys in it, versions "
    "how many versions they hold, skipped the keys that are not backup-able.",
    80,
    "backup",
    BackupResult(
        bundle=b"signd-backup\x00\x01\n\x00" + bytes(8),
        keys=(KEY,),
        versions=2,
        skipped=(RSA_KEY,),
    ),
)
request(
    "restore.request",
    "restore one key: the bundle's header and header_mac, the key's entry and entry_mac "
    "(bin; here cut short). key is the entry's key.",
    82,
    "restore",
    RestoreArgs(key=KEY, header=_BUNDLE_HEADER, header_mac=_MAC, entry=_ENTRY, entry_mac=_MAC),
)
request(
    "restore.request.check",
    "check: true only checks the MACs and says what would be done; nothing is written.",
    83,
    "restore",
    RestoreArgs(
        key=KEY,
        header=_BUNDLE_HEADER,
        header_mac=_MAC,
        entry=_ENTRY,
        entry_mac=_MAC,
        check=True,
    ),
)
result(
    "restore.result",
    "outcome is created, updated or unchanged; restored the versions put on the token, "
    "present those it held already.",
    82,
    "restore",
    RestoreResult(key=KEY, outcome="updated", restored=(2,), present=(1,)),
)

# ---- import (bring your own key)

IMPORT_KEY = "imported-p256"
#: an RSA-3072 SubjectPublicKeyInfo's first bytes (here cut short), and its id
_IMPORT_SPKI = bytes.fromhex("308201a2300d06092a864886f70d01010105000382018f003082018a0282018100")
_IMPORT_ID = hashlib.sha256(_IMPORT_SPKI).hexdigest()
_IMPORTED = _ec_key("imported-p256 v1")
_IMPORTED_SPKI = _IMPORTED.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)
_WRAPPED_KEY = bytes(range(48))  # 384 bytes in a real request (RSA-3072 OAEP); cut short
_WRAPPED_MATERIAL = hashlib.sha512(b"a PKCS#8 key under AES-KWP").digest()  # cut short

request(
    "import_params.request",
    "the import key to wrap material under for key (checked: the import verb on it).",
    110,
    "import_params",
    ImportParamsArgs(key=IMPORT_KEY),
)
result(
    "import_params.result",
    "algorithm names the wrapping; public_key is the import key's SubjectPublicKeyInfo DER "
    "(bin; here cut short), import_key_id its SHA-256 in hex.",
    110,
    "import_params",
    ImportParamsResult(
        algorithm="rsa-oaep-sha1+aes-kwp", import_key_id=_IMPORT_ID, public_key=_IMPORT_SPKI
    ),
)
request(
    "import_key.request",
    "a new ec-p256 key from wrapped material: wrapped_key is an AES-256 key under RSA-OAEP "
    "(SHA-1), wrapped_material the PKCS#8 under that key (AES-KWP), both bin, here cut "
    "short; public_key the private key's SubjectPublicKeyInfo DER.",
    111,
    "import_key",
    ImportKeyArgs(
        key=IMPORT_KEY,
        type="ec-p256",
        import_key_id=_IMPORT_ID,
        wrapped_key=_WRAPPED_KEY,
        wrapped_material=_WRAPPED_MATERIAL,
        public_key=_IMPORTED_SPKI,
        idempotency_key="7d1e0c52a4b24f0e9f2c1b3a5d6e7f80",
    ),
)
request(
    "import_key.request.new_version",
    "the material as the next version of the existing key (it keeps its settings).",
    112,
    "import_key",
    ImportKeyArgs(
        key=IMPORT_KEY,
        type="ec-p256",
        import_key_id=_IMPORT_ID,
        wrapped_key=_WRAPPED_KEY,
        wrapped_material=_WRAPPED_MATERIAL,
        public_key=_IMPORTED_SPKI,
        new_version=True,
    ),
)
result(
    "import_key.result",
    "a KeyInfo, as create_key answers; created_version is the version the import made.",
    111,
    "import_key",
    KeyInfo(
        name=IMPORT_KEY,
        type="ec-p256",
        created=T1,
        current_version=1,
        versions=(
            VersionInfo(version=1, state="active", created=T1, public_key_pem=_pem(_IMPORTED)),
        ),
        created_version=1,
    ),
)

# ---- results of the key lifecycle

result(
    "create_key.result.settings",
    "the answer to create_key.request.settings: a daemon with the key lifecycle always "
    "sends the five settings; next_rotation is when automatic rotation is due (absent "
    "when it is off).",
    16,
    "create_key",
    KeyInfo(
        name=KEY5,
        type="ec-p256",
        created=T1,
        current_version=1,
        versions=(VersionInfo(version=1, state="active", created=T1, public_key_pem=_pem(B[0])),),
        **ON,
        next_rotation=T1 + PERIOD,
    ),
)
result(
    "update_key.result",
    "the answer to update_key.request: version 1 is verify-only until verify_until, "
    "verify_grace after version 2 was created.",
    17,
    "update_key",
    INFO_ON,
)
result(
    "disable.result",
    "the answer to disable.request: version 1 is disabled (no verify_until).",
    19,
    "disable",
    KeyInfo(
        name=KEY,
        type="ec-p256",
        created=T1,
        current_version=2,
        versions=(
            VersionInfo(version=1, state="disabled", created=T1, public_key_pem=_pem(EC_V1)),
            V2,
        ),
        **ON,
        next_rotation=T2 + PERIOD,
    ),
)
result(
    "enable.result",
    "the answer to enable.request: version 1 is verify-only again.",
    20,
    "enable",
    INFO_ON,
)
result(
    "destroy.result",
    "the answer to destroy.request.version: version 1 is destroyed; its public key stays.",
    35,
    "destroy",
    KeyInfo(
        name=KEY,
        type="ec-p256",
        created=T1,
        current_version=2,
        versions=(
            VersionInfo(version=1, state="destroyed", created=T1, public_key_pem=_pem(EC_V1)),
            V2,
        ),
        **ON,
        next_rotation=T2 + PERIOD,
    ),
)
result(
    "key_info.result.lifecycle",
    "a key with a version in each state, on 2025-05-02: 1 destroyed; 2 retired (its "
    "grace ended 7 days after version 3 was made); 3 disabled; 4 verify-only until 7 days "
    "after version 5 was made; 5 active and current. Automatic rotation every 30 days.",
    3,
    "key_info",
    INFO_5,
)
result(
    "key_info.result.defaults",
    "a key with every setting off, as a daemon with the key lifecycle sends it: the "
    "settings are present, next_rotation and verify_until are absent.",
    3,
    "key_info",
    KeyInfo(
        name=KEY,
        type="ec-p256",
        created=T1,
        current_version=2,
        versions=(V1_OLD, V2),
        **OFF,
    ),
)

# ---- results of requests with an idempotency key

result(
    "create_key.result.idempotent",
    "the answer to create_key.request.idempotent, the first time and every time it is "
    "sent again: created_version is the version the request made (always 1 here).",
    61,
    "create_key",
    KeyInfo(
        name=KEY,
        type="ec-p256",
        created=T1,
        current_version=1,
        versions=(V1,),
        **OFF,
        created_version=1,
    ),
)
result(
    "rotate.result.idempotent",
    "the answer to rotate.request.idempotent sent again after the key was rotated once "
    "more: nothing was rotated; created_version is the version the first request made "
    "(2), current_version the newest (3).",
    62,
    "rotate",
    KeyInfo(
        name=KEY,
        type="ec-p256",
        created=T1,
        current_version=3,
        versions=(
            V1_OLD,
            VersionInfo(version=2, state="verify-only", created=T2, public_key_pem=_pem(EC_V2)),
            VersionInfo(
                version=3,
                state="active",
                created=T3,
                public_key_pem=_pem(_ec_key("app-signing v3")),
            ),
        ),
        **OFF,
        created_version=2,
    ),
)

# ---- results with version retention

result(
    "update_key.result.max_versions",
    "the answer to update_key.request.max_versions: max_versions is the cap in force (the "
    "key's own, or the daemon's default when it has none); absent from older daemons.",
    64,
    "update_key",
    KeyInfo(
        name=KEY,
        type="ec-p256",
        created=T1,
        current_version=2,
        versions=(V1_OLD, V2),
        **OFF,
        max_versions=10,
    ),
)

# ---- results with backup-able keys

result(
    "create_key.result.backup",
    "the answer to create_key.request.backup: backup is true; a key made without it "
    "answers no backup field at all.",
    100,
    "create_key",
    KeyInfo(name=KEY, type="ec-p256", created=T1, current_version=1, versions=(V1,), backup=True),
)

# ---- results with ec-secp256k1 keys (Ethereum)

result(
    "sign.result.eth",
    "answer to sign.request.eth: 65 bytes r || s || v, s low (s <= n/2), v the recovery id "
    "(0 or 1; Ethereum adds 27 for a personal message); recovers key_info.result.secp256k1's "
    "version 2 address.",
    111,
    "sign",
    SignResult(signature=SIG_ETH, key=K1_KEY, version=2, algorithm="ecdsa-secp256k1-keccak256"),
)
result(
    "verify.result.eth",
    "answer to verify.request.eth.",
    112,
    "verify",
    VerifyResult(valid=True, key=K1_KEY, version=2, algorithm="ecdsa-secp256k1-keccak256"),
)
result(
    "key_info.result.secp256k1",
    "an ec-secp256k1 key after one rotation: each version shows its Ethereum address "
    "(EIP-55), which changes with the version.",
    3,
    "key_info",
    INFO_K1,
)

# ---- errors: every code

error(
    "error.malformed_frame",
    "the frame body was not a msgpack map; id is nil; the connection stays open.",
    None,
    e.MalformedFrame("frame body must be a map, got array"),
)
error(
    "error.frame_too_large",
    "the length prefix exceeded the limit; id is nil; the daemon then closes the connection.",
    None,
    e.FrameTooLarge(
        f"frame of {DEFAULT_MAX_FRAME + 1} bytes exceeds the limit of {DEFAULT_MAX_FRAME} bytes"
    ),
)
error(
    "error.unsupported_version",
    "the request had v = 2.",
    21,
    e.UnsupportedVersion("protocol version 2 is not supported; this daemon speaks 1"),
)
error(
    "error.unknown_operation",
    "the request named an op that does not exist.",
    22,
    e.UnknownOperation("unknown operation 'frobnicate'"),
)
error(
    "error.invalid_request",
    "the envelope had a field other than v, id, op and args.",
    23,
    e.InvalidRequest("unknown envelope field 'deadline'"),
)
error(
    "error.invalid_request.no_id",
    "the request's id was missing or not a uint64, so the answer has id nil.",
    None,
    e.InvalidRequest("field 'id' must be an unsigned integer below 2**64"),
)
error(
    "error.invalid_argument",
    "an argument had the wrong type (bin where str is required).",
    24,
    e.InvalidArgument("field 'key': expected str, got bin"),
)
error(
    "error.invalid_digest",
    "a digest whose length does not match the named hash.",
    25,
    e.InvalidDigest("a sha256 digest is 32 bytes, got 31"),
)
error(
    "error.unsupported_algorithm",
    "create_key with a key type signd does not have.",
    26,
    e.UnsupportedAlgorithm(
        "unknown key type 'dsa-1024'; supported: ec-p256, ec-p384, ed25519, rsa-2048, "
        "rsa-3072, rsa-4096"
    ),
)
error(
    "error.key_not_found", "no key of that name.", 27, e.KeyNotFound("no key named 'no-such-key'")
)
error(
    "error.version_not_found",
    "the key exists but has no such version.",
    28,
    e.VersionNotFound("key 'app-signing' has no version 9"),
)
error(
    "error.key_exists",
    "create_key with a name already taken.",
    29,
    e.KeyExists("a key named 'app-signing' already exists"),
)
error(
    "error.version_not_usable",
    "the version exists but its state forbids the operation: here the answer to "
    "sign.request.version_not_active.",
    39,
    e.VersionNotUsable(
        "key 'app-signing' version 1 may not sign: it is verify-only (only the newest "
        "version signs while min_sign_version is 0)"
    ),
)
error(
    "error.deletion_not_allowed",
    "destroy on a key whose deletion_allowed setting is off: the answer to "
    "destroy.request.not_allowed.",
    37,
    e.DeletionNotAllowed(
        "key 'app-signing' does not allow deletion; set deletion_allowed first (an admin operation)"
    ),
)
error(
    "error.deletion_not_allowed.max_versions",
    "rotate on a key that holds max_versions versions not destroyed (here 2) when none "
    "may be pruned (deletion is off, or no older version is retired yet); nothing was made.",
    65,
    e.DeletionNotAllowed(
        "key 'app-signing' holds 2 versions that are not destroyed, its max_versions is 2, "
        "and none can be pruned, as the key does not allow deletion: set deletion_allowed "
        "(its retired versions are then pruned) or raise max_versions; nothing was rotated"
    ),
)
error(
    "error.conflict",
    "another process sharing the token changed the key at the same moment (here: two "
    "daemons rotating it at once); this request changed nothing; retryable.",
    11,
    e.Conflict(
        "key 'app-signing' was changed by another process at the same moment; nothing was changed"
    ),
)
error(
    "error.permission_denied",
    "the peer (by SO_PEERCRED) may not do this operation on this key; audited.",
    99,
    e.PermissionDenied("nobody (uid 65534, pid 4242) may not sign key 'app-signing'"),
)
error(
    "error.rate_limited",
    "over a rate limit (per peer or per key); retry_after says when; retryable.",
    98,
    e.RateLimited("uid 1000 is over its rate limit; retry after 0.250 s", 0.25),
)
error(
    "error.internal_error",
    "a bug in signd; the details are in its log.",
    30,
    e.InternalError("internal error; see daemon log"),
)
error(
    "error.token_unavailable",
    "the token cannot be reached; retryable.",
    31,
    e.TokenUnavailable("token unavailable during sign: DeviceRemoved"),
)
error(
    "error.token_error",
    "the token refused or failed the operation.",
    32,
    e.TokenError("token failed key generation: GeneralError"),
)
error(
    "error.busy",
    "the token's queue is full; retryable; the connection stays open.",
    33,
    e.Busy("token queue is full (65536 signatures waiting)"),
)
error(
    "error.busy.connection",
    "too many connections: sent with id nil right after accept, then the daemon closes.",
    None,
    e.Busy("too many connections; try again later"),
)
error(
    "error.shutting_down",
    "the daemon is stopping: sent with id nil right after accept, then the daemon closes.",
    None,
    e.ShuttingDown("signd is shutting down"),
)
error(
    "error.deadline_exceeded",
    "the request was not finished within the daemon's request_timeout; retryable.",
    34,
    e.DeadlineExceeded("key look-up timed out"),
)

# ---------------------------------------------------------------- hand-made frames


def _raw(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _pack(obj: Any) -> bytes:
    return _raw(msgpack.packb(obj, use_bin_type=True))


def _error_ref(rid: int | None, err: type[e.WireError]) -> dict[str, Any]:
    return {"id": rid, "code": int(err.code), "name": err.code.name.lower()}


rejected: list[dict[str, Any]] = []


def reject(
    name: str,
    description: str,
    frame: bytes,
    rid: int | None,
    err: type[e.WireError],
    signd_response: str | None = None,
) -> None:
    try:
        message = _body_json(frame)
    except Exception:
        message = None  # not msgpack at all
    rejected.append(
        {
            "name": name,
            "description": description,
            "hex": frame.hex(),
            "message": message,
            "error": _error_ref(rid, err),
            "signd_response": signd_response,
        }
    )


OK_ARGS = {"key": KEY}
reject("not_msgpack", "0xc1 is never valid msgpack.", _raw(b"\xc1"), None, e.MalformedFrame)
reject(
    "trailing_bytes",
    "a valid request followed by one more byte inside the same frame.",
    _raw(msgpack.packb({"v": 1, "id": 40, "op": "health", "args": {}}) + b"\x00"),
    None,
    e.MalformedFrame,
)
reject("empty_body", "a frame of length 0.", _raw(b""), None, e.MalformedFrame)
reject(
    "not_a_map",
    "the body is an array.",
    _pack([1, 2]),
    None,
    e.MalformedFrame,
    "error.malformed_frame",
)
reject(
    "int_map_key",
    "map keys must be str; an int key is a malformed frame.",
    _pack({1: 2}),
    None,
    e.MalformedFrame,
)
reject(
    "frame_too_large",
    "only the 4-byte length prefix: 1048577 > 1048576 is refused before any body arrives.",
    struct.pack(">I", DEFAULT_MAX_FRAME + 1),
    None,
    e.FrameTooLarge,
    "error.frame_too_large",
)
reject(
    "id_missing",
    "no id: the answer cannot name the request.",
    _pack({"v": 1, "op": "health", "args": {}}),
    None,
    e.InvalidRequest,
    "error.invalid_request.no_id",
)
reject(
    "id_negative",
    "ids are unsigned.",
    _pack({"v": 1, "id": -1, "op": "health", "args": {}}),
    None,
    e.InvalidRequest,
)
reject(
    "id_bool",
    "true is not an integer.",
    _pack({"v": 1, "id": True, "op": "health", "args": {}}),
    None,
    e.InvalidRequest,
)
reject(
    "id_float",
    "1.0 is not an integer.",
    _pack({"v": 1, "id": 1.0, "op": "health", "args": {}}),
    None,
    e.InvalidRequest,
)
reject(
    "id_str",
    "a str id.",
    _pack({"v": 1, "id": "41", "op": "health", "args": {}}),
    None,
    e.InvalidRequest,
)
reject(
    "v_2",
    "protocol version 2.",
    _pack({"v": 2, "id": 21, "op": "health", "args": {}}),
    21,
    e.UnsupportedVersion,
    "error.unsupported_version",
)
reject(
    "v_missing",
    "no protocol version.",
    _pack({"id": 42, "op": "health", "args": {}}),
    42,
    e.UnsupportedVersion,
)
reject(
    "op_missing",
    "no op.",
    _pack({"v": 1, "id": 43, "args": {}}),
    43,
    e.InvalidRequest,
)
reject(
    "op_not_str",
    "op is an int.",
    _pack({"v": 1, "id": 44, "op": 5, "args": {}}),
    44,
    e.InvalidRequest,
)
reject(
    "op_unknown",
    "an op that does not exist.",
    _pack({"v": 1, "id": 22, "op": "frobnicate", "args": {}}),
    22,
    e.UnknownOperation,
    "error.unknown_operation",
)
reject(
    "envelope_unknown_field",
    "a field other than v, id, op and args in the envelope.",
    _pack({"v": 1, "id": 23, "op": "health", "args": {}, "deadline": 5}),
    23,
    e.InvalidRequest,
    "error.invalid_request",
)
reject(
    "args_not_a_map",
    "args is an array.",
    _pack({"v": 1, "id": 45, "op": "key_info", "args": [KEY]}),
    45,
    e.InvalidArgument,
)
reject(
    "args_unknown_field",
    "an argument the op does not have is rejected, never ignored.",
    _pack({"v": 1, "id": 46, "op": "sign", "args": {"key": KEY, "message": MESSAGE, "salt": 0}}),
    46,
    e.InvalidArgument,
)
reject(
    "args_unknown_field_nil",
    "an unknown argument is rejected even when its value is nil.",
    _pack({"v": 1, "id": 47, "op": "list_keys", "args": {"verbose": None}}),
    47,
    e.InvalidArgument,
)
reject(
    "args_missing_required",
    "key_info without key.",
    _pack({"v": 1, "id": 48, "op": "key_info", "args": {}}),
    48,
    e.InvalidArgument,
)
reject(
    "args_required_nil",
    "a required argument sent as nil counts as missing.",
    _pack({"v": 1, "id": 49, "op": "key_info", "args": {"key": None}}),
    49,
    e.InvalidArgument,
)
reject(
    "args_key_bin",
    "key must be a msgpack str, not bin.",
    _pack({"v": 1, "id": 24, "op": "key_info", "args": {"key": KEY.encode()}}),
    24,
    e.InvalidArgument,
    "error.invalid_argument",
)
reject(
    "args_message_str",
    "message must be a msgpack bin, not str.",
    _pack({"v": 1, "id": 50, "op": "sign", "args": {"key": KEY, "message": "hello"}}),
    50,
    e.InvalidArgument,
)
reject(
    "args_version_bool",
    "version must be an int; true is not one.",
    _pack({"v": 1, "id": 51, "op": "public_key", "args": {**OK_ARGS, "version": True}}),
    51,
    e.InvalidArgument,
)
reject(
    "args_version_float",
    "version must be an int; 1.0 is a float.",
    _pack({"v": 1, "id": 52, "op": "public_key", "args": {**OK_ARGS, "version": 1.0}}),
    52,
    e.InvalidArgument,
)

reject(
    "args_batch_item_str",
    "every item of a sign_batch's digests must be a msgpack bin; a str item is refused "
    "like any other argument of the wrong type.",
    _pack(
        {
            "v": 1,
            "id": 53,
            "op": "sign_batch",
            "args": {"key": KEY, "digests": [SHA256, SHA256.hex()], "hash": "sha256"},
        }
    ),
    53,
    e.InvalidArgument,
)

reject(
    "args_bool_int",
    "deletion_allowed must be a msgpack bool; the int 1 is not one.",
    _pack({"v": 1, "id": 55, "op": "update_key", "args": {**OK_ARGS, "deletion_allowed": 1}}),
    55,
    e.InvalidArgument,
)
reject(
    "args_disable_without_version",
    "disable and enable need the version; there is no default.",
    _pack({"v": 1, "id": 56, "op": "disable", "args": OK_ARGS}),
    56,
    e.InvalidArgument,
)

reject(
    "args_idempotency_key_bin",
    "idempotency_key must be a msgpack str, not bin.",
    _pack(
        {
            "v": 1,
            "id": 57,
            "op": "rotate",
            "args": {"key": KEY, "idempotency_key": IDEM_ROTATE.encode()},
        }
    ),
    57,
    e.InvalidArgument,
)

accepted: list[dict[str, Any]] = []


def accept(name: str, description: str, frame: bytes, rid: int, op: str, args: Any) -> None:
    accepted.append(
        {
            "name": name,
            "description": description,
            "hex": frame.hex(),
            "message": _body_json(frame),
            "request": {"id": rid, "op": op, "args": _json(args)},
        }
    )


accept(
    "keys_reordered",
    "the same sign request with every map's keys in another order.",
    _pack({"args": {"message": MESSAGE, "key": KEY}, "op": "sign", "id": 6, "v": 1}),
    6,
    "sign",
    {"key": KEY, "message": MESSAGE},
)
accept(
    "optional_nil",
    "optional arguments sent as nil are the same as absent.",
    _pack(
        {
            "v": 1,
            "id": 4,
            "op": "public_key",
            "args": {"key": KEY, "version": None},
        }
    ),
    4,
    "public_key",
    {"key": KEY},
)
accept(
    "args_omitted",
    "args may be left out when the op has no required argument.",
    _pack({"v": 1, "id": 60, "op": "list_keys"}),
    60,
    "list_keys",
    {},
)
accept(
    "wide_int",
    "an id in a wider msgpack int than needed (uint 64 holding 7) is the same id.",
    _raw(b"\x84\xa1v\x01\xa2id\xcf" + (7).to_bytes(8, "big") + b"\xa2op\xa6health\xa4args\x80"),
    7,
    "health",
    {},
)


# Replay protection (PROTOCOL.md, "Replay protection"): a watermarked key's
# position, the error naming its mark, and a replay-checked verify whose
# signature (deterministic ECDSA by app-signing v2) covers the replay payload.
WM_KEY = "chain-signer"
REPLAY_TS = 1750000000
REPLAY_NONCE = bytes(range(16))
REPLAY_PAYLOAD = (
    b"signd-replay-v1\x00"
    + struct.pack(">QB", REPLAY_TS, len(REPLAY_NONCE))
    + REPLAY_NONCE
    + MESSAGE
)
SIG_REPLAY = EC_V2.sign(
    hashlib.sha256(REPLAY_PAYLOAD).digest(),
    ec.ECDSA(utils.Prehashed(hashes.SHA256()), deterministic_signing=True),
)
request(
    "create_key.request.watermark",
    "a watermarked key: every sign must carry a position above its mark.",
    71,
    "create_key",
    CreateKeyArgs(key=WM_KEY, type="ec-p256", watermark=True),
)
request(
    "sign.request.position",
    "sign at a position of a watermarked key (uint64, above the key's mark).",
    72,
    "sign",
    SignArgs(key=WM_KEY, message=MESSAGE, position=101),
)
request(
    "sign_batch.request.position",
    "a watermarked batch: the first item's position; the next item is 103.",
    73,
    "sign_batch",
    SignBatchArgs(key=WM_KEY, messages=(MESSAGE, MESSAGE), position=102),
)
error(
    "error.position_used",
    "a position at or below the key's mark (the message names it); never retried.",
    72,
    e.PositionUsed(
        f"key '{WM_KEY}': position 101 is at or below its mark 103 (the highest position "
        "signed); sign at 104 or above"
    ),
)
request(
    "update_key.request.raise_mark",
    "raise a watermarked key's mark by hand (never lowered).",
    74,
    "update_key",
    UpdateKeyArgs(key=WM_KEY, raise_mark=5000),
)
request(
    "verify.request.replay",
    "a replay-checked verify: the signature covers 'signd-replay-v1' 0x00 || "
    "u64be(timestamp) || u8(len(nonce)) || nonce || message.",
    75,
    "verify",
    VerifyArgs(
        key=KEY,
        signature=SIG_REPLAY,
        message=MESSAGE,
        version=2,
        timestamp=REPLAY_TS,
        nonce=REPLAY_NONCE,
    ),
)
result(
    "verify.result.replay_valid",
    "the first time: valid, the nonce now held (on disk before this answer).",
    75,
    "verify",
    VerifyResult(valid=True, key=KEY, version=2, algorithm="ecdsa-p256-sha256", status="valid"),
)
result(
    "verify.result.replayed",
    "the same request again: replayed (valid is false).",
    75,
    "verify",
    VerifyResult(valid=False, key=KEY, status="replayed"),
)


def document() -> dict[str, Any]:
    return {
        "about": (
            "Golden frames of the signd wire protocol (see PROTOCOL.md). 'hex' is the whole "
            "frame: the 4-byte big-endian length, then the msgpack body. 'message' is the body "
            'as JSON; a msgpack bin value is written {"$bin": "<hex>"}; a JSON number with '
            "a decimal point is a msgpack float 64, one without is a msgpack int. 'vectors' "
            "are exactly what signd's encoder writes (map keys in that order). "
            "'rejected_requests' must be answered with the given error code and id (messages "
            "are for humans and may differ). 'accepted_requests' are not what signd's encoder "
            "writes but must decode to 'request'. Generated by generate.py; do not edit."
        ),
        "protocol_version": PROTOCOL_VERSION,
        "max_frame": DEFAULT_MAX_FRAME,
        "vectors": vectors,
        "rejected_requests": rejected,
        "accepted_requests": accepted,
    }


def render() -> str:
    return json.dumps(document(), indent=2, ensure_ascii=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--check", action="store_true", help="compare with frames.json instead of writing it"
    )
    opts = parser.parse_args()
    text = render()
    if opts.check:
        if OUT.read_text() != text:
            print(f"{OUT} differs from what the encoder writes now", file=sys.stderr)
            return 1
        print(f"{OUT} is up to date")
        return 0
    OUT.write_text(text)
    print(
        f"wrote {len(vectors)} vectors, {len(rejected)} rejected and {len(accepted)} accepted "
        f"requests to {OUT}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
