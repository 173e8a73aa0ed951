"""The ``jwks`` operation: every version that may verify, as a JWK Set.

Each JWK is checked against the PEM the daemon gives for the same version,
by loading it with PyJWT (an independent JWK parser) and comparing public
numbers; a signature by each version verifies with the key PyJWT built.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from signd_client import Client
from signd_client.errors import InvalidArgument, KeyNotFound
from signd_client.protocol import MAX_JWKS_KEYS

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import Daemon


def _jwk_key(jwk: dict[str, Any]) -> Any:
    return jwt.PyJWK.from_dict(jwk).key


def _same_public_key(a: Any, pem: str) -> None:
    b = serialization.load_pem_public_key(pem.encode())
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert a.public_bytes(*spki) == b.public_bytes(*spki)


def _by_kid(c: Client, names: list[str]) -> dict[str, dict[str, Any]]:
    doc = c.jwks(names).to_wire()
    json.dumps(doc)  # a JSON document as it stands: only str members
    return {k["kid"]: k for k in doc["keys"]}


@pytest.mark.parametrize(
    ("key_type", "kty", "alg", "crv"),
    [
        ("ec-p256", "EC", "ES256", "P-256"),
        ("ec-p384", "EC", "ES384", "P-384"),
        ("ed25519", "OKP", "EdDSA", "Ed25519"),
    ],
)
def test_each_version_that_verifies(
    signd: Daemon, key_name: str, key_type: str, kty: str, alg: str, crv: str
) -> None:
    with signd.client() as c:
        c.create_key(key_name, key_type)
        c.rotate(key_name)
        info = c.key_info(key_name)
        keys = _by_kid(c, [key_name])
        # Both versions, newest first; every member a JWK verifier expects.
        assert list(keys) == [f"{key_name}:2", f"{key_name}:1"]
        for v in info.versions:
            jwk = keys[f"{key_name}:{v.version}"]
            assert {k: jwk[k] for k in ("kty", "use", "alg", "crv")} == {
                "kty": kty,
                "use": "sig",
                "alg": alg,
                "crv": crv,
            }
            assert "=" not in jwk["x"]  # base64url without padding
            _same_public_key(_jwk_key(jwk), v.public_key_pem)
        # A signature by the current version verifies with its JWK.
        res = c.sign(key_name, b"jwks", format="raw" if kty == "EC" else None)
        pub = _jwk_key(keys[f"{key_name}:{res.version}"])
        if isinstance(pub, ed25519.Ed25519PublicKey):
            pub.verify(res.signature, b"jwks")
        else:
            assert isinstance(pub, ec.EllipticCurvePublicKey)
            size = len(res.signature) // 2
            from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

            der = encode_dss_signature(
                int.from_bytes(res.signature[:size]), int.from_bytes(res.signature[size:])
            )
            h = hashes.SHA256() if crv == "P-256" else hashes.SHA384()
            pub.verify(der, b"jwks", ec.ECDSA(h))
        # Version 1 stops verifying: it leaves the set.
        c.update_key(key_name, min_verify_version=2)
        assert list(_by_kid(c, [key_name])) == [f"{key_name}:2"]


def test_rsa_jwk_has_no_alg_and_verifies(signd: Daemon, key_name: str) -> None:
    with signd.client() as c:
        c.create_key(key_name, "rsa-2048")
        (jwk,) = c.jwks([key_name]).to_wire()["keys"]
        assert jwk["kty"] == "RSA"
        assert jwk["e"] == "AQAB"  # 65537, minimal length
        assert "alg" not in jwk  # one RSA key signs RS256 and PS256
        pub = _jwk_key(jwk)
        assert isinstance(pub, rsa.RSAPublicKey)
        _same_public_key(pub, c.public_key(key_name).public_key_pem)
        res = c.sign(key_name, b"rsa", padding="pss")
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        pub.verify(res.signature, b"rsa", pss, hashes.SHA256())


def test_several_keys_and_bad_input(signd: Daemon, key_name: str) -> None:
    a, b = key_name + "-a", key_name + "-b"
    with signd.client() as c:
        c.create_key(a, "ec-p256")
        c.create_key(b, "ed25519")
        c.disable(b, 1)  # a disabled version does not verify: no JWK
        c.rotate(b)
        # Named twice: listed once, in the order asked.
        assert list(_by_kid(c, [b, a, b])) == [f"{b}:2", f"{a}:1"]
        with pytest.raises(KeyNotFound, match=f"{key_name}-missing"):
            c.jwks([a, key_name + "-missing"])
        with pytest.raises(InvalidArgument, match="1 to 100 keys"):
            c.jwks([])
        with pytest.raises(InvalidArgument, match="1 to 100 keys"):
            c.jwks([f"{key_name}-{i}" for i in range(MAX_JWKS_KEYS + 1)])
        with pytest.raises(InvalidArgument, match="key name"):
            c.jwks([a, "no/slash"])
        assert c.health().ready  # the daemon is unharmed


def test_key_made_by_another_daemon(
    signd: Daemon, make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    """A name this daemon has not seen is looked up on the token, like key_info."""
    other = make_daemon()
    with other.client() as c:
        c.create_key(key_name, "ec-p256")
        pem = c.public_key(key_name).public_key_pem
    with signd.client() as c:
        (jwk,) = c.jwks([key_name]).to_wire()["keys"]
    _same_public_key(_jwk_key(jwk), pem)


def test_signctl_prints_a_jwk_set(signd: Daemon, key_name: str) -> None:
    with signd.client() as c:
        c.create_key(key_name, "ec-p256")
        pem = c.public_key(key_name).public_key_pem
    out = signd.signctl("jwks", key_name)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    (jwk,) = doc["keys"]
    assert jwk["kid"] == f"{key_name}:1"
    _same_public_key(_jwk_key(jwk), pem)
    missing = signd.signctl("jwks", key_name + "-missing")
    assert missing.returncode == 2
    assert b"key_not_found" in missing.stderr
