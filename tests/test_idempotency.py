"""``create_key`` and ``rotate`` with an idempotency key: a repeat is answered, not done again.

Against real daemons on real SoftHSM tokens.  The idempotency key is stored
with the version it made, in the key's record on the token, in the same
compare-and-swap write; so a repeat is recognised by the same process, by a
restarted one (the client's retry after the daemon was restarted), by one
killed in the middle of the rotation, and by a second daemon on the token.
Answers are lost on purpose (a raw connection closed before the answer; a
relay that drops the first answer) to show that the client library's own
retries, with the key it makes up, never rotate twice.  Every signature is
checked with ``cryptography`` against the PEM the daemon reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signd.keys import algorithms
from signd.keys.store import (
    DESTROYED,
    DISABLED,
    ENABLED,
    KeyRecord,
    KeySettings,
    VersionRecord,
    request_digest,
)
from signd_client import AsyncClient, Client, KeyInfo
from signd_client._calls import Call
from signd_client._common import with_idempotency_key
from signd_client.errors import (
    ErrorCode,
    InvalidArgument,
    KeyExists,
    SigndError,
    WireError,
)
from signd_client.protocol import (
    IDEMPOTENCY_KEY_RE,
    CreateKeyArgs,
    FrameDecoder,
    RotateArgs,
    decode_response,
)
from support import kill_tree

if TYPE_CHECKING:
    from conftest import Daemon, TokenEnv  # the root conftest.py

ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())

# --------------------------------------------------------------------------
# helpers


def frame(op: str, args: dict[str, Any], rid: int = 1) -> bytes:
    """A request frame built by hand, so any value can be sent."""
    body = msgpack.packb({"v": 1, "id": rid, "op": op, "args": args}, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def read_frame(sock: socket.socket) -> bytes:
    """One whole frame (length prefix included); b"" if the peer closed first."""
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
        data = sock.recv(65536)
        if not data:
            return b""
        buf += data
    end = 4 + struct.unpack(">I", buf[:4])[0]
    assert len(buf) == end, "one request at a time: one answer"
    return buf


def raw_call(d: Daemon, op: str, args: dict[str, Any]) -> KeyInfo | WireError:
    """Send one request on a raw connection; its KeyInfo or its error."""
    with d.connect_raw() as s:
        s.sendall(frame(op, args))
        answer = read_frame(s)
    decoder = FrameDecoder(1 << 26)
    decoder.receive_data(answer)
    (body,) = decoder.frames()
    resp = decode_response(body)
    if resp.error is not None:
        assert isinstance(resp.error, WireError)
        return resp.error
    return KeyInfo.from_wire(resp.result, strict=False)


def check_signs(c: Client, name: str, info: KeyInfo, version: int) -> None:
    """``version`` signs, as the PEM in ``info`` (from a possibly replayed answer) says."""
    pem = next(v.public_key_pem for v in info.versions if v.version == version)
    public = serialization.load_pem_public_key(pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    msg = f"signed by {name} v{version} at {time.monotonic()}".encode()
    res = c.sign(name, msg, version=version)
    assert res.version == version
    public.verify(res.signature, msg, ECDSA_SHA256)


def numbers(info: KeyInfo) -> list[int]:
    return [v.version for v in info.versions]


def on_token(make_daemon: Callable[..., Daemon], token: TokenEnv, config: str = "") -> Daemon:
    d = make_daemon(config, start=False)
    d.token = token
    d.start()
    return d


LIST_PRIVATE_KEYS = """
import json, sys, pkcs11
from pkcs11 import Attribute, ObjectClass
module, label, pin_file, prefix = sys.argv[1:]
with open(pin_file) as f:
    pin = f.read().rstrip("\\n")
