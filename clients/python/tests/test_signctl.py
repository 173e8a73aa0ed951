"""The installed ``signctl`` command, run as a process against a real daemon.

Signatures are checked with ``cryptography`` and the ``openssl`` command,
never with signd's own code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from _support import AnsweringListener, load_public_key
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from signd_client.cli import OP_COMMANDS, main
from signd_client.protocol import OPS, KeyGrant, Request, Whoami

if TYPE_CHECKING:
    from conftest import Daemon  # the root conftest.py

MESSAGE = b"signed through signctl\n"
ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
COMMANDS = (
    "keys",
    "create",
    "info",
    "pubkey",
    "sign",
    "sign-batch",
    "verify",
    "rotate",
    "update",
    "disable",
    "enable",
    "destroy",
    "health",
    "whoami",
    "backup",
    "restore",
    "jwks",
    "import",
    "import-key",
)


def signctl_exe() -> str:
    exe = shutil.which("signctl", path=os.path.dirname(sys.executable))
    assert exe is not None, "signctl is not installed next to the test interpreter"
    return exe


def run_signctl(
    *args: str, input: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``signctl ARGS`` with no ``--socket`` added and no ``$SIGND_SOCKET`` inherited."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIGND_")}
    clean.update(env or {})
    return subprocess.run(
        [signctl_exe(), *args], input=input, capture_output=True, timeout=60, check=False, env=clean
    )


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    """Assert exit 0 and return stdout as text."""
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout.decode()


def error_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    """Assert exit 2 with a one-line message and no traceback; return the message."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.decode()
    assert "Traceback" not in err, err
    assert err.startswith("signctl: "), err
    return err.strip()


def pubkey(daemon: Daemon, name: str, *extra: str) -> Any:
    return load_public_key(ok(daemon.signctl("pubkey", name, *extra)))


def b64_signature(proc: subprocess.CompletedProcess[bytes]) -> bytes:
    out = ok(proc).strip()
    assert "\n" not in out, out
    return base64.b64decode(out, validate=True)


@pytest.fixture
def ec_key(signd: Daemon, key_name: str) -> str:
    ok(signd.signctl("create", key_name, "--type", "ec-p256"))
    return key_name


@pytest.fixture
def msg_file(tmp_path: Path) -> Path:
    path = tmp_path / "message.bin"
    path.write_bytes(MESSAGE)
    return path


# --------------------------------------------------------------------------
# keys, create, info, pubkey


def test_create_then_keys_lists_it(signd: Daemon, key_name: str) -> None:
    out = ok(signd.signctl("create", key_name, "--type", "ed25519"))
    assert key_name in out
    assert "ed25519" in out
    assert "current version 1" in out

    listed = ok(signd.signctl("keys")).splitlines()
    assert f"{key_name}\ted25519\tv1" in listed


def test_keys_json_before_and_after_the_command(signd: Daemon, ec_key: str) -> None:
    for args in (("--json", "keys"), ("keys", "--json")):
        keys = json.loads(ok(signd.signctl(*args)))
        assert isinstance(keys, list)
        (mine,) = [k for k in keys if k["name"] == ec_key]
        assert mine["type"] == "ec-p256"
        assert mine["current_version"] == 1


def test_socket_option_after_the_command(signd: Daemon, ec_key: str) -> None:
    keys = json.loads(ok(run_signctl("keys", "--socket", signd.socket, "--json")))
    assert ec_key in [k["name"] for k in keys]


def test_socket_from_environment(signd: Daemon) -> None:
    out = ok(run_signctl("health", env={"SIGND_SOCKET": signd.socket}))
    assert "ready True" in out


def test_info_shows_versions_and_public_key(signd: Daemon, ec_key: str) -> None:
    out = ok(signd.signctl("info", ec_key))
    assert f"{ec_key}  type ec-p256  current version 1" in out
    assert re.search(r"^\s+v1\s+active\b", out, re.MULTILINE), out
    pem = out[out.index("-----BEGIN PUBLIC KEY-----") :]
    assert isinstance(load_public_key(pem), ec.EllipticCurvePublicKey)

    info = json.loads(ok(signd.signctl("--json", "info", ec_key)))
    assert info["name"] == ec_key
    assert info["current_version"] == 1
    assert [v["state"] for v in info["versions"]] == ["active"]
    assert load_public_key(info["versions"][0]["public_key_pem"]) == load_public_key(pem)


def test_pubkey_prints_pem(signd: Daemon, ec_key: str) -> None:
    out = ok(signd.signctl("pubkey", ec_key))
    assert out.startswith("-----BEGIN PUBLIC KEY-----\n")
    assert out.endswith("-----END PUBLIC KEY-----\n")
    key = load_public_key(out)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert load_public_key(ok(signd.signctl("pubkey", ec_key, "--version", "1"))) == key


# --------------------------------------------------------------------------
# sign


def test_sign_file_prints_base64(signd: Daemon, ec_key: str, msg_file: Path) -> None:
    sig = b64_signature(signd.signctl("sign", ec_key, "--in", str(msg_file)))
    pubkey(signd, ec_key).verify(sig, MESSAGE, ECDSA_SHA256)


def test_sign_stdin(signd: Daemon, ec_key: str) -> None:
    pub = pubkey(signd, ec_key)
    explicit = b64_signature(signd.signctl("sign", ec_key, "--in", "-", input=MESSAGE))
    pub.verify(explicit, MESSAGE, ECDSA_SHA256)
    implicit = b64_signature(signd.signctl("sign", ec_key, input=MESSAGE))
    pub.verify(implicit, MESSAGE, ECDSA_SHA256)


