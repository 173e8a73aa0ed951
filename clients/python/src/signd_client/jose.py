"""JWS and JWT signed by a key on the token (RFC 7515, 7518, 7519, 8037).

PyJWT signs with a key on the token as it is: ``jwt.encode(claims,
client.private_key(name), algorithm=..., headers={"kid": kid(key)})``.  What
it lacks is here: ``kid`` names the key *and* its version (``NAME:VERSION``, as
in signd's JWK Set), and ``sign_jwt`` follows rotation.

``sign_jwt(key, claims)`` gives a compact JWS whose header names the key and
version as ``kid`` (``NAME:VERSION``, as in the JWK Set from ``Client.jwks``),
so a verifier that fetched the JWK Set picks the right public key, and tokens
signed before a rotation keep verifying until their version retires::

    key = client.private_key("api-tokens")
    token = sign_jwt(key, {"sub": "alice", "exp": int(time.time()) + 600})
    jwks = client.jwks(["api-tokens"]).to_wire()  # publish this as JSON

The algorithm follows from the key type (ES256 for ec-p256, ES384 for ec-p384,
ES256K for ec-secp256k1, EdDSA for ed25519, RS256 for RSA); RSA keys also take
RS384, RS512, PS256, PS384 and PS512.

A key object made without a version follows rotation here: when its version
can no longer sign, ``sign_jwt`` moves on to the key's current version (and
remembers that, so later tokens cost one round trip again).  A key made with
an explicit version never moves; signing after that version stopped being
active raises ``VersionNotUsable``.
"""

from __future__ import annotations

import base64
import json
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

from .errors import VersionNotUsable

if TYPE_CHECKING:
    from .keys import AsyncSigndPrivateKey, SigndPrivateKey

__all__ = [
    "JWS_ALGORITHMS",
    "default_algorithm",
    "kid",
    "sign_jws",
    "sign_jws_async",
    "sign_jwt",
    "sign_jwt_async",
]


@dataclass(frozen=True, slots=True)
class _Alg:
    key_types: tuple[str, ...]
    hash: str | None
    padding: str | None
    format: str | None


_RSA: Final = ("rsa-2048", "rsa-3072", "rsa-4096")

#: JWS ``alg`` -> what signd signs with (RFC 7518 section 3.1, RFC 8037).
JWS_ALGORITHMS: Final[Mapping[str, _Alg]] = {
    "ES256": _Alg(("ec-p256",), "sha256", None, "raw"),
    "ES384": _Alg(("ec-p384",), "sha384", None, "raw"),
    # RFC 8812: ECDSA over secp256k1 with SHA-256 (signd's signatures are low-S).
    "ES256K": _Alg(("ec-secp256k1",), "sha256", None, "raw"),
    "EdDSA": _Alg(("ed25519",), None, None, None),
    "RS256": _Alg(_RSA, "sha256", "pkcs1v15", None),
    "RS384": _Alg(_RSA, "sha384", "pkcs1v15", None),
    "RS512": _Alg(_RSA, "sha512", "pkcs1v15", None),
    # signd's PSS salt is the digest's length, as RFC 7518 section 3.5 requires.
    "PS256": _Alg(_RSA, "sha256", "pss", None),
    "PS384": _Alg(_RSA, "sha384", "pss", None),
    "PS512": _Alg(_RSA, "sha512", "pss", None),
}

_DEFAULT: Final = {
    "ec-p256": "ES256",
    "ec-p384": "ES384",
    "ec-secp256k1": "ES256K",
    "ed25519": "EdDSA",
}

#: Key objects made without a version -> the key object that replaced them
#: after a rotation (weak: it goes when the caller drops the original).
_successors: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_successors_lock = threading.Lock()

K = TypeVar("K", "SigndPrivateKey", "AsyncSigndPrivateKey")


def default_algorithm(key_type: str) -> str:
    """The JWS ``alg`` a key of ``key_type`` signs with unless told otherwise."""
    return _DEFAULT.get(key_type, "RS256")


def kid(key: SigndPrivateKey | AsyncSigndPrivateKey) -> str:
    """The JWS ``kid`` of ``key``'s version: ``NAME:VERSION``, the ``kid`` of its
    JWK in ``Client.jwks``, so a verifier picks the right version's public key."""
    return f"{key.name}:{key.version}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _compact_json(value: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"JWT claims and headers must be JSON values: {exc}") from None


