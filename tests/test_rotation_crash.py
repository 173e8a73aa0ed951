"""Rotation is crash-safe: ``kill -9`` at many points of a rotation leaves the old
state or the new one, never half a key, a lost or a duplicated version."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from signd_client import Client
from signd_client.errors import SigndError
from support import kill_tree

if TYPE_CHECKING:
    from conftest import Daemon, TokenEnv

KILLS = 20


def _check(pem: str, key_type: str, sig: bytes, msg: bytes) -> None:
    pub = serialization.load_pem_public_key(pem.encode())
    if key_type.startswith("rsa"):
        assert isinstance(pub, rsa.RSAPublicKey)
        pub.verify(sig, msg, padding.PKCS1v15(), hashes.SHA256())
    else:
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        pub.verify(sig, msg, ec.ECDSA(hashes.SHA256()))


def test_kill_9_during_rotation(
    make_daemon: Callable[..., Daemon], own_token: TokenEnv, key_name: str
) -> None:
    rng = random.Random(4242)
    # A token of its own: each of the many restarts reads only these keys,
    # not every key the session's other tests left on the shared token.
    d = make_daemon(token=own_token)
    keys = {f"{key_name}-ec": "ec-p256", f"{key_name}-rsa": "rsa-2048"}
    signed: list[tuple[str, int, bytes, bytes]] = []  # key, version, message, signature
    took: dict[str, float] = {}  # how long an uninterrupted rotation of each key takes
    with d.client() as c:
        for name, kt in keys.items():
            c.create_key(name, kt)
            for _ in range(2):
                started = time.monotonic()
                c.rotate(name)
                took[name] = max(took.get(name, 0.0), time.monotonic() - started)
    for i in range(KILLS):
        name = list(keys)[i % 2]
        with Client(d.socket, retries=0, timeout=30) as c:
            msg = b"before kill %d" % i
            res = c.sign(name, msg)
            signed.append((name, res.version, msg, res.signature))

        def rotate(name: str = name) -> None:
            try:
                with Client(d.socket, retries=0, timeout=30) as c:
                    c.rotate(name)
            except SigndError:
                pass  # killed mid-way: either outcome is fine

        t = threading.Thread(target=rotate)
        t.start()
        # Kill anywhere from before the request arrives to after it is done:
        # within 1.5 times what a rotation took here, so that on a slow or
        # loaded machine the kills still fall all over the rotation.
        threading.Event().wait(rng.uniform(0, 1.5 * took[name]))
        kill_tree(d)
        t.join(30)
        d.start()
        with d.client() as c:
            for key, kt in keys.items():
                info = c.key_info(key)
                versions = [v.version for v in info.versions]
                assert versions == list(range(1, len(versions) + 1)), (i, key, versions)
                states = [v.state for v in info.versions]
                assert states[-1] == "active", (i, key, states)
                assert all(s == "verify-only" for s in states[:-1]), (i, key, states)
                assert info.current_version == versions[-1]
                pems = {v.version: v.public_key_pem for v in info.versions}
                assert len(set(pems.values())) == len(pems), "two versions share a keypair"
                for k, version, msg, sig in signed:
                    if k == key:
                        _check(pems[version], kt, sig, msg)  # independent check
                        assert c.verify(key, sig, msg).version == version
    with d.client() as c:
        landed = sum(c.key_info(k).current_version - 3 for k in keys)  # 2 each before the kills
    # The kills fell at different points: some rotations survived, some did not.
    assert 0 < landed < KILLS, landed
    assert d.stop() == 0