def test_sign_digest(signd: Daemon, ec_key: str) -> None:
    digest = hashlib.sha256(MESSAGE).hexdigest()
    sig = b64_signature(signd.signctl("sign", ec_key, "--digest", digest, "--hash", "sha256"))
    pubkey(signd, ec_key).verify(sig, MESSAGE, ECDSA_SHA256)


def test_sign_raw_format(signd: Daemon, ec_key: str, msg_file: Path) -> None:
    sig = b64_signature(signd.signctl("sign", ec_key, "--in", str(msg_file), "--format", "raw"))
    assert len(sig) == 64
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    pubkey(signd, ec_key).verify(der, MESSAGE, ECDSA_SHA256)


def test_sign_rsa_pss_and_pkcs1(signd: Daemon, key_name: str, msg_file: Path) -> None:
    ok(signd.signctl("create", key_name, "--type", "rsa-2048"))
    pub = pubkey(signd, key_name)
    assert isinstance(pub, rsa.RSAPublicKey)

    pss = b64_signature(signd.signctl("sign", key_name, "--in", str(msg_file), "--padding", "pss"))
    pss_padding = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
    pub.verify(pss, MESSAGE, pss_padding, hashes.SHA256())
    with pytest.raises(InvalidSignature):  # it really is PSS, not PKCS#1 v1.5
        pub.verify(pss, MESSAGE, padding.PKCS1v15(), hashes.SHA256())

    pkcs1 = b64_signature(signd.signctl("sign", key_name, "--in", str(msg_file)))
    pub.verify(pkcs1, MESSAGE, padding.PKCS1v15(), hashes.SHA256())


def test_sign_out_file(signd: Daemon, ec_key: str, msg_file: Path, tmp_path: Path) -> None:
    out_file = tmp_path / "message.sig"
    proc = signd.signctl("sign", ec_key, "--in", str(msg_file), "--out", str(out_file))
    assert ok(proc) == ""  # the signature goes to the file, not to stdout
    assert f"signed with {ec_key} version 1" in proc.stderr.decode()
    pubkey(signd, ec_key).verify(out_file.read_bytes(), MESSAGE, ECDSA_SHA256)


def test_sign_json(signd: Daemon, ec_key: str, msg_file: Path) -> None:
    res = json.loads(ok(signd.signctl("--json", "sign", ec_key, "--in", str(msg_file))))
    assert res["key"] == ec_key
    assert res["version"] == 1
    assert res["algorithm"] == "ecdsa-p256-sha256"
    sig = base64.b64decode(res["signature"], validate=True)
    pubkey(signd, ec_key).verify(sig, MESSAGE, ECDSA_SHA256)


def test_digest_without_hash_is_a_usage_error(signd: Daemon, ec_key: str) -> None:
    digest = hashlib.sha256(MESSAGE).hexdigest()
    proc = signd.signctl("sign", ec_key, "--digest", digest)
    assert "--hash" in error_line(proc)
    assert proc.stdout == b""


def test_digest_that_is_not_hex_is_a_usage_error(signd: Daemon, ec_key: str) -> None:
    msg = error_line(signd.signctl("sign", ec_key, "--digest", "not-hex", "--hash", "sha256"))
    assert "hex" in msg


OPENSSL_DGST = "dgst -sha256 -verify {pub} -signature {sig} {msg}"
OPENSSL_RAWIN = "pkeyutl -verify -pubin -inkey {pub} -rawin -in {msg} -sigfile {sig}"


@pytest.mark.parametrize(
    ("key_type", "openssl_verify"),
    [("ec-p256", OPENSSL_DGST), ("rsa-2048", OPENSSL_DGST), ("ed25519", OPENSSL_RAWIN)],
)
def test_openssl_verifies_signctl_signatures(
    signd: Daemon,
    key_name: str,
    msg_file: Path,
    tmp_path: Path,
    key_type: str,
    openssl_verify: str,
) -> None:
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is required (apt-get install openssl)"
    ok(signd.signctl("create", key_name, "--type", key_type))
    pub, sig = tmp_path / "pub.pem", tmp_path / "msg.sig"
    pub.write_bytes(signd.signctl("pubkey", key_name).stdout)
    ok(signd.signctl("sign", key_name, "--in", str(msg_file), "--out", str(sig)))

    def openssl_ok(message: Path) -> bool:
        argv = [a.format(pub=pub, sig=sig, msg=message) for a in openssl_verify.split()]
        return subprocess.run([openssl, *argv], capture_output=True, check=False).returncode == 0

    assert openssl_ok(msg_file)
    tampered = tmp_path / "tampered.bin"
    tampered.write_bytes(MESSAGE + b"!")
    assert not openssl_ok(tampered)


# --------------------------------------------------------------------------
# sign-batch

ECDSA_PREHASHED_SHA256 = ec.ECDSA(Prehashed(hashes.SHA256()))
ITEM_ERROR = re.compile(r"error: (\w+) \(error (\d+)\): \S.*")


