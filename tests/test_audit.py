"""The audit log: one hash-chained record per request, checked by `signctl audit verify`."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from signd import errors
from signd.access.policy import Principal
from signd.audit.facts import Outcome, outcome_of
from signd.audit.records import Entry, data_digest, seal_entry, seal_request, who_fields
from signd.protocol import (
    HEADER,
    KeyInfo,
    KeyList,
    PublicKey,
    SignArgs,
    SignBatchArgs,
    SignResult,
    VerifyArgs,
    VerifyResult,
    VersionInfo,
    encode_error,
    encode_request,
    encode_result,
)
from signd_client.audit import AUDIT_KEY, GENESIS, canonical, line_of, verify_files
from signd_client.errors import SigndError, error_from_wire

if TYPE_CHECKING:
    from conftest import Daemon

SIGNCTL = str(Path(sys.executable).parent / "signctl")


def audit_files(d: Daemon) -> list[Path]:
    return sorted((d.workdir / "audit").glob("audit-*.jsonl"))


def all_records(d: Daemon) -> list[dict[str, object]]:
    # Split at newlines only: str.splitlines would also split at U+2028 and the
    # like, which canonical JSON (ensure_ascii=False) leaves unescaped in strings.
    return [json.loads(ln) for f in audit_files(d) for ln in f.read_bytes().split(b"\n") if ln]


def records(d: Daemon) -> list[dict[str, object]]:
    """The records of requests (not the daemon's checkpoints, nor the test's
    own look-up of the audit key in ``stop``)."""
    return [r for r in all_records(d) if "kind" not in r and r.get("key") != AUDIT_KEY]


#: The members that chain a record, not what it says.
CHAIN = ("seq", "prev", "hash", "phase")


def answers(d: Daemon) -> list[dict[str, Any]]:
    """One record per request answered, in the order of the log: the combined
    records and the outcome records; the request records are checked against
    their outcomes and left out.  After a clean stop every request record has
    its outcome."""
    recs = records(d)
    by_seq = {r["seq"]: r for r in recs}
    asked = {r["seq"] for r in recs if r.get("phase") == "request"}
    out: list[dict[str, Any]] = []
    for r in recs:
        phase = r.get("phase")
        if phase == "request":
            assert "result" not in r, r
            continue
        if phase == "outcome":
            request = by_seq[r["request"]]
            assert request.get("phase") == "request", (request, r)
            assert int(str(r["request"])) < int(str(r["seq"]))
            said = {k: v for k, v in request.items() if k not in CHAIN}
            assert said == {k: r[k] for k in said}, (request, r)
            asked.discard(int(str(r["request"])))
        else:
            assert phase is None, r
        out.append(r)
    assert not asked, f"request records without an outcome: {sorted(asked)}"
    return out


#: The audit key's public key (one key on the session's shared token), saved
#: by ``stop`` from a running daemon; verify checks checkpoints with it.
_AUDIT_PEM: list[Path] = []


def save_audit_key(d: Daemon) -> Path:
    # Saved again if the daemon that saved it took its directory along.
    if not _AUDIT_PEM or not _AUDIT_PEM[0].exists():
        with d.client() as c:
            pem = c.public_key(AUDIT_KEY).public_key_pem
        path = d.workdir / "audit-key.pem"
        path.write_text(pem)
        _AUDIT_PEM[:] = [path]
    return _AUDIT_PEM[0]


def stop(d: Daemon) -> None:
    save_audit_key(d)
    assert d.stop() == 0, d.logs()


def verify(*files: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    assert _AUDIT_PEM, "stop() a daemon first: it saves the audit key"
    return subprocess.run(
        [SIGNCTL, "audit", "verify", "--public-key", str(_AUDIT_PEM[0]), *extra, *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "SIGND_SOCKET"},
    )


def test_one_record_per_request_and_no_signed_data(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon('[audit]\ndir = "audit"\n')
    secret = b"confidential payload " + key_name.encode()
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
        sig = c.sign(key_name, secret)
        assert c.verify(key_name, sig.signature, secret).valid
        assert not c.verify(key_name, sig.signature, secret + b"!").valid
        with pytest.raises(SigndError):
            c.sign(key_name + "-none", secret)
    stop(d)
    recs = answers(d)
    assert [r["op"] for r in recs] == ["create_key", "sign", "verify", "verify", "sign"]
    create, sign, ok, bad, missing = recs
    assert (create["result"], create["version"]) == ("ok", 1)
    assert sign["data_sha256"] == hashlib.sha256(secret).hexdigest()
    assert (sign["key"], sign["version"], sign["result"], sign["code"]) == (key_name, 1, "ok", 0)
    assert (ok["valid"], bad["valid"]) == (True, False)
    assert (missing["result"], missing["code"]) == ("key_not_found", 300)
    for r in recs:
        assert r["uid"] == 0
        assert r["pid"] > 0
        assert isinstance(r["latency_ms"], float)
        assert str(r["exe"]).startswith("/")
    text = "".join(f.read_text() for f in audit_files(d))
    assert secret.decode() not in text
    assert sig.signature.hex() not in text
    assert d.token.pin not in text
    out = verify(*audit_files(d))
    assert out.returncode == 0, out.stdout
    assert "chain intact" in out.stdout  # with 2 checkpoints: start, shutdown
    assert "2 checkpoint(s) verified" in out.stdout


def test_denied_requests_are_audited(make_daemon: Callable[..., Daemon], key_name: str) -> None:
    d = make_daemon('[audit]\ndir = "audit"\n\n[access]\ntrust_root = false\n')
    with d.client() as c, pytest.raises(SigndError, match="permission_denied"):
        c.create_key(key_name, "ec-p256")
    stop(d)
    (rec,) = answers(d)
    assert (rec["op"], rec["key"], rec["result"], rec["code"]) == (
        "create_key",
        key_name,
        "permission_denied",
        400,
    )


@pytest.fixture
def log_of_20(make_daemon: Callable[..., Daemon], key_name: str, tmp_path: Path) -> list[Path]:
    d = make_daemon('[audit]\ndir = "audit"\nmax_bytes = 4096\n')
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
        for i in range(19):
            c.sign(key_name, b"%d" % i)
    stop(d)
    files = audit_files(d)
    assert len(files) > 1, "4 KiB files: the log must have rotated"
    copies = []
    for f in files:
        shutil.copy(f, tmp_path / f.name)
        copies.append(tmp_path / f.name)
    assert verify(*copies).returncode == 0
    return copies


def _lines(files: list[Path]) -> list[tuple[Path, list[str]]]:
    return [(f, f.read_text().splitlines(keepends=True)) for f in files]


def test_edited_record_is_detected(log_of_20: list[Path]) -> None:
    f, lines = _lines(log_of_20)[0]
    rec = json.loads(lines[2])
    rec["result"] = "key_not_found"
    lines[2] = json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n"
    f.write_text("".join(lines))
    out = verify(*log_of_20)
    assert out.returncode == 1
    assert "altered" in out.stdout


def test_deleted_record_is_detected(log_of_20: list[Path]) -> None:
    f, lines = _lines(log_of_20)[0]
    del lines[3]
    f.write_text("".join(lines))
    out = verify(*log_of_20)
    assert out.returncode == 1
    assert "jumps" in out.stdout


def test_reordered_records_are_detected(log_of_20: list[Path]) -> None:
    f, lines = _lines(log_of_20)[0]
    lines[1], lines[2] = lines[2], lines[1]
    f.write_text("".join(lines))
    out = verify(*log_of_20)
    assert out.returncode == 1
    assert "chain broken" in out.stdout or "jumps" in out.stdout


def test_inserted_record_is_detected(log_of_20: list[Path]) -> None:
    f, lines = _lines(log_of_20)[0]
    lines.insert(2, lines[1])  # a replayed copy of a real record
    f.write_text("".join(lines))
    assert verify(*log_of_20).returncode == 1


def test_missing_file_in_the_middle_is_detected(log_of_20: list[Path]) -> None:
    if len(log_of_20) < 3:
        pytest.skip("the log rotated into only two files")
    assert verify(log_of_20[0], *log_of_20[2:]).returncode == 1


def test_chain_continues_across_restarts(make_daemon: Callable[..., Daemon], key_name: str) -> None:
    d = make_daemon('[audit]\ndir = "audit"\n')
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
    d.restart()
    with d.client() as c:
        c.sign(key_name, b"after restart")
    stop(d)
    recs = all_records(d)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(recs))
    # (not the audit key's public_key, which stop() asks for when no test saved it yet)
    ops = [r for r in recs if r.get("phase") != "request" and r.get("op") != "public_key"]
    assert [r.get("kind", r.get("op")) for r in ops] == [
        *("checkpoint", "create_key", "checkpoint"),  # start, request, shutdown
        *("checkpoint", "sign", "checkpoint"),
    ]
    assert verify(*audit_files(d)).returncode == 0

    assert verify(*audit_files(d)).returncode == 0


def test_a_client_whose_path_is_not_utf8_is_audited(
    make_daemon: Callable[..., Daemon], key_name: str, tmp_path: Path
) -> None:
    """The kernel names a client's executable in bytes; the record must still be written."""
    d = make_daemon('[audit]\ndir = "audit"\n')
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
    odd_dir = os.fsencode(tmp_path) + b"/bin-\xff"
    os.mkdir(odd_dir)
    exe = odd_dir + b"/python"
    shutil.copy2(os.fsencode(os.path.realpath(sys.executable)), exe)
    code = (
        "import sys; from signd_client import Client\n"
        "with Client(sys.argv[1], timeout=20, retries=0) as c: c.sign(sys.argv[2], b'odd')\n"
    )
    env = {**d.token.env(), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run(
        [exe, "-c", code, d.socket, key_name], env=env, capture_output=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    stop(d)
    rec = answers(d)[-1]
    assert (rec["op"], rec["result"]) == ("sign", "ok")
    assert rec["exe"] == os.fsdecode(exe).encode("utf-8", "surrogateescape").decode(
        "utf-8", "backslashreplace"
    )
    assert verify(*audit_files(d)).returncode == 0


def test_a_request_naming_a_version_is_recorded_with_that_version(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon('[audit]\ndir = "audit"\n')
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
        c.rotate(key_name)
        c.public_key(key_name, version=1)
        with pytest.raises(SigndError):
            c.public_key(key_name, version=99)
        c.key_info(key_name)
        c.sign(key_name, b"no version named")
    stop(d)
    named_1, named_99, info, sign = answers(d)[2:]
    assert (named_1["op"], named_1["result"], named_1["version"]) == ("public_key", "ok", 1)
    # No answer names a version here: the record has the one the request named.
    assert named_99["result"] != "ok"
    assert named_99["version"] == 99
    # Without one in the request, the version is the answer's, as before.
    assert (info["op"], info["version"]) == ("key_info", 2)
    assert (sign["op"], sign["version"]) == ("sign", 2)
    assert verify(*audit_files(d)).returncode == 0


TRICKY_KEYS = [
    "ключ",
    'quote"and\\backslash',
    "tab\tnewline\ncarriage\rnul\x00unit\x1fdel\x7f",
    "line\u2028paragraph\u2029separators",
    "emoji-\U0001f511-bom-\ufeff-private-\ue000-last-\uffff",
]


def test_key_names_that_need_escaping_are_recorded_exactly(
    make_daemon: Callable[..., Daemon],
) -> None:
    d = make_daemon('[audit]\ndir = "audit"\n')
    with d.client() as c:
        for name in TRICKY_KEYS:
            with pytest.raises(SigndError):
                c.sign(name, b"data")
    stop(d)
    assert [r["key"] for r in answers(d)] == TRICKY_KEYS
    assert verify(*audit_files(d)).returncode == 0


def test_an_id_reused_while_in_flight_gets_a_record_per_request(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon('[audit]\ndir = "audit"\n')
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
    messages = [b"first", b"second", b"third"]
    with d.connect_raw() as s:
        s.sendall(b"".join(encode_request(7, "sign", SignArgs(key_name, m)) for m in messages))
        got = b""
        while got.count(b"signature") < len(messages):
            chunk = s.recv(65536)
            assert chunk, "the daemon closed the connection"
            got += chunk
    stop(d)
    signs = [r for r in answers(d) if r["op"] == "sign"]
    assert sorted(str(r["data_sha256"]) for r in signs) == sorted(
        hashlib.sha256(m).hexdigest() for m in messages
    )
    assert verify(*audit_files(d)).returncode == 0


def test_relaxed_mode_writes_the_same_chain(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon('[audit]\ndir = "audit"\nmode = "relaxed"\n')
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
        for i in range(10):
            c.sign(key_name, b"%d" % i)
    stop(d)
    recs = records(d)
    assert [r["op"] for r in recs] == ["create_key"] + ["sign"] * 10
    assert not any("phase" in r for r in recs), "relaxed mode writes one record per request"
    assert verify(*audit_files(d)).returncode == 0


# ---------------------------------------------------------------- the record encoder
#
# The writer builds each record's JSON with a template instead of json.dumps.
# Whatever goes in, the line must be exactly what ``canonical`` makes of the
# record, or its hash would not verify; and the record must say what the old
# dict-and-json.dumps encoder said.

TRICKY_CHARS = '"\\/\b\f\n\r\t\x00\x1f\x7f\x80\xff\u2028\u2029\ud7ff\ue000\ufeff\uffff\U0001f511é'
texts = st.text(
    alphabet=st.one_of(st.sampled_from(TRICKY_CHARS), st.characters(exclude_categories=["Cs"])),
    max_size=24,
)
# What the kernel or passwd may give: any bytes, decoded as Python decodes paths.
os_texts = st.binary(max_size=24).map(os.fsdecode)
ints = st.integers(min_value=0, max_value=(1 << 64) - 1)
maybe_ints = st.none() | ints


def _as_recorded(text: str | None) -> str | None:
    if text is None:
        return None
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


#: Every error the daemon may answer.
WIRE_ERRORS = sorted(
    (
        c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.WireError) and c is not errors.WireError
    ),
    key=lambda c: c.__name__,
)


@st.composite
def entries(draw: st.DrawFn) -> tuple[Entry, dict[str, Any], int]:
    """An entry for the writer, the record it must give, and the clock offset."""
    who = Principal(
        uid=draw(st.integers(0, (1 << 32) - 1)),
        gid=draw(st.integers(0, (1 << 32) - 1)),
        pid=draw(st.integers(1, (1 << 22))),
        user=draw(st.none() | os_texts),
        groups=frozenset(),
        group_names=frozenset(),
        exe=draw(st.none() | os_texts),
    )
    offset = draw(st.integers(0, 4 << 60))
    ended = draw(st.integers(0, 1 << 62))
    expected: dict[str, Any] = {
        "uid": who.uid,
        "gid": who.gid,
        "pid": who.pid,
        "user": _as_recorded(who.user),
        "exe": _as_recorded(who.exe),
    }
    named_version = None
    if draw(st.booleans()):
        started = ended - draw(st.integers(0, 10**12))
        op, key = draw(texts), draw(st.none() | texts)
        digest = draw(st.none() | st.binary(min_size=32, max_size=32))
        items, named_version = draw(maybe_ints), draw(maybe_ints)
        notes = (op, key, digest, items, named_version, started)
        expected.update(op=op, key=key, latency_ms=(ended - started) // 1000 / 1e3)
        if digest is not None:
            expected["data_sha256"] = digest.hex()
        if items is not None:
            expected["items"] = items
    else:
        started, notes = ended, None
        expected.update(op=None, key=None)
    expected["ts"] = (started + offset) // 1000 / 1e6
    version = named_version
    # The answer's outcome as the service passes it (the frame is never decoded).
    outcome: Outcome
    if draw(st.booleans()):
        exc = draw(st.sampled_from(WIRE_ERRORS))("no")
        name, code = exc.name, int(exc.code)
        outcome = Outcome(error=exc, version=draw(maybe_ints))
        answer: dict[str, Any] = {"error": {"code": code, "name": name, "message": draw(texts)}}
        expected.update(result=name, code=code)
    else:
        result: dict[str, Any] = {"signature": draw(st.binary(max_size=8)), "key": draw(texts)}
        for field in ("version", "created_version", "current_version"):
            value = draw(maybe_ints)
            if value is not None:
                result[field] = value
        valid = draw(st.sampled_from([None, True, False]))
        if valid is not None:
            result["valid"] = expected["valid"] = valid
        answer = {"result": result}
        expected.update(result="ok", code=0)
        named = result.get("version", result.get("created_version", result.get("current_version")))
        outcome = Outcome(version=named, valid=valid)
        if version is None:
            version = named
    if version is not None:
        expected["version"] = version
    body = msgpack.packb({"v": 1, "id": draw(maybe_ints), **answer}, use_bin_type=True)
    frame = HEADER.pack(len(body)) + body
    return (who_fields(who), notes, ended, frame, outcome, None, None), expected, offset


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries(), st.integers(1, 1 << 62), st.binary(min_size=32, max_size=32).map(bytes.hex))
def test_records_are_encoded_exactly_as_canonical_encodes_them(
    case: tuple[Entry, dict[str, Any], int], seq: int, prev: str
) -> None:
    entry, expected, offset = case
    line, digest = seal_entry(entry, seq, prev, offset)
    expected.update(seq=seq, prev=prev)
    assert (line, digest) == line_of(canonical(expected))
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert json.loads(line) == {**expected, "hash": digest}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries(),
    st.integers(1, 1 << 62),
    st.binary(min_size=32, max_size=32).map(bytes.hex),
    st.integers(1, 1 << 62),
)
def test_outcome_records_are_encoded_exactly_as_canonical_encodes_them(
    case: tuple[Entry, dict[str, Any], int], seq: int, prev: str, request: int
) -> None:
    """An outcome record: the one-record form, plus its phase and its request's seq."""
    entry, expected, offset = case
    line, digest = seal_entry(entry, seq, prev, offset, request)
    expected.update(seq=seq, prev=prev, phase="outcome", request=request)
    assert (line, digest) == line_of(canonical(expected))
    assert json.loads(line) == {**expected, "hash": digest}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries(), st.integers(1, 1 << 62), st.binary(min_size=32, max_size=32).map(bytes.hex))
def test_request_records_are_encoded_exactly_as_canonical_encodes_them(
    case: tuple[Entry, dict[str, Any], int], seq: int, prev: str
) -> None:
    """A request record: who asked for what, with no outcome."""
    (who, notes, *_), said, offset = case
    assume(notes is not None)
    assert notes is not None
    op, key, digest, items, version, started = notes
    expected: dict[str, Any] = {k: said[k] for k in ("uid", "gid", "pid", "user", "exe")}
    expected.update(op=op, key=key, ts=(started + offset) // 1000 / 1e6, phase="request")
    if digest is not None:
        expected["data_sha256"] = digest.hex()
    for name, value in (("items", items), ("version", version)):
        if value is not None:
            expected[name] = value
    line, hashed = seal_request(who, notes, seq, prev, offset)
    expected.update(seq=seq, prev=prev)
    assert (line, hashed) == line_of(canonical(expected))
    assert line.count(b"\n") == 1
    assert json.loads(line) == {**expected, "hash": hashed}


def test_encoded_records_verify_as_a_chain(tmp_path: Path) -> None:
    """Lines of the template encoder, chained, pass ``verify_files`` (what signctl runs)."""
    who = who_fields(
        # Not UTF-8: bytes decoded by surrogateescape, and a surrogate of no such origin.
        Principal(1000, 1000, 4242, "ünïcode\udcff", frozenset(), frozenset(), "/b\udcfe/\ud800")
    )
    ok = Outcome(version=3, valid=True)
    err = Outcome(error=errors.InvalidArgument("no"))
    lines, prev = [], GENESIS
    for seq, (notes, outcome) in enumerate(
        [(("verify", "k\u2028", b"\xab" * 32, None, None, 10**9), ok), (None, err)] * 3, 1
    ):
        line, prev = seal_entry((who, notes, 2 * 10**9, b"", outcome, None, None), seq, prev, 1)
        lines.append(line)
    path = tmp_path / "audit-000001.jsonl"
    path.write_bytes(b"".join(lines))
    state = verify_files([str(path)])
    assert (state.records, state.problems) == (6, [])


def _outcome_in(frame: bytes) -> Outcome:
    """What an answer's frame says of its outcome, read as the writer read it
    before the service passed outcomes: the reference the service's must match."""
    answer = msgpack.unpackb(frame[HEADER.size :])
    error = answer.get("error")
    if error is not None:
        exc = error_from_wire(error["code"], error["name"], error["message"], None)
        assert isinstance(exc, errors.WireError)
        return Outcome(error=exc)
    value = answer.get("result") or {}
    version = value.get("version", value.get("created_version", value.get("current_version")))
    return Outcome(version=version, valid=value.get("valid"))


V = VersionInfo(version=4, state="active", created=1.0, public_key_pem="pem")
# What the service answers, as results and errors: each gives the same record
# from its ``Outcome`` as from its frame, which is how the writer read it before.
RESULTS = [
    SignResult(key="k", version=3, algorithm="ecdsa-p256-sha256", signature=b"s"),
    VerifyResult(key="k", valid=True, version=2),
    VerifyResult(key="k", valid=False),
    KeyInfo(
        name="k", type="ec-p256", created=1.0, current_version=4, versions=(V,), created_version=2
    ),
    KeyInfo(name="k", type="ec-p256", created=1.0, current_version=4, versions=(V,)),
    PublicKey(name="k", version=5, type="ec-p256", public_key_pem="pem"),
    KeyList(keys=()),
]


@pytest.mark.parametrize(
    ("result", "version"), list(zip(RESULTS, [3, 2, None, 2, 4, 5, None], strict=True))
)
@pytest.mark.parametrize("named", [None, 7])
def test_an_outcome_gives_the_record_its_frame_gave(
    result: Any, version: int | None, named: int | None
) -> None:
    who = who_fields(Principal(1, 2, 3, "u", frozenset(), frozenset(), "/x"))
    notes = ("op", "k", b"\x01" * 32, None, named, 10**9)
    frame = encode_result(9, result)
    told = seal_entry((who, notes, 2 * 10**9, frame, outcome_of(result), None, 9), 5, GENESIS, 7)
    read = seal_entry((who, notes, 2 * 10**9, frame, _outcome_in(frame), None, 9), 5, GENESIS, 7)
    assert told == read
    assert json.loads(told[0]).get("version") == (version if named is None else named)


@pytest.mark.parametrize("error", WIRE_ERRORS, ids=lambda c: c.__name__)
def test_an_error_outcome_gives_the_record_its_frame_gave(error: type[Exception]) -> None:
    exc = error("why")
    assert isinstance(exc, errors.WireError)
    who = who_fields(Principal(1, 2, 3, None, frozenset(), frozenset(), None))
    frame = encode_error(4, exc)
    for notes in (None, ("sign", "k", None, 2, 3, 10**9)):
        told = seal_entry((who, notes, 2 * 10**9, frame, Outcome(error=exc), None, 4), 1, "a", 0)
        read = seal_entry((who, notes, 2 * 10**9, frame, _outcome_in(frame), None, 4), 1, "a", 0)
        assert told == read
        assert json.loads(told[0])["result"] == exc.name


def test_the_writer_does_not_decode_a_frame_it_is_told_the_outcome_of() -> None:
    """With its outcome, an answer's frame is only carried back to its recipient."""
    who = who_fields(Principal(1, 2, 3, "u", frozenset(), frozenset(), "/x"))
    entry: Entry = (who, None, 10**9, b"not a frame", Outcome(version=2), None, None)
    line, _ = seal_entry(entry, 1, GENESIS, 0)
    assert json.loads(line)["version"] == 2


def test_a_message_is_recorded_by_the_sha256_it_is_signed_by() -> None:
    """One message: the record's digest is the SHA-256 digest a SHA-256
    algorithm signs, so the signing path can take it instead of hashing again."""
    message = b"sign me" * 1000
    digest, items = data_digest(SignArgs(key="k", message=message))
    assert (digest, items) == (hashlib.sha256(message).digest(), None)
    assert data_digest(VerifyArgs(key="k", message=message, signature=b"s"))[0] == digest
    batch = data_digest(SignBatchArgs(key="k", messages=(b"a", b"b")))
    inner = hashlib.sha256(hashlib.sha256(b"a").digest() + hashlib.sha256(b"b").digest())
    assert batch == (inner.digest(), 2)
