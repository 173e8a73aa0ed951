"""``AsyncClient`` under trio and under asyncio, against a real daemon.

pytest-trio runs in trio mode, so ``async def test_*`` runs under trio; the
asyncio tests are plain functions that call ``asyncio.run``.  Signatures are
checked with ``cryptography``, never with signd's own code.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest
import trio
from _support import SilentListener, load_public_key
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from signd_client import AsyncClient, Health, KeyInfo, SignResult, WireError
from signd_client.errors import (
    ConnectionFailed,
    InvalidArgument,
    InvalidDigest,
    KeyExists,
    KeyNotFound,
    RequestTimeout,
    UnsupportedAlgorithm,
    VersionNotFound,
)
from signd_client.protocol import Whoami

if TYPE_CHECKING:
    from conftest import Daemon  # the root conftest.py

ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def check_signatures(pem: str, signed: list[tuple[bytes, SignResult]], key: str) -> None:
    pub = load_public_key(pem)
    for msg, res in signed:
        assert isinstance(res, SignResult)
        assert res.key == key
        # A response handed to the wrong task would fail here.
        pub.verify(res.signature, msg, ECDSA_SHA256)


async def reconnects_after_daemon_restart(
    daemon: Daemon, key_name: str, to_thread: Callable[[Callable[[], None]], Awaitable[None]]
) -> None:
    """Restart ``daemon`` twice under one client; run by trio's and asyncio's tests.

    ``to_thread`` is the event loop's way to run the blocking ``daemon.restart``.
    """
    async with AsyncClient(daemon.socket) as c:
        info = await c.create_key(key_name, "ec-p256")
        before = await c.sign(key_name, b"before")  # its connection is now pooled, idle
        await to_thread(daemon.restart)
        after = await c.sign(key_name, b"after")  # the pooled connection is dead: retried
        await to_thread(daemon.restart)
        # create_key carries an idempotency key (the client makes one): retried too.
        made = await c.create_key(key_name + "-2", "ec-p256")
        assert made.created_version == 1
        assert [v.version for v in (await c.key_info(key_name + "-2")).versions] == [1]
    check_signatures(
        info.versions[0].public_key_pem, [(b"before", before), (b"after", after)], key_name
    )


ERROR_CASES: list[Any] = [
    pytest.param(lambda c, k: c.key_info(k + "-absent"), KeyNotFound, 300, id="key"),
    pytest.param(
        lambda c, k: c.sign(k, digest=b"\x00" * 31, hash="sha256"), InvalidDigest, 201, id="digest"
    ),
    pytest.param(lambda c, k: c.create_key(k, "ec-p256"), KeyExists, 302, id="exists"),
    pytest.param(lambda c, k: c.public_key(k, 42), VersionNotFound, 301, id="version"),
    pytest.param(lambda c, k: c.sign(k, b"m", padding="pss"), InvalidArgument, 200, id="argument"),
    pytest.param(
        lambda c, k: c.sign(k, b"m", hash="md5"), UnsupportedAlgorithm, 202, id="algorithm"
    ),
]


# --------------------------------------------------------------------------
# trio


async def test_trio_concurrent_signs_from_32_tasks(signd: Daemon, key_name: str) -> None:
    tasks, per_task = 32, 8
    signed: list[tuple[bytes, SignResult]] = []
    async with AsyncClient(signd.socket) as c:
        info = await c.create_key(key_name, "ec-p256")
        assert isinstance(info, KeyInfo)

        async def work(t: int) -> None:
            for i in range(per_task):
                msg = f"task {t} message {i}".encode()
                signed.append((msg, await c.sign(key_name, msg)))

        async with trio.open_nursery() as nursery:
            for t in range(tasks):
                nursery.start_soon(work, t)
        health = await c.health()
    assert isinstance(health, Health)
    assert len(signed) == tasks * per_task
    check_signatures(info.versions[0].public_key_pem, signed, key_name)


async def test_trio_whoami(signd: Daemon, key_name: str) -> None:
    async with AsyncClient(signd.socket) as c:
        await c.create_key(key_name, "ec-p256")
        who = await c.whoami()
    assert isinstance(who, Whoami)
    assert (who.uid, who.gid) == (os.getuid(), os.getgid())
    assert "create" in next(k.verbs for k in who.keys if k.name == key_name)


@pytest.mark.parametrize(("call", "exc_type", "code"), ERROR_CASES)
async def test_trio_errors_are_typed(
    signd: Daemon,
    key_name: str,
    call: Callable[[AsyncClient, str], Any],
    exc_type: type[WireError],
    code: int,
) -> None:
    async with AsyncClient(signd.socket) as c:
        await c.create_key(key_name, "ec-p256")
        with pytest.raises(exc_type) as info:
            await call(c, key_name)
        assert info.value.code == code
        assert str(info.value).startswith(f"{info.value.name} (error {code}): ")
        # The connection that carried the error answer is still good.
        assert (await c.key_info(key_name)).name == key_name


async def test_trio_reconnects_after_daemon_restart(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    await reconnects_after_daemon_restart(make_daemon(), key_name, trio.to_thread.run_sync)


async def test_trio_timeout_on_silent_listener(silent: SilentListener) -> None:
    async with AsyncClient(silent.path, timeout=0.3) as c:
        with pytest.raises(RequestTimeout):
            await c.health()


async def test_trio_connection_failed_when_nothing_listens(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    path = str(tmp_path_factory.mktemp("nobody") / "absent.sock")
    async with AsyncClient(path, timeout=5) as c:
        with pytest.raises(ConnectionFailed, match="cannot connect"):
            await c.health()


async def test_trio_cancellation_mid_flight_leaves_client_usable(
    signd: Daemon,
    silent: SilentListener,
    tmp_path_factory: pytest.TempPathFactory,
    key_name: str,
) -> None:
    # The client's socket path is a symlink: first to a listener that never
    # answers, then to the real daemon.  Had the cancelled call put its
    # connection back in the pool, the next call would reuse it, get no
    # answer and time out.
    link = tmp_path_factory.mktemp("link") / "signd.sock"
    link.symlink_to(silent.path)
    async with AsyncClient(str(link), timeout=5) as c:
        with trio.move_on_after(0.2) as scope:
            await c.sign(key_name, b"never answered")
        assert scope.cancelled_caught

        link.unlink()
        link.symlink_to(signd.socket)
        assert (await c.health()).ready
        info = await c.create_key(key_name, "ec-p256")
        res = await c.sign(key_name, b"after the cancellation")
    check_signatures(info.versions[0].public_key_pem, [(b"after the cancellation", res)], key_name)


async def test_trio_closed_client_refuses_calls(signd: Daemon) -> None:
    c = AsyncClient(signd.socket)
    assert (await c.health()).ready
    await c.aclose()
    with pytest.raises(ConnectionFailed, match="closed"):
        await c.health()


def test_async_client_socket_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIGND_SOCKET", raising=False)
    assert AsyncClient().settings.socket_path == "/run/signd/signd.sock"
    monkeypatch.setenv("SIGND_SOCKET", "/tmp/from-env.sock")
    assert AsyncClient().settings.socket_path == "/tmp/from-env.sock"
    assert AsyncClient("/tmp/explicit.sock").settings.socket_path == "/tmp/explicit.sock"


# --------------------------------------------------------------------------
# asyncio (plain test functions: asyncio.run, not trio)


def test_asyncio_concurrent_signs_with_gather(signd: Daemon, key_name: str) -> None:
    tasks, per_task = 32, 8

    async def main() -> tuple[KeyInfo, list[list[tuple[bytes, SignResult]]]]:
        async with AsyncClient(signd.socket) as c:
            info = await c.create_key(key_name, "ec-p256")

            async def work(t: int) -> list[tuple[bytes, SignResult]]:
                out = []
                for i in range(per_task):
                    msg = f"asyncio task {t} message {i}".encode()
                    out.append((msg, await c.sign(key_name, msg)))
                return out

            results = await asyncio.gather(*(work(t) for t in range(tasks)))
            return info, results

    info, results = asyncio.run(main())
    signed = [pair for chunk in results for pair in chunk]
    assert len(signed) == tasks * per_task
    check_signatures(info.versions[0].public_key_pem, signed, key_name)


def test_asyncio_errors_are_typed(signd: Daemon, key_name: str) -> None:
    async def main() -> None:
        async with AsyncClient(signd.socket) as c:
            await c.create_key(key_name, "ec-p256")
            with pytest.raises(KeyNotFound) as not_found:
                await c.sign(key_name + "-absent", b"m")
            assert not_found.value.code == 300
            assert str(not_found.value).startswith("key_not_found (error 300): ")
            with pytest.raises(InvalidDigest) as bad_digest:
                await c.sign(key_name, digest=b"\x01" * 48, hash="sha256")
            assert bad_digest.value.code == 201
            with pytest.raises(KeyExists):
                await c.create_key(key_name, "ed25519")
            assert (await c.key_info(key_name)).type == "ec-p256"

    asyncio.run(main())


def test_asyncio_reconnects_after_daemon_restart(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    asyncio.run(reconnects_after_daemon_restart(make_daemon(), key_name, asyncio.to_thread))


def test_asyncio_timeout_on_silent_listener(silent: SilentListener) -> None:
    async def main() -> None:
        async with AsyncClient(silent.path, timeout=0.3) as c:
            with pytest.raises(RequestTimeout):
                await c.health()

    asyncio.run(main())


def test_asyncio_connection_failed_when_nothing_listens(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    path = str(tmp_path_factory.mktemp("nobody") / "absent.sock")

    async def main() -> None:
        async with AsyncClient(path, timeout=5) as c:
            with pytest.raises(ConnectionFailed, match="cannot connect"):
                await c.health()

    asyncio.run(main())
