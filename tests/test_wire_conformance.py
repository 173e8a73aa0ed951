"""Wire conformance: what PROTOCOL.md says about version numbers, the jwks
limit and the token's mechanism names is what the daemon does."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import msgpack
import pytest
from pkcs11 import Mechanism

from signd.token.session import mechanism_name
from signd_client.errors import InvalidArgument, VersionNotFound
from signd_client.protocol import (
    MAX_JWKS_KEYS,
    MAX_VERSION,
    BadRequest,
    Request,
    SignArgs,
    decode_request,
)

if TYPE_CHECKING:
    from conftest import Daemon

#: A PKCS#11 mechanism name (words of capitals and digits joined by one
#: underscore), or a number in hex.
MECHANISM = re.compile(r"CKM_[A-Z0-9]+(?:_[A-Z0-9]+)*|0x[0-9a-f]{8}")


@pytest.mark.parametrize("version", [0, -1, MAX_VERSION + 1, 2**63, 2**64 - 1])
def test_a_version_out_of_range_is_invalid_argument(
    signd: Daemon, key_name: str, version: int
) -> None:
    with signd.client() as c:
        c.create_key(key_name, "ec-p256")
        with pytest.raises(InvalidArgument, match="field 'version': must be 1 to 2147483647"):
            c.sign(key_name, b"x", version=version)
        with pytest.raises(InvalidArgument, match="field 'version'"):
            c.public_key(key_name, version=version)
        with pytest.raises(InvalidArgument, match="field 'min_verify_version'"):
            c.update_key(key_name, min_verify_version=-1)
        # In range but not there: the key has no such version.
        with pytest.raises(VersionNotFound):
            c.sign(key_name, b"x", version=MAX_VERSION)
        assert c.health().ready


def test_the_decoder_bounds_versions() -> None:
    def decode(version: int) -> Request | BadRequest:
        args = {"key": "k", "message": b"m", "version": version}
        return decode_request(msgpack.packb({"v": 1, "id": 7, "op": "sign", "args": args}))

    for good in (1, MAX_VERSION):
        request = decode(good)
        assert isinstance(request, Request)
        assert isinstance(request.args, SignArgs)
        assert request.args.version == good
    for bad in (0, MAX_VERSION + 1):
        refused = decode(bad)
        assert isinstance(refused, BadRequest)
        assert refused.id == 7
        assert isinstance(refused.error, InvalidArgument)
        assert "'version'" in str(refused.error)


def test_the_jwks_limit_counts_names_as_sent(signd: Daemon, key_name: str) -> None:
    with signd.client() as c:
        c.create_key(key_name, "ec-p256")
        assert len(c.jwks([key_name] * MAX_JWKS_KEYS).keys) == 1  # listed once
        with pytest.raises(InvalidArgument, match=f"1 to {MAX_JWKS_KEYS} keys, got 101"):
            c.jwks([key_name] * (MAX_JWKS_KEYS + 1))


def test_mechanism_names_are_pkcs11_names() -> None:
    assert mechanism_name(Mechanism.ECDSA) == "CKM_ECDSA"
    assert mechanism_name(Mechanism.SHA_1) == "CKM_SHA_1"
    assert mechanism_name(Mechanism._MD5) == "CKM_MD5"  # python-pkcs11: deprecated
    assert mechanism_name(Mechanism._VENDOR_DEFINED) == "0x80000000"
    assert mechanism_name(0x80001234) == "0x80001234"
    assert mechanism_name(0x7FFFFFF0) == "0x7ffffff0"  # a number nobody names
    for mech in Mechanism:
        assert MECHANISM.fullmatch(mechanism_name(mech)), mech


def test_health_lists_the_tokens_mechanisms_by_pkcs11_name(signd: Daemon) -> None:
    with signd.client() as c:
        token = c.health().token
    assert token is not None
    names = token.mechanisms
    assert list(names) == sorted(names)
    assert [n for n in names if not MECHANISM.fullmatch(n)] == []
    assert "CKM_ECDSA" in names
    assert "CKM_MD5" in names  # SoftHSM offers it; python-pkcs11 calls it _MD5
