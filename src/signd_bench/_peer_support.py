"""What the peers share: deadlines, errors, process and socket helpers, and the
check of every signature a peer returns (see :mod:`signd_bench.peers`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from ._measure import process_tree, reset_peak_rss, usage_of

#: The fixed 32-byte digest (or ssh-agent data blob) every peer signs.
DIGEST = hashlib.sha256(b"signd bench: peer digest").digest()

#: Latencies kept per client (a sample: the first calls of the run).
MAX_SAMPLES = 200_000

#: Deadlines, in seconds, for the waits that have nothing to do with `seconds`.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

KEY_TYPE = "ec-p256"


class PeerError(Exception):
    """A peer ran but did not do its job (refused, crashed, answered nonsense)."""


class PeerUnavailable(PeerError):
    """A peer cannot be measured here: not installed, or it did not start."""


class PeerBadSignature(PeerError):
    """A peer returned a signature that does not verify under its public key."""


# --------------------------------------------------------------------- helpers --


def _which(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise PeerUnavailable(f"{tool} is not installed")
    return path


def _listening(path: str) -> bool:
    """Whether a Unix socket bound to ``path`` is listening (from /proc/net/unix).

    Polling this instead of connecting matters for p11-kit's server, which forks
    and execs a ``p11-kit-remote`` for every connection, even a probe.
    """
    try:
        with open("/proc/net/unix") as f:
            next(f)  # header
            for line in f:
                parts = line.split(None, 7)
                # Flags 0x10000 is __SO_ACCEPTCON: listen() has been called.
                if len(parts) == 8 and parts[7].rstrip("\n") == path:
                    if int(parts[3], 16) & 0x10000:
                        return True
    except (OSError, StopIteration, ValueError):
        return False
    return False


def _wait_listening(proc: subprocess.Popen[bytes], path: str, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    delay = 0.001
    while not _listening(path):
        if proc.poll() is not None:
            raise PeerUnavailable(
                f"{what} exited with status {proc.returncode} before listening: {_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise PeerUnavailable(f"{what} did not listen on {path} within {START_TIMEOUT}s")
        time.sleep(delay)  # polling a condition that has no event to wait on
        delay = min(delay * 2, 0.05)


def _tail(path: Path, limit: int = 500) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no output)"
    return text[-limit:] if text else "(no output)"


def _alive_comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """Signal a process this module started and reap it; SIGKILL if it lingers."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _kill_leftovers(pids: Sequence[int], comm_prefix: str) -> None:
    """SIGKILL processes we started (known by pid) that outlived their parent.

    The command name is checked first so a recycled pid is never touched.
    """
    for pid in pids:
        comm = _alive_comm(pid)
        if comm is not None and comm.startswith(comm_prefix):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _server_usage(pid: int) -> Iterator[_Usage]:
    """CPU seconds and peak RSS of ``pid``'s process tree over the ``with`` body."""
    pids = process_tree(pid)
    reset_peak_rss(pids)
    before = usage_of(pids)
    out = _Usage()
    yield out
    # Children forked during the interval count too; ones that already exited
    # are lost (their CPU went to the parent's cutime), so callers keep their
    # connections open until this is taken.
    after_pids = sorted(set(pids) | set(process_tree(pid)))
    after = usage_of(after_pids)
    out.cpu = max(0.0, after.cpu - before.cpu)
    out.peak_rss_mb = after.peak_rss_mb


@dataclass
class _Usage:
    cpu: float = 0.0
    peak_rss_mb: float = 0.0


def _p256_public_key(point: bytes) -> ec.EllipticCurvePublicKey:
    """A P-256 key from an X9.62 point, bare or in a DER OCTET STRING (CKA_EC_POINT)."""
    if len(point) == 67 and point[0] == 0x04 and point[1] == 65:
        point = point[2:]
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError as exc:
        raise PeerError(f"not a P-256 public point: {point.hex()}") from exc


def _point_of(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _verify_p256(key: ec.EllipticCurvePublicKey, raw: bytes, *, what: str) -> None:
    """Check a PKCS#11 raw ``r || s`` ECDSA signature over :data:`DIGEST`."""
    if len(raw) != 64:
        raise PeerBadSignature(f"{what}: signature is {len(raw)} bytes, not 64 (r || s)")
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        key.verify(der, DIGEST, ec.ECDSA(Prehashed(hashes.SHA256())))
    except InvalidSignature as exc:
        raise PeerBadSignature(f"{what}: signature does not verify") from exc


def _without(env: Mapping[str, str], prefixes: tuple[str, ...]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith(prefixes)}
