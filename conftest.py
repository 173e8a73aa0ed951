"""Fixtures shared by the daemon's tests (tests/) and the client's (clients/python/tests/).

Everything here is real: a SoftHSM token made by ``softhsm-init.sh`` in a
temporary directory, and ``signd serve`` running as its own process on a real
Unix socket.  Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.parser import text_string_to_metric_families

from signd.config import find_softhsm_module
from signd_client import Client

ROOT = Path(__file__).resolve().parent
SOFTHSM_INIT = ROOT / "softhsm-init.sh"
TOKEN_LABEL = "signd-test"
OPENCRYPTOKI_INIT = ROOT / "opencryptoki-init.sh"
OCK_LABEL = "signd-test-ock"
#: held while a test session uses opencryptoki's soft token: there is one per
#: machine, and another session's ``--reset`` would wipe it under our daemons
OCK_SESSION_LOCK = Path("/run/lock/signd-tests-opencryptoki.lock")
#: serialises the check of ``OCK_RUN_FILE`` and a reset of opencryptoki's token
OCK_INIT_LOCK = Path("/run/lock/signd-tests-opencryptoki.init.lock")
#: the test run (pytest-xdist's run id) that initialised opencryptoki's token last
OCK_RUN_FILE = Path("/run/lock/signd-tests-opencryptoki.run")


def _softhsm_module() -> str:
    module = find_softhsm_module()
    if module is None:
        pytest.fail(
            "SoftHSM is not installed: run the README's test command (apt-get install softhsm2)"
        )
    return module


@dataclass(frozen=True)
class TokenEnv:
    """A real SoftHSM token in a temporary state directory."""

    state_dir: Path
    conf: Path
    label: str
    module: str

    @property
    def pin_file(self) -> Path:
        return self.state_dir / "user.pin"

    @property
    def pin(self) -> str:
        return self.pin_file.read_text().rstrip("\n")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "SIGND_"))}
        env["SOFTHSM2_CONF"] = str(self.conf)
        return env


def make_softhsm_token(state: Path, label: str) -> Path:
    """A new SoftHSM token labelled ``label`` in ``state`` (``softhsm-init.sh``:
    user.pin and so.pin files there); returns its SOFTHSM2_CONF."""
    out = subprocess.run(
        ["bash", str(SOFTHSM_INIT), "--state-dir", str(state), "--label", label, "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, f"softhsm-init.sh failed: {out.stderr}"
    line = out.stdout.strip()
    assert line.startswith("export SOFTHSM2_CONF="), line
    return Path(line.split("=", 1)[1])


@pytest.fixture(scope="session")
def token_env(tmp_path_factory: pytest.TempPathFactory) -> TokenEnv:
    state = tmp_path_factory.mktemp("softhsm")
    conf = make_softhsm_token(state, TOKEN_LABEL)
    # In-process PKCS#11 readers in tests (e.g. the sensitivity check) need it too.
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return TokenEnv(state, conf, TOKEN_LABEL, _softhsm_module())


def write_config(
    path: Path,
    token: TokenEnv,
    socket_path: Path,
    extra: str = "",
    server_extra: str = "",
    token_extra: str = "",
) -> Path:
    """A daemon config for ``token``; ``extra`` is appended TOML (e.g. [limits]),
    ``server_extra`` goes into the [server] table, ``token_extra`` into [token]."""
    path.write_text(
        f'[server]\nsocket = "{socket_path}"\n{server_extra}\n'
        f'[token]\nmodule = "{token.module}"\nlabel = "{token.label}"\n'
        f'pin_file = "{token.pin_file}"\n{token_extra}\n'
        # Many daemons run at once in the tests: no bulk worker unless asked for.
        + ("" if "bulk_workers" in token_extra else "bulk_workers = 0\n")
        + extra
        # Many daemons run at once in the tests: each takes a free metrics port.
        + ("" if "[metrics]" in extra else '\n[metrics]\nlisten = "127.0.0.1:0"\n')
    )
    return path


@dataclass
class Daemon:
    """``signd serve`` as a child process on a real Unix socket."""

    token: TokenEnv
    workdir: Path
    extra_config: str = ""
    proc: subprocess.Popen[bytes] | None = None
    server_extra: str = ""
    token_extra: str = ""
    env_extra: dict[str, str] = field(default_factory=dict)
    #: set: the daemon's /metrics wants this bearer token (``[metrics] token_file``,
    #: added to its config) and shows per-key series; ``http_get`` sends it
    metrics_token: str | None = None
    _log_offset: int = 0

    @property
    def socket(self) -> str:
        return str(self.workdir / "signd.sock")

    @property
    def config(self) -> Path:
        return self.workdir / "signd.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "signd.log"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "signd", "serve", "--config", str(self.config)]

    def env(self) -> dict[str, str]:
        env = self.token.env()
        env.update(self.env_extra)
        return env

    def write_config(self) -> Path:
        extra = self.extra_config
        if self.metrics_token is not None:
            token_file = self.workdir / "metrics.token"
            token_file.write_text(self.metrics_token + "\n")
            token_file.chmod(0o600)
            line = f'token_file = "{token_file}"\n'
            if "[metrics]" in extra:
                extra = extra.replace("[metrics]\n", "[metrics]\n" + line, 1)
            else:
                extra += '\n[metrics]\nlisten = "127.0.0.1:0"\n' + line
        return write_config(
            self.config,
            self.token,
            Path(self.socket),
            extra,
            self.server_extra,
            self.token_extra,
        )

    def check_config(self) -> subprocess.CompletedProcess[str]:
        """Write this daemon's config and run ``signd check-config`` on it."""
        self.write_config()
        return subprocess.run(
            [sys.executable, "-m", "signd", "check-config", "--config", str(self.config)],
            capture_output=True,
            text=True,
            check=False,
            env=self.env(),
        )

    def start(self, *, wait: bool = True, argv: list[str] | None = None) -> None:
        self.write_config()
        log = open(self.log_path, "ab")
        self._log_offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            argv or self.command(), stdout=log, stderr=log, env=self.env(), cwd=self.workdir
        )
        log.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"signd exited with {self.proc.returncode}:\n{self.logs()}")
            if b'"msg": "ready"' in self.log_path.read_bytes()[self._log_offset :]:
                return
            time.sleep(0.02)
        pytest.fail(f"signd did not become ready in {timeout}s:\n{self.logs()}")

    def http_get(self, path: str = "/metrics") -> tuple[int, str, str]:
        """GET ``path`` from this daemon's metrics endpoint, with its metrics
        token if it has one: (status, Content-Type, body)."""
        url = self.metrics_url().removesuffix("/metrics") + path
        headers = {}
        if self.metrics_token is not None:
            headers["Authorization"] = f"Bearer {self.metrics_token}"
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as r:  # loopback
                return r.status, r.headers["Content-Type"], r.read().decode()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.headers["Content-Type"], exc.read().decode()

    def gauge(self, name: str) -> float:
        """The value of the sample ``name`` (no labels) in this daemon's /metrics."""
        text = self.http_get()[2]
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name:
                    return float(s.value)
        raise AssertionError(f"{name} not exported")

    def metrics_url(self) -> str:
        """Where this run of the daemon serves /metrics (from its log line)."""
        for line in reversed(self.log_path.read_text(errors="replace").splitlines()):
            if '"msg": "metrics endpoint"' in line:
                url = json.loads(line)["url"]
                assert isinstance(url, str)
                return url
        pytest.fail(f"signd logged no metrics endpoint:\n{self.logs()}")

    def token_workers(self, role: str | None = None) -> list[int]:
        """Pids of this daemon's token workers (``python -m signd.token FD ROLE``),
        of one role ("sign" or "write") or all of them."""
        assert self.proc is not None
        children: list[str] = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            # Every thread's children: workers may be started from a helper thread.
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                children += (task / "children").read_text().split()
        out = []
        for c in children:
            try:
                argv = Path(f"/proc/{c}/cmdline").read_bytes().split(b"\0")[:-1]
            except FileNotFoundError:
                continue  # it just exited
            if b"signd.token" in argv and (role is None or argv[-1] == role.encode()):
                out.append(int(c))
        return out

    def new_ec_key(self, prefix: str) -> tuple[str, ec.EllipticCurvePublicKey]:
        """A fresh ec-p256 key through this daemon: its name and public key."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        with self.client(timeout=30.0) as c:
            info = c.create_key(name, "ec-p256")
        public = serialization.load_pem_public_key(info.versions[0].public_key_pem.encode())
        assert isinstance(public, ec.EllipticCurvePublicKey)
        return name, public

    def check_signs(self, key: tuple[str, ec.EllipticCurvePublicKey]) -> None:
        """One signature through this daemon's socket, verified with cryptography."""
        name, public = key
        msg = f"check {uuid.uuid4()}".encode()
        with self.client(timeout=30.0) as c:
            sig = c.sign(name, msg).signature
        public.verify(sig, msg, ec.ECDSA(hashes.SHA256()))

    def log_records(self, msg: str) -> list[dict[str, Any]]:
        """This daemon's JSON log records whose ``msg`` is ``msg``, oldest first."""
        out = []
        for line in self.logs().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("msg") == msg:
                out.append(rec)
        return out

    def reload(
        self, extra: str | None = None, outcome: str = "config reloaded", timeout: float = 30.0
    ) -> dict[str, Any]:
        """SIGHUP (after writing ``extra`` as the config's extra part, if given)
        and wait for the log record ``outcome``; returns it."""
        before = len(self.log_records(outcome))
        if extra is not None:
            self.extra_config = extra
            self.write_config()
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while len(found := self.log_records(outcome)) == before:
            assert self.proc.poll() is None, self.logs()
            assert time.monotonic() < deadline, f"no {outcome!r} record:\n{self.logs()}"
            time.sleep(0.02)
        return found[-1]

    def logs(self) -> str:
        """Everything this daemon logged, across restarts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the daemon and wait; returns its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"signd did not stop within {timeout}s after {sig}:\n{self.logs()}")

    def restart(self) -> None:
        assert self.stop() == 0, self.logs()
        self.start()

    def client(self, **kwargs: float | int) -> Client:
        return Client(self.socket, **kwargs)  # type: ignore[arg-type]

    def connect_raw(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(self.socket)
        return s

    def signctl(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run the installed ``signctl`` against this daemon."""
        exe = shutil.which("signctl", path=os.path.dirname(sys.executable)) or "signctl"
        return subprocess.run(
            [exe, "--socket", self.socket, *args],
            input=input,
            capture_output=True,
            timeout=60,
            check=False,
            env=self.token.env(),
        )


