"""The blocking ``Client`` against a real daemon on a real SoftHSM token.

Signatures are checked with ``cryptography``, never with signd's own code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pwd
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pytest
from _support import SilentListener, load_public_key
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from signd_client import (
    Client,
    Health,
    KeyInfo,
    KeyList,
    KeySummary,
    PublicKey,
    SignResult,
    VerifyResult,
    VersionInfo,
    WireError,
)
from signd_client.errors import (
    ConnectionFailed,
    ErrorCode,
    InvalidArgument,
    InvalidDigest,
    KeyExists,
    KeyNotFound,
    RequestTimeout,
    UnsupportedAlgorithm,
    VersionNotFound,
)
from signd_client.protocol import KeyGrant, TokenStatus, Whoami

if TYPE_CHECKING:
    from conftest import Daemon  # the root conftest.py

DEFAULT_SOCKET = "/run/signd/signd.sock"


@pytest.fixture
def client(signd: Daemon) -> Iterator[Client]:
    with signd.client() as c:
        yield c


@pytest.fixture
def ec_key(client: Client, key_name: str) -> str:
    client.create_key(key_name, "ec-p256")
    return key_name


# --------------------------------------------------------------------------
# Typed methods


def test_every_method_returns_its_dataclass(client: Client, key_name: str) -> None:
    created = client.create_key(key_name, "ec-p256")
    assert isinstance(created, KeyInfo)
    assert (created.name, created.type, created.current_version) == (key_name, "ec-p256", 1)
    assert len(created.versions) == 1
    v1 = created.versions[0]
    assert isinstance(v1, VersionInfo)
    assert (v1.version, v1.state) == (1, "active")
    assert isinstance(load_public_key(v1.public_key_pem), ec.EllipticCurvePublicKey)
    with pytest.raises(dataclasses.FrozenInstanceError):
        created.name = "other"  # type: ignore[misc]

    listed = client.list_keys()
    assert isinstance(listed, KeyList)
    assert all(isinstance(k, KeySummary) for k in listed.keys)
    (mine,) = [k for k in listed.keys if k.name == key_name]
    assert (mine.type, mine.current_version) == ("ec-p256", 1)

    info = client.key_info(key_name)
    assert isinstance(info, KeyInfo)
    assert created.created_version == 1  # only create_key and rotate say what they made
    assert info == dataclasses.replace(created, created_version=None)

    pk = client.public_key(key_name)
    assert isinstance(pk, PublicKey)
    assert (pk.name, pk.version, pk.type) == (key_name, 1, "ec-p256")
    assert pk.public_key_pem == v1.public_key_pem
    public = load_public_key(pk.public_key_pem)
    assert isinstance(public.curve, ec.SECP256R1)

    signed = client.sign(key_name, b"typed message")
    assert isinstance(signed, SignResult)
    assert (signed.key, signed.version, signed.algorithm) == (key_name, 1, "ecdsa-p256-sha256")
    public.verify(signed.signature, b"typed message", ec.ECDSA(hashes.SHA256()))

    good = client.verify(key_name, signed.signature, b"typed message")
    assert isinstance(good, VerifyResult)
    assert (good.valid, good.key, good.version) == (True, key_name, 1)
    bad = client.verify(key_name, signed.signature, b"another message")
    assert isinstance(bad, VerifyResult)
    assert bad.valid is False

    rotated = client.rotate(key_name)
    assert isinstance(rotated, KeyInfo)
    assert rotated.current_version == 2
    assert [v.version for v in rotated.versions] == [1, 2]
    assert rotated.versions[1].state == "active"
    assert rotated.versions[0].public_key_pem == v1.public_key_pem

    health = client.health()
    assert isinstance(health, Health)
    assert health.live
    assert health.ready
    assert health.protocol_version == 1
    assert isinstance(health.token, TokenStatus)
    assert health.token.logged_in


def test_whoami_names_this_process_and_its_verbs(client: Client, ec_key: str) -> None:
    client.sign(ec_key, b"m")  # it may sign with the key: so "sign" is among its verbs
    who = client.whoami()
    assert isinstance(who, Whoami)
    assert (who.uid, who.gid) == (os.getuid(), os.getgid())
    assert who.gid in who.groups
    assert list(who.groups) == sorted(who.groups)
    assert who.user == pwd.getpwuid(os.getuid()).pw_name
    names = [k.name for k in who.keys]
    assert names == sorted(names)
    (mine,) = [k for k in who.keys if k.name == ec_key]
    assert isinstance(mine, KeyGrant)
    assert {"create", "sign"} <= set(mine.verbs)
    assert list(mine.verbs) == sorted(mine.verbs)


def test_rotation_keeps_old_signatures_verifying(client: Client, ec_key: str) -> None:
    old = client.sign(ec_key, b"signed by v1")
    client.rotate(ec_key)
    new = client.sign(ec_key, b"signed by v2")
    assert (old.version, new.version) == (1, 2)

    v1 = load_public_key(client.public_key(ec_key, 1).public_key_pem)
    v2 = load_public_key(client.public_key(ec_key, 2).public_key_pem)
    v1.verify(old.signature, b"signed by v1", ec.ECDSA(hashes.SHA256()))
    v2.verify(new.signature, b"signed by v2", ec.ECDSA(hashes.SHA256()))

    assert client.verify(ec_key, old.signature, b"signed by v1").version == 1
    assert client.verify(ec_key, new.signature, b"signed by v2").version == 2
    assert not client.verify(ec_key, old.signature, b"signed by v1", version=2).valid


def _verify_ec_der(pub: Any, sig: bytes, msg: bytes) -> None:
    pub.verify(sig, msg, ec.ECDSA(hashes.SHA256()))


def _verify_ec_raw(pub: Any, sig: bytes, msg: bytes) -> None:
    assert len(sig) == 64
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    pub.verify(der, msg, ec.ECDSA(hashes.SHA256()))


def _verify_p384(pub: Any, sig: bytes, msg: bytes) -> None:
    pub.verify(sig, msg, ec.ECDSA(hashes.SHA384()))


def _verify_ed25519(pub: Any, sig: bytes, msg: bytes) -> None:
    assert isinstance(pub, ed25519.Ed25519PublicKey)
    pub.verify(sig, msg)


def _verify_rsa_pkcs1(pub: Any, sig: bytes, msg: bytes) -> None:
    assert isinstance(pub, rsa.RSAPublicKey)
    pub.verify(sig, msg, padding.PKCS1v15(), hashes.SHA256())


def _verify_rsa_pss(pub: Any, sig: bytes, msg: bytes) -> None:
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
    pub.verify(sig, msg, pss, hashes.SHA256())


MESSAGE = b"the client passes every option through"
SHA256 = hashlib.sha256(MESSAGE).digest()


@pytest.mark.parametrize(
    ("key_type", "kwargs", "check"),
    [
        pytest.param("ec-p256", {"message": MESSAGE}, _verify_ec_der, id="ec-p256"),
        pytest.param(
            "ec-p256", {"digest": SHA256, "hash": "sha256"}, _verify_ec_der, id="ec-p256-digest"
        ),
        pytest.param(
            "ec-p256", {"message": MESSAGE, "format": "raw"}, _verify_ec_raw, id="ec-p256-raw"
        ),
        pytest.param("ec-p384", {"message": MESSAGE}, _verify_p384, id="ec-p384"),
        pytest.param("ed25519", {"message": MESSAGE}, _verify_ed25519, id="ed25519"),
        pytest.param("rsa-2048", {"message": MESSAGE}, _verify_rsa_pkcs1, id="rsa-pkcs1v15"),
        pytest.param(
            "rsa-2048", {"message": MESSAGE, "padding": "pss"}, _verify_rsa_pss, id="rsa-pss"
        ),
    ],
)
def test_sign_options_verify_with_cryptography(
    client: Client,
    key_name: str,
    key_type: str,
    kwargs: dict[str, Any],
    check: Callable[[Any, bytes, bytes], None],
) -> None:
    client.create_key(key_name, key_type)
    res = client.sign(key_name, **kwargs)
    pub = load_public_key(client.public_key(key_name).public_key_pem)
    check(pub, res.signature, MESSAGE)
    assert client.verify(key_name, res.signature, **kwargs).valid
    with pytest.raises(InvalidSignature):
        check(pub, res.signature, MESSAGE + b"!")


# --------------------------------------------------------------------------
# Errors


ERROR_CASES: list[Any] = [
    pytest.param(
        lambda c, k: c.key_info(k + "-absent"), KeyNotFound, 300, "key_not_found", id="key"
    ),
    pytest.param(
        lambda c, k: c.sign(k, digest=b"\x00" * 20, hash="sha256"),
        InvalidDigest,
        201,
        "invalid_digest",
        id="digest",
    ),
    pytest.param(
        lambda c, k: c.create_key(k, "ec-p256"), KeyExists, 302, "key_exists", id="exists"
    ),
    pytest.param(
        lambda c, k: c.public_key(k, 99), VersionNotFound, 301, "version_not_found", id="version"
    ),
    pytest.param(
        lambda c, k: c.create_key("not a valid name!", "ec-p256"),
        InvalidArgument,
        200,
        "invalid_argument",
        id="argument",
    ),
    pytest.param(
        lambda c, k: c.create_key(k + "-dsa", "dsa-1024"),
        UnsupportedAlgorithm,
        202,
        "unsupported_algorithm",
        id="algorithm",
    ),
]


@pytest.mark.parametrize(("call", "exc_type", "code", "name"), ERROR_CASES)
def test_wire_errors_become_typed_exceptions(
    client: Client,
    ec_key: str,
    call: Callable[[Client, str], object],
    exc_type: type[WireError],
    code: int,
    name: str,
) -> None:
    with pytest.raises(exc_type) as info:
        call(client, ec_key)
    err = info.value
    assert isinstance(err, WireError)
    assert err.code == code
    assert err.code is ErrorCode(code)
    assert err.name == name
    assert err.message
    assert str(err) == f"{name} (error {code}): {err.message}"
    # An error answer leaves the client (and its pooled connection) usable.
    assert client.key_info(ec_key).name == ec_key


def test_key_not_found_message(client: Client) -> None:
    with pytest.raises(KeyNotFound) as info:
        client.sign("no-such-key-anywhere", b"x")
    assert str(info.value).startswith("key_not_found (error 300): ")
    assert "no-such-key-anywhere" in str(info.value)


# --------------------------------------------------------------------------
# Threads


def test_one_client_shared_by_16_threads(client: Client, ec_key: str) -> None:
    threads, per_thread = 16, 50
    barrier = threading.Barrier(threads)

    def work(t: int) -> list[tuple[bytes, SignResult]]:
        barrier.wait(timeout=30)
        out = []
        for i in range(per_thread):
            msg = f"thread {t} message {i}".encode()
            out.append((msg, client.sign(ec_key, msg)))
        return out

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(work, t) for t in range(threads)]
        results = [f.result(timeout=120) for f in futures]

    pub = load_public_key(client.public_key(ec_key).public_key_pem)
    signed = [pair for chunk in results for pair in chunk]
    assert len(signed) == threads * per_thread
    for msg, res in signed:
        assert (res.key, res.version) == (ec_key, 1)
        # A response delivered to the wrong thread would fail here.
        pub.verify(res.signature, msg, ec.ECDSA(hashes.SHA256()))


# --------------------------------------------------------------------------
# Socket resolution, connection failures, time-outs


def test_socket_resolution_order(monkeypatch: pytest.MonkeyPatch, signd: Daemon) -> None:
    monkeypatch.delenv("SIGND_SOCKET", raising=False)
    assert Client().settings.socket_path == DEFAULT_SOCKET

    monkeypatch.setenv("SIGND_SOCKET", signd.socket)
    with Client() as from_env:
        assert from_env.settings.socket_path == signd.socket
        assert from_env.health().ready

    explicit = Client("/nonexistent/explicit.sock")
    assert explicit.settings.socket_path == "/nonexistent/explicit.sock"


def test_connection_failed_when_nothing_listens(tmp_path_factory: pytest.TempPathFactory) -> None:
    missing = str(tmp_path_factory.mktemp("nobody") / "absent.sock")
    with Client(missing, timeout=5) as c, pytest.raises(ConnectionFailed, match="cannot connect"):
        c.health()


def test_connection_failed_on_stale_socket_file(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = str(tmp_path_factory.mktemp("stale") / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nobody listens: ECONNREFUSED
    with Client(path, timeout=5) as c, pytest.raises(ConnectionFailed, match=path):
        c.list_keys()


def test_request_timeout_on_silent_listener(silent: SilentListener) -> None:
    with Client(silent.path, timeout=0.3) as c, pytest.raises(RequestTimeout):
        c.health()


def test_closed_client_refuses_calls(signd: Daemon) -> None:
    c = signd.client()
    assert c.health().ready
    c.close()
    with pytest.raises(ConnectionFailed, match="closed"):
        c.health()


# --------------------------------------------------------------------------
# Reconnection


def test_idempotent_call_reconnects_after_daemon_restart(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    daemon = make_daemon()
    with daemon.client() as c:
        c.create_key(key_name, "ec-p256")
        before = c.sign(key_name, b"before restart")  # its connection is now pooled, idle
        daemon.restart()
        after = c.sign(key_name, b"after restart")  # the pooled connection is dead: retried
        pub = load_public_key(c.public_key(key_name).public_key_pem)
    pub.verify(before.signature, b"before restart", ec.ECDSA(hashes.SHA256()))
    pub.verify(after.signature, b"after restart", ec.ECDSA(hashes.SHA256()))


def test_create_key_and_rotate_are_retried_under_their_idempotency_key(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    """The client gives every create_key and rotate an idempotency key, so it
    may send them again after a broken connection: the daemon answers a repeat
    instead of making a second key or version (tests/test_idempotency.py loses
    answers on purpose to show that)."""
    daemon = make_daemon()
    with daemon.client() as c:
        assert c.health().ready  # its connection is now pooled, idle
        daemon.restart()
        info = c.create_key(key_name, "ec-p256")  # the pooled connection is dead: retried
        assert info.current_version == info.created_version == 1
        daemon.restart()
        info = c.rotate(key_name)
        assert info.current_version == info.created_version == 2
        assert [v.version for v in c.key_info(key_name).versions] == [1, 2]
