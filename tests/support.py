"""Helpers shared by the tests (one place)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from signd.access.policy import Policy, Principal
from signd.keys import algorithms
from signd.keys.records import KeyRecord
from signd.keys.store import load_key
from signd.metrics import Metrics
from signd.protocol import Message, Request, decode_response
from signd.service.core import Service
from signd.token.pool import Entry
from signd.token.profiles import PROFILES
from signd.token.session import MetadataBlob, SignJob


class _SigningInMemory:
    """A token pool that holds a test's EC private keys and signs at once,
    for service tests about anything but the token."""

    is_open = True
    pending = 0
    info = None

    def __init__(self) -> None:
        self.private: dict[bytes, ec.EllipticCurvePrivateKey] = {}

    async def load_metadata(self, name: str | None = None) -> list[MetadataBlob]:
        return []

    async def public_keys(self, object_ids: Sequence[bytes]) -> dict[bytes, tuple[bytes, bool]]:
        return {}

    def enqueue(self, source: object, entries: Sequence[Entry]) -> None:
        for entry in entries:
            job = entry.job
            assert isinstance(job, SignJob)
            assert job.hash == "sha256"
            der = self.private[job.object_id].sign(
                job.data, ec.ECDSA(utils.Prehashed(hashes.SHA256()))
            )
            r, s = utils.decode_dss_signature(der)
            entry.callback(True, r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def pump(self) -> None:
        pass


def service_with_keys(policy: Policy, names: Iterable[str], now: float = 1.75e9) -> Service:
    """An in-process service holding an ec-p256 key per name (no token: its
    pool signs in memory)."""
    pool = _SigningInMemory()
    service = Service(
        pool,  # type: ignore[arg-type]
        policy,
        None,
        Metrics(),
        clock=lambda: now,
        profile=PROFILES["softhsm"],
    )
    kt = algorithms.key_type("ec-p256")
    for i, name in enumerate(names):
        private = ec.generate_private_key(ec.SECP256R1())
        spki = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        oid = i.to_bytes(8, "big")
        pool.private[oid] = private
        service.keystore.put(load_key(KeyRecord.new(name, kt, now, oid), {oid: spki}, now))
    service.loaded = True
    return service


def principal(
    uid: int,
    gid: int | None = None,
    *,
    user: str | None = None,
    groups: Iterable[int] = (),
    group_names: Iterable[str] = (),
) -> Principal:
    """A peer as the kernel would record it."""
    gid = uid if gid is None else gid
    return Principal(uid, gid, os.getpid(), user, frozenset({gid, *groups}), frozenset(group_names))


_request_ids = itertools.count(1)


async def call_service(service: Service, who: Principal, op: str, args: Message) -> Any:
    """One request through ``Service.handle`` as ``who``: the result map, or
    the wire error raised.  Slow work (look-ups) runs to its end."""
    answers: list[bytes] = []
    req = Request(next(_request_ids), op, args)
    for work in service.handle(
        [req], lambda _rid, frame, _outcome: answers.append(frame), object(), who
    ):
        await work()
    assert len(answers) == 1
    resp = decode_response(answers[0][4:])
    if resp.error is not None:
        raise resp.error
    return resp.result