@pytest.fixture(scope="session")
def signd(token_env: TokenEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon shared by the whole session.  Use ``key_name`` for unique keys."""
    d = Daemon(token_env, tmp_path_factory.mktemp("signd"))
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        assert d.stop() == 0, d.logs()


@pytest.fixture
def make_daemon(
    token_env: TokenEnv, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Daemon]]:
    """A factory for daemons a test may stop, restart or misconfigure; on the
    session's token unless given another (``token=own_token``)."""
    made: list[Daemon] = []

    def make(
        extra_config: str = "",
        start: bool = True,
        workdir: Path | None = None,
        token: TokenEnv | None = None,
        **kw: Any,
    ) -> Daemon:
        d = Daemon(
            token or token_env, workdir or tmp_path_factory.mktemp("signd"), extra_config, **kw
        )
        made.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


@pytest.fixture
def key_name(request: pytest.FixtureRequest) -> str:
    """A key name unique to this test, so tests sharing one token never collide."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40].strip("-")
    return f"{base}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def new_softhsm_token(
    token_env: TokenEnv, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], TokenEnv]:
    """A factory of fresh SoftHSM tokens, each labelled as asked (as ``own_token``
    makes one; same module and PIN handling)."""

    def make(label: str) -> TokenEnv:
        state = tmp_path_factory.mktemp("softhsm-" + label)
        conf = make_softhsm_token(state, label)
        return dataclasses.replace(token_env, state_dir=state, conf=conf, label=label)

    return make


@pytest.fixture
def own_token(token_env: TokenEnv, tmp_path_factory: pytest.TempPathFactory) -> TokenEnv:
    """A token of this test's own (same module and PIN handling, another directory).

    Every daemon on a token re-reads its keys and rotates those that are due,
    so on the shared token the session's daemon would take part in a fast
    schedule (and keep it up after the test); and where several daemons write
    at once, nothing they leave behind reaches the next test.
    """
    state = tmp_path_factory.mktemp("softhsm-own")
    conf = make_softhsm_token(state, "signd-own")
    return dataclasses.replace(token_env, state_dir=state, conf=conf, label="signd-own")


@pytest.fixture(scope="module")
def module_token(token_env: TokenEnv, tmp_path_factory: pytest.TempPathFactory) -> TokenEnv:
    """A token of this test module's own: for a module that makes many keys
    (the session's token holds every key the session made, and each key
    generation and record write on it gets slower as it grows)."""
    state = tmp_path_factory.mktemp("softhsm-module")
    conf = make_softhsm_token(state, "signd-module")
    return dataclasses.replace(token_env, state_dir=state, conf=conf, label="signd-module")


@dataclass(frozen=True)
class OckTokenEnv(TokenEnv):
    """opencryptoki's soft token (made by ``opencryptoki-init.sh``): ``module``,
    ``label`` and ``pin_file`` (``state_dir/user.pin``) as for SoftHSM; the
    token itself is system-wide, served by ``pkcsslotd``, and needs no
    environment variable (``conf`` is the script's ``opencryptoki.env``)."""

    def env(self) -> dict[str, str]:
        env = super().env()
        del env["SOFTHSM2_CONF"]
        return env


def _flock(f: Any, how: int, what: str) -> None:
    """Take an flock on ``f``, polling (so a stuck holder fails the test, not hangs it)."""
    deadline = time.monotonic() + 600
    while True:
        try:
            fcntl.flock(f, how | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                pytest.fail(f"another test session kept {what} for 600 s")
            time.sleep(0.5)


@pytest.fixture(scope="session")
def ock_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OckTokenEnv]:
    """opencryptoki's soft token, wiped and initialised once per test run.

    The pytest-xdist workers of one run share it: the first one initialises
    it (``--reset``) and records the run in ``OCK_RUN_FILE``; the others use
    it as it is.  Each holds ``OCK_SESSION_LOCK`` shared while it uses the
    token; a session of another run takes it exclusively to reset the token,
    so it waits until no one uses it.  ``OCK_INIT_LOCK`` serialises the check
    and the reset.

    Needs root (the script configures and starts ``pkcsslotd``); fails, never
    skips, when that or opencryptoki is missing."""
    how = "run the README's test command, scripts/dev.sh test (as root; it installs opencryptoki)"
    if os.geteuid() != 0:
        pytest.fail(f"opencryptoki's soft token needs root (pkcsslotd): {how}")
    sbin = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    if shutil.which("pkcsslotd", path=sbin) is None or shutil.which("pkcsconf", path=sbin) is None:
        pytest.fail(f"opencryptoki is not installed (no pkcsslotd/pkcsconf): {how}")
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex
    with open(OCK_SESSION_LOCK, "a") as lock:
        with open(OCK_INIT_LOCK, "a") as init:
            _flock(init, fcntl.LOCK_EX, str(OCK_INIT_LOCK))
            try:
                recorded = json.loads(OCK_RUN_FILE.read_text())
            except (OSError, ValueError):
                recorded = {}
            if recorded.get("run") == run:
                _flock(lock, fcntl.LOCK_SH, str(OCK_SESSION_LOCK))
                fields = recorded["token"]
            else:
                _flock(lock, fcntl.LOCK_EX, str(OCK_SESSION_LOCK))
                OCK_RUN_FILE.unlink(missing_ok=True)
                state = tmp_path_factory.mktemp("opencryptoki")
                out = subprocess.run(
                    [
                        *("bash", str(OPENCRYPTOKI_INIT), "--state-dir", str(state)),
                        *("--label", OCK_LABEL, "--quiet", "--reset"),
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                assert out.returncode == 0, f"opencryptoki-init.sh failed: {out.stderr}"
                # KEY=VALUE lines quoted for the shell (printf %q)
                exported = dict(
                    shlex.split(line)[-1].split("=", 1) for line in out.stdout.splitlines() if line
                )
                fields = [str(state), exported["OCK_LABEL"], exported["OCK_MODULE"]]
                pin_file = Path(exported["OCK_PIN_FILE"]).resolve()
                assert pin_file == (state / "user.pin").resolve(), exported
                OCK_RUN_FILE.write_text(json.dumps({"run": run, "token": fields}))
                # Still under OCK_INIT_LOCK: no other run can reset it meanwhile.
                fcntl.flock(lock, fcntl.LOCK_SH)
        state = Path(fields[0])
        yield OckTokenEnv(state, state / "opencryptoki.env", fields[1], fields[2])


@pytest.fixture(scope="module")
def module_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Daemon]]:
    """A factory for daemons on any token (``token_env``, ``ock_token``) that
    last the whole test module; stopped (killed if need be) after it."""
    made: list[Daemon] = []

    def make(token: TokenEnv, extra_config: str = "", **kw: Any) -> Daemon:
        d = Daemon(token, tmp_path_factory.mktemp("signd"), extra_config, **kw)
        made.append(d)
        d.start()
        return d

    yield make
    for d in made:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.terminate()
            try:
                d.proc.wait(20)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait()


class P11KitServer:
    """``p11-kit server`` exporting one SoftHSM token on a Unix socket: a token
    behind a transport, which tests can kill, stop or slow down.  A daemon uses
    it with ``client_module`` as its module and ``P11_KIT_SERVER_ADDRESS`` set
    to ``address`` (or to a relay in front of it)."""

    def __init__(self, token: TokenEnv, path: Path) -> None:
        self.token = token
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"unix:path={self.path}"

    @property
    def client_module(self) -> str:
        found = sorted(glob.glob("/usr/lib/*/pkcs11/p11-kit-client.so"))
        if not found:
            pytest.fail("p11-kit-client.so is missing: run the README's test command (p11-kit)")
        return found[0]

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [
                *("p11-kit", "server", "--foreground", "--name", str(self.path)),
                *("--provider", self.token.module, f"pkcs11:token={self.token.label}"),
            ],
            env=self.token.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own group: the forked servers go with it
        )
        deadline = time.monotonic() + 30
        while not self.path.exists():
            assert time.monotonic() < deadline, "p11-kit server did not listen"
            time.sleep(0.02)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.kill()


@pytest.fixture
def p11kit(own_token: TokenEnv, tmp_path: Path) -> Iterator[P11KitServer]:
    """A running ``p11-kit server`` in front of this test's own token."""
    server = P11KitServer(own_token, tmp_path / "p11-kit.sock")
    server.start()
    yield server
    server.close()
