"""p11-kit's server as a peer: ``p11-kit server`` remoting the token, measured with
separate client processes (see :mod:`signd_bench.peers`)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from ._measure import Row, process_tree
from ._peer_support import (
    DIGEST,
    KEY_TYPE,
    MAX_SAMPLES,
    START_TIMEOUT,
    STOP_TIMEOUT,
    PeerBadSignature,
    PeerError,
    PeerUnavailable,
    _kill_leftovers,
    _p256_public_key,
    _point_of,
    _server_usage,
    _stop,
    _tail,
    _Usage,
    _verify_p256,
    _wait_listening,
    _which,
    _without,
)

# -------------------------------------------------------------- p11-kit server --

#: Where Debian (and others) install p11-kit's client module.
_P11KIT_CLIENT_DIRS = (
    "/usr/lib/x86_64-linux-gnu/pkcs11",
    f"/usr/lib/{sysconfig.get_config_var('MULTIARCH') or 'x86_64-linux-gnu'}/pkcs11",
    "/usr/lib64/pkcs11",
    "/usr/lib/pkcs11",
)


def p11kit_client_module() -> str | None:
    """The path of ``p11-kit-client.so``, or None if it is not installed."""
    for d in _P11KIT_CLIENT_DIRS:
        path = os.path.join(d, "p11-kit-client.so")
        if os.path.exists(path):
            return path
    return None


def p11kit_available() -> str | None:
    """None if p11-kit's server can be measured here, else the reason why not."""
    exe = shutil.which("p11-kit")
    if exe is None:
        return "p11-kit is not installed (Debian package p11-kit)"
    if p11kit_client_module() is None:
        return "p11-kit-client.so is not installed (Debian package p11-kit-modules)"
    if importlib.util.find_spec("pkcs11") is None:
        return "python-pkcs11 is not installed"
    try:
        out = subprocess.run(
            [exe, "server", "--help"],
            capture_output=True,
            timeout=START_TIMEOUT,
            check=False,
            env=_without(os.environ, ("P11_KIT_",)),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"p11-kit server --help failed: {exc}"
    if out.returncode != 0 or b"p11-kit server" not in out.stdout + out.stderr:
        return "p11-kit has no server command (p11-kit-server is not installed)"
    return None


#: The client process: ``python -c _P11KIT_DRIVER``.  It speaks JSON lines:
#: stdin  -> {config, PIN included}, then "go", then EOF (= exit, at any point)
#: stdout <- {"ready"...} or {"error"...}, then the result {"count", ...}
#: The PIN arrives on stdin only: never argv, never the environment.
_P11KIT_DRIVER = r"""
import json, sys, time

def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()

def main():
    import pkcs11
    from pkcs11 import Attribute, Mechanism, ObjectClass

    line = sys.stdin.readline()
    if not line:
        return 0
    cfg = json.loads(line)
    pin = cfg.pop("pin")
    session = None
    try:
        lib = pkcs11.lib(cfg["client_module"])
        token = lib.get_token(token_label=cfg["token_label"])
        session = token.open(user_pin=pin)
        del pin
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=cfg["key_label"])
        pub = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=cfg["key_label"])
        point = bytes(pub[Attribute.EC_POINT])
        digest = bytes.fromhex(cfg["digest"])
        mech = Mechanism.ECDSA
        sig = key.sign(digest, mechanism=mech)  # warm-up, and proof the key signs
    except Exception as exc:
        emit({"error": "%s: %s" % (type(exc).__name__, exc)})
        return 1
    emit({"ready": True, "ec_point": point.hex()})

    if sys.stdin.readline().strip() != "go":
        return 0
    seconds = float(cfg["seconds"])
    cap = int(cfg["max_samples"])
    lat = []
    append = lat.append
    perf = time.perf_counter
    sign = key.sign
    count = 0
    error = None
    t0 = now = perf()
    end = t0 + seconds
    try:
        while now < end:
            sig = sign(digest, mechanism=mech)
            t = perf()
            if count < cap:
                append(t - now)
            count += 1
            now = t
    except Exception as exc:
        error = "%s: %s" % (type(exc).__name__, exc)
        now = perf()
    emit({"count": count, "elapsed": now - t0, "latencies": lat,
          "signature": sig.hex(), "error": error})
    # Stay connected until told: the server's per-connection process must be
    # alive when the parent reads its CPU time.
    sys.stdin.readline()
    try:
        session.close()
    except Exception:
        pass
    return 0

sys.exit(main())
"""


@dataclass
class _Client:
    index: int
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    buf: bytearray = field(default_factory=bytearray)
    ready: bool = False
    ec_point: bytes = b""
    result: dict[str, Any] | None = None
    failure: str | None = None

    def send(self, line: str) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(line.encode() + b"\n")
            stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise PeerError(f"client {self.index} is gone ({exc})") from exc

    def read(self, deadline: float) -> dict[str, Any]:
        """The next JSON line from the client, or PeerError (EOF, garbage, timeout)."""
        stdout = self.proc.stdout
        assert stdout is not None
        fd = stdout.fileno()
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 1]
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise PeerError(f"client {self.index} wrote {line[:80]!r}") from exc
                if not isinstance(obj, dict):
                    raise PeerError(f"client {self.index} wrote {line[:80]!r}")
                return obj
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerError(f"client {self.index} did not answer in time")
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                self.proc.poll()
                raise PeerError(
                    f"client {self.index} exited (status {self.proc.returncode}): "
                    f"{_tail(self.stderr_path)}"
                )
            self.buf += chunk


