"""signd under systemd: the units in systemd/, the notification protocol, the sandbox.

There is no systemd as PID 1 here, so what systemd does is reproduced with
systemd's own tools and with the kernel:

* ``systemd-analyze verify`` and ``systemd-analyze security --offline=yes``
  judge the unit files; ``systemd-sysusers`` and ``systemd-tmpfiles`` apply the
  snippets to a scratch root.
* The notification protocol is a real ``$NOTIFY_SOCKET``: a datagram socket
  this test binds, as systemd does, given to a real ``signd serve``.
* ``systemd-socket-activate`` passes the listening socket, as systemd does.
* The unit's seccomp settings (``SystemCallFilter=``, ``MemoryDenyWriteExecute=``,
  ``RestrictAddressFamilies=``, ``SystemCallArchitectures=native``, and
  ``NoNewPrivileges=``) are loaded into the kernel with libseccomp, as systemd
  loads them; the capability bounding set is emptied with ``setpriv``; in a
  private mount namespace the root file system is read-only but for the
  token's and the socket's directories (``ProtectSystem=strict``) and /proc
  shows processes only (``ProcSubset=pid``).  signd must still start, sign,
  serve metrics and stop in there.  The other namespace settings
  (``PrivateDevices=``, ``PrivateTmp=``, ``ProtectHome=`` ...) and the user
  ``signd`` are not reproduced.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import queue
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from signd.config import load_config
from signd.server.systemd import Notifier
from support import wait_until

if TYPE_CHECKING:
    from conftest import Daemon  # the root conftest.py

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
SERVICE = UNITS / "signd.service"
SOCKET = UNITS / "signd.socket"
MAX_EXPOSURE = 2.0


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: run the README's test command (Debian package systemd)"
        )
    return path


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> every value given, in order (a key may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def one(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


# --------------------------------------------------------------------------
# the unit files


def test_units_say_what_the_daemon_needs() -> None:
    svc = unit_settings(SERVICE)
    sock = unit_settings(SOCKET)
    assert one(sock, "Socket.ListenStream") == "/run/signd/signd.sock"
    assert one(sock, "Socket.SocketMode") == "0660"
    assert one(sock, "Socket.SocketGroup") == "signd"
    assert one(svc, "Service.Type") == "notify"
    assert one(svc, "Service.NotifyAccess") == "main"
    assert one(svc, "Service.Restart") == "on-failure"
    assert one(svc, "Service.User") == "signd"
    assert one(svc, "Service.StateDirectory") == "signd"
    assert one(svc, "Service.WatchdogSec")
    assert one(svc, "Service.LimitCORE") == "0"  # the PIN never lands in a core dump
    assert one(svc, "Unit.Requires") == "signd.socket"
    # The credential the unit loads is the one the example config names.
    credential, _, source = one(svc, "Service.LoadCredential").partition(":")
    assert source == "/etc/signd/user.pin"
    example = load_config(ROOT / "examples" / "signd.toml")
    assert example.token.pin_credential == credential
    # ExecStart runs `signd serve` on the config in ConfigurationDirectory=.
    argv = one(svc, "Service.ExecStart").split()
    assert argv[1:] == ["serve", "--config", "/etc/signd/signd.toml"]
    assert one(svc, "Service.ConfigurationDirectory") == "signd"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` is clean on the units.

    verify checks that ExecStart's program exists and is executable.  The unit
    names /opt/signd/bin/signd, where the README installs it, which a test
    machine does not have; so the units are verified as copies whose only
    change is ExecStart pointing at this virtualenv's signd.  Verifying the
    files as they are finds nothing else than that missing program.
    """
    analyze = tool("systemd-analyze")
    signd = shutil.which("signd", path=os.path.dirname(sys.executable))
    assert signd is not None, "signd is not installed in this virtualenv"
    exec_start = one(unit_settings(SERVICE), "Service.ExecStart")
    program = exec_start.split()[0]
    for unit in (SERVICE, SOCKET):
        text = unit.read_text()
        if unit == SERVICE:
            copy = text.replace(f"ExecStart={program} ", f"ExecStart={signd} ")
            changed = set(copy.splitlines()) ^ set(text.splitlines())
            assert len(changed) == 2, changed  # the one ExecStart= line, old and new
            text = copy
        (tmp_path / unit.name).write_text(text)
    copies = [str(tmp_path / SERVICE.name), str(tmp_path / SOCKET.name)]
    out = subprocess.run(
        [analyze, "verify", *copies], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout + out.stderr == "", out.stdout + out.stderr

    if not os.path.exists(program):
        out = subprocess.run(
            [analyze, "verify", str(SERVICE), str(SOCKET)],
            capture_output=True,
            text=True,
            check=False,
            cwd=tmp_path,
        )
        problems = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
        assert problems == [
            f"signd.service: Command {program} is not executable: No such file or directory"
        ], problems


def test_security_exposure() -> None:
    analyze = tool("systemd-analyze")
    out = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(SERVICE)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"Overall exposure level for signd\.service: (\d+\.\d+)", out.stdout)
    assert m is not None, out.stdout + out.stderr
    exposure = float(m.group(1))
    assert exposure <= MAX_EXPOSURE, out.stdout