def message_files(tmp_path: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        path = tmp_path / f"item-{i}.txt"
        path.write_bytes(b"batch item %d\n" % i)
        paths.append(path)
    return paths


def batch_lines(proc: subprocess.CompletedProcess[bytes], count: int) -> list[str]:
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == count, lines
    return lines


def test_sign_batch_files(signd: Daemon, ec_key: str, tmp_path: Path) -> None:
    files = message_files(tmp_path, 5)
    proc = signd.signctl("sign-batch", ec_key, "--in", *map(str, files))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    pub = pubkey(signd, ec_key)
    for path, line in zip(files, batch_lines(proc, len(files)), strict=True):
        pub.verify(base64.b64decode(line, validate=True), path.read_bytes(), ECDSA_SHA256)


def test_sign_batch_files_and_stdin_ed25519(signd: Daemon, key_name: str, tmp_path: Path) -> None:
    ok(signd.signctl("create", key_name, "--type", "ed25519"))
    files = message_files(tmp_path, 2)
    args = ("sign-batch", key_name, "--in", str(files[0]), "-", str(files[1]))
    lines = batch_lines(signd.signctl(*args, input=MESSAGE), 3)
    pub = pubkey(signd, key_name)
    assert isinstance(pub, ed25519.Ed25519PublicKey)
    for msg, line in zip(
        [files[0].read_bytes(), MESSAGE, files[1].read_bytes()], lines, strict=True
    ):
        pub.verify(base64.b64decode(line, validate=True), msg)


def test_sign_batch_rsa_pss(signd: Daemon, key_name: str, tmp_path: Path) -> None:
    ok(signd.signctl("create", key_name, "--type", "rsa-2048"))
    files = message_files(tmp_path, 3)
    proc = signd.signctl("sign-batch", key_name, "--padding", "pss", "--in", *map(str, files))
    pub = pubkey(signd, key_name)
    assert isinstance(pub, rsa.RSAPublicKey)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
    for path, line in zip(files, batch_lines(proc, 3), strict=True):
        pub.verify(base64.b64decode(line, validate=True), path.read_bytes(), pss, hashes.SHA256())


def test_sign_batch_digests_raw(signd: Daemon, ec_key: str, tmp_path: Path) -> None:
    digests = [hashlib.sha256(b"digest %d" % i).digest() for i in range(50)]
    listing = tmp_path / "digests.txt"
    # Blank lines and surrounding spaces are ignored; upper-case hex is fine.
    listing.write_text("\n".join(f"  {d.hex().upper()} " for d in digests) + "\n\n")
    proc = signd.signctl(
        "sign-batch", ec_key, "--digests", str(listing), "--hash", "sha256", "--format", "raw"
    )
    assert proc.returncode == 0, proc.stderr
    pub = pubkey(signd, ec_key)
    for digest, line in zip(digests, batch_lines(proc, len(digests)), strict=True):
        sig = base64.b64decode(line, validate=True)
        assert len(sig) == 64
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        pub.verify(der, digest, ECDSA_PREHASHED_SHA256)


def test_sign_batch_digests_from_stdin(signd: Daemon, ec_key: str) -> None:
    digest = hashlib.sha256(MESSAGE).digest()
    proc = signd.signctl(
        "sign-batch", ec_key, "--digests", "-", "--hash", "sha256", input=digest.hex().encode()
    )
    (line,) = batch_lines(proc, 1)
    pubkey(signd, ec_key).verify(base64.b64decode(line), MESSAGE, ECDSA_SHA256)


def test_sign_batch_item_errors_exit_1(signd: Daemon, ec_key: str, tmp_path: Path) -> None:
    good = [hashlib.sha256(b"good %d" % i).digest() for i in range(3)]
    listing = tmp_path / "digests.txt"
    listing.write_text(
        f"{good[0].hex()}\n{'ab' * 31}\n{good[1].hex()}\n{'cd' * 33}\n{good[2].hex()}\n"
    )
    proc = signd.signctl("sign-batch", ec_key, "--digests", str(listing), "--hash", "sha256")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr.decode()
    assert "2 of 5 items failed" in proc.stderr.decode()
    lines = batch_lines(proc, 5)
    for i, size in ((1, 31), (3, 33)):
        match = ITEM_ERROR.fullmatch(lines[i])
        assert match is not None, lines[i]
        assert match.groups() == ("invalid_digest", "201")
        assert f"got {size}" in lines[i]
    pub = pubkey(signd, ec_key)
    for digest, line in zip(good, [lines[0], lines[2], lines[4]], strict=True):
        pub.verify(base64.b64decode(line, validate=True), digest, ECDSA_PREHASHED_SHA256)


def test_sign_batch_json(signd: Daemon, ec_key: str, tmp_path: Path) -> None:
    digest = hashlib.sha256(MESSAGE).digest()
    listing = tmp_path / "digests.txt"
    listing.write_text(f"{digest.hex()}\n{digest.hex()[:62]}\n")
    proc = signd.signctl(
        "sign-batch", ec_key, "--json", "--digests", str(listing), "--hash", "sha256"
    )
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    res = json.loads(proc.stdout)
    assert (res["key"], res["version"], res["algorithm"]) == (ec_key, 1, "ecdsa-p256-sha256")
    signed, failed = res["results"]
    assert set(signed) == {"signature"}
    sig = base64.b64decode(signed["signature"], validate=True)
    pubkey(signd, ec_key).verify(sig, MESSAGE, ECDSA_SHA256)
    assert failed["error"]["code"] == 201
    assert failed["error"]["name"] == "invalid_digest"
    assert failed["error"]["message"] == "a sha256 digest is 32 bytes, got 31"
    assert "signature" not in failed

    all_ok = signd.signctl("sign-batch", ec_key, "--in", str(listing), "--json")
    assert json.loads(ok(all_ok))["results"][0].keys() == {"signature"}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(("{key}-absent", "--in", "{msg}"), "key_not_found (error 300)", id="key"),
        pytest.param(
            ("{key}", "--in", "{msg}", "--padding", "pss"),
            "invalid_argument (error 200)",
            id="options",
        ),
    ],
)
def test_sign_batch_whole_request_errors_exit_2(
    signd: Daemon, ec_key: str, msg_file: Path, args: tuple[str, ...], expected: str
) -> None:
    proc = signd.signctl("sign-batch", *(a.format(key=ec_key, msg=msg_file) for a in args))
    msg = error_line(proc)
    assert re.fullmatch(rf"signctl: {re.escape(expected)}: \S.*", msg), msg
    assert proc.stdout == b""


