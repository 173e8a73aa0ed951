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
import random
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

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
        rng = random.Random(seed)
        while not self.stop.is_set():
            try:
                with Client(self.socket, retries=0, timeout=10) as c:
                    while not self.stop.is_set():
                        p = self._next(rng)
                        try:
                            sig = c.sign(self.key, message(p), position=p).signature
                        except PositionUsed:
                            with self.lock:
                                self.refused += 1
                            continue
                        with self.lock:
                            self.signed.append((p, sig))
                            self.progress.notify_all()
            except SigndError:  # the daemon was killed: connect again
                self.stop.wait(0.01)

    def wait_for_more(self, count: int, timeout: float = 20.0) -> None:
        with self.lock:
            assert self.progress.wait_for(lambda: len(self.signed) >= count, timeout), (
                f"no signature within {timeout}s"
            )


def audit_signatures(directory: Path, key: str) -> list[str]:
    """The data_sha256 of every ``sign`` of ``key`` the audit log says succeeded."""
    out = []
    for path in sorted(directory.glob("audit-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if rec.get("op") == "sign" and rec.get("key") == key and rec.get("result") == "ok":
                out.append(rec["data_sha256"])
    return out


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

    signers = Signers(d.socket, "chain")
    signers.start()
    try:
        for _ in range(KILLS):
            signers.wait_for_more(len(signers.signed) + 1)
            threading.Event().wait(rng.uniform(0, 0.02))  # kill anywhere in what follows
            kill_tree(d)
            d.start()
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
    audited = Counter(by_digest[h] for h in audit_signatures(audit, "chain"))
    assert not [p for p, n in audited.items() if n > 1]
    assert set(got) <= set(audited)  # strict: every answer's record was written first
    with d.client() as c:
        mark = c.key_info("chain").mark
    assert mark is not None
    assert mark >= max(got)
    print(
        f"{KILLS} kills: {len(signers.signed)} signatures, {signers.refused} refused, "
        f"{len(audited)} audited, mark {mark}"
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