def test_sysusers_and_tmpfiles(tmp_path: Path) -> None:
    """The snippets, applied to a scratch root: the user, then its directories."""
    sysusers, tmpfiles = tool("systemd-sysusers"), tool("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    users_conf = conf_dir / "signd.conf"
    shutil.copy(UNITS / "signd.sysusers.conf", users_conf)
    out = subprocess.run(
        [sysusers, f"--root={root}", str(users_conf)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    users = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    assert "signd" in users, users
    _, _, uid, gid, _, home, shell = users["signd"]
    assert 0 < int(uid) < 1000
    assert home == "/var/lib/signd"
    assert shell.endswith("nologin")
    groups = {
        line.split(":")[0]: line.split(":")[2]
        for line in (root / "etc/group").read_text().splitlines()
    }
    assert groups["signd"] == gid

    files_conf = conf_dir / "signd.tmpfiles.conf"
    shutil.copy(UNITS / "signd.tmpfiles.conf", files_conf)
    out = subprocess.run(
        [tmpfiles, "--create", f"--root={root}", str(files_conf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    for path, mode in (("run/signd", 0o750), ("var/lib/signd", 0o700)):
        st = os.lstat(root / path)
        assert stat.S_ISDIR(st.st_mode), path
        assert stat.S_IMODE(st.st_mode) == mode, path
        assert (st.st_uid, st.st_gid) == (int(uid), int(gid)), path


# --------------------------------------------------------------------------
# the notification protocol


class NotifySocket:
    """What systemd listens on: a Unix datagram socket, by path or abstract name.

    A thread reads it all the time, as systemd does: a datagram socket holds
    only a few unread messages (``net.unix.max_dgram_qlen``), and signd drops a
    notification rather than wait for a reader.
    """

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self.sock.bind(bind_to)
        self.address = address
        #: every message taken by ``receive``, in order
        self.received: list[dict[str, str]] = []
        self._queue: queue.Queue[dict[str, str]] = queue.Queue()
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        self.sock.settimeout(0.05)
        while not self._closing.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self._queue.put(dict(line.split("=", 1) for line in data.decode().split("\n") if line))

    def close(self) -> None:
        self._closing.set()
        self._reader.join()
        self.sock.close()

    def receive(self, timeout: float) -> dict[str, str] | None:
        """The next message as its fields, or None after ``timeout`` seconds."""
        try:
            fields = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        self.received.append(fields)
        return fields

    def rest(self) -> list[dict[str, str]]:
        """Once the sender is gone: every message not taken yet."""
        self._closing.set()
        self._reader.join()
        self.sock.setblocking(False)
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            self._queue.put(dict(line.split("=", 1) for line in data.decode().split("\n") if line))
        rest = []
        while (fields := self.receive(0.0)) is not None:
            rest.append(fields)
        return rest

    def wait_for(self, key: str, timeout: float = 30.0) -> dict[str, str]:
        """Read until a message carries ``key``; return that message."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            fields = self.receive(left)
            if fields is not None and key in fields:
                return fields
        pytest.fail(f"no {key} within {timeout}s; received {self.received}")


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(str(tmp_path / "notify.sock"))
    yield s
    s.close()


@pytest.fixture
def abstract_notify_socket() -> Iterator[NotifySocket]:
    s = NotifySocket(f"@signd-test-notify-{uuid.uuid4().hex}")
    yield s
    s.close()


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = f.read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in items if b"=" in item)


def test_ready_watchdog_stopping(
    make_daemon: Callable[..., Daemon], notify_socket: NotifySocket
) -> None:
    """READY=1 once the socket answers, WATCHDOG=1 pings, STOPPING=1 on SIGTERM."""
    d = make_daemon(
        start=False,
        env_extra={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000"},
    )
    d.start(wait=False)
    assert d.proc is not None
    first = notify_socket.wait_for("READY")
    # READY=1 is the first message, with a status line, and it comes only when
    # the socket is there and answers ready.
    assert notify_socket.received == [first]
    assert first["READY"] == "1"
    assert first["STATUS"].startswith("Serving ")
    with d.client(timeout=10.0) as c:
        assert c.health().ready
    d.check_signs(d.new_ec_key("systemd"))

    for _ in range(2):
        assert notify_socket.wait_for("WATCHDOG") == {"WATCHDOG": "1"}

    # The token workers did not inherit the notification variables.
    workers = [
        p for p in children(d.proc.pid) if "signd.token" in Path(f"/proc/{p}/cmdline").read_text()
    ]
    assert workers, "no token worker found"
    for pid in workers:
        env = environ_of(pid)
        assert "SOFTHSM2_CONF" in env
        assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & env.keys(), env.keys()

    d.proc.send_signal(signal.SIGTERM)
    stopping = notify_socket.wait_for("STOPPING")
    assert stopping["STOPPING"] == "1"
    assert "SIGTERM" in stopping["STATUS"]
    assert d.proc.wait(20) == 0, d.logs()
    # Nothing but watchdog pings between READY and STOPPING, and nothing after it.
    notify_socket.rest()
    after_ready = notify_socket.received[1:]
    assert after_ready[-1] == stopping, after_ready
    assert all(m == {"WATCHDOG": "1"} for m in after_ready[:-1]), after_ready


def test_socket_activation_with_notify(
    make_daemon: Callable[..., Daemon], abstract_notify_socket: NotifySocket
) -> None:
    """As under signd.socket: systemd passes the socket and listens for READY=1."""
    activate = tool("systemd-socket-activate")
    notify = abstract_notify_socket
    d = make_daemon(start=False, env_extra={"NOTIFY_SOCKET": notify.address})
    argv = [activate, "-l", d.socket, "-E", "SOFTHSM2_CONF", "-E", "NOTIFY_SOCKET", *d.command()]
    d.start(wait=False, argv=argv)
    assert d.proc is not None
    proc = d.proc

    def listening() -> bool:
        assert proc.poll() is None, d.logs()
        return os.path.exists(d.socket)

    wait_until(listening, "systemd-socket-activate to listen")
    assert notify.receive(0.0) is None  # signd starts at the first connection
    # The first connection starts signd, which serves on the socket it was passed.
    key = d.new_ec_key("systemd")
    ready = notify.wait_for("READY")
    assert notify.received == [ready]
    d.check_signs(key)
    d.proc.send_signal(signal.SIGTERM)
    assert notify.wait_for("STOPPING")["STOPPING"] == "1"
    assert d.proc.wait(20) == 0, d.logs()
    # Without WATCHDOG_USEC there are no pings.
    notify.rest()
    assert not [m for m in notify.received if "WATCHDOG" in m], notify.received


@pytest.mark.parametrize(
    ("environ", "address", "interval"),
    [
        pytest.param({}, None, None, id="no-socket"),
        pytest.param({"WATCHDOG_USEC": "1000000"}, None, None, id="watchdog-without-socket"),
        pytest.param({"NOTIFY_SOCKET": "/run/x"}, "/run/x", None, id="path"),
        pytest.param({"NOTIFY_SOCKET": "@x/y"}, "\0x/y", None, id="abstract"),
        pytest.param({"NOTIFY_SOCKET": "run/x"}, None, None, id="relative-path"),
        pytest.param({"NOTIFY_SOCKET": "vsock:2:1"}, None, None, id="vsock"),
        pytest.param(
            {"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "30000000"}, "/n", 15.0, id="watchdog"
        ),
        pytest.param(
            {"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "OWN"},
            "/n",
            15.0,
            id="watchdog-own-pid",
        ),
        pytest.param(
            {"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"},
            "/n",
            None,
            id="watchdog-other-pid",
        ),
        pytest.param({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "0"}, "/n", None, id="usec-0"),
        pytest.param({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "x"}, "/n", None, id="usec-bad"),
    ],
)
def test_notifier_from_environ(
    environ: dict[str, str], address: str | None, interval: float | None
) -> None:
    env = {k: str(os.getpid()) if v == "OWN" else v for k, v in environ.items()}
    env["OTHER"] = "kept"
    n = Notifier.from_environ(env)
    assert (n.address, n.watchdog_interval) == (address, interval)
    assert n.enabled == (address is not None)
    assert env == {"OTHER": "kept"}, "the notification variables must be removed"


def test_notify_failure_is_not_fatal(tmp_path: Path) -> None:
    """Nobody listening: the notification is lost, and nothing is raised."""
    n = Notifier(str(tmp_path / "nobody.sock"))
    assert not n.ready("Serving")
    assert not Notifier().ready("Serving")


# --------------------------------------------------------------------------
# the sandbox


#: Loads seccomp filters like those systemd makes from the unit, then execs argv.
#: Usage: python sandbox.py SPEC.json -- PROGRAM ARGS...
SANDBOX = r"""
import ctypes, ctypes.util, errno, json, mmap, os, socket, sys

spec = json.load(open(sys.argv[1]))
argv = sys.argv[3:]
lib = ctypes.CDLL(ctypes.util.find_library("seccomp"), use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]

class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

lib.seccomp_rule_add_array.argtypes = [
    ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(Cmp)]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ALLOW = 0x7FFF0000
def ERRNO(e): return 0x00050000 | e
NE, LT, LE, EQ, GE, GT, MASKED_EQ = range(1, 8)

def rule(ctx, action, name, *cmps):
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        return  # not a system call of this architecture
    arr = (Cmp * max(1, len(cmps)))(*[Cmp(*c) for c in cmps])
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
    if rc != 0:
        sys.exit(f"sandbox: rule {name}: {rc}")

def load(ctx):
    rc = lib.seccomp_load(ctx)
    if rc != 0:
        sys.exit(f"sandbox: load: {rc}")

# MemoryDenyWriteExecute=yes, as systemd's seccomp_memory_deny_write_execute()
if spec["mdwe"]:
    W, X = mmap.PROT_WRITE, mmap.PROT_EXEC
    ctx = lib.seccomp_init(ALLOW)
    rule(ctx, ERRNO(errno.EPERM), "mmap", (2, MASKED_EQ, W | X, W | X))
    rule(ctx, ERRNO(errno.EPERM), "mprotect", (2, MASKED_EQ, X, X))
    rule(ctx, ERRNO(errno.EPERM), "pkey_mprotect", (2, MASKED_EQ, X, X))
    rule(ctx, ERRNO(errno.EPERM), "shmat", (2, MASKED_EQ, 0o100000, 0o100000))
    load(ctx)
# RestrictAddressFamilies= (an allow list)
families = sorted(spec["families"])
ctx = lib.seccomp_init(ALLOW)
rule(ctx, ERRNO(errno.EAFNOSUPPORT), "socket", (0, GT, families[-1], 0))
for family in range(families[-1]):
    if family not in families:
        rule(ctx, ERRNO(errno.EAFNOSUPPORT), "socket", (0, EQ, family, 0))
load(ctx)

# SystemCallFilter= (an allow list) with SystemCallErrorNumber=EPERM; last, as
# it does not allow seccomp() itself
ctx = lib.seccomp_init(ERRNO(errno.EPERM))
for name in spec["allow"]:
    rule(ctx, ALLOW, name)
load(ctx)

# The filters are in force:
def refused(call):
    try:
        call()
    except OSError as exc:
        return exc.errno in (errno.EPERM, errno.EAFNOSUPPORT)
    return False
checks = {
    "W+X memory": lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC),
    "netlink socket": lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW),
    "sched_setaffinity": lambda: os.sched_setaffinity(0, os.sched_getaffinity(0)),
}
failed = [what for what, call in checks.items() if not refused(call)]
if failed:
    sys.exit(f"sandbox: not refused: {failed}")
os.execv(argv[0], argv)
"""


def syscall_group(name: str, cache: dict[str, set[str]]) -> set[str]:
    """The system calls of a ``@group``, as ``systemd-analyze syscall-filter`` lists them."""
    if name in cache:
        return cache[name]
    out = subprocess.run(
        [tool("systemd-analyze"), "syscall-filter", "--no-pager", name],
        capture_output=True,
        text=True,
        check=True,
    )
    calls: set[str] = set()
    for line in out.stdout.splitlines()[1:]:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        calls |= syscall_group(entry, cache) if entry.startswith("@") else {entry}
    cache[name] = calls
    return calls


def seccomp_spec(settings: dict[str, list[str]]) -> dict[str, object]:
    """The unit's seccomp settings, resolved as systemd resolves them."""
    cache: dict[str, set[str]] = {}

    def calls(words: list[str]) -> set[str]:
        out: set[str] = set()
        for w in words:
            out |= syscall_group(w, cache) if w.startswith("@") else {w}
        return out

    lines = settings["Service.SystemCallFilter"]
    assert not lines[0].startswith("~"), "the first SystemCallFilter= must be an allow list"
    allow = calls(lines[0].split())
    for line in lines[1:]:
        assert line.startswith("~"), line
        allow -= calls(line[1:].split())
    assert one(settings, "Service.SystemCallErrorNumber") == "EPERM"
    assert one(settings, "Service.SystemCallArchitectures") == "native"
    assert one(settings, "Service.NoNewPrivileges") == "yes"
    assert one(settings, "Service.CapabilityBoundingSet") == ""
    families = [
        getattr(socket, f) for f in one(settings, "Service.RestrictAddressFamilies").split()
    ]
    return {
        "allow": sorted(allow),
        "mdwe": one(settings, "Service.MemoryDenyWriteExecute") == "yes",
        "families": families,
    }


#: Mounts as ProtectSystem=strict and ProcSubset=pid do (in a private mount
#: namespace): /proc shows processes only, and the root file system is
#: read-only but for the directories given.  Usage: sh -c MOUNTS sh DIR... -- PROGRAM ARGS...
MOUNTS = r"""
mount -t proc -o subset=pid proc /proc
while [ "$1" != -- ]; do mount --bind "$1" "$1"; shift; done
shift
mount -o remount,bind,ro /
test ! -e /proc/stat || { echo "sandbox: /proc/stat is visible"; exit 3; }
! touch /var/tmp/signd-sandbox-probe 2>/dev/null || { echo "sandbox: / is writable"; exit 3; }
exec "$@"
"""


def test_signd_works_in_the_units_sandbox(
    make_daemon: Callable[..., Daemon], notify_socket: NotifySocket, tmp_path: Path
) -> None:
    """signd starts, signs, serves metrics, pings and stops inside the unit's
    seccomp filters, without capabilities, and with /proc and the file system
    restricted as the unit restricts them."""
    if ctypes.util.find_library("seccomp") is None:
        pytest.fail("libseccomp is missing: run the README's test command (libseccomp2)")
    setpriv, unshare = tool("setpriv"), tool("unshare")
    settings = unit_settings(SERVICE)
    assert one(settings, "Service.ProtectSystem") == "strict"
    assert one(settings, "Service.ProcSubset") == "pid"
    spec = seccomp_spec(settings)
    assert spec["mdwe"]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "sandbox.py").write_text(SANDBOX)
    d = make_daemon(
        start=False,
        env_extra={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000"},
    )
    # Writable, as StateDirectory= (the token) and the socket's directory are.
    writable = [str(d.token.state_dir), str(d.workdir)]
    argv = [
        *[unshare, "--mount", "--propagation", "private", "--"],
        *["sh", "-euc", MOUNTS, "sh", *writable, "--"],
        *[setpriv, "--bounding-set=-all", "--inh-caps=-all", "--"],
        *[sys.executable, str(tmp_path / "sandbox.py"), str(tmp_path / "spec.json"), "--"],
        *d.command(),
    ]
    d.start(argv=argv)
    assert d.proc is not None
    status = Path(f"/proc/{d.proc.pid}/status").read_text()
    assert re.search(r"^Seccomp:\s+2$", status, re.M), status
    assert re.search(r"^CapEff:\s+0+$", status, re.M), status
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
    assert os.readlink(f"/proc/{d.proc.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    assert notify_socket.wait_for("READY")["READY"] == "1"
    key = d.new_ec_key("systemd")  # made by the token writer process, under the same restrictions
    for _ in range(3):
        d.check_signs(key)
    with urllib.request.urlopen(d.metrics_url(), timeout=10) as resp:
        assert resp.status == 200
        assert resp.read()
    assert notify_socket.wait_for("WATCHDOG") == {"WATCHDOG": "1"}
    assert d.stop() == 0, d.logs()
    assert "sandbox:" not in d.logs()
