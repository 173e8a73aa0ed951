"""Health: liveness and readiness on the wire, in ``signctl health`` and in metrics,
while the token goes away and comes back.

The token is made unreachable for real: its directory is moved away, and the
daemon's token workers are killed, so the daemon must log in again and cannot
until the directory is back.  (Issue 6 adds recovery from a token that fails
under a live session; this is the readiness signal operators script against.)
"""

from __future__ import annotations

import dataclasses
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from signd_client.errors import KeyNotFound, UnsupportedAlgorithm
from support import wait_until

if TYPE_CHECKING:
    from conftest import Daemon, P11KitServer, TokenEnv


def health_exit(d: Daemon) -> int:
    return d.signctl("health").returncode


def test_not_ready_while_the_token_is_away_and_ready_when_it_returns(
    make_daemon: Callable[..., Daemon], own_token: TokenEnv, key_name: str
) -> None:
    d = make_daemon(start=False)
    d.token = own_token
    d.start()
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
        c.sign(key_name, b"before")
        h = c.health()
    assert (h.live, h.ready, h.status) == (True, True, "ok")
    assert health_exit(d) == 0
    assert d.gauge("signd_ready") == 1
    assert d.gauge("signd_token_up") == 1
    reconnects = d.gauge("signd_token_reconnects_total")

    tokens = own_token.state_dir / "tokens"
    away = own_token.state_dir / "tokens.away"
    tokens.rename(away)
    try:
        for pid in d.token_workers():  # the signing workers and the writer
            os.kill(pid, signal.SIGKILL)
        # No worker can log in again: not ready (exit 1), yet alive and answering.
        wait_until(lambda: health_exit(d) == 1, "signctl health to say not ready")
        with d.client() as c:
            h = c.health()
        assert (h.live, h.ready, h.status) == (True, False, "unavailable")
        assert h.detail
        assert d.gauge("signd_ready") == 0
        assert d.gauge("signd_token_up") == 0
        # The same for HTTP probes: /healthz (live) 200, /readyz 503.
        base = d.metrics_url().removesuffix("/metrics")
        with urllib.request.urlopen(base + "/healthz", timeout=10) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + "/readyz", timeout=10).close()
        info.value.close()
        assert info.value.code == 503
    finally:
        away.rename(tokens)
    # The workers log in again on their own (with back-off): ready, and signing.
    wait_until(lambda: health_exit(d) == 0, "signctl health to say ready again")
    with d.client() as c:
        assert c.health().ready
        assert c.sign(key_name, b"after").version == 1
    assert d.gauge("signd_token_up") == 1
    assert d.gauge("signd_token_reconnects_total") > reconnects
    assert d.stop() == 0


def test_health_lists_what_the_token_can_do(signd: Daemon) -> None:
    """Read from the token's mechanism list: SoftHSM 2.6.1 makes every type."""
    with signd.client() as c:
        token = c.health().token
    assert token is not None
    assert token.profile == "softhsm"
    assert token.key_types == (
        "ec-p256",
        "ec-p384",
        "ed25519",
        "rsa-2048",
        "rsa-3072",
        "rsa-4096",
        "ec-secp256k1",
        "hmac-sha256",
        "hmac-sha384",
        "hmac-sha512",
    )
    assert token.mechanisms is not None
    assert {"CKM_ECDSA", "CKM_EDDSA", "CKM_RSA_PKCS_PSS"} <= set(token.mechanisms)
    assert list(token.mechanisms) == sorted(token.mechanisms)


def test_a_type_the_token_lacks_is_unsupported_algorithm(
    make_daemon: Callable[..., Daemon], p11kit: P11KitServer, key_name: str
) -> None:
    """p11-kit's remoting does not carry the Edwards mechanisms: through it,
    SoftHSM cannot make Ed25519 keys, health says so, and create_key says why."""
    d = make_daemon(start=False, env_extra={"P11_KIT_SERVER_ADDRESS": p11kit.address})
    d.token = dataclasses.replace(p11kit.token, module=p11kit.client_module)
    d.start()
    with d.client() as c:
        token = c.health().token
        assert token is not None
        assert token.profile == "generic"  # p11-kit-client.so: no profile of its own
        assert token.key_types is not None
        assert "ed25519" not in token.key_types
        assert "ec-p256" in token.key_types
        with pytest.raises(UnsupportedAlgorithm, match="cannot make ed25519 keys") as info:
            c.create_key(key_name, "ed25519")
        assert "it can make: ec-p256" in str(info.value)
        with pytest.raises(KeyNotFound):
            c.key_info(key_name)  # nothing was made
        c.create_key(key_name, "ec-p256")  # the daemon is fine
        assert c.sign(key_name, b"still signing").version == 1
    out = d.signctl("health", "--json")
    assert out.returncode == 0, out.stderr
    assert b'"key_types"' in out.stdout
