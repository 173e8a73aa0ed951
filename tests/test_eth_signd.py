"""Ethereum through a real daemon on SoftHSM: ``signd_client.eth`` signs with
an ``ec-secp256k1`` key and ``eth-account`` (not signd's code) recovers the
signer from the raw transaction or the message: an EIP-1559 transaction, a
legacy EIP-155 and pre-155 one, an EIP-191 personal message and EIP-712
typed data, before and after a rotation (the address changes with the
version).  ``cryptography`` checks the same (r, s) against the version's PEM.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import rlp  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from eth_account import Account
from eth_account.messages import encode_defunct, encode_typed_data
from eth_account.typed_transactions.typed_transaction import TypedTransaction
from eth_utils.crypto import keccak
from hexbytes import HexBytes

from signd_client import AsyncClient, Client, UnsupportedKeyOperation
from signd_client.errors import VersionNotUsable
from signd_client.eth import (
    SECP256K1_N,
    SigndEthSigner,
    eth_address,
    load_async_eth_signer,
    load_eth_signer,
)

if TYPE_CHECKING:
    from conftest import Daemon

CHAIN_ID = 11155111  # Sepolia
EIP1559_TX: dict[str, Any] = {
    "type": 2,
    "chainId": CHAIN_ID,
    "nonce": 7,
    "gas": 21_000,
    "maxFeePerGas": 30_000_000_000,
    "maxPriorityFeePerGas": 1_000_000_000,
    "to": "0x09616C3d61b3331fc4109a9E41a8BDB7d9776609",
    "value": 10**16,
    "data": b"",
    "accessList": [],
}
LEGACY_TX: dict[str, Any] = {
    "chainId": CHAIN_ID,
    "nonce": 8,
    "gas": 21_000,
    "gasPrice": 20_000_000_000,
    "to": "0xF0109fC8DF283027b6285cc889F5aA624EaC1F55",
    "value": 1,
    "data": b"",
}
MAIL: dict[str, Any] = {
    "types": {
        "EIP712Domain": [
            {"name": "name", "type": "string"},
            {"name": "chainId", "type": "uint256"},
        ],
        "Order": [{"name": "id", "type": "uint256"}, {"name": "owner", "type": "address"}],
    },
    "primaryType": "Order",
    "domain": {"name": "signd test", "chainId": CHAIN_ID},
    "message": {"id": 42, "owner": "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"},
}


@pytest.fixture(scope="module")
def client(signd: Daemon) -> Iterator[Client]:
    with signd.client() as c:
        yield c


def _check_rs(pem: str, digest: bytes, r: int, s: int) -> None:
    """``cryptography`` verifies (r, s) over the digest with the version's PEM; S is low."""
    pub = serialization.load_pem_public_key(pem.encode())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert isinstance(pub.curve, ec.SECP256K1)
    # Prehashed only fixes the digest's length (32 bytes), not its hash.
    pub.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    assert 0 < s <= SECP256K1_N // 2


def _check_everything(signer: SigndEthSigner, pem: str) -> None:
    """All four kinds, recovered by eth-account to ``signer.address``."""
    # EIP-1559
    signed = signer.sign_transaction(EIP1559_TX)
    raw = bytes(signed.raw_transaction)
    assert Account.recover_transaction(raw) == signer.address
    decoded = TypedTransaction.from_bytes(HexBytes(raw)).as_dict()
    assert decoded["nonce"] == 7
    assert decoded["chainId"] == CHAIN_ID
    assert decoded["value"] == 10**16
    assert signed.v in (0, 1)
    assert signed.hash == keccak(raw)
    _check_rs(pem, TypedTransaction.from_dict(EIP1559_TX).hash(), signed.r, signed.s)

    # legacy, EIP-155 and pre-155
    signed = signer.sign_transaction(LEGACY_TX)
    assert Account.recover_transaction(signed.raw_transaction) == signer.address
    assert signed.v in (CHAIN_ID * 2 + 35, CHAIN_ID * 2 + 36)
    fields = rlp.decode(bytes(signed.raw_transaction))
    assert int.from_bytes(fields[0], "big") == 8
    pre155 = {k: v for k, v in LEGACY_TX.items() if k != "chainId"}
    signed = signer.sign_transaction(pre155)
    assert Account.recover_transaction(signed.raw_transaction) == signer.address
    assert signed.v in (27, 28)

    # EIP-191 personal message
    msg = encode_defunct(text="signd signs for Ethereum")
    sm = signer.sign_message(msg)
    assert sm.v in (27, 28)
    assert Account.recover_message(msg, signature=sm.signature) == signer.address
    _check_rs(pem, bytes(sm.message_hash), sm.r, sm.s)

    # EIP-712 typed data
    typed = encode_typed_data(full_message=MAIL)
    sm = signer.sign_message(typed)
    assert Account.recover_message(typed, signature=sm.signature) == signer.address
    assert signer.sign_typed_data(full_message=MAIL).message_hash == sm.message_hash


def test_eth_signer_before_and_after_rotation(client: Client, key_name: str) -> None:
    info = client.create_key(key_name, "ec-secp256k1")
    v1 = info.versions[0]
    signer = load_eth_signer(client, key_name)
    assert signer.version == 1
    assert signer.address == v1.eth_address == eth_address(v1.public_key_pem)
    _check_everything(signer, v1.public_key_pem)

    info = client.rotate(key_name)
    v2 = next(v for v in info.versions if v.version == 2)
    new = signer.latest()
    assert new.version == 2
    assert new.address == v2.eth_address == eth_address(v2.public_key_pem)
    assert new.address != signer.address
    _check_everything(new, v2.public_key_pem)
    # Version 1 is verify-only now: the signer pinned to it says so.
    with pytest.raises(VersionNotUsable, match="signs only with version 1"):
        signer.sign_transaction(EIP1559_TX)


def test_daemon_verifies_the_eth_signature(client: Client, key_name: str) -> None:
    """The 65-byte answer the signer used is one the daemon's verify accepts."""
    client.create_key(key_name, "ec-secp256k1")
    signer = load_eth_signer(client, key_name)
    sm = signer.sign_message(encode_defunct(text="check me"))
    wire = sm.signature[:64] + bytes([sm.v - 27])
    res = client.verify(
        key_name, wire, digest=bytes(sm.message_hash), hash="keccak256", format="eth"
    )
    assert res.valid


def test_other_key_types_are_refused(client: Client, key_name: str) -> None:
    client.create_key(key_name, "ec-p256")
    with pytest.raises(UnsupportedKeyOperation, match="needs an ec-secp256k1 key"):
        load_eth_signer(client, key_name)


async def test_async_eth_signer(signd: Daemon, key_name: str) -> None:
    async with AsyncClient(signd.socket) as ac:
        await ac.create_key(key_name, "ec-secp256k1")
        signer = await load_async_eth_signer(ac, key_name)
        signed = await signer.sign_transaction(EIP1559_TX)
        assert Account.recover_transaction(signed.raw_transaction) == signer.address
        msg = encode_defunct(text="async")
        sm = await signer.sign_message(msg)
        assert Account.recover_message(msg, signature=sm.signature) == signer.address
