"""Helpers shared by the tests (one place)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signd.access.policy import Policy, Principal
from signd.keys import algorithms
from signd.keys.store import KeyRecord, load_key
from signd.metrics import Metrics
from signd.protocol import Message, Request, decode_response
from signd.service.core import Service
from signd.token.profiles import PROFILES
from signd.token.session import MetadataBlob


class _IdleToken:
    """A token pool with no keys beyond those a test puts in the keystore,
    for service tests that never reach the token."""

    is_open = True
    pending = 0
    info = None

    async def load_metadata(self, name: str | None = None) -> list[MetadataBlob]:
        return []

    async def public_keys(self, object_ids: Sequence[bytes]) -> dict[bytes, tuple[bytes, bool]]:
        return {}


def service_with_keys(policy: Policy, names: Iterable[str], now: float = 1.75e9) -> Service:
    """An in-process service (no token) holding an ec-p256 key per name."""
    service = Service(
        _IdleToken(),  # type: ignore[arg-type]
        policy,
        None,
        Metrics(),
        clock=lambda: now,
        profile=PROFILES["softhsm"],
    )
    kt = algorithms.key_type("ec-p256")
    for i, name in enumerate(names):
        spki = (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        oid = i.to_bytes(8, "big")
        service.keystore.put(load_key(KeyRecord.new(name, kt, now, oid), {oid: spki}, now))
    service.loaded = True
    return service


def principal(
    uid: int, gid: int | None = None, *, user: str | None = None, groups: Iterable[int] = ()
) -> Principal:
    """A peer as the kernel would record it (no names for its groups)."""
    gid = uid if gid is None else gid
    return Principal(uid, gid, os.getpid(), user, frozenset({gid, *groups}), frozenset())


_request_ids = itertools.count(1)


async def call_service(service: Service, who: Principal, op: str, args: Message) -> Any:
    """One request through ``Service.handle`` as ``who``: the result map, or
    the wire error raised.  Slow work (look-ups) runs to its end."""
    answers: list[bytes] = []
    req = Request(next(_request_ids), op, args)
    for work in service.handle([req], lambda _rid, frame: answers.append(frame), object(), who):
        await work()
    assert len(answers) == 1
    resp = decode_response(answers[0][4:])
    if resp.error is not None:
        raise resp.error
    return resp.result
