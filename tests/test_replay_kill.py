"""Replay protection survives ``kill -9``: the whole daemon, killed 50 times
while clients sign positions of a watermarked key, never signs a position
twice; and a nonce accepted before a kill is ``replayed`` after it.

Every signature a client got is checked (against its position's message,
with ``cryptography``), and so is the audit log (strict mode: a record is on
disk before its answer is sent), which records what the token signed even
when the answer was lost to the kill.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signd_client import Client
from signd_client.errors import PositionUsed, SigndError
from signd_client.replay import fresh, signed_payload
from support import kill_tree

if TYPE_CHECKING:
    from conftest import Daemon, TokenEnv

KILLS = 50
CLIENTS = 3


def message(position: int) -> bytes:
    return b"block at height %d" % position


class Signers:
    """Client threads that sign positions of ``key``: mostly the next one, sometimes
    one tried already (a retry, or a second signer racing the first)."""

    def __init__(self, socket: str, key: str) -> None:
        self.socket = socket
        self.key = key
        self.lock = threading.Lock()
        self.frontier = 0  # the highest position any client has asked for
        self.signed: list[tuple[int, bytes]] = []  # every signature a client got
        self.refused = 0
        self.progress = threading.Condition(self.lock)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(seed,)) for seed in range(CLIENTS)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _next(self, rng: random.Random) -> int:
        with self.lock:
            if rng.random() < 0.7 or self.frontier == 0:
                self.frontier += 1
                return self.frontier
            return rng.randint(max(1, self.frontier - 3), self.frontier)

    def _run(self, seed: int) -> None:
        """Sign until stopped.  A request that got no answer (the daemon was
        killed) is sent again, same position, once the daemon is back: as a
        signer that does not know whether it was signed would."""
        rng = random.Random(seed)
        pending: int | None = None
        while not self.stop.is_set():
            try:
                with Client(self.socket, retries=0, timeout=10) as c:
                    while not self.stop.is_set():
                        if pending is None:
                            pending = self._next(rng)
                        p = pending
                        try:
                            sig = c.sign(self.key, message(p), position=p).signature
                        except PositionUsed:
                            pending = None
                            with self.lock:
                                self.refused += 1
                            continue
                        pending = None
                        with self.lock:
                            self.signed.append((p, sig))
                            self.progress.notify_all()
            except SigndError:  # the daemon was killed: connect again, same position
                self.stop.wait(0.01)

    def wait_for_more(self, count: int, timeout: float = 20.0) -> None:
        with self.lock:
            assert self.progress.wait_for(lambda: len(self.signed) >= count, timeout), (
                f"no signature within {timeout}s"
            )


def audit_signatures(directory: Path, key: str) -> tuple[set[str], list[str]]:
    """What the audit log says of the ``sign``s of ``key``: the data_sha256 of
    every one asked (a request record, or a combined one), and of every one
    that succeeded (an outcome ``ok``).

    A request whose answer is not there at once gets a request record (durable
    before the answer leaves) and later an outcome record naming it
    (``request``: its seq), which a kill may leave unwritten: asked, outcome
    unknown (``signd.audit.log``)."""
    asked: dict[int, str] = {}
    signed = []
    for path in sorted(directory.glob("audit-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if rec.get("op") != "sign" or rec.get("key") != key:
                continue
            if "data_sha256" in rec:
                asked[rec["seq"]] = rec["data_sha256"]
            if rec.get("result") == "ok":
                signed.append(rec.get("data_sha256") or asked[rec["request"]])
    return set(asked.values()), signed


@pytest.mark.slow
def test_kill_9_never_signs_a_position_twice(
    make_daemon: Callable[..., Daemon], own_token: TokenEnv, tmp_path: Path
) -> None:
    rng = random.Random(1616)
    audit = tmp_path / "audit"
    extra = (
        f'[state]\ndir = "{tmp_path / "state"}"\n'
        f'[audit]\ndir = "{audit}"\nmode = "strict"\non_mismatch = "continue"\n'
        "[metrics]\nenabled = false\n"
    )
    d = make_daemon(extra, token=own_token, token_extra="workers = 1")
    with d.client() as c:
        info = c.create_key("chain", "ec-p256", watermark=True)
        c.create_key("api", "ec-p256")
    public = serialization.load_pem_public_key(info.versions[0].public_key_pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)

    starts: list[float] = []
    signers = Signers(d.socket, "chain")
    signers.start()
    try:
        for _ in range(KILLS):
            signers.wait_for_more(len(signers.signed) + 1)
            threading.Event().wait(rng.uniform(0, 0.02))  # kill anywhere in what follows
            kill_tree(d)
            t0 = time.monotonic()
            d.start()
            starts.append(time.monotonic() - t0)
        signers.wait_for_more(len(signers.signed) + 1)
    finally:
        signers.join()

    got = Counter(p for p, _ in signers.signed)
    twice = sorted(p for p, n in got.items() if n > 1)
    assert not twice, f"positions signed twice: {twice}"
    for p, sig in signers.signed:
        public.verify(sig, message(p), ec.ECDSA(hashes.SHA256()))
    assert signers.refused > 0  # the clients did try used positions
    # The audit log: what the token signed, answered or not, at most once a position.
    by_digest = {hashlib.sha256(message(p)).hexdigest(): p for p in range(signers.frontier + 1)}
    asked, signed = audit_signatures(audit, "chain")
    audited = Counter(by_digest[h] for h in signed)
    assert not [p for p, n in audited.items() if n > 1]
    # strict: no answer left before the record of its request was on disk
    assert set(got) <= {by_digest[h] for h in asked}
    with d.client() as c:
        mark = c.key_info("chain").mark
    assert mark is not None
    assert mark >= max(got)
    print(
        f"{KILLS} kills: {len(signers.signed)} signatures, {signers.refused} refused, "
        f"{len(audited)} audited, mark {mark}; restarts took {sum(starts):.1f} s"
    )

    # A nonce accepted before a kill is replayed after it.
    ts, nonce = fresh()
    with d.client() as c:
        sig = c.sign("api", signed_payload(b"pay 10", ts, nonce)).signature
        assert c.verify("api", sig, b"pay 10", timestamp=ts, nonce=nonce).status == "valid"
    kill_tree(d)
    d.start()
    with d.client() as c:
        again = c.verify("api", sig, b"pay 10", timestamp=ts, nonce=nonce)
        assert (again.status, again.valid) == ("replayed", False)
    assert d.stop() == 0, d.logs()


README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_replay_examples_run(
    make_daemon: Callable[..., Daemon], own_token: TokenEnv, tmp_path: Path
) -> None:
    """The Python blocks of the README's "Replay protection", as written, against a
    daemon with a state directory (their printed lines are checked too)."""
    text = README.read_text()
    section = text[text.index("## Replay protection") : text.index("## Python client")]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 2
    d = make_daemon(f'[state]\ndir = "{tmp_path / "state"}"\n', token=own_token)
    outputs = []
    for i, block in enumerate(blocks):
        script = tmp_path / f"block{i}.py"
        script.write_text(block)
        out = subprocess.run(
            [sys.executable, str(script)],
            env={**os.environ, "SIGND_SOCKET": d.socket},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        outputs.append(out.stdout)
    assert "mark 103" in outputs[0]
    assert outputs[1].split() == ["valid", "replayed"]
    assert d.stop() == 0, d.logs()