def _plan(
    key_type: str, name: str, version: int, headers: Mapping[str, Any] | None, algorithm: str | None
) -> tuple[dict[str, Any], _Alg]:
    """The protected header and how to sign; raises ValueError for a mismatch."""
    alg = algorithm if algorithm is not None else default_algorithm(key_type)
    spec = JWS_ALGORITHMS.get(alg)
    if spec is None:
        raise ValueError(
            f"unsupported JWS algorithm {alg!r}; supported: {', '.join(JWS_ALGORITHMS)}"
        )
    if key_type not in spec.key_types:
        raise ValueError(
            f"JWS algorithm {alg} needs a {' or '.join(spec.key_types)} key; "
            f"key {name!r} is {key_type}"
        )
    header: dict[str, Any] = {"alg": alg, "kid": f"{name}:{version}"}
    for field, value in (headers or {}).items():
        if field in ("alg", "kid") and value != header[field]:
            raise ValueError(
                f"header {field!r} is set by the key: {header[field]!r}, not {value!r}"
            )
        header[field] = value
    return header, spec


def _signing_input(header: Mapping[str, Any], payload: bytes) -> bytes:
    return f"{_b64url(_compact_json(header))}.{_b64url(payload)}".encode("ascii")


def _current(key: K) -> K:
    """``key``, or the key object that replaced it after a rotation."""
    with _successors_lock:
        newer: K | None = _successors.get(key)
    return newer if newer is not None else key


def _check_follow(key: K, followed: bool, error: VersionNotUsable) -> None:
    """Re-raise ``error`` unless ``key`` may move on to the current version now.

    Only a key made without a version moves, and once per call: if the newest
    version cannot sign either (disabled, say), the caller hears why.
    """
    if key.pinned or followed:
        raise error


def _moved_on(key: K, newer: K) -> K:
    with _successors_lock:
        _successors[key] = newer
    return newer


def _request(
    signer: SigndPrivateKey | AsyncSigndPrivateKey,
    payload: bytes,
    headers: Mapping[str, Any] | None,
    algorithm: str | None,
) -> tuple[bytes, dict[str, Any]]:
    """The JWS signing input and the ``sign`` options for it."""
    header, spec = _plan(signer.key_type, signer.name, signer.version, headers, algorithm)
    options = {
        "hash": spec.hash,
        "padding": spec.padding,
        "format": spec.format,
        "version": signer.version,
    }
    return _signing_input(header, payload), options


def _compact(signing_input: bytes, signature: bytes) -> str:
    return f"{signing_input.decode('ascii')}.{_b64url(signature)}"


def sign_jws(
    key: SigndPrivateKey,
    payload: bytes,
    *,
    headers: Mapping[str, Any] | None = None,
    algorithm: str | None = None,
) -> str:
    """A compact JWS of ``payload`` (``header.payload.signature``).

    ``headers`` are added to the protected header; ``alg`` and ``kid`` come
    from the key.

    Raises:
        ValueError: ``algorithm`` does not fit the key type, or is unknown.
        VersionNotUsable: a key pinned to a version that may no longer sign.
        SigndError: any other error from the daemon.
    """
    signer = _current(key)
    followed = False
    while True:
        data, options = _request(signer, payload, headers, algorithm)
        try:
            res = signer.client.sign(signer.name, data, **options)
        except VersionNotUsable as exc:
            _check_follow(key, followed, exc)
            signer, followed = _moved_on(key, signer.latest()), True
            continue
        return _compact(data, res.signature)


async def sign_jws_async(
    key: AsyncSigndPrivateKey,
    payload: bytes,
    *,
    headers: Mapping[str, Any] | None = None,
    algorithm: str | None = None,
) -> str:
    """``sign_jws`` for a key from ``AsyncClient.private_key`` (trio or asyncio)."""
    signer = _current(key)
    followed = False
    while True:
        data, options = _request(signer, payload, headers, algorithm)
        try:
            res = await signer.client.sign(signer.name, data, **options)
        except VersionNotUsable as exc:
            _check_follow(key, followed, exc)
            signer, followed = _moved_on(key, await signer.latest()), True
            continue
        return _compact(data, res.signature)


def _jwt_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"typ": "JWT", **(headers or {})}


def sign_jwt(
    key: SigndPrivateKey,
    claims: Mapping[str, Any],
    *,
    headers: Mapping[str, Any] | None = None,
    algorithm: str | None = None,
) -> str:
    """A JWT: ``claims`` as a compact JWS with ``typ: JWT`` (see ``sign_jws``).

    The claims are written as given; add ``iat``/``exp``/``nbf`` (integers, in
    seconds) yourself, as your verifier expects.
    """
    return sign_jws(key, _compact_json(claims), headers=_jwt_headers(headers), algorithm=algorithm)


async def sign_jwt_async(
    key: AsyncSigndPrivateKey,
    claims: Mapping[str, Any],
    *,
    headers: Mapping[str, Any] | None = None,
    algorithm: str | None = None,
) -> str:
    """``sign_jwt`` for a key from ``AsyncClient.private_key`` (trio or asyncio)."""
    return await sign_jws_async(
        key, _compact_json(claims), headers=_jwt_headers(headers), algorithm=algorithm
    )
