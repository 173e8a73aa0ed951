"""``signd_client.eth`` in process, without a daemon.

A fake client plays the daemon's ``sign`` with ``format: "eth"``: it signs the
digest with a local secp256k1 key through ``cryptography`` (random nonces, as
a token's), makes S low and appends the recovery id.  What the signer returns
is checked the way a chain checks it: ``eth-account`` recovers the address
from the raw transaction or the message and decodes the transaction's fields,
which must be those ``Account.sign_transaction`` encodes with the same private
key.  Signatures are not compared byte for byte (eth-account's nonces are
RFC 6979, the token's are random).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import rlp  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data
from eth_account.signers.base import BaseAccount
from eth_account.typed_transactions.typed_transaction import TypedTransaction
from eth_keys.datatypes import Signature
from eth_utils.address import to_canonical_address
from eth_utils.crypto import keccak
from hexbytes import HexBytes

from signd_client import AsyncClient, Client, UnsupportedKeyOperation
from signd_client.errors import ProtocolViolation, VersionNotUsable
from signd_client.eth import (
    SECP256K1_N,
    AsyncSigndEthSigner,
    SigndEthSigner,
    eth_address,
    load_async_eth_signer,
    load_eth_signer,
)
from signd_client.protocol import PublicKey, SignResult

NAME = "treasury"
TO = "0xF0109fC8DF283027b6285cc889F5aA624EaC1F55"

EIP1559_TX: dict[str, Any] = {
    "type": 2,
    "chainId": 1337,
    "nonce": 34,
    "gas": 100_000,
    "maxFeePerGas": 2_000_000_000,
    "maxPriorityFeePerGas": 2_000_000_000,
    "to": "0x09616C3d61b3331fc4109a9E41a8BDB7d9776609",
    "value": 100_000_000_000_000,
    "data": "0x616263646566",
    "accessList": [
        {
            "address": "0x0000000000000000000000000000000000000001",
            "storageKeys": ["0x0100000000000000000000000000000000000000000000000000000000000000"],
        }
    ],
}
EIP2930_TX: dict[str, Any] = {
    "type": 1,
    "chainId": 1337,
    "nonce": 3,
    "gas": 100_000,
    "gasPrice": 1_000_000_000,
    "to": TO,
    "value": 5,
    "data": b"",
    "accessList": [],
}
LEGACY_155_TX: dict[str, Any] = {
    "chainId": 1,
    "nonce": 0,
    "gas": 2_000_000,
    "gasPrice": 234_567_897_654_321,
    "to": TO,
    "value": 1_000_000_000,
    "data": b"",
}
LEGACY_PRE155_TX: dict[str, Any] = {k: v for k, v in LEGACY_155_TX.items() if k != "chainId"}

#: The example of EIP-712 itself, and the digest the EIP gives for it.
MAIL: dict[str, Any] = {
    "types": {
        "EIP712Domain": [
            {"name": "name", "type": "string"},
            {"name": "version", "type": "string"},
            {"name": "chainId", "type": "uint256"},
            {"name": "verifyingContract", "type": "address"},
        ],
        "Person": [{"name": "name", "type": "string"}, {"name": "wallet", "type": "address"}],
        "Mail": [
            {"name": "from", "type": "Person"},
            {"name": "to", "type": "Person"},
            {"name": "contents", "type": "string"},
        ],
    },
    "primaryType": "Mail",
    "domain": {
        "name": "Ether Mail",
        "version": "1",
        "chainId": 1,
        "verifyingContract": "0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC",
    },
    "message": {
        "from": {"name": "Cow", "wallet": "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"},
        "to": {"name": "Bob", "wallet": "0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB"},
        "contents": "Hello, Bob!",
    },
}
MAIL_DIGEST = "be609aee343fb3c4b28e1df9e632fca64fcfaede20f02e86244efddf30957bd2"
#: eth-account's documented digest of ``encode_defunct(text="I♥SF")``.
DEFUNCT_DIGEST = "1476abb745d423bf09273f1afd887d951181d25adc66c4834a70491911b7f750"


def _private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(32, "big")


@dataclass
class FakeSigner:
    """The daemon's side of ``public_key`` and ``sign`` for one ``ec-secp256k1``
    key with versions; ``tamper`` changes the 65-byte answer to test the checks."""

    key_type: str = "ec-secp256k1"
    versions: dict[int, ec.EllipticCurvePrivateKey] = field(default_factory=dict)
    active: set[int] = field(default_factory=set)
    calls: list[dict[str, Any]] = field(default_factory=list)
    tamper: Any = None
    answer_version: int | None = None

    def __post_init__(self) -> None:
        self.rotate()

    @property
    def current(self) -> int:
        return max(self.versions)

    def rotate(self) -> int:
        v = len(self.versions) + 1
        curve: ec.EllipticCurve = (
            ec.SECP256K1() if self.key_type == "ec-secp256k1" else ec.SECP256R1()
        )
        self.versions[v] = ec.generate_private_key(curve)
        self.active.add(v)
        return v

    def local_account(self, version: int | None = None) -> Any:
        """eth-account's own account for the same private key."""
        return Account.from_key(_private_bytes(self.versions[version or self.current]))

    def public_key(self, name: str, version: int | None = None) -> PublicKey:
        v = version or self.current
        pem = (
            self.versions[v]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        return PublicKey(name=name, version=v, type=self.key_type, public_key_pem=pem)

    def sign(self, name: str, message: bytes | None = None, **kw: Any) -> SignResult:
        self.calls.append({"name": name, "message": message, **kw})
        assert message is None
        assert kw["hash"] == "keccak256"
        assert kw["format"] == "eth"
        digest = kw["digest"]
        assert len(digest) == 32
        v = kw["version"]
        if v not in self.active:
            raise VersionNotUsable(f"version {v} of {name!r} is not active")
        key = self.versions[v]
        r, s = decode_dss_signature(key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
        if s > SECP256K1_N // 2:
            s = SECP256K1_N - s
        address = eth_address(key.public_key())
        recid = next(
            i
            for i in (0, 1)
            if Signature(vrs=(i, r, s))
            .recover_public_key_from_msg_hash(digest)
            .to_checksum_address()
            == address
        )
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([recid])
        if self.tamper is not None:
            sig = self.tamper(sig)
        return SignResult(
            signature=sig, key=name, version=self.answer_version or v, algorithm="ecdsa-keccak256"
        )


class AsyncFakeSigner:
    """``FakeSigner`` behind the coroutine methods of ``AsyncClient``."""

    def __init__(self, fake: FakeSigner) -> None:
        self.fake = fake

    async def public_key(self, name: str, version: int | None = None) -> PublicKey:
        return self.fake.public_key(name, version)

    async def sign(self, name: str, message: bytes | None = None, **kw: Any) -> SignResult:
        return self.fake.sign(name, message, **kw)


@pytest.fixture
def fake() -> FakeSigner:
    return FakeSigner()


@pytest.fixture
def signer(fake: FakeSigner) -> SigndEthSigner:
    return load_eth_signer(cast(Client, fake), NAME)


def _fields_without_signature(raw: bytes) -> Any:
    """The fields a raw transaction encodes, without v, r and s."""
    if raw[0] <= 0x7F:
        d = TypedTransaction.from_bytes(HexBytes(raw)).as_dict()
        return {k: val for k, val in d.items() if k not in ("v", "r", "s", "yParity")}
    return rlp.decode(raw)[:6]


def _until_both_parities(sign: Any) -> list[Any]:
    """Sign until results of both recovery ids came back (nonces are random:
    64 tries miss one with probability 2**-63)."""
    seen: dict[int, Any] = {}
    for _ in range(64):
        result = sign()
        seen.setdefault(result.v % 2, result)
        if len(seen) == 2:
            return list(seen.values())
    raise AssertionError("64 signatures with one recovery id")


# ------------------------------------------------------------------ address


def test_address_is_eth_accounts_for_the_same_key(fake: FakeSigner, signer: SigndEthSigner) -> None:
    assert signer.address == fake.local_account().address
    assert signer.version == 1
    assert signer.name == NAME
    assert not signer.pinned
    assert isinstance(signer, BaseAccount)
    assert repr(signer) == f"<SigndEthSigner 'treasury' version 1 {signer.address}>"


def test_eth_address_known_vector() -> None:
    """Private key 1: its address is G's, 0x7E5F...5Bdf (widely published)."""
    pub = ec.derive_private_key(1, ec.SECP256K1()).public_key()
    assert eth_address(pub) == "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"
    pem = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert eth_address(pem) == eth_address(pem.decode()) == eth_address(pub)
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(ValueError, match="secp256k1"):
        eth_address(p256)


def test_other_key_types_are_refused() -> None:
    fake = FakeSigner(key_type="ec-p256")
    with pytest.raises(UnsupportedKeyOperation, match="is of type ec-p256: an Ethereum signer"):
        load_eth_signer(cast(Client, fake), NAME)


# ------------------------------------------------------------- transactions


@pytest.mark.parametrize("tx", [EIP1559_TX, EIP2930_TX], ids=["eip1559", "eip2930"])
def test_typed_transaction(fake: FakeSigner, signer: SigndEthSigner, tx: dict[str, Any]) -> None:
    for signed in _until_both_parities(lambda: signer.sign_transaction(tx)):
        raw = bytes(signed.raw_transaction)
        assert Account.recover_transaction(raw) == signer.address
        assert raw[0] == tx["type"]
        assert signed.v in (0, 1)  # the y-parity
        assert signed.hash == keccak(raw)
        decoded = TypedTransaction.from_bytes(HexBytes(raw))
        assert decoded.vrs() == (signed.v, signed.r, signed.s)
        local = fake.local_account().sign_transaction(tx)
        assert _fields_without_signature(raw) == _fields_without_signature(
            bytes(local.raw_transaction)
        )
    call = fake.calls[-1]
    assert call["digest"] == TypedTransaction.from_dict(tx).hash()
    assert call["version"] == 1


def test_legacy_eip155_transaction(fake: FakeSigner, signer: SigndEthSigner) -> None:
    for signed in _until_both_parities(lambda: signer.sign_transaction(LEGACY_155_TX)):
        raw = bytes(signed.raw_transaction)
        assert Account.recover_transaction(raw) == signer.address
        assert signed.v in (1 * 2 + 35, 1 * 2 + 36)  # chainId * 2 + 35 + recid
        assert signed.hash == keccak(raw)
        fields = rlp.decode(raw)
        assert [int.from_bytes(f, "big") for f in fields[6:]] == [signed.v, signed.r, signed.s]
        local = fake.local_account().sign_transaction(LEGACY_155_TX)
        assert _fields_without_signature(raw) == _fields_without_signature(
            bytes(local.raw_transaction)
        )


def test_legacy_pre155_transaction(fake: FakeSigner, signer: SigndEthSigner) -> None:
    for signed in _until_both_parities(lambda: signer.sign_transaction(LEGACY_PRE155_TX)):
        raw = bytes(signed.raw_transaction)
        assert Account.recover_transaction(raw) == signer.address
        assert signed.v in (27, 28)
        local = fake.local_account().sign_transaction(LEGACY_PRE155_TX)
        assert _fields_without_signature(raw) == _fields_without_signature(
            bytes(local.raw_transaction)
        )


def test_from_field(signer: SigndEthSigner) -> None:
    tx = {**EIP1559_TX, "from": signer.address}
    assert (
        Account.recover_transaction(signer.sign_transaction(tx).raw_transaction) == signer.address
    )
    lower = {**EIP1559_TX, "from": signer.address.lower()}
    assert (
        Account.recover_transaction(signer.sign_transaction(lower).raw_transaction)
        == signer.address
    )
    other = {**EIP1559_TX, "from": TO}
    with pytest.raises(TypeError, match="from field must match"):
        signer.sign_transaction(other)


def test_bad_transaction_is_eth_accounts_error(fake: FakeSigner, signer: SigndEthSigner) -> None:
    with pytest.raises((TypeError, ValueError)):
        signer.sign_transaction({**LEGACY_155_TX, "bogus": 1})
    assert fake.calls == []  # refused before anything was signed


def test_authorization_and_set_code_transaction(fake: FakeSigner, signer: SigndEthSigner) -> None:
    """EIP-7702: an authorization, then a type-4 transaction carrying it."""
    auth = {"chainId": 1337, "address": TO, "nonce": 5}
    signed = signer.sign_authorization(auth)
    assert signed.authority == to_canonical_address(signer.address)
    local = fake.local_account().sign_authorization(auth)
    assert signed.authorization_hash == local.authorization_hash
    assert (signed.chain_id, signed.address, signed.nonce) == (1337, to_canonical_address(TO), 5)
    assert signed.y_parity in (0, 1)
    tx = {
        "type": 4,
        "chainId": 1337,
        "nonce": 4,
        "gas": 100_000,
        "maxFeePerGas": 2_000_000_000,
        "maxPriorityFeePerGas": 1_000_000_000,
        "to": TO,
        "value": 0,
        "data": b"",
        "accessList": [],
        "authorizationList": [signed],
    }
    raw = signer.sign_transaction(tx).raw_transaction
    assert Account.recover_transaction(raw) == signer.address
    assert raw[0] == 4


# ----------------------------------------------------------------- messages


def test_personal_message(fake: FakeSigner, signer: SigndEthSigner) -> None:
    msg = encode_defunct(text="I♥SF")
    for signed in _until_both_parities(lambda: signer.sign_message(msg)):
        assert signed.message_hash.hex() == DEFUNCT_DIGEST
        assert signed.v in (27, 28)
        assert len(signed.signature) == 65
        assert signed.signature == HexBytes(
            signed.r.to_bytes(32, "big") + signed.s.to_bytes(32, "big") + bytes([signed.v])
        )
        assert Account.recover_message(msg, signature=signed.signature) == signer.address
        assert Account.recover_message(msg, vrs=(signed.v, signed.r, signed.s)) == signer.address
    assert fake.calls[-1]["digest"].hex() == DEFUNCT_DIGEST
    local = fake.local_account().sign_message(msg)
    assert local.message_hash == signed.message_hash


def test_typed_data(fake: FakeSigner, signer: SigndEthSigner) -> None:
    msg = encode_typed_data(full_message=MAIL)
    signed = signer.sign_message(msg)
    assert signed.message_hash.hex() == MAIL_DIGEST
    assert Account.recover_message(msg, signature=signed.signature) == signer.address
    again = signer.sign_typed_data(full_message=MAIL)
    assert again.message_hash.hex() == MAIL_DIGEST
    assert Account.recover_message(msg, signature=again.signature) == signer.address
    parts = signer.sign_typed_data(
        MAIL["domain"],
        {k: v for k, v in MAIL["types"].items() if k != "EIP712Domain"},
        MAIL["message"],
    )
    assert parts.message_hash.hex() == MAIL_DIGEST
    assert fake.local_account().sign_message(msg).message_hash.hex() == MAIL_DIGEST


def test_unsafe_sign_hash(signer: SigndEthSigner) -> None:
    digest = keccak(b"anything")
    signed = signer.unsafe_sign_hash(digest)
    assert signed.message_hash == digest
    assert signed.v in (27, 28)
    pub = Signature(vrs=(signed.v - 27, signed.r, signed.s)).recover_public_key_from_msg_hash(
        digest
    )
    assert pub.to_checksum_address() == signer.address
    assert signer.unsafe_sign_hash("0x" + digest.hex()).message_hash == digest
    with pytest.raises(ValueError, match="exactly 32 bytes"):
        signer.unsafe_sign_hash(digest[:31])


# ----------------------------------------------------------------- versions


def test_rotation_changes_the_address(fake: FakeSigner, signer: SigndEthSigner) -> None:
    old = signer.address
    fake.rotate()
    assert signer.sign_message(encode_defunct(b"still v1")).v in (27, 28)  # v1 still active
    new = signer.latest()
    assert new.version == 2
    assert new.address == fake.local_account(2).address != old
    msg = encode_defunct(text="after rotation")
    assert Account.recover_message(msg, signature=new.sign_message(msg).signature) == new.address
    raw = new.sign_transaction(EIP1559_TX).raw_transaction
    assert Account.recover_transaction(raw) == new.address
    pinned = load_eth_signer(cast(Client, fake), NAME, 1)
    assert pinned.pinned
    assert pinned.address == old
    assert pinned == signer
    assert pinned != new
    fake.active.discard(1)
    with pytest.raises(VersionNotUsable, match=r"signs only with version 1.*\.latest\(\)"):
        signer.sign_transaction(EIP1559_TX)


# ----------------------------------------------- the daemon's answer checked


def _flip_v(sig: bytes) -> bytes:
    return sig[:64] + bytes([sig[64] ^ 1])


def _high_s(sig: bytes) -> bytes:
    s = int.from_bytes(sig[32:64], "big")
    return sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + _flip_v(sig)[64:]


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (lambda sig: sig[:64], "is 64 bytes, not 65"),
        (lambda sig: sig[:64] + bytes([27]), "v = 27, not a recovery id"),
        (_flip_v, "recovers to 0x"),
        (_high_s, "not low-S"),
        (lambda sig: bytes(32) + sig[32:], "out of range"),
    ],
    ids=["short", "v27", "wrong-recid", "high-s", "r-zero"],
)
def test_bad_answers_are_protocol_violations(
    fake: FakeSigner, signer: SigndEthSigner, tamper: Any, match: str
) -> None:
    fake.tamper = tamper
    with pytest.raises(ProtocolViolation, match=match):
        signer.sign_message(encode_defunct(text="x"))
    with pytest.raises(ProtocolViolation, match=match):
        signer.sign_transaction(EIP1559_TX)


