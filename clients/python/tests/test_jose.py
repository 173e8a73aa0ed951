"""JWTs signed on the token, checked by PyJWT with the JWK Set signd exports.

PyJWT is the independent verifier: it parses the compact JWS, picks the JWK
by ``kid`` from ``Client.jwks`` and checks the signature and the claims.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING, Any

import jwt
import pytest

from signd_client import AsyncClient, Client
from signd_client.errors import VersionNotUsable
from signd_client.jose import kid, sign_jws, sign_jwt, sign_jwt_async

if TYPE_CHECKING:
    from conftest import Daemon

CLAIMS: dict[str, Any] = {"sub": "alice", "aud": "orders", "scope": ["read", "write"], "n": 1}


def verify(client: Client, token: str, names: list[str], alg: str) -> dict[str, Any]:
    """Check ``token`` the way a relying party does: JWK Set by kid, then PyJWT."""
    keys = jwt.PyJWKSet.from_dict(client.jwks(names).to_wire())
    kid = jwt.get_unverified_header(token)["kid"]
    claims: dict[str, Any] = jwt.decode(token, keys[kid].key, algorithms=[alg], audience="orders")
    return claims


@pytest.fixture(scope="module")
def keys(signd: Daemon) -> dict[str, str]:
    """One key per type, made once for the module (RSA generation is slow)."""
    suffix = str(time.monotonic_ns())
    types = ("ec-p256", "ec-p384", "ec-secp256k1", "ed25519", "rsa-2048")
    made = {t: f"jose-{t}-{suffix}" for t in types}
    with signd.client() as c:
        for t, name in made.items():
            c.create_key(name, t)
    return made


@pytest.mark.parametrize(
    ("alg", "key_type"),
    [
        ("ES256", "ec-p256"),
        ("ES384", "ec-p384"),
        ("ES256K", "ec-secp256k1"),
        ("EdDSA", "ed25519"),
        ("RS256", "rsa-2048"),
        ("PS256", "rsa-2048"),
        ("RS512", "rsa-2048"),
        ("PS384", "rsa-2048"),
    ],
)
def test_each_algorithm_verifies_with_pyjwt(
    signd: Daemon, keys: dict[str, str], alg: str, key_type: str
) -> None:
    name = keys[key_type]
    with signd.client() as c:
        key = c.private_key(name)
        explicit = None if alg in ("ES256", "ES384", "ES256K", "EdDSA", "RS256") else alg
        token = sign_jwt(key, CLAIMS, headers={"cty": "test"}, algorithm=explicit)
        header = jwt.get_unverified_header(token)
        assert header == {"alg": alg, "kid": f"{name}:{key.version}", "typ": "JWT", "cty": "test"}
        assert verify(c, token, [name], alg) == CLAIMS
        # Tampering with the claims breaks it.
        head, _body, sig = token.split(".")
        forged_body = jwt.utils.base64url_encode(b'{"sub":"mallory","aud":"orders"}').decode()
        with pytest.raises(jwt.InvalidSignatureError):
            verify(c, f"{head}.{forged_body}.{sig}", [name], alg)


@pytest.mark.parametrize(
    ("alg", "key_type"),
    [("ES256", "ec-p256"), ("ES384", "ec-p384"), ("EdDSA", "ed25519"), ("PS256", "rsa-2048")],
)
def test_pyjwt_signs_with_a_key_on_the_token_and_kid_names_its_version(
    signd: Daemon, keys: dict[str, str], alg: str, key_type: str
) -> None:
    """What the README shows first: PyJWT encodes, signd signs, ``kid`` picks the JWK."""
    name = keys[key_type]
    with signd.client() as c:
        key = c.private_key(name)
        assert kid(key) == f"{name}:{key.version}"
        token = jwt.encode(CLAIMS, key, algorithm=alg, headers={"kid": kid(key)})
        assert jwt.get_unverified_header(token)["kid"] == kid(key)
        assert verify(c, token, [name], alg) == CLAIMS


def test_rotation_keeps_old_tokens_until_their_version_retires(
    signd: Daemon, key_name: str
) -> None:
    with signd.client() as c:
        c.create_key(key_name, "ec-p256", verify_grace=1.5)
        key = c.private_key(key_name)  # no version: follows rotation in sign_jwt
        pinned = c.private_key(key_name, 1)
        before = sign_jwt(key, CLAIMS)
        c.rotate(key_name)
        after = sign_jwt(key, CLAIMS)  # moves on to version 2 by itself
        assert jwt.get_unverified_header(before)["kid"] == f"{key_name}:1"
        assert jwt.get_unverified_header(after)["kid"] == f"{key_name}:2"
        assert key.version == 1  # the object itself never changes
        with pytest.raises(VersionNotUsable, match="verify-only"):
            sign_jwt(pinned, CLAIMS)  # a pinned key never moves
        # Both verify against the set published after the rotation.
        assert verify(c, before, [key_name], "ES256") == CLAIMS
        assert verify(c, after, [key_name], "ES256") == CLAIMS
        # Once version 1's grace ends it leaves the set, and its tokens fail.
        deadline = time.monotonic() + 30
        while f"{key_name}:1" in {k.kid for k in c.jwks([key_name]).keys}:
            assert time.monotonic() < deadline, "version 1 never retired"
            time.sleep(0.2)
        with pytest.raises(KeyError):
            verify(c, before, [key_name], "ES256")
        assert verify(c, after, [key_name], "ES256") == CLAIMS


def test_threads_share_one_client(signd: Daemon, keys: dict[str, str]) -> None:
    """A threaded web app: one Client (a connection pool) for every worker thread."""
    name = keys["ed25519"]
    tokens: list[str] = []
    errors: list[BaseException] = []
    with signd.client() as c:
        key = c.private_key(name)

        def issue(i: int) -> None:
            try:
                for j in range(20):
                    tokens.append(sign_jwt(key, {**CLAIMS, "n": i * 100 + j}))
            except BaseException as exc:  # collected, asserted below
                errors.append(exc)

        threads = [threading.Thread(target=issue, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert sorted(verify(c, t, [name], "EdDSA")["n"] for t in tokens) == sorted(
            i * 100 + j for i in range(8) for j in range(20)
        )


async def test_trio(signd: Daemon, keys: dict[str, str]) -> None:
    name = keys["ec-p384"]
    async with AsyncClient(signd.socket) as ac:
        key = await ac.private_key(name)
        token = await sign_jwt_async(key, CLAIMS)
    with signd.client() as c:
        assert verify(c, token, [name], "ES384") == CLAIMS


def test_asyncio(signd: Daemon, keys: dict[str, str]) -> None:
    name = keys["rsa-2048"]

    async def main() -> list[str]:
        async with AsyncClient(signd.socket) as ac:
            key = await ac.private_key(name)
            return list(
                await asyncio.gather(
                    *(sign_jwt_async(key, CLAIMS, algorithm="PS256") for _ in range(10))
                )
            )

    tokens = asyncio.run(main())
    with signd.client() as c:
        for token in tokens:
            assert verify(c, token, [name], "PS256") == CLAIMS


def test_bad_input_is_refused_before_the_wire(signd: Daemon, keys: dict[str, str]) -> None:
    with signd.client() as c:
        ed = c.private_key(keys["ed25519"])
        rsa = c.private_key(keys["rsa-2048"])
        with pytest.raises(ValueError, match="ES256 needs a ec-p256 key"):
            sign_jwt(ed, CLAIMS, algorithm="ES256")
        with pytest.raises(ValueError, match="unsupported JWS algorithm 'HS256'"):
            sign_jwt(rsa, CLAIMS, algorithm="HS256")
        with pytest.raises(ValueError, match="header 'kid' is set by the key"):
            sign_jwt(ed, CLAIMS, headers={"kid": "someone-else"})
        with pytest.raises(TypeError, match="JSON values"):
            sign_jwt(ed, {"when": object()})
        # A detached payload need not be JSON: a JWS of raw bytes.
        jws = sign_jws(ed, b"\x00\xffraw")
        keyset = jwt.PyJWKSet.from_dict(c.jwks([keys["ed25519"]]).to_wire())
        kid = jwt.get_unverified_header(jws)["kid"]
        assert jwt.api_jws.decode(jws, keyset[kid].key, algorithms=["EdDSA"]) == b"\x00\xffraw"
