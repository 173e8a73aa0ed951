"""The disaster drill, on real SoftHSM tokens and whole daemons (OPERATIONS.md
section 13): keys made, rotated and used on token A; a 3-of-5 wrap key
ceremony; ``signctl backup``; token A's directory deleted; a new token B given
the wrap key from 3 shares; ``signctl restore``; every version signs on B with
its old public key (``openssl`` verifies old and new signatures), and settings
and states are as they were.  Then the bad bundles: each refused, nothing
written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from signd_client.bundle import decode_bundle, encode_bundle

if TYPE_CHECKING:
    from conftest import Daemon, TokenEnv

from support import kill_tree
from test_wrapkey import create, wrap_key_cmd

#: (key, type, rotations): every type SoftHSM can back up
KEYS = (("drill-p256", "ec-p256", 2), ("drill-p384", "ec-p384", 1), ("drill-rsa", "rsa-2048", 1))
#: the hash each key type signs with by default (P-384: SHA-384)
DIGEST = {"drill-p256": "-sha256", "drill-p384": "-sha384", "drill-rsa": "-sha256"}


def _openssl_verify(tmp: Path, name: str, pem: str, message: bytes, signature: bytes) -> None:
    """``openssl dgst -verify``: an independent verifier of a DER ECDSA or
    PKCS#1 v1.5 signature with the key's default hash."""
    (tmp / "pub.pem").write_text(pem)
    (tmp / "msg").write_bytes(message)
    (tmp / "sig").write_bytes(signature)
    out = subprocess.run(
        [
            "openssl",
            "dgst",
            DIGEST[name],
            "-verify",
            str(tmp / "pub.pem"),
            "-signature",
            str(tmp / "sig"),
            str(tmp / "msg"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Verified OK" in out.stdout


def _tokens_dir(token: TokenEnv) -> Path:
    for line in token.conf.read_text().splitlines():
        if line.strip().startswith("directories.tokendir"):
            return Path(line.split("=", 1)[1].strip())
    raise AssertionError(f"no tokendir in {token.conf}")


def _restore(d: Daemon, bundle: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return d.signctl("--json", "restore", str(bundle), *args)


@pytest.fixture(scope="module")
def drill(
    new_softhsm_token: Callable[[str], TokenEnv],
    module_daemon: Callable[..., Daemon],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """Token A's life, the backup, A lost; returns what the tests check on B."""
    work = tmp_path_factory.mktemp("drill")
    token_a = new_softhsm_token("signd-drill-a")
    shares, check = create(token_a, shares=5, threshold=3)
    a = module_daemon(token_a, '[audit]\ndir = "audit"\n')
    signed: list[tuple[str, int, bytes, bytes]] = []
    pems: dict[tuple[str, int], str] = {}
    try:
        with a.client() as c:
            for name, kt, rotations in KEYS:
                c.create_key(name, kt, backup=True, verify_grace=3600.0, deletion_allowed=True)
                for _ in range(rotations):
                    c.rotate(name)
                # every version may sign (and so be checked by signing on B)
                c.update_key(name, min_sign_version=1)
                info = c.key_info(name)
                for v in info.versions:
                    message = f"{name} v{v.version} on token A".encode()
                    signed.append(
                        (
                            name,
                            v.version,
                            message,
                            c.sign(name, message, version=v.version).signature,
                        )
                    )
                    pems[(name, v.version)] = v.public_key_pem
            c.disable("drill-p256", 1)
            c.create_key("drill-plain", "ec-p256")  # not backup-able: not in the bundle
            before = {name: c.key_info(name) for name, _, _ in KEYS}
        bundle = work / "keys.bundle"
        out = a.signctl("--json", "backup", "--out", str(bundle))
        assert out.returncode == 0, out.stderr
        made = json.loads(out.stdout)
        assert made["keys"] == sorted(n for n, _, _ in KEYS)
        assert made["skipped"] == ["drill-plain"]
        assert made["versions"] == 3 + 2 + 2
        assert bundle.stat().st_mode & 0o777 == 0o600
        again = a.signctl("backup", "--out", str(bundle))
        assert again.returncode != 0
        assert b"exists" in again.stderr
        audit = [
            json.loads(line)
            for f in sorted((a.workdir / "audit").glob("audit-*.jsonl"))
            for line in f.read_bytes().split(b"\n")
            if line
        ]
        assert any(r.get("op") == "backup" and r.get("result") == "ok" for r in audit)
    finally:
        assert a.stop() == 0, a.logs()
    # The disaster: token A's directory is gone.
    shutil.rmtree(_tokens_dir(token_a))
    return {
        "shares": shares,
        "check": check,
        "bundle": bundle,
        "before": before,
        "signed": signed,
        "pems": pems,
        "work": work,
    }


def _token_with_shares(
    new_softhsm_token: Callable[[str], TokenEnv], label: str, shares: list[str]
) -> TokenEnv:
    token = new_softhsm_token(label)
    out = wrap_key_cmd(token, "import", stdin="\n".join(shares) + "\n")
    assert out.returncode == 0, out.stderr
    return token


def test_the_drill_restores_every_key_version_state_and_setting(
    drill: dict[str, Any],
    new_softhsm_token: Callable[[str], TokenEnv],
    make_daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    shares = drill["shares"]
    token_b = _token_with_shares(
        new_softhsm_token, "signd-drill-b", [shares[4], shares[1], shares[2]]
    )
    b = make_daemon(token=token_b)
    checked = _restore(b, drill["bundle"], "--check")
    assert checked.returncode == 0, checked.stderr
    with b.client() as c:
        assert c.list_keys().keys == ()  # --check wrote nothing
    out = _restore(b, drill["bundle"])
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [(r["key"], r["outcome"], r["restored"]) for r in results] == [
        ("drill-p256", "created", [1, 2, 3]),
        ("drill-p384", "created", [1, 2]),
        ("drill-rsa", "created", [1, 2]),
    ]
    with b.client() as c:
        for name, info in drill["before"].items():
            assert c.key_info(name) == info  # versions, states, settings, times
        # old signatures verify on B, and with openssl against A's public keys
        for name, version, message, signature in drill["signed"]:
            if (name, version) != ("drill-p256", 1):  # disabled: it verifies nothing
                assert c.verify(name, signature, message=message, version=version).valid
            _openssl_verify(tmp_path, name, drill["pems"][(name, version)], message, signature)
        # every enabled version signs on B with its old public key
        for name, _, _ in KEYS:
            for v in c.key_info(name).versions:
                if v.state != "active":
                    continue
                message = f"{name} v{v.version} on token B".encode()
                sig = c.sign(name, message, version=v.version).signature
                _openssl_verify(tmp_path, name, drill["pems"][(name, v.version)], message, sig)
        assert next(v.state for v in c.key_info("drill-p256").versions) == "disabled"
        # a restored key is still backup-able, and rotates
        assert c.key_info("drill-rsa").backup is True
        assert c.rotate("drill-rsa").current_version == 3
    # Answered means durable: killed -9 at once, the restarted daemon has every key.
    kill_tree(b)
    b.start()
    with b.client() as c:
        for name, info in drill["before"].items():
            if name != "drill-rsa":  # rotated above
                assert c.key_info(name) == info
    # restore twice: nothing duplicated
    twice = _restore(b, drill["bundle"])
    assert twice.returncode == 0, twice.stderr
    outcomes = json.loads(twice.stdout)
    assert [r["outcome"] for r in outcomes] == ["unchanged"] * 3
    assert all(r["restored"] == [] for r in outcomes)
    with b.client() as c:
        assert [v.version for v in c.key_info("drill-rsa").versions] == [1, 2, 3]


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]


def test_bad_bundles_and_the_wrong_wrap_key_write_nothing(
    drill: dict[str, Any],
    new_softhsm_token: Callable[[str], TokenEnv],
    make_daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    shares = drill["shares"]
    data = drill["bundle"].read_bytes()
    parts = decode_bundle(data)
    (last, mac) = parts.entries[-1]
    bad = {
        "flipped bit in a wrapped key": encode_bundle(
            parts.header,
            parts.header_mac,
            [*parts.entries[:-1], (_flip(last, len(last) - 30), mac)],
        ),
        "flipped bit in the header": encode_bundle(
            _flip(parts.header, len(parts.header) - 3), parts.header_mac, parts.entries
        ),
        "truncated": data[: len(data) - 100],
        "an entry dropped": encode_bundle(parts.header, parts.header_mac, parts.entries[:-1]),
    }
    # Two shares of three put no wrap key on a token; a corrupted share neither.
    token_c = new_softhsm_token("signd-drill-c")
    two = wrap_key_cmd(token_c, "import", stdin="\n".join(shares[:2]) + "\n")
    assert two.returncode != 0
    assert "3 shares are needed" in two.stderr, two.stderr
    corrupted = shares[2][:-20] + ("0" if shares[2][-20] != "0" else "1") + shares[2][-19:]
    bent = wrap_key_cmd(token_c, "import", stdin="\n".join([*shares[:2], corrupted]) + "\n")
    assert bent.returncode != 0, bent.stderr
    out = wrap_key_cmd(token_c, "import", stdin="\n".join(shares[2:]) + "\n")
    assert out.returncode == 0, out.stderr
    c_daemon = make_daemon(token=token_c)
    for what, blob in bad.items():
        path = tmp_path / "bad.bundle"
        path.write_bytes(blob)
        refused = _restore(c_daemon, path)
        assert refused.returncode != 0, what
        assert b"nothing was written" in refused.stderr, (what, refused.stderr)
    # the wrong wrap key: another ceremony's token
    token_d = new_softhsm_token("signd-drill-d")
    _, other_check = create(token_d, shares=2, threshold=2)
    d_daemon = make_daemon(token=token_d)
    wrong = _restore(d_daemon, drill["bundle"])
    assert wrong.returncode != 0
    message = wrong.stderr.decode()
    assert f"made under wrap key {drill['check']}" in message, message
    assert f"holds wrap key {other_check}" in message, message
    for daemon in (c_daemon, d_daemon):
        with daemon.client() as c:
            assert c.list_keys().keys == ()
    # and the good bundle still restores on C
    assert _restore(c_daemon, drill["bundle"]).returncode == 0