def measure_p11kit_server(
    *,
    module: str,
    token_label: str,
    pin: str,
    key_label: str,
    processes: int,
    seconds: float,
    softhsm_conf: str,
    public_key: ec.EllipticCurvePublicKey | None = None,
) -> Row:
    """Sign through ``p11-kit server`` from ``processes`` client processes at once.

    ``module`` is the token's PKCS#11 module (SoftHSM), which the server loads;
    the key pair labelled ``key_label`` (ECDSA P-256) must already be on the token.
    If ``public_key`` is given, signatures are verified against it and the public
    key the token reports through the server must be the same one.

    Clients connect and log in one after another (many connecting at once made
    p11-kit's server fail with ``GeneralError``), then all start signing together
    for ``seconds``.  A client that fails is reported in the row's note.

    Raises:
        PeerUnavailable: p11-kit is missing, the server did not start, or no
            client could log in and find the key.
        PeerBadSignature: a client's signature does not verify.
        PeerError: the clients did not report back in time, or mid-run failures
            left nothing measured.
    """
    if processes < 1:
        raise ValueError("processes must be at least 1")
    reason = p11kit_available()
    if reason is not None:
        raise PeerUnavailable(reason)
    exe = _which("p11-kit")
    client_module = p11kit_client_module()
    assert client_module is not None

    tmp = Path(tempfile.mkdtemp(prefix="signd-p11kit-"))
    sock = str(tmp / "p11kit.sock")
    server: subprocess.Popen[bytes] | None = None
    clients: list[_Client] = []
    server_pids: list[int] = []
    measured = False
    try:
        server_env = _without(os.environ, ("P11_KIT_SERVER_",))
        server_env["SOFTHSM2_CONF"] = softhsm_conf
        server_log = tmp / "server.log"
        with open(server_log, "wb") as log:
            server = subprocess.Popen(
                [
                    exe,
                    "server",
                    "--provider",
                    module,
                    "-f",
                    "-n",
                    sock,
                    "pkcs11:token=" + urllib.parse.quote(token_label, safe=""),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=server_env,
                cwd=tmp,
                start_new_session=True,  # a terminal's Ctrl-C is ours to forward
            )
        _wait_listening(server, sock, "p11-kit server", server_log)

        client_env = _without(os.environ, ("P11_KIT_SERVER_",))
        client_env["P11_KIT_SERVER_ADDRESS"] = "unix:path=" + urllib.parse.quote(sock, safe="/-_.~")
        # All interpreters start (and import pkcs11) in parallel; each connects
        # only when handed its config, one after another.
        for i in range(processes):
            err = tmp / f"client-{i}.err"
            with open(err, "wb") as errf:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _P11KIT_DRIVER],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=errf,
                    env=client_env,
                    cwd=tmp,
                    bufsize=0,
                )
            clients.append(_Client(i, proc, err))

        config = {
            "client_module": client_module,
            "token_label": token_label,
            "key_label": key_label,
            "digest": DIGEST.hex(),
            "seconds": seconds,
            "max_samples": MAX_SAMPLES,
        }
        for c in clients:
            try:
                c.send(json.dumps({**config, "pin": pin}))
                answer = c.read(time.monotonic() + START_TIMEOUT)
            except PeerError as exc:
                c.failure = str(exc)
                continue
            if "error" in answer:
                c.failure = f"client {c.index}: {answer['error']}"
                continue
            c.ready = True
            c.ec_point = bytes.fromhex(str(answer["ec_point"]))

        ready = [c for c in clients if c.ready]
        if not ready:
            failures = "; ".join(c.failure or "?" for c in clients)
            raise PeerUnavailable(
                f"no p11-kit client could sign: {failures}; server: {_tail(server_log)}"
            )

        with _server_usage(server.pid) as usage:
            for c in ready:
                try:
                    c.send("go")
                except PeerError as exc:
                    c.failure = str(exc)
            deadline = time.monotonic() + seconds + START_TIMEOUT
            for c in ready:
                if c.failure is not None:
                    continue
                try:
                    c.result = c.read(deadline)
                except PeerError as exc:
                    c.failure = str(exc)
                    continue
                if c.result.get("error"):
                    c.failure = f"client {c.index} failed mid-run: {c.result['error']}"
        server_pids = process_tree(server.pid)
        measured = True
        return _p11kit_row(clients, processes, usage, public_key)
    finally:
        for c in clients:  # EOF on stdin: every client state ends with that
            if c.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    c.proc.stdin.close()
            if not measured and c.proc.poll() is None:
                # Interrupted (or failed) mid-run: do not wait for the loops to end.
                with contextlib.suppress(ProcessLookupError):
                    c.proc.terminate()
        for c in clients:
            try:
                c.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _stop(c.proc, signal.SIGKILL)
            _stop(c.proc)
        if server is not None:
            server_pids = sorted(set(server_pids) | set(process_tree(server.pid)))
            _stop(server)
            _kill_leftovers([p for p in server_pids if p != server.pid], "p11-kit")
        shutil.rmtree(tmp, ignore_errors=True)


