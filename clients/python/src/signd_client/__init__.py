"""Client library for signd, the PKCS#11 signing daemon.

``Client`` is blocking and thread-safe; ``AsyncClient`` works in trio and in
asyncio.  Every operation returns a frozen dataclass from
``signd_client.protocol``; every wire error code is a class in
``signd_client.errors``.
"""

from ._async import AsyncClient
from ._sync import Client
from .errors import SigndError, WireError
from .keys import (
    AsyncSigndPrivateKey,
    SigndEd25519PrivateKey,
    SigndEllipticCurvePrivateKey,
    SigndPrivateKey,
    SigndRSAPrivateKey,
    UnsupportedKeyOperation,
    load_private_key,
)
from .protocol import (
    BatchItem,
    Health,
    KeyInfo,
    KeyList,
    KeySummary,
    PublicKey,
    SignBatchResult,
    SignResult,
    VerifyResult,
    VersionInfo,
)

__version__ = "0.1.0"
__all__ = [
    "AsyncClient",
    "AsyncSigndPrivateKey",
    "BatchItem",
    "SignBatchResult",
    "Client",
    "Health",
    "KeyInfo",
    "KeyList",
    "KeySummary",
    "PublicKey",
    "SignResult",
    "SigndEd25519PrivateKey",
    "SigndEllipticCurvePrivateKey",
    "SigndPrivateKey",
    "SigndRSAPrivateKey",
    "SigndError",
    "UnsupportedKeyOperation",
    "VerifyResult",
    "VersionInfo",
    "WireError",
    "__version__",
    "load_private_key",
]