s = pkcs11.lib(module).get_token(token_label=label).open(user_pin=pin)
objs = s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
print(json.dumps(sorted(o[Attribute.LABEL] for o in objs if o[Attribute.LABEL].startswith(prefix))))
"""


def private_key_labels(token: TokenEnv, prefix: str) -> list[str]:
    """The private keys on the token, read by a process that is not signd."""
    out = subprocess.run(
        [
            *(sys.executable, "-c", LIST_PRIVATE_KEYS),
            *(token.module, token.label, str(token.pin_file), prefix),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=token.env(),
    )
    assert out.returncode == 0, out.stderr
    labels = json.loads(out.stdout)
    assert isinstance(labels, list)
    return labels


class DropFirstAnswer:
    """A relay in front of the daemon's socket that loses one answer.

    It passes each request of a connection on to the daemon and each answer
    back, except the first answer of all: that one it reads from the daemon
    and throws away, then closes the client's connection, as a daemon
    restarted at the wrong moment would.  ``requests`` is every request
    body it passed on, decoded, in order.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.dir = tempfile.mkdtemp(prefix="signd-relay-")  # short: sun_path is 108 bytes
        self.path = os.path.join(self.dir, "relay.sock")
        self.requests: list[dict[str, Any]] = []
        self.dropped = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(8)
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            t = threading.Thread(target=self._relay, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.settimeout(60)
        client.settimeout(60)
        try:
            upstream.connect(self.target)
            while True:
                request = read_frame(client)
                if not request:
                    return
                with self._lock:
                    self.requests.append(msgpack.unpackb(request[4:], raw=False))
                upstream.sendall(request)
                answer = read_frame(upstream)
                assert answer, "the daemon closed the connection"
                with self._lock:
                    drop = not self.dropped.is_set()
                    self.dropped.set()
                if drop:
                    return  # the answer is lost; the client sees its connection close
                client.sendall(answer)
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        # close() alone does not wake a thread blocked in accept(); shutdown() does.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._accept.join(10)
        for t in self._threads:
            t.join(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def dropping_first_answer(d: Daemon) -> Iterator[DropFirstAnswer]:
    relay = DropFirstAnswer(d.socket)
    try:
        yield relay
    finally:
        relay.close()


# --------------------------------------------------------------------------
# rotate


def test_rotate_repeated_with_its_key_rotates_once(signd: Daemon, key_name: str) -> None:
    with signd.client() as c:
        c.create_key(key_name, "ec-p256")
        first = c.rotate(key_name, idempotency_key="rotate-1")
        assert first.current_version == first.created_version == 2
        again = c.rotate(key_name, idempotency_key="rotate-1")
        assert again == first  # the same answer, field for field
        assert numbers(c.key_info(key_name)) == [1, 2]

        # Another key rotates again; the first one, repeated, still names version 2.
        other = c.rotate(key_name, idempotency_key="rotate-2")
        assert other.current_version == other.created_version == 3
        late = c.rotate(key_name, idempotency_key="rotate-1")
        assert (late.created_version, late.current_version) == (2, 3)
        assert numbers(late) == [1, 2, 3]
        assert late.versions[1] == c.key_info(key_name).versions[1]
        # The version the replay names is the real one: its PEM verifies what it signs
        # (once min_sign_version lets an older version sign).
        c.update_key(key_name, min_sign_version=2)
        check_signs(c, key_name, late, 2)
        check_signs(c, key_name, other, 3)


def test_rotate_without_a_key_is_not_idempotent(signd: Daemon, key_name: str) -> None:
    """On the wire the key is optional, and without it every rotate rotates."""
    with signd.client() as c:
        c.create_key(key_name, "ec-p256")
    for expected in (2, 3):
        info = raw_call(signd, "rotate", {"key": key_name})
        assert isinstance(info, KeyInfo)
        assert info.current_version == info.created_version == expected


def test_the_key_is_per_key(signd: Daemon, key_name: str) -> None:
    """One idempotency key on two keys: two rotations, one each."""
    a, b = key_name + "-a", key_name + "-b"
    with signd.client() as c:
        for name in (a, b):
            c.create_key(name, "ec-p256")
        assert c.rotate(a, idempotency_key="shared").created_version == 2
        assert c.rotate(b, idempotency_key="shared").created_version == 2
        assert numbers(c.key_info(a)) == numbers(c.key_info(b)) == [1, 2]


def test_replay_answers_even_after_the_version_changed_state(signd: Daemon, key_name: str) -> None:
    """The key is kept as long as the version: disabled or destroyed, a repeat
    still does not rotate, and answers the key as it is now."""
    with signd.client() as c:
        c.create_key(key_name, "ec-p256", deletion_allowed=True)
        c.rotate(key_name, idempotency_key="k")
        c.disable(key_name, 2)
        info = c.rotate(key_name, idempotency_key="k")
        assert (info.created_version, numbers(info), info.versions[1].state) == (
            2,
            [1, 2],
            "disabled",
        )
        c.destroy(key_name, 2)
        info = c.rotate(key_name, idempotency_key="k")
        assert (info.created_version, numbers(info), info.versions[1].state) == (
            2,
            [1, 2],
            "destroyed",
        )


def test_lost_answer_on_a_raw_connection_then_retry(signd: Daemon, key_name: str) -> None:
    """The first rotate is done but its answer never read; the retry is answered."""
    with signd.client() as c:
        c.create_key(key_name, "ec-p256")
        with signd.connect_raw() as s:
            s.sendall(frame("rotate", {"key": key_name, "idempotency_key": "lost-1"}))
            deadline = time.monotonic() + 20
            while c.key_info(key_name).current_version < 2:  # done, answer unread
                assert time.monotonic() < deadline, "the rotation never happened"
                time.sleep(0.02)
        info = c.rotate(key_name, idempotency_key="lost-1")
        assert (info.created_version, numbers(info)) == (2, [1, 2])

        # Closed before the daemon could even answer: done once, whichever comes first.
        with signd.connect_raw() as s:
            s.sendall(frame("rotate", {"key": key_name, "idempotency_key": "lost-2"}))
        info = c.rotate(key_name, idempotency_key="lost-2")
        assert (info.created_version, numbers(info)) == (3, [1, 2, 3])
        check_signs(c, key_name, info, 3)


@pytest.mark.parametrize("op", ["rotate", "create_key"])
def test_client_retry_after_a_lost_answer_uses_the_same_key(
    signd: Daemon, key_name: str, op: str
) -> None:
    """No key given: the client makes one up, and sends the same one again."""
    with signd.client() as c:
        if op == "rotate":
            c.create_key(key_name, "ec-p256")
        with dropping_first_answer(signd) as relay, Client(relay.path, retries=3) as rc:
            info = rc.rotate(key_name) if op == "rotate" else rc.create_key(key_name, "ec-p256")
            sent = [r for r in relay.requests if r["op"] == op]
            assert relay.dropped.is_set()
        made = 2 if op == "rotate" else 1
        assert (info.created_version, info.current_version) == (made, made)
        assert numbers(c.key_info(key_name)) == list(range(1, made + 1))
        assert len(sent) == 2  # sent, answer lost, sent again ...
        keys = {r["args"]["idempotency_key"] for r in sent}
        assert len(keys) == 1  # ... with the same key,
        (key,) = keys
        assert IDEMPOTENCY_KEY_RE.fullmatch(key)
        check_signs(c, key_name, info, made)
        assert c.rotate(key_name).created_version == made + 1  # and a new call gets a new one


async def test_async_client_retry_after_a_lost_answer(signd: Daemon, key_name: str) -> None:
    async with AsyncClient(signd.socket) as c:
        await c.create_key(key_name, "ec-p256")
        with dropping_first_answer(signd) as relay:
            async with AsyncClient(relay.path, retries=3) as rc:
                info = await rc.rotate(key_name)
            sent = [r["args"] for r in relay.requests]
        assert (info.created_version, info.current_version) == (2, 2)
        assert numbers(await c.key_info(key_name)) == [1, 2]
        assert len(sent) == 2
        assert sent[0] == sent[1]
        assert sent[0]["idempotency_key"]


# --------------------------------------------------------------------------
# create_key


def test_create_repeated_with_its_key_is_answered(signd: Daemon, key_name: str) -> None:
    with signd.client() as c:
        first = c.create_key(key_name, "ec-p256", verify_grace=60, idempotency_key="c-1")
        assert first.created_version == 1
        again = c.create_key(key_name, "ec-p256", verify_grace=60, idempotency_key="c-1")
        assert again == first
        # The request is the same when a setting is given as its default value.
        same = c.create_key(
            key_name, "ec-p256", verify_grace=60, auto_rotate_period=0, idempotency_key="c-1"
        )
        assert same == first
        # Without the key, or with another: the name is taken, as always.
        with pytest.raises(KeyExists):
            c.create_key(key_name, "ec-p256", verify_grace=60)
        with pytest.raises(KeyExists):
            c.create_key(key_name, "ec-p256", verify_grace=60, idempotency_key="c-2")
        # After a rotation the repeat still answers; created_version stays 1.
        c.rotate(key_name)
        late = c.create_key(key_name, "ec-p256", verify_grace=60, idempotency_key="c-1")
        assert (late.created_version, late.current_version) == (1, 2)
        check_signs(c, key_name, late, 2)


@pytest.mark.parametrize(
    "other",
    [
        pytest.param({"type": "ed25519", "verify_grace": 60}, id="type"),
        pytest.param(
            {"type": "ec-p256", "verify_grace": 60, "deletion_allowed": True}, id="setting"
        ),
        pytest.param({"type": "ec-p256", "verify_grace": 61}, id="setting-value"),
    ],
)
def test_create_key_reused_with_other_arguments_is_refused(
    signd: Daemon, key_name: str, other: dict[str, Any]
) -> None:
    with signd.client() as c:
        c.create_key(key_name, "ec-p256", verify_grace=60, idempotency_key="c-1")
        with pytest.raises(InvalidArgument, match="different parameters") as info:
            c.create_key(key_name, idempotency_key="c-1", **other)
        assert info.value.code == ErrorCode.INVALID_ARGUMENT
        assert "c-1" in info.value.message
        assert numbers(c.key_info(key_name)) == [1]


def test_a_key_is_for_one_operation(signd: Daemon, key_name: str) -> None:
    """A create's key sent with rotate (and a rotate's with create) is a reuse, not a repeat."""
    with signd.client() as c:
        c.create_key(key_name, "ec-p256", idempotency_key="made-it")
        with pytest.raises(InvalidArgument, match="different parameters"):
            c.rotate(key_name, idempotency_key="made-it")
        c.rotate(key_name, idempotency_key="rotated-it")
        with pytest.raises(InvalidArgument, match="different parameters"):
            c.create_key(key_name, "ec-p256", idempotency_key="rotated-it")
        assert numbers(c.key_info(key_name)) == [1, 2]


def test_signctl_idempotency_key(signd: Daemon, key_name: str) -> None:
    def run(*args: str) -> dict[str, Any]:
        out = signd.signctl("--json", *args)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert isinstance(doc, dict)
        return doc

    create = ("create", key_name, "--type", "ec-p256", "--idempotency-key", "cli-create")
    assert run(*create)["created_version"] == 1
    assert run(*create)["created_version"] == 1  # run again: answered, not key_exists
    first = run("rotate", key_name, "--idempotency-key", "cli-rotate")
    assert run("rotate", key_name, "--idempotency-key", "cli-rotate") == first
    run("rotate", key_name)  # a fresh key of signctl's own: rotates
    out = signd.signctl("rotate", key_name, "--idempotency-key", "cli-rotate")
    assert out.returncode == 0, out.stderr
    assert b"current version 3" in out.stdout
    assert b"this request made version 2" in out.stdout
    bad = signd.signctl("rotate", key_name, "--idempotency-key", "has space")
    assert bad.returncode == 2
    assert b"idempotency_key" in bad.stderr
    with signd.client() as c:
        assert numbers(c.key_info(key_name)) == [1, 2, 3]


# --------------------------------------------------------------------------
# validation


BAD_KEYS = [
    pytest.param("", id="empty"),
    pytest.param("x" * 129, id="too-long"),
    pytest.param("has space", id="space"),
    pytest.param("tab\there", id="control"),
    pytest.param("caf\u00e9", id="non-ascii"),
]


@pytest.mark.parametrize("bad", BAD_KEYS)
@pytest.mark.parametrize("op", ["rotate", "create_key"])
def test_bad_idempotency_key_is_invalid_argument(
    signd: Daemon, key_name: str, op: str, bad: str
) -> None:
    with signd.client() as c:
        c.create_key(key_name, "ec-p256")
    name = key_name if op == "rotate" else key_name + "-new"
    args: dict[str, Any] = {"key": name, "idempotency_key": bad}
    if op == "create_key":
        args["type"] = "ec-p256"
    err = raw_call(signd, op, args)
    assert isinstance(err, InvalidArgument), err
    assert "idempotency_key" in err.message
    # The client refuses it before sending anything.
    with signd.client() as c:
        send: Callable[[], KeyInfo] = (
            (lambda: c.rotate(name, idempotency_key=bad))
            if op == "rotate"
            else (lambda: c.create_key(name, "ec-p256", idempotency_key=bad))
        )
        with pytest.raises(InvalidArgument, match="idempotency_key"):
            send()
    with signd.client() as c:
        assert numbers(c.key_info(key_name)) == [1]  # not rotated
        assert key_name + "-new" not in {k.name for k in c.list_keys().keys}  # not created


def test_longest_and_odd_keys_are_accepted(signd: Daemon, key_name: str) -> None:
    with signd.client() as c:
        c.create_key(key_name, "ec-p256")
        longest = "k" * 127 + "~"
        assert c.rotate(key_name, idempotency_key=longest).created_version == 2
        assert c.rotate(key_name, idempotency_key=longest).created_version == 2
        punct = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
        assert c.rotate(key_name, idempotency_key=punct).created_version == 3
        assert c.rotate(key_name, idempotency_key=punct).created_version == 3


def test_bad_idempotency_key_type_is_rejected(signd: Daemon, key_name: str) -> None:
    err = raw_call(signd, "rotate", {"key": key_name, "idempotency_key": 12345})
    assert isinstance(err, InvalidArgument)
    assert "idempotency_key" in err.message
    # ... and key_info has no such argument.
    err = raw_call(signd, "key_info", {"key": key_name, "idempotency_key": "k"})
    assert isinstance(err, InvalidArgument)
    assert "unknown field 'idempotency_key'" in err.message


# --------------------------------------------------------------------------
# restarts, crashes, two daemons


def test_replay_across_a_restart_does_not_rotate(
    make_daemon: Callable[..., Daemon], own_token: TokenEnv, key_name: str
) -> None:
    d = on_token(make_daemon, own_token)
    with d.client() as c:
        created = c.create_key(key_name, "ec-p256", idempotency_key="create-it")
        rotated = c.rotate(key_name, idempotency_key="rotate-it")
    d.restart()  # a new process: it knows the keys only from the token
    with d.client() as c:
        assert c.rotate(key_name, idempotency_key="rotate-it") == rotated
        replayed = c.create_key(key_name, "ec-p256", idempotency_key="create-it")
        assert replayed == dataclasses.replace(rotated, created_version=1)
        assert numbers(c.key_info(key_name)) == [1, 2]
        check_signs(c, key_name, rotated, 2)
    assert created.created_version == 1
    # Nothing was generated for the repeats: one key pair per version on the token.
    assert private_key_labels(own_token, key_name + "/") == [f"{key_name}/v1", f"{key_name}/v2"]
    assert "idempotent request repeated" in d.logs()


def test_retry_after_a_crash_mid_rotation_rotates_exactly_once(
    make_daemon: Callable[..., Daemon], own_token: TokenEnv, key_name: str
) -> None:
    """kill -9 anywhere in a rotation; the retry (to the new process) with the same
    key either finds the version the killed one recorded, or makes it: one, always."""
    rng = random.Random(6)
    d = on_token(make_daemon, own_token)
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
    for i in range(6):
        before = i + 1
        key = f"crash-{i}"

        def rotate(key: str = key) -> None:
            try:
                with Client(d.socket, retries=0, timeout=30) as c:
                    c.rotate(key_name, idempotency_key=key)
            except SigndError:
                pass  # killed mid-way: either outcome is fine

        t = threading.Thread(target=rotate)
        t.start()
        time.sleep(rng.uniform(0, 0.03))  # the subject: a kill at a random point of the rotation
        kill_tree(d)
        t.join(30)
        d.start()
        with d.client() as c:
            info = c.rotate(key_name, idempotency_key=key)
            assert (info.created_version, numbers(info)) == (
                before + 1,
                list(range(1, before + 2)),
            )
            assert c.rotate(key_name, idempotency_key=key) == info
            check_signs(c, key_name, info, before + 1)


def test_two_daemons_one_key_one_rotation(
    make_daemon: Callable[..., Daemon], own_token: TokenEnv, key_name: str
) -> None:
    """The same rotate sent to two daemons on one token at once: the record's
    compare-and-swap lets one write; the other finds the key there and answers."""
    a = on_token(make_daemon, own_token)
    b = on_token(make_daemon, own_token)
    with a.client() as ca, b.client() as cb:
        ca.create_key(key_name, "rsa-2048")  # slow to generate: a wide window for the race
        cb.key_info(key_name)
        answers: list[KeyInfo | BaseException] = []
        start = threading.Barrier(2)

        def rotate(client: Client) -> None:
            start.wait()
            try:
                answers.append(client.rotate(key_name, idempotency_key="both"))
            except BaseException as exc:
                answers.append(exc)

        threads = [threading.Thread(target=rotate, args=(x,)) for x in (ca, cb)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(isinstance(x, KeyInfo) for x in answers), answers
        assert {x.created_version for x in answers if isinstance(x, KeyInfo)} == {2}
        assert numbers(ca.key_info(key_name)) == numbers(cb.key_info(key_name)) == [1, 2]
    assert private_key_labels(own_token, key_name + "/") == [f"{key_name}/v1", f"{key_name}/v2"]


# --------------------------------------------------------------------------
# the stored record (no daemon)


PEM_ID = bytes.fromhex("0102030405060708")
KT = algorithms.key_type("ec-p256")


def test_record_round_trip_keeps_the_key() -> None:
    digest = request_digest("create_key", type="ec-p256", settings=KeySettings().to_json())
    record = KeyRecord.new("k", KT, 1.5, PEM_ID, KeySettings(), ("create-1", digest))
    rotated = record.rotated(2.5, bytes(8), ("rotate-1", request_digest("rotate")))
    again = KeyRecord.from_bytes("k", rotated.revision, rotated.to_bytes())
    assert again == rotated
    assert [v.idempotency_key for v in again.versions] == ["create-1", "rotate-1"]
    # State changes keep it.
    changed = again.with_state([1], DISABLED).with_state([2], DESTROYED)
    assert [v.idempotency_key for v in changed.versions] == ["create-1", "rotate-1"]
    assert KeyRecord.from_bytes("k", 9, changed.to_bytes()).versions == changed.versions
    # Looked up by key and request.
    assert again.made_by("rotate-1", request_digest("rotate")) == again.versions[1]
    assert again.made_by("never", request_digest("rotate")) is None
    with pytest.raises(InvalidArgument, match="different parameters"):
        again.made_by("create-1", request_digest("rotate"))


OLD_RECORD = (
    b'{"created":1.5,"format":1,"name":"k","settings":{"auto_rotate_period":0.0,'
    b'"deletion_allowed":false,"min_sign_version":0,"min_verify_version":0,'
    b'"verify_grace":0.0},"type":"ec-p256","versions":[{"created":1.5,'
    b'"id":"0102030405060708","state":"enabled","version":1}]}'
)


def test_a_record_without_keys_reads_and_writes_as_before() -> None:
    """Records written before idempotency keys load (no key on any version), and a
    record without keys is written byte for byte as before (older daemons read it)."""
    record = KeyRecord.from_bytes("k", 1, OLD_RECORD)
    assert record.versions == (VersionRecord(1, 1.5, ENABLED, PEM_ID),)
    assert record.versions[0].idempotency_key is None
    assert record.made_by("any", request_digest("rotate")) is None
    assert record.to_bytes() == OLD_RECORD
    assert KeyRecord.new("k", KT, 1.5, PEM_ID).to_bytes() == OLD_RECORD
    # An even older record (states stored as "active") too.
    legacy = OLD_RECORD.replace(b'"state":"enabled"', b'"state":"active"')
    assert KeyRecord.from_bytes("k", 1, legacy).versions == record.versions


def test_a_record_with_a_bad_key_is_unreadable() -> None:
    bad = OLD_RECORD.replace(b'"version":1}', b'"version":1,"idempotency_key":7}')
    with pytest.raises(ValueError, match="unreadable metadata"):
        KeyRecord.from_bytes("k", 1, bad)


# --------------------------------------------------------------------------
# the client's retry rules (no daemon)


def test_client_retries_create_and_rotate_only_with_a_key() -> None:
    rotate: Call[KeyInfo] = Call("rotate", RotateArgs(key="k"), KeyInfo)
    create: Call[KeyInfo] = Call("create_key", CreateKeyArgs(key="k", type="ec-p256"), KeyInfo)
    assert not rotate.idempotent
    assert not create.idempotent
    for call in (rotate, create):
        keyed = with_idempotency_key(call)
        assert keyed.idempotent
        assert keyed.idempotency_key is not None
        assert IDEMPOTENCY_KEY_RE.fullmatch(keyed.idempotency_key)
        assert with_idempotency_key(keyed) is keyed  # a key given is kept
        assert with_idempotency_key(call).idempotency_key != keyed.idempotency_key
    given = Call("rotate", RotateArgs(key="k", idempotency_key="mine"), KeyInfo)
    assert with_idempotency_key(given).idempotency_key == "mine"
    other: Call[KeyInfo] = Call("key_info", RotateArgs(key="k"), KeyInfo)
    assert with_idempotency_key(other) is other