def _p11kit_row(
    clients: list[_Client],
    processes: int,
    usage: _Usage,
    public_key: ec.EllipticCurvePublicKey | None,
) -> Row:
    measured = [c for c in clients if c.result is not None and int(c.result["count"]) > 0]
    notes = [c.failure for c in clients if c.failure is not None]
    if not measured:
        raise PeerError("no p11-kit client completed a signature: " + "; ".join(notes))

    expected = _point_of(public_key) if public_key is not None else None
    for c in measured:
        assert c.result is not None
        token_key = _p256_public_key(c.ec_point)
        if expected is not None and _point_of(token_key) != expected:
            raise PeerBadSignature(
                f"client {c.index}: the token's public key for this label is not the expected one"
            )
        raw = bytes.fromhex(str(c.result["signature"]))
        _verify_p256(public_key or token_key, raw, what=f"p11-kit client {c.index}")

    latencies: list[float] = []
    for c in measured:
        assert c.result is not None
        latencies.extend(float(x) for x in c.result["latencies"])
    operations = sum(int(c.result["count"]) for c in measured if c.result is not None)
    elapsed = max(float(c.result["elapsed"]) for c in measured if c.result is not None)
    plural = "client process" if processes == 1 else "client processes"
    note = (
        f"p11-kit server remoting SoftHSM, CKM_ECDSA on a 32-byte digest; "
        f"clients ok: {len(measured)}/{processes}; "
        f"server side = p11-kit server + one p11-kit-remote per client; "
        f"verified {len(measured)} signature(s)"
    )
    if notes:
        note += "; failures: " + "; ".join(notes)
    return Row(
        name=f"p11-kit server, {processes} {plural}",
        key_type=KEY_TYPE,
        operations=operations,
        seconds=elapsed,
        latencies=latencies,
        server_cpu=usage.cpu,
        server_peak_rss_mb=usage.peak_rss_mb,
        note=note,
    )
