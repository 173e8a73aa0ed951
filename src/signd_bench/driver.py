"""A load-generating client process: ``python -m signd_bench.driver``.

It reads its job as JSON on stdin, connects, prints ``ready``, waits for a
``go`` line, runs ``warmup`` seconds unmeasured and ``seconds`` measured, and
prints one JSON line with what it counted and the seconds it measured.  It
speaks signd's protocol through ``signd_client`` (its codec, or its blocking
``Client``), so the benchmark measures what a real client sees.

A window in which nothing was answered (a ``--quick`` window on a loaded
machine, with 1,000-digest batches in flight) lasts until the first answer,
so every row counts something; the seconds reported are then that longer
window.

Modes:
* ``client``: the blocking ``signd_client.Client``, one call at a time.
* ``pipeline``: ``connections`` sockets, each keeping ``window`` requests in
  flight; responses are matched by id (they may come back in any order).
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time
from array import array
from typing import Any

from signd_client import Client
from signd_client.protocol import (
    FrameDecoder,
    Message,
    SignArgs,
    SignBatchArgs,
    VerifyArgs,
    decode_response,
    encode_request,
)


def _args(job: dict[str, Any]) -> tuple[str, Message]:
    op = job["op"]
    data = bytes.fromhex(job["data"])
    if op == "sign":
        if job.get("digest"):
            fmt = job.get("format")
            return op, SignArgs(key=job["key"], digest=data, hash=job["hash"], format=fmt)
        return op, SignArgs(key=job["key"], message=data)
    if op == "sign_batch":
        if "hash" not in job:  # messages (an HMAC key takes no digest)
            return op, SignBatchArgs(key=job["key"], messages=(data,) * job["batch"])
        return op, SignBatchArgs(key=job["key"], digests=(data,) * job["batch"], hash=job["hash"])
    assert op == "verify"
    sig = bytes.fromhex(job["signature"])
    if job.get("digest"):
        return op, VerifyArgs(key=job["key"], signature=sig, digest=data, hash=job["hash"])
    return op, VerifyArgs(key=job["key"], signature=sig, message=data)


def _per_request(job: dict[str, Any]) -> int:
    return int(job["batch"]) if job["op"] == "sign_batch" else 1


def run_client(job: dict[str, Any]) -> dict[str, Any]:
    op, args = _args(job)
    assert op == "sign"
    assert isinstance(args, SignArgs)
    client = Client(job["socket"], timeout=30)
    client.sign(args.key, args.message, digest=args.digest, hash=args.hash)  # connect
    _barrier()
    lat = array("d")
    count = 0
    start = time.perf_counter()
    measure_from = start + job["warmup"]
    end = measure_from + job["seconds"]
    now = start
    while now < end or count == 0:
        t0 = time.perf_counter()
        client.sign(args.key, args.message, digest=args.digest, hash=args.hash)
        now = time.perf_counter()
        if now > end and count == 0:
            end = now  # nothing was answered in the window: it lasts to this answer
        if now >= measure_from and now <= end:
            count += 1
            if t0 >= measure_from:
                lat.append(now - t0)
    client.close()
    return {"count": count, "seconds": end - measure_from, "latencies": list(lat), "errors": 0}


def run_pipeline(job: dict[str, Any]) -> dict[str, Any]:
    op, args = _args(job)
    window = int(job["window"])
    per = _per_request(job)
    socks: list[socket.socket] = []
    for _ in range(int(job["connections"])):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(job["socket"])
        s.setblocking(False)
        socks.append(s)
    ep = select.epoll()
    state: dict[int, tuple[socket.socket, FrameDecoder, dict[int, float]]] = {}
    for s in socks:
        ep.register(s.fileno(), select.EPOLLIN)
        state[s.fileno()] = (s, FrameDecoder(64 << 20), {})
    next_id = 1
    _barrier()
    lat = array("d")
    count = errors = 0
    error_names: dict[str, int] = {}
    start = time.perf_counter()
    measure_from = start + job["warmup"]
    end = measure_from + job["seconds"]

    def fill(s: socket.socket, sent: dict[int, float], n: int) -> None:
        nonlocal next_id
        now = time.perf_counter()
        frames = []
        for _ in range(n):
            frames.append(encode_request(next_id, op, args))
            sent[next_id] = now
            next_id += 1
        data = b"".join(frames)
        while data:
            try:
                k = s.send(data)
            except BlockingIOError:
                select.select([], [s], [], 1.0)
                continue
            data = data[k:]

    for s, _, sent in state.values():
        fill(s, sent, window)
    now = start

    def waiting_for_sample() -> bool:
        # A request sent inside the window is still owed its latency sample.
        return any(t >= measure_from for _, _, sent in state.values() for t in sent.values())

    # Measure until the window closes, then collect the answers to requests
    # sent inside it: a slow request (a 1,000-digest batch on a loaded machine)
    # still gives its latency instead of leaving the row without samples.
    drain_until = end + 30.0
    while now < end or (now < drain_until and (count == 0 or waiting_for_sample())):
        for fd, _ in ep.poll(0.5):
            s, dec, sent = state[fd]
            try:
                data = s.recv(1 << 20)
            except BlockingIOError:
                continue
            if not data:
                raise SystemExit("signd closed a connection")
            dec.receive_data(data)
            now = time.perf_counter()
            answered = 0
            for body in dec.frames():
                resp = decode_response(body)
                t0 = sent.pop(resp.id) if resp.id is not None else now
                answered += 1
                if resp.error is not None:
                    errors += 1
                    error_names[resp.error.name] = error_names.get(resp.error.name, 0) + 1
                else:
                    stretched = now > end and count == 0
                    if stretched:
                        end = now  # nothing was answered in the window: it lasts to this one
                    # Throughput: every answer that arrives in the window.
                    # Latency: only requests sent in it (no warm-up queueing),
                    # but for a window stretched to its first answer, that one
                    # (on a loaded machine, all in flight were sent before it).
                    if measure_from <= now <= end:
                        count += per
                    if measure_from <= t0 <= end or (stretched and not lat):
                        lat.append(now - t0)
            if answered and now < end:
                fill(s, sent, answered)
        now = time.perf_counter()
    for s in socks:
        s.close()
    # A sample of latencies is plenty for percentiles.
    step = max(1, len(lat) // 200_000)
    return {
        "count": count,
        "seconds": end - measure_from,
        "latencies": list(lat[::step]),
        "errors": errors,
        "error_names": error_names,
    }


def _barrier() -> None:
    print("ready", flush=True)
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise SystemExit("no go")


def main() -> None:
    job = json.loads(sys.stdin.readline())
    result = run_client(job) if job["mode"] == "client" else run_pipeline(job)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