def test_sign_batch_usage_errors_exit_2(signd: Daemon, ec_key: str, tmp_path: Path) -> None:
    listing = tmp_path / "digests.txt"
    listing.write_text(hashlib.sha256(MESSAGE).hexdigest() + "\nnot-hex\n")
    assert "line 2" in error_line(
        signd.signctl("sign-batch", ec_key, "--digests", str(listing), "--hash", "sha256")
    )
    assert "--hash" in error_line(signd.signctl("sign-batch", ec_key, "--digests", str(listing)))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert "no digests" in error_line(
        signd.signctl("sign-batch", ec_key, "--digests", str(empty), "--hash", "sha256")
    )
    missing = str(tmp_path / "absent.bin")
    assert "cannot read" in error_line(signd.signctl("sign-batch", ec_key, "--in", missing))
    assert "stdin" in error_line(signd.signctl("sign-batch", ec_key, "--in", "-", "-"))
    # Exactly one of --in and --digests (argparse's own usage errors, also exit 2).
    assert signd.signctl("sign-batch", ec_key).returncode == 2
    both = ("sign-batch", ec_key, "--in", str(listing), "--digests", str(listing))
    assert signd.signctl(*both).returncode == 2


# --------------------------------------------------------------------------
# verify


def test_verify_exit_codes_with_sig_file(
    signd: Daemon, ec_key: str, msg_file: Path, tmp_path: Path
) -> None:
    sig = tmp_path / "message.sig"
    ok(signd.signctl("sign", ec_key, "--in", str(msg_file), "--out", str(sig)))

    valid = signd.signctl("verify", ec_key, "--sig", str(sig), "--in", str(msg_file))
    assert valid.returncode == 0, valid.stderr
    assert f"valid: {ec_key} version 1" in valid.stdout.decode()

    other = tmp_path / "other.bin"
    other.write_bytes(b"a different message")
    invalid = signd.signctl("verify", ec_key, "--sig", str(sig), "--in", str(other))
    assert invalid.returncode == 1, invalid.stderr
    assert "invalid" in invalid.stdout.decode()

    from_stdin = signd.signctl("verify", ec_key, "--sig", str(sig), "--in", "-", input=MESSAGE)
    assert from_stdin.returncode == 0, from_stdin.stderr

    unknown = signd.signctl("verify", ec_key + "-absent", "--sig", str(sig), "--in", str(msg_file))
    assert error_line(unknown).startswith("signctl: key_not_found (error 300): ")


def test_verify_exit_codes_with_sig_base64(signd: Daemon, ec_key: str, msg_file: Path) -> None:
    sig = b64_signature(signd.signctl("sign", ec_key, "--in", str(msg_file)))
    b64 = base64.b64encode(sig).decode()

    valid = signd.signctl("verify", ec_key, "--sig-base64", b64, "--in", str(msg_file))
    assert valid.returncode == 0, valid.stderr
    invalid = signd.signctl("verify", ec_key, "--sig-base64", b64, input=b"not the message")
    assert invalid.returncode == 1, invalid.stderr

    as_json = signd.signctl("--json", "verify", ec_key, "--sig-base64", b64, "--in", str(msg_file))
    assert json.loads(ok(as_json)) == {
        "valid": True,
        "key": ec_key,
        "version": 1,
        "algorithm": "ecdsa-p256-sha256",
    }

    unknown = signd.signctl("verify", "absent-" + ec_key, "--sig-base64", b64, input=MESSAGE)
    assert error_line(unknown).startswith("signctl: key_not_found (error 300): ")
    garbage = signd.signctl("verify", ec_key, "--sig-base64", "%%%", input=MESSAGE)
    assert "base64" in error_line(garbage)


def test_verify_digest(signd: Daemon, ec_key: str, msg_file: Path) -> None:
    sig = b64_signature(signd.signctl("sign", ec_key, "--in", str(msg_file)))
    b64 = base64.b64encode(sig).decode()
    digest = hashlib.sha256(MESSAGE).hexdigest()
    good = signd.signctl(
        "verify", ec_key, "--sig-base64", b64, "--digest", digest, "--hash", "sha256"
    )
    assert good.returncode == 0, good.stderr
    wrong = hashlib.sha256(b"other").hexdigest()
    bad = signd.signctl(
        "verify", ec_key, "--sig-base64", b64, "--digest", wrong, "--hash", "sha256"
    )
    assert bad.returncode == 1, bad.stderr


# --------------------------------------------------------------------------
# rotate, health


