"""Ethereum signing with a signd ``ec-secp256k1`` key, through ``eth-account``.

``load_eth_signer(client, name)`` returns a ``SigndEthSigner``: an
``eth_account`` account (a ``BaseAccount``, as ``Account.from_key(...)``
returns a ``LocalAccount``) whose private key stays on the token.
``eth-account`` does all the encoding and hashing; signd signs the 32-byte
Keccak-256 digest (``hash="keccak256"``, ``format="eth"``: ``r || s || v``
with ``v`` the recovery id, 0 or 1, and ``s`` low) and this module turns the
answer into what ``eth-account`` itself returns::

    from eth_account import Account
    from signd_client import Client
    from signd_client.eth import load_eth_signer

    with Client() as signd:
        signer = load_eth_signer(signd, "treasury")
        signed = signer.sign_transaction({"type": 2, "chainId": 1, ...})
        assert Account.recover_transaction(signed.raw_transaction) == signer.address

- ``sign_transaction(tx, blobs=None)``: typed transactions (EIP-2930,
  EIP-1559, EIP-4844, EIP-7702; ``v`` is the y-parity 0/1) and legacy ones,
  with ``chainId`` (EIP-155: ``v = chainId * 2 + 35 + recid``) or without
  (``v = 27 + recid``); returns ``SignedTransaction`` (raw_transaction, hash,
  r, s, v) as ``Account.sign_transaction`` does.
- ``sign_message(encode_defunct(...) | encode_typed_data(...))`` (EIP-191,
  EIP-712), ``sign_typed_data(...)`` and ``unsafe_sign_hash(h)``: return
  ``SignedMessage`` with ``v = 27 + recid``, as ``Account.sign_message`` does.
- ``sign_authorization({"chainId", "address", "nonce"})``: an EIP-7702
  ``SignedSetCodeAuthorization``, as ``Account.sign_authorization`` makes it.

The signatures differ byte for byte from ``eth-account``'s with the same key
(the token's ECDSA nonces are random, not RFC 6979), but they are valid the
same way: ``Account.recover_transaction`` and ``Account.recover_message``
give ``signer.address``.  By default each signature is checked by recovering
its signer locally (``eth_keys``) before it is returned, so a wrong ``v``
can never leave this module.

The signer is bound to one version of the key, like the ``cryptography``
keys of ``signd_client.keys``: its ``address`` is that version's, and it
signs only with that version.  After a rotation the key has a new address;
``signer.latest()`` gives a signer for it, and the old signer raises
``VersionNotUsable`` once its version can no longer sign.

``AsyncSigndEthSigner`` (``await load_async_eth_signer(async_client, name)``)
has the same methods as coroutines.

Needs the ``eth`` extra: ``pip install 'signd-client[eth]'``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

# eth-account has no public function that turns a legacy transaction dict
# into its signing hash, nor one that assembles a signed transaction from
# (v, r, s): ``Account.sign_transaction`` uses these two from ``_utils``.  Using
# them gives exactly its encoding and validation (defaults, EIP-155, typed
# transactions, blobs); both exist with these signatures from 0.13 to 0.14,
# which is why the ``eth`` extra pins ``eth-account>=0.13.6,<0.15`` (0.13.6
# brought EIP-7702's ``Authorization``).
from eth_account._utils.legacy_transactions import (
    Transaction,
    UnsignedTransaction,
    encode_transaction,
    serializable_unsigned_transaction_from_dict,
)
from eth_account.datastructures import (
    SignedMessage,
    SignedSetCodeAuthorization,
    SignedTransaction,
)
from eth_account.messages import SignableMessage, encode_typed_data
from eth_account.signers.base import BaseAccount
from eth_account.typed_transactions.set_code_transaction import Authorization
from eth_account.typed_transactions.typed_transaction import TypedTransaction
from eth_keys.datatypes import Signature
from eth_keys.exceptions import BadSignature
from eth_typing import ChecksumAddress, Hash32
from eth_utils.address import to_canonical_address, to_checksum_address
from eth_utils.crypto import keccak
from hexbytes import HexBytes

from .errors import ProtocolViolation, VersionNotUsable
from .keys import UnsupportedKeyOperation, _load_public

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._async import AsyncClient
    from ._sync import Client
    from .protocol import PublicKey, SignResult

__all__ = [
    "KEY_TYPE",
    "AsyncSigndEthSigner",
    "SigndEthSigner",
    "eth_address",
    "load_async_eth_signer",
    "load_eth_signer",
]

#: The signd key type an Ethereum signer needs.
KEY_TYPE: Final = "ec-secp256k1"
#: The order of secp256k1; a low-S signature has ``s <= N // 2`` (EIP-2).
SECP256K1_N: Final = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
#: ``v`` of messages and pre-EIP-155 legacy transactions is ``27 + recid``.
V_OFFSET: Final = 27
#: ``v`` of EIP-155 legacy transactions is ``chainId * 2 + 35 + recid``.
CHAIN_ID_OFFSET: Final = 35

ClientT = TypeVar("ClientT")


def eth_address(public_key: ec.EllipticCurvePublicKey | str | bytes) -> ChecksumAddress:
    """The EIP-55 Ethereum address of a secp256k1 public key (an object or a PEM):
    the last 20 bytes of the Keccak-256 of its uncompressed point ``x || y``.

    Raises: ValueError (not a secp256k1 public key).
    """
    key: object = public_key
    if isinstance(public_key, str | bytes):
        pem = public_key.encode() if isinstance(public_key, str) else public_key
        key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256K1):
        raise ValueError("an Ethereum address needs a secp256k1 public key")
    point = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return to_checksum_address(keccak(point[1:])[-20:])


def _eip191_hash(signable_message: SignableMessage) -> Hash32:
    """The digest EIP-191 signs: ``keccak256(0x19 || version || header || body)``,
    what ``Account.sign_message`` hashes (its own helper for it is private)."""
    if len(signable_message.version) != 1:
        raise ValueError(
            f"an EIP-191 message has a one-byte version, not {signable_message.version!r}"
        )
    joined = b"\x19" + signable_message.version + signable_message.header + signable_message.body
    return Hash32(keccak(joined))


_Unsigned = TypedTransaction | Transaction | UnsignedTransaction


class _EthBinding(Generic[ClientT]):
    """One version of an ``ec-secp256k1`` key, bound to a client, and the
    parts of signing that do no I/O (shared by the blocking and async signers)."""

    def __init__(
        self, client: ClientT, answer: PublicKey, *, pinned: bool, check_recovery: bool
    ) -> None:
        public = _load_public(answer)
        if answer.type != KEY_TYPE or not (
            isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256K1)
        ):
            raise UnsupportedKeyOperation(
                f"signd key {answer.name!r} is of type {answer.type}: "
                f"an Ethereum signer needs an {KEY_TYPE} key"
            )
        self._client = client
        self._name = answer.name
        self._version = answer.version
        self._public = public
        self._address = eth_address(public)
        self._pinned = pinned
        self._check_recovery = check_recovery

    @property
    def client(self) -> ClientT:
        """The client that signs with this key."""
        return self._client

    @property
    def name(self) -> str:
        """The key's name in signd."""
        return self._name

    @property
    def version(self) -> int:
        """The one version this signer signs with, and whose address it has."""
        return self._version

    @property
    def address(self) -> ChecksumAddress:
        """This version's Ethereum address (EIP-55 checksummed)."""
        return self._address

    @property
    def pinned(self) -> bool:
        """True when the caller named the version; False when it was the
        key's current version at the time the signer was made."""
        return self._pinned

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """This version's public key (a ``cryptography`` secp256k1 key)."""
        return self._public

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self._name!r} version {self._version} "
            f"{self._address}{' pinned' if self._pinned else ''}>"
        )

    # -- what signing needs before and after the daemon's answer -------------

    def _sign_args(self, digest: bytes) -> dict[str, Any]:
        """The keyword arguments of the ``sign`` call for ``digest``."""
        return {"digest": digest, "hash": "keccak256", "format": "eth", "version": self._version}

    def _version_not_usable(self, exc: VersionNotUsable) -> VersionNotUsable:
        return VersionNotUsable(
            f"{exc.message} (this signer signs only with version {self._version}, "
            f"address {self._address}; call .latest() for a signer of the key's current version)"
        )

    def _vrs(self, result: SignResult, digest: bytes) -> tuple[int, int, int]:
        """(recid, r, s) of the daemon's ``eth`` signature of ``digest``, checked:
        65 bytes, the version asked for, recid 0 or 1, low S and, unless turned
        off, the signer it recovers to.

        Raises: ProtocolViolation.
        """
        sig = result.signature
        what = f"signd's signature by {self._name!r} version {self._version}"
        if result.version != self._version:
            raise ProtocolViolation(
                f"asked signd to sign with {self._name!r} version {self._version}, "
                f"it signed with version {result.version}"
            )
        if len(sig) != 65:
            raise ProtocolViolation(f"{what} is {len(sig)} bytes, not 65 (r || s || v)")
        r = int.from_bytes(sig[:32], "big")
        s = int.from_bytes(sig[32:64], "big")
        recid = sig[64]
        if recid not in (0, 1):
            raise ProtocolViolation(f"{what} has v = {recid}, not a recovery id 0 or 1")
        if not (0 < r < SECP256K1_N and 0 < s <= SECP256K1_N // 2):
            raise ProtocolViolation(f"{what} is out of range or not low-S")
        if self._check_recovery:
            try:
                signer = (
                    Signature(vrs=(recid, r, s))
                    .recover_public_key_from_msg_hash(digest)
                    .to_checksum_address()
                )
            except BadSignature as exc:
                raise ProtocolViolation(f"{what} recovers no public key: {exc}") from None
            if signer != self._address:
                raise ProtocolViolation(
                    f"{what} recovers to {signer}, not to the version's address {self._address}"
                )
        return recid, r, s

    def _unsigned(
        self, transaction_dict: Mapping[str, Any], blobs: Sequence[bytes] | None
    ) -> _Unsigned:
        """The transaction eth-account would sign, as ``Account.sign_transaction``
        builds it (its ``from``, if given, must be this address).

        Raises: TypeError (another ``from``), what eth-account raises for a bad
        transaction (TypeError, ValueError).
        """
        tx = dict(transaction_dict)
        if "from" in tx:
            sender = tx.pop("from")
            text = sender.decode() if isinstance(sender, bytes) else str(sender)
            try:
                same = to_checksum_address(text) == self._address
            except (TypeError, ValueError):
                same = False
            if not same:
                raise TypeError(f"from field must match key's {self._address}, but it was {text}")
        return serializable_unsigned_transaction_from_dict(
            tx,
            blobs=None if blobs is None else list(blobs),
        )

    @staticmethod
    def _signed_transaction(unsigned: _Unsigned, vrs: tuple[int, int, int]) -> SignedTransaction:
        """The signed transaction, with ``v`` as its kind wants it."""
        recid, r, s = vrs
        if isinstance(unsigned, TypedTransaction):
            v = recid  # the y-parity; the type's own encoding
        elif isinstance(unsigned, Transaction):
            # EIP-155: serializable_unsigned_transaction_from_dict put the chain
            # id in v (r = s = 0), so the signing hash covers it.
            v = recid + CHAIN_ID_OFFSET + 2 * unsigned.v
        else:
            v = recid + V_OFFSET
        raw = encode_transaction(unsigned, vrs=(v, r, s))
        return SignedTransaction(
            raw_transaction=HexBytes(raw), hash=HexBytes(keccak(raw)), r=r, s=s, v=v
        )

    @staticmethod
    def _signed_message(digest: bytes, vrs: tuple[int, int, int]) -> SignedMessage:
        recid, r, s = vrs
        v = recid + V_OFFSET
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([v])
        return SignedMessage(
            message_hash=HexBytes(digest), r=r, s=s, v=v, signature=HexBytes(signature)
        )

    @staticmethod
    def _authorization(authorization: Mapping[str, Any]) -> Authorization:
        """The EIP-7702 authorization to sign, as ``Account.sign_authorization`` builds it."""
        if not isinstance(authorization, Mapping):
            raise TypeError(f"authorization must be dict-like, got {authorization!r}")
        return Authorization(
            authorization["chainId"],
            to_canonical_address(authorization["address"]),
            authorization["nonce"],
        )

    @staticmethod
    def _signed_authorization(
        unsigned: Authorization, vrs: tuple[int, int, int]
    ) -> SignedSetCodeAuthorization:
        recid, r, s = vrs
        return SignedSetCodeAuthorization(
            chain_id=unsigned.chainId,
            address=unsigned.address,
            nonce=unsigned.nonce,
            y_parity=recid,
            r=r,
            s=s,
            signature=Signature(vrs=(recid, r, s)),
            authorization_hash=unsigned.hash(),
        )


def _digest(message_hash: bytes | str) -> bytes:
    digest = bytes(HexBytes(message_hash))
    if len(digest) != 32:
        raise ValueError(f"the message hash must be exactly 32 bytes, not {len(digest)}")
    return digest


class SigndEthSigner(_EthBinding["Client"], BaseAccount):
    """An ``eth-account`` account whose key is one version of a signd
    ``ec-secp256k1`` key.  Make one with ``load_eth_signer``.

    Raises (signing methods): VersionNotUsable (the version can no longer
    sign), the client's other errors; ProtocolViolation (the daemon's
    signature is not a valid ``eth`` signature of this address).
    """

    def __init__(
        self,
        client: Client,
        answer: PublicKey,
        *,
        pinned: bool = False,
        check_recovery: bool = True,
    ) -> None:
        super().__init__(client, answer, pinned=pinned, check_recovery=check_recovery)

    def latest(self) -> SigndEthSigner:
        """A signer for the key's current version (a rotation changes the address)."""
        return load_eth_signer(self._client, self._name, check_recovery=self._check_recovery)

    def _sign_digest(self, digest: bytes) -> tuple[int, int, int]:
        try:
            result = self._client.sign(self._name, **self._sign_args(digest))
        except VersionNotUsable as exc:
            raise self._version_not_usable(exc) from exc
        return self._vrs(result, digest)

    def unsafe_sign_hash(self, message_hash: Hash32 | bytes | str) -> SignedMessage:
        """Sign a 32-byte hash as ``Account.unsafe_sign_hash`` does (``v`` = 27/28).
        Never sign a hash you did not make: it may be a transaction."""
        digest = _digest(message_hash)
        return self._signed_message(digest, self._sign_digest(digest))

    def sign_message(self, signable_message: SignableMessage) -> SignedMessage:
        """Sign an EIP-191 message (``encode_defunct``, ``encode_typed_data``, ...)
        as ``Account.sign_message`` does."""
        digest = _eip191_hash(signable_message)
        return self._signed_message(digest, self._sign_digest(digest))

    def sign_typed_data(
        self,
        domain_data: dict[str, Any] | None = None,
        message_types: dict[str, Any] | None = None,
        message_data: dict[str, Any] | None = None,
        full_message: dict[str, Any] | None = None,
    ) -> SignedMessage:
        """Sign EIP-712 typed data, with the arguments of ``encode_typed_data``
        (as ``LocalAccount.sign_typed_data``)."""
        return self.sign_message(
            encode_typed_data(domain_data, message_types, message_data, full_message)
        )

    def sign_transaction(
        self,
        transaction_dict: Mapping[str, Any],
        blobs: Sequence[bytes] | None = None,
    ) -> SignedTransaction:
        """Sign a transaction dict as ``Account.sign_transaction`` does; ``from``,
        if present, must be this address.

        Raises: TypeError, ValueError (a transaction eth-account refuses).
        """
        unsigned = self._unsigned(transaction_dict, blobs)
        return self._signed_transaction(unsigned, self._sign_digest(unsigned.hash()))

    def sign_authorization(self, authorization: Mapping[str, Any]) -> SignedSetCodeAuthorization:
        """Sign an EIP-7702 authorization (``chainId``, ``address``, ``nonce``) as
        ``Account.sign_authorization`` does; put it in a type-4 transaction's
        ``authorizationList``."""
        unsigned = self._authorization(authorization)
        digest = bytes(unsigned.hash())
        return self._signed_authorization(unsigned, self._sign_digest(digest))


class AsyncSigndEthSigner(_EthBinding["AsyncClient"]):
    """``SigndEthSigner`` for ``AsyncClient``: the same methods, as coroutines
    (so not an ``eth_account`` ``BaseAccount``, whose methods are blocking).
    Make one with ``await load_async_eth_signer(client, name)``.
    """

    async def latest(self) -> AsyncSigndEthSigner:
        """A signer for the key's current version."""
        return await load_async_eth_signer(
            self._client, self._name, check_recovery=self._check_recovery
        )

    async def _sign_digest(self, digest: bytes) -> tuple[int, int, int]:
        try:
            result = await self._client.sign(self._name, **self._sign_args(digest))
        except VersionNotUsable as exc:
            raise self._version_not_usable(exc) from exc
        return self._vrs(result, digest)

    async def unsafe_sign_hash(self, message_hash: Hash32 | bytes | str) -> SignedMessage:
        """See ``SigndEthSigner.unsafe_sign_hash``."""
        digest = _digest(message_hash)
        return self._signed_message(digest, await self._sign_digest(digest))

    async def sign_message(self, signable_message: SignableMessage) -> SignedMessage:
        """See ``SigndEthSigner.sign_message``."""
        digest = _eip191_hash(signable_message)
        return self._signed_message(digest, await self._sign_digest(digest))

    async def sign_typed_data(
        self,
        domain_data: dict[str, Any] | None = None,
        message_types: dict[str, Any] | None = None,
        message_data: dict[str, Any] | None = None,
        full_message: dict[str, Any] | None = None,
    ) -> SignedMessage:
        """See ``SigndEthSigner.sign_typed_data``."""
        return await self.sign_message(
            encode_typed_data(domain_data, message_types, message_data, full_message)
        )

    async def sign_transaction(
        self, transaction_dict: Mapping[str, Any], blobs: Sequence[bytes] | None = None
    ) -> SignedTransaction:
        """See ``SigndEthSigner.sign_transaction``."""
        unsigned = self._unsigned(transaction_dict, blobs)
        return self._signed_transaction(unsigned, await self._sign_digest(unsigned.hash()))

    async def sign_authorization(
        self, authorization: Mapping[str, Any]
    ) -> SignedSetCodeAuthorization:
        """See ``SigndEthSigner.sign_authorization``."""
        unsigned = self._authorization(authorization)
        digest = bytes(unsigned.hash())
        return self._signed_authorization(unsigned, await self._sign_digest(digest))

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.address == getattr(other, "address", None)

    def __hash__(self) -> int:
        return hash((type(self), self._address))


def load_eth_signer(
    client: Client, name: str, version: int | None = None, *, check_recovery: bool = True
) -> SigndEthSigner:
    """An ``eth-account`` signer for ``name``, bound to ``version`` (by default
    the key's current version at this call).  One ``public_key`` request.

    ``check_recovery=False`` skips the local recovery of each signature's
    signer (a few milliseconds of pure-Python EC math each without
    ``coincurve``); the length, ``v`` and low-S checks stay.

    Raises: KeyNotFound, VersionNotFound; UnsupportedKeyOperation (not an
    ``ec-secp256k1`` key); the client's other errors.
    """
    answer = client.public_key(name, version)
    return SigndEthSigner(client, answer, pinned=version is not None, check_recovery=check_recovery)


async def load_async_eth_signer(
    client: AsyncClient, name: str, version: int | None = None, *, check_recovery: bool = True
) -> AsyncSigndEthSigner:
    """``load_eth_signer`` for ``AsyncClient``."""
    answer = await client.public_key(name, version)
    return AsyncSigndEthSigner(
        client, answer, pinned=version is not None, check_recovery=check_recovery
    )