def test_answer_for_another_version(fake: FakeSigner, signer: SigndEthSigner) -> None:
    fake.answer_version = 7
    with pytest.raises(ProtocolViolation, match="it signed with version 7"):
        signer.sign_message(encode_defunct(text="x"))


def test_recovery_check_can_be_turned_off(fake: FakeSigner) -> None:
    unchecked = load_eth_signer(cast(Client, fake), NAME, check_recovery=False)
    fake.tamper = _flip_v
    signed = unchecked.sign_message(encode_defunct(text="x"))  # not caught: the caller's choice
    assert Account.recover_message(encode_defunct(text="x"), signature=signed.signature) != (
        unchecked.address
    )


# -------------------------------------------------------------------- async


async def test_async_signer(fake: FakeSigner) -> None:
    client = cast(AsyncClient, AsyncFakeSigner(fake))
    signer = await load_async_eth_signer(client, NAME)
    assert isinstance(signer, AsyncSigndEthSigner)
    assert signer.address == fake.local_account().address
    for tx in (EIP1559_TX, LEGACY_155_TX, LEGACY_PRE155_TX):
        signed = await signer.sign_transaction(tx)
        assert Account.recover_transaction(signed.raw_transaction) == signer.address
    msg = encode_defunct(text="async")
    signed_msg = await signer.sign_message(msg)
    assert Account.recover_message(msg, signature=signed_msg.signature) == signer.address
    typed = await signer.sign_typed_data(full_message=MAIL)
    assert typed.message_hash.hex() == MAIL_DIGEST
    assert (await signer.unsafe_sign_hash(bytes(32))).message_hash == bytes(32)
    auth = await signer.sign_authorization({"chainId": 1, "address": TO, "nonce": 0})
    assert auth.authority == to_canonical_address(signer.address)
    fake.rotate()
    latest = await signer.latest()
    assert latest.version == 2
    assert latest.address != signer.address
    fake.active.discard(1)
    with pytest.raises(VersionNotUsable, match="signs only with version 1"):
        await signer.sign_message(msg)
    assert (
        len(set(itertools.chain([signer, latest, await load_async_eth_signer(client, NAME, 1)])))
        == 2
    )