def test_rotate(signd: Daemon, ec_key: str, msg_file: Path, tmp_path: Path) -> None:
    old_sig = tmp_path / "v1.sig"
    ok(signd.signctl("sign", ec_key, "--in", str(msg_file), "--out", str(old_sig)))
    v1_pub = pubkey(signd, ec_key)

    out = ok(signd.signctl("rotate", ec_key))
    assert "current version 2" in out
    assert re.search(r"^\s+v2\s+active\b", out, re.MULTILINE), out

    new = json.loads(ok(signd.signctl("--json", "sign", ec_key, "--in", str(msg_file))))
    assert new["version"] == 2
    new_sig = base64.b64decode(new["signature"])
    pubkey(signd, ec_key, "--version", "2").verify(new_sig, MESSAGE, ECDSA_SHA256)
    assert pubkey(signd, ec_key, "--version", "1") == v1_pub

    # Version 1's signature still verifies, and is reported as version 1 ...
    old = signd.signctl("--json", "verify", ec_key, "--sig", str(old_sig), "--in", str(msg_file))
    assert json.loads(ok(old))["version"] == 1
    # ... but not against version 2 alone.
    only_v2 = ("verify", ec_key, "--sig", str(old_sig), "--in", str(msg_file), "--version", "2")
    assert signd.signctl(*only_v2).returncode == 1

    info = json.loads(ok(signd.signctl("info", ec_key, "--json")))
    assert info["current_version"] == 2
    assert [v["version"] for v in info["versions"]] == [1, 2]


def test_health(signd: Daemon) -> None:
    out = ok(signd.signctl("health"))
    assert "ready True" in out
    assert "signd-test" in out  # the token's label
    health = json.loads(ok(signd.signctl("health", "--json")))
    assert health["ready"] is True
    assert health["live"] is True
    assert health["token"]["label"] == "signd-test"


# --------------------------------------------------------------------------
# key lifecycle: create settings, update, disable, enable, destroy, sign --version

DAY = 86400


def info_json(daemon: Daemon, name: str) -> dict[str, Any]:
    info = json.loads(ok(daemon.signctl("--json", "info", name)))
    assert isinstance(info, dict), info
    return info


def states(daemon: Daemon, name: str) -> list[str]:
    return [v["state"] for v in info_json(daemon, name)["versions"]]


def utc(t: float) -> str:
    """How signctl shows a wire time; written out here, not taken from signctl."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def version_line(out: str, version: int) -> str:
    (line,) = [x for x in out.splitlines() if re.match(rf"\s+v{version}\s", x)]
    return line


def test_create_with_settings(signd: Daemon, key_name: str) -> None:
    out = ok(
        signd.signctl(
            "create",
            key_name,
            "--type",
            "ec-p256",
            "--auto-rotate-period",
            "90d",
            "--verify-grace",
            "12h",
            "--deletion-allowed",
            "true",
        )
    )
    info = info_json(signd, key_name)
    assert info["auto_rotate_period"] == 90 * DAY
    assert info["verify_grace"] == 12 * 3600
    assert info["deletion_allowed"] is True
    assert (info["min_sign_version"], info["min_verify_version"]) == (0, 0)
    created = info["versions"][0]["created"]
    assert info["next_rotation"] == created + 90 * DAY
    # The human output shows every setting, in the form the options take.
    assert f"auto-rotate-period  90d (next rotation {utc(created + 90 * DAY)})" in out
    assert "verify-grace        12h" in out
    assert "deletion-allowed    true" in out
    assert re.search(r"^\s+v1\s+active\s+created \d{4}-\d\d-\d\dT", out, re.MULTILINE), out


def test_info_shows_settings_next_rotation_and_verify_until(signd: Daemon, ec_key: str) -> None:
    out = ok(signd.signctl("info", ec_key))
    assert "auto-rotate-period  0 (off)" in out
    assert "verify-grace        0 (no limit)" in out
    assert "min-sign-version    0 (only the newest version signs)" in out
    assert "min-verify-version  0 (no minimum)" in out
    assert "deletion-allowed    false" in out
    assert "next rotation" not in out

    ok(signd.signctl("rotate", ec_key))
    ok(signd.signctl("update", ec_key, "--verify-grace", "7d", "--auto-rotate-period", "30d"))
    info = info_json(signd, ec_key)
    v1, v2 = info["versions"]
    assert (v1["state"], v2["state"]) == ("verify-only", "active")
    # The grace runs from the creation of the next version.
    assert v1["verify_until"] == v2["created"] + 7 * DAY
    assert "verify_until" not in v2
    assert info["next_rotation"] == v2["created"] + 30 * DAY

    out = ok(signd.signctl("info", ec_key))
    assert f"verifies until {utc(v1['verify_until'])}" in version_line(out, 1)
    assert "verifies until" not in version_line(out, 2)
    assert f"30d (next rotation {utc(info['next_rotation'])})" in out
    assert out.count("-----BEGIN PUBLIC KEY-----") == 2


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("45s", 45),
        ("30m", 1800),
        ("1.5h", 5400),
        ("12h", 12 * 3600),
        ("90d", 90 * DAY),
        ("0", 0),
    ],
)
def test_update_durations(signd: Daemon, ec_key: str, text: str, seconds: int) -> None:
    out = ok(signd.signctl("update", ec_key, "--verify-grace", text))
    assert "verify-grace" in out
    assert info_json(signd, ec_key)["verify_grace"] == seconds


def test_update_keeps_what_it_is_not_given(signd: Daemon, ec_key: str) -> None:
    ok(signd.signctl("update", ec_key, "--auto-rotate-period", "2h", "--verify-grace", "1d"))
    ok(signd.signctl("update", ec_key, "--deletion-allowed", "true"))
    info = info_json(signd, ec_key)
    assert (info["auto_rotate_period"], info["verify_grace"]) == (7200, DAY)
    assert info["deletion_allowed"] is True
    assert info["next_rotation"] == info["versions"][0]["created"] + 7200

    out = ok(signd.signctl("update", ec_key, "--auto-rotate-period", "0"))
    assert "auto-rotate-period  0 (off)" in out
    info = info_json(signd, ec_key)
    assert info["auto_rotate_period"] == 0
    assert "next_rotation" not in info
    assert (info["verify_grace"], info["deletion_allowed"]) == (DAY, True)

    as_json = json.loads(
        ok(signd.signctl("--json", "update", ec_key, "--deletion-allowed", "FALSE"))
    )
    assert as_json["deletion_allowed"] is False
    assert as_json["name"] == ec_key


@pytest.mark.parametrize("bad", ["1w", "-5", "abc", "", "5 d", "1.5.2", "90dd", "inf", "nan", "d"])
def test_bad_durations_are_usage_errors(signd: Daemon, ec_key: str, bad: str) -> None:
    for args in (
        ("update", ec_key, "--verify-grace", bad),
        ("update", ec_key, "--auto-rotate-period", bad),
        ("create", ec_key + "-new", "--type", "ec-p256", "--auto-rotate-period", bad),
    ):
        proc = signd.signctl(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        err = proc.stderr.decode()
        assert "Traceback" not in err
        assert f"invalid duration {bad!r}" in err, err
        assert "90d" in err, err  # says what would be right
    assert ec_key + "-new" not in ok(signd.signctl("keys"))
    assert info_json(signd, ec_key)["verify_grace"] == 0


def test_other_bad_settings(signd: Daemon, ec_key: str) -> None:
    proc = signd.signctl("update", ec_key, "--deletion-allowed", "yes")
    assert proc.returncode == 2
    assert "invalid value 'yes': use true or false" in proc.stderr.decode()
    proc = signd.signctl("update", ec_key, "--min-sign-version", "-1")
    assert proc.returncode == 2
    assert "invalid version '-1'" in proc.stderr.decode()
    assert "nothing to change" in error_line(signd.signctl("update", ec_key))
    # Well-formed but refused by the daemon: below its [keys] min_rotate_period (1 h).
    msg = error_line(signd.signctl("update", ec_key, "--auto-rotate-period", "10m"))
    assert msg.startswith("signctl: invalid_argument (error 200): auto_rotate_period"), msg
    assert "min_rotate_period" in msg
    msg = error_line(signd.signctl("update", ec_key, "--min-verify-version", "2"))
    assert msg.startswith("signctl: invalid_argument (error 200): min_verify_version"), msg
    assert info_json(signd, ec_key)["auto_rotate_period"] == 0


def test_min_versions_and_sign_with_a_version(
    signd: Daemon, ec_key: str, msg_file: Path, tmp_path: Path
) -> None:
    ok(signd.signctl("rotate", ec_key))
    ok(signd.signctl("rotate", ec_key))
    # By default only the newest version signs; naming an older one is refused.
    msg = error_line(signd.signctl("sign", ec_key, "--in", str(msg_file), "--version", "2"))
    assert msg.startswith("signctl: version_not_usable (error 303): "), msg

    out = ok(
        signd.signctl("update", ec_key, "--min-verify-version", "2", "--min-sign-version", "2")
    )
    assert re.search(r"^\s+v1\s+retired\b", out, re.MULTILINE), out
    assert states(signd, ec_key) == ["retired", "active", "active"]

    res = json.loads(
        ok(signd.signctl("--json", "sign", ec_key, "--in", str(msg_file), "--version", "2"))
    )
    assert res["version"] == 2
    pubkey(signd, ec_key, "--version", "2").verify(
        base64.b64decode(res["signature"]), MESSAGE, ECDSA_SHA256
    )
    sig = b64_signature(signd.signctl("sign", ec_key, "--in", str(msg_file)))
    pubkey(signd, ec_key, "--version", "3").verify(sig, MESSAGE, ECDSA_SHA256)  # the newest
    msg = error_line(signd.signctl("sign", ec_key, "--in", str(msg_file), "--version", "1"))
    assert msg.startswith("signctl: version_not_usable (error 303): "), msg
    assert "retired" in msg

    files = message_files(tmp_path, 3)
    batch = signd.signctl(
        "--json", "sign-batch", ec_key, "--version", "2", "--in", *map(str, files)
    )
    res = json.loads(ok(batch))
    assert res["version"] == 2
    v2 = pubkey(signd, ec_key, "--version", "2")
    for path, item in zip(files, res["results"], strict=True):
        v2.verify(base64.b64decode(item["signature"]), path.read_bytes(), ECDSA_SHA256)
    refused = signd.signctl("sign-batch", ec_key, "--version", "1", "--in", str(files[0]))
    assert error_line(refused).startswith("signctl: version_not_usable (error 303): ")


def test_disable_and_enable(signd: Daemon, ec_key: str, msg_file: Path, tmp_path: Path) -> None:
    old_sig = tmp_path / "v1.sig"
    ok(signd.signctl("sign", ec_key, "--in", str(msg_file), "--out", str(old_sig)))
    ok(signd.signctl("rotate", ec_key))
    verify_old = ("verify", ec_key, "--sig", str(old_sig), "--in", str(msg_file))
    assert signd.signctl(*verify_old).returncode == 0

    out = ok(signd.signctl("disable", ec_key, "--version", "1"))
    assert re.search(r"^\s+v1\s+disabled\b", out, re.MULTILINE), out
    assert states(signd, ec_key) == ["disabled", "active"]
    assert signd.signctl(*verify_old).returncode == 1  # no version that verifies it
    msg = error_line(signd.signctl(*verify_old, "--version", "1"))
    assert msg.startswith("signctl: version_not_usable (error 303): "), msg
    ok(signd.signctl("disable", ec_key, "--version", "1"))  # again: nothing changes
    assert states(signd, ec_key) == ["disabled", "active"]

    out = ok(signd.signctl("enable", ec_key, "--version", "1"))
    assert re.search(r"^\s+v1\s+verify-only\b", out, re.MULTILINE), out
    assert json.loads(ok(signd.signctl("--json", *verify_old)))["version"] == 1

    # Disabling the newest version stops signing without a version.
    ok(signd.signctl("disable", ec_key, "--version", "2"))
    msg = error_line(signd.signctl("sign", ec_key, "--in", str(msg_file)))
    assert msg.startswith("signctl: version_not_usable (error 303): "), msg
    as_json = json.loads(ok(signd.signctl("enable", ec_key, "--version", "2", "--json")))
    assert [v["state"] for v in as_json["versions"]] == ["verify-only", "active"]
    b64_signature(signd.signctl("sign", ec_key, "--in", str(msg_file)))

    msg = error_line(signd.signctl("disable", ec_key, "--version", "9"))
    assert msg.startswith("signctl: version_not_found (error 301): "), msg
    assert signd.signctl("disable", ec_key).returncode == 2  # --version is required


def test_destroy_refused_until_deletion_allowed(
    signd: Daemon, ec_key: str, msg_file: Path, tmp_path: Path
) -> None:
    old_sig = tmp_path / "v1.sig"
    ok(signd.signctl("sign", ec_key, "--in", str(msg_file), "--out", str(old_sig)))
    v1_pem = ok(signd.signctl("pubkey", ec_key))
    ok(signd.signctl("rotate", ec_key))

    refused = signd.signctl("destroy", ec_key, "--version", "1")
    msg = error_line(refused)
    assert msg.startswith("signctl: deletion_not_allowed (error 304): "), msg
    assert "deletion_allowed" in msg
    assert refused.stdout == b""
    assert states(signd, ec_key) == ["verify-only", "active"]

    ok(signd.signctl("update", ec_key, "--deletion-allowed", "true"))
    out = ok(signd.signctl("destroy", ec_key, "--version", "1"))
    assert out.splitlines()[0] == (
        f"destroyed {ec_key} version 1: private key deleted from the token, public key kept"
    )
    assert re.search(r"^\s+v1\s+destroyed\b", out, re.MULTILINE), out
    assert states(signd, ec_key) == ["destroyed", "active"]

    # The daemon no longer accepts the old signature ...
    verify_old = ("verify", ec_key, "--sig", str(old_sig), "--in", str(msg_file))
    assert signd.signctl(*verify_old).returncode == 1
    # ... but the public key is kept, and still checks it independently.
    kept = ok(signd.signctl("pubkey", ec_key, "--version", "1"))
    assert kept == v1_pem
    load_public_key(kept).verify(old_sig.read_bytes(), MESSAGE, ECDSA_SHA256)
    # Gone for good: it cannot be enabled again, and destroying it again changes nothing.
    msg = error_line(signd.signctl("enable", ec_key, "--version", "1"))
    assert msg.startswith("signctl: version_not_usable (error 303): "), msg
    ok(signd.signctl("destroy", ec_key, "--version", "1"))
    # The other version still signs.
    sig = b64_signature(signd.signctl("sign", ec_key, "--in", str(msg_file)))
    pubkey(signd, ec_key, "--version", "2").verify(sig, MESSAGE, ECDSA_SHA256)


def test_destroy_all_needs_yes(signd: Daemon, key_name: str, msg_file: Path) -> None:
    ok(signd.signctl("create", key_name, "--type", "ed25519", "--deletion-allowed", "true"))
    ok(signd.signctl("rotate", key_name))

    # Neither --version nor --all, or both: usage errors; nothing is destroyed.
    assert signd.signctl("destroy", key_name).returncode == 2
    assert signd.signctl("destroy", key_name, "--all", "--version", "1", "--yes").returncode == 2
    msg = error_line(signd.signctl("destroy", key_name, "--all"))
    assert "--yes" in msg
    assert states(signd, key_name) == ["verify-only", "active"]

    out = ok(signd.signctl("destroy", key_name, "--all", "--yes"))
    assert out.splitlines()[0] == (
        f"destroyed {key_name} versions 1, 2: private keys deleted from the token, public keys kept"
    )
    assert states(signd, key_name) == ["destroyed", "destroyed"]
    msg = error_line(signd.signctl("sign", key_name, "--in", str(msg_file)))
    assert msg.startswith("signctl: version_not_usable (error 303): "), msg
    as_json = json.loads(ok(signd.signctl("--json", "destroy", key_name, "--all", "--yes")))
    assert [v["state"] for v in as_json["versions"]] == ["destroyed", "destroyed"]


def test_auto_rotation_shows_in_info(make_daemon: Callable[..., Daemon], key_name: str) -> None:
    """A daemon whose [keys] min_rotate_period allows a 1 s period rotates on its own."""
    d = make_daemon("[keys]\nmin_rotate_period = 1\nsync_interval = 0.2\n")
    ok(d.signctl("create", key_name, "--type", "ec-p256", "--auto-rotate-period", "1s"))
    deadline = time.monotonic() + 30
    while info_json(d, key_name)["current_version"] < 2:
        assert time.monotonic() < deadline, d.logs()
        time.sleep(0.1)
    ok(d.signctl("update", key_name, "--auto-rotate-period", "0"))
    info = info_json(d, key_name)
    assert "next_rotation" not in info
    assert info["versions"][-1]["state"] == "active"


# --------------------------------------------------------------------------
# errors and usage


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(("info", "{key}-absent"), "key_not_found (error 300)", id="key-not-found"),
        pytest.param(
            ("create", "{key}", "--type", "ec-p256"), "key_exists (error 302)", id="exists"
        ),
        pytest.param(
            ("pubkey", "{key}", "--version", "9"), "version_not_found (error 301)", id="version"
        ),
        pytest.param(
            ("sign", "{key}", "--digest", "00" * 20, "--hash", "sha256"),
            "invalid_digest (error 201)",
            id="digest",
        ),
        pytest.param(
            ("sign", "{key}", "--padding", "pss"), "invalid_argument (error 200)", id="argument"
        ),
        pytest.param(("rotate", "{key}-absent"), "key_not_found (error 300)", id="rotate"),
    ],
)
def test_error_answers_print_name_and_code(
    signd: Daemon, ec_key: str, args: tuple[str, ...], expected: str
) -> None:
    proc = signd.signctl(*(a.format(key=ec_key) for a in args), input=MESSAGE)
    msg = error_line(proc)
    assert re.fullmatch(rf"signctl: {re.escape(expected)}: \S.*", msg), msg
    assert proc.stdout == b""


def test_no_daemon(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = str(tmp_path_factory.mktemp("nobody") / "absent.sock")
    msg = error_line(run_signctl("--socket", path, "keys"))
    assert "cannot connect to signd" in msg
    assert path in msg


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_exits_0_and_documents_exit_codes(command: str | None) -> None:
    proc = run_signctl(*([command] if command else []), "--help")
    text = " ".join(ok(proc).split()).lower()  # undo argparse's line wrapping
    assert text.startswith(f"usage: signctl {command or ''}".rstrip())
    assert "exit code" in text, text
    assert "2 error" in text, text


def test_usage_errors_exit_2() -> None:
    assert run_signctl().returncode == 2  # no command
    assert run_signctl("frobnicate").returncode == 2
    assert run_signctl("create", "k", "--type", "dsa-512").returncode == 2
    assert run_signctl("verify", "k", "--sig", "a", "--sig-base64", "b").returncode == 2


def test_signctl_has_a_command_for_every_op() -> None:
    assert set(OP_COMMANDS) == set(OPS)
    assert set(OP_COMMANDS.values()) <= set(COMMANDS)  # each one's --help is checked above


# --------------------------------------------------------------------------
# whoami

WHO = Whoami(
    uid=1001,
    gid=1001,
    groups=(27, 1001, 1002),
    user="deploy",
    keys=(
        KeyGrant(name="app-signing", verbs=("read", "sign", "verify")),
        KeyGrant(name="release-ed25519-long-name", verbs=("verify",)),
    ),
)


@pytest.fixture
def who_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnsweringListener]:
    def answer(request: Request) -> Whoami:
        assert request.op == "whoami"
        return WHO

    listener = AnsweringListener(str(tmp_path_factory.mktemp("who") / "s.sock"), answer)
    yield listener
    listener.close()


def test_whoami_prints_the_caller_and_a_table_of_verbs(
    who_socket: AnsweringListener, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--socket", who_socket.path, "whoami"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "uid 1001 (deploy)  gid 1001  groups 27, 1001, 1002",
        "KEY                        VERBS",
        "app-signing                read, sign, verify",
        "release-ed25519-long-name  verify",
    ]
    assert [r.op for r in who_socket.requests] == ["whoami"]


def test_whoami_json_is_the_answer(
    who_socket: AnsweringListener, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["whoami", "--json", "--socket", who_socket.path]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "uid": 1001,
        "gid": 1001,
        "groups": [27, 1001, 1002],
        "user": "deploy",
        "keys": [
            {"name": "app-signing", "verbs": ["read", "sign", "verify"]},
            {"name": "release-ed25519-long-name", "verbs": ["verify"]},
        ],
    }


def test_whoami_without_user_or_keys(
    tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    nobody = Whoami(uid=64055, gid=64055, groups=(64055,))
    listener = AnsweringListener(
        str(tmp_path_factory.mktemp("who") / "s.sock"), lambda _request: nobody
    )
    try:
        assert main(["--socket", listener.path, "whoami"]) == 0
    finally:
        listener.close()
    assert capsys.readouterr().out.splitlines() == [
        "uid 64055  gid 64055  groups 64055",
        "no key: this uid and these groups may use none",
    ]


def test_whoami_against_the_daemon(signd: Daemon, ec_key: str) -> None:
    who = json.loads(ok(signd.signctl("whoami", "--json")))
    assert (who["uid"], who["gid"]) == (os.getuid(), os.getgid())
    assert who["gid"] in who["groups"]
    (mine,) = [k for k in who["keys"] if k["name"] == ec_key]
    assert "create" in mine["verbs"]  # it made the key
    assert mine["verbs"] == sorted(mine["verbs"])
    text = ok(signd.signctl("whoami"))
    assert text.startswith(f"uid {os.getuid()} ")
    assert re.search(rf"^{re.escape(ec_key)} +\S", text, re.MULTILINE)


# --------------------------------------------------------------------------
# backup and restore: files that cannot be read or written


def test_restore_of_a_missing_or_damaged_file_is_a_one_line_error(tmp_path: Path) -> None:
    """Refused before any request: no daemon is needed to say so."""
    from signd_client.cli import main

    sock = str(tmp_path / "absent.sock")
    missing = subprocess.run(
        [signctl_exe(), "--socket", sock, "restore", str(tmp_path / "absent.bundle")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 2  # a usage error
    assert missing.stderr.startswith("signctl: cannot read"), missing.stderr
    assert "Traceback" not in missing.stderr
    damaged = tmp_path / "damaged.bundle"
    damaged.write_bytes(b"not a bundle at all")
    assert main(["--socket", sock, "restore", str(damaged)]) == 2
