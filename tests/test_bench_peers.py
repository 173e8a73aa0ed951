"""The benchmark's peer rows: p11-kit's server and ssh-agent, measured for real.

Each measurement runs briefly against the session's SoftHSM token (a keypair
made here, in-process) and must come back with a sane row: signatures counted,
positive latencies, the server side's cost, every client's signature verified,
and no process left behind.  Nothing here asserts on speed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pkcs11
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.exceptions import UserAlreadyLoggedIn
from pkcs11.util.ec import encode_named_curve_parameters

from signd_bench._measure import Row, process_tree
from signd_bench.peers import (
    PeerBadSignature,
    PeerUnavailable,
    measure_p11kit_server,
    measure_signd_agent,
    measure_ssh_agent,
    p11kit_available,
    ssh_agent_available,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import Daemon, TokenEnv  # the root conftest.py

SECONDS = 0.5


@dataclass(frozen=True)
class BenchKey:
    label: str
    public_key: ec.EllipticCurvePublicKey


@pytest.fixture(scope="module")
def bench_key(token_env: TokenEnv) -> Iterator[BenchKey]:
    """An ECDSA P-256 keypair on the session token, made in this process."""
    lib = pkcs11.lib(token_env.module)
    token = lib.get_token(token_label=token_env.label)
    try:
        session = token.open(rw=True, user_pin=token_env.pin)
    except UserAlreadyLoggedIn:
        # Another test module of this process holds the (per-process) login; a
        # session without a PIN already sees and makes private objects.
        session = token.open(rw=True)
    label = f"bench-peer-{uuid.uuid4().hex[:8]}"
    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
    )
    pub, _priv = params.generate_keypair(
        store=True,
        label=label,
        private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
    )
    point = bytes(pub[Attribute.EC_POINT])
    assert point[:2] == b"\x04\x41"  # DER OCTET STRING around the 65-byte point
    public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point[2:])
    try:
        yield BenchKey(label, public_key)
    finally:
        for obj in session.get_objects({Attribute.LABEL: label}):
            assert obj.object_class in (ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY)
            obj.destroy()
        # Closes (and logs out) only if this module logged in; a PIN-less
        # session's close does not log the process out.
        session.close()


def children() -> set[int]:
    me = os.getpid()
    return set(process_tree(me)) - {me}


def assert_sane(row: Row) -> None:
    assert row.key_type == "ec-p256"
    assert row.operations > 0
    assert row.seconds > 0
    assert row.latencies, "no latency sample"
    assert all(x > 0 for x in row.latencies)
    assert len(row.latencies) <= row.operations
    assert row.server_cpu is not None
    assert row.server_cpu >= 0
    assert row.server_peak_rss_mb is not None
    assert row.server_peak_rss_mb > 0
    # The row serializes the way the benchmark's JSON file needs.
    out = row.to_json()
    assert out["p50_us"] > 0
    assert out["p99_us"] >= out["p50_us"]


@pytest.fixture
def p11kit() -> None:
    reason = p11kit_available()
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.usefixtures("p11kit")
@pytest.mark.parametrize("processes", [1, 2])
def test_p11kit_server_row(token_env: TokenEnv, bench_key: BenchKey, processes: int) -> None:
    before = children()
    row = measure_p11kit_server(
        module=token_env.module,
        token_label=token_env.label,
        pin=token_env.pin,
        key_label=bench_key.label,
        processes=processes,
        seconds=SECONDS,
        softhsm_conf=str(token_env.conf),
        public_key=bench_key.public_key,
    )
    assert_sane(row)
    assert row.name.startswith(f"p11-kit server, {processes} client")
    # Every client logged in, signed and had its signature verified.
    assert f"clients ok: {processes}/{processes}" in row.note, row.note
    assert f"verified {processes} signature" in row.note
    assert "failures" not in row.note
    # The server, its per-client p11-kit-remote processes and the clients are gone.
    assert children() <= before


@pytest.mark.usefixtures("p11kit")
def test_p11kit_server_checks_signatures_against_the_given_key(
    token_env: TokenEnv, bench_key: BenchKey
) -> None:
    """The verification can fail: a key other than the token's is caught."""
    before = children()
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(PeerBadSignature, match="not the expected one"):
        measure_p11kit_server(
            module=token_env.module,
            token_label=token_env.label,
            pin=token_env.pin,
            key_label=bench_key.label,
            processes=1,
            seconds=0.1,
            softhsm_conf=str(token_env.conf),
            public_key=other,
        )
    assert children() <= before


def test_ssh_agent_row() -> None:
    reason = ssh_agent_available()
    if reason is not None:
        pytest.skip(reason)
    before = children()
    row = measure_ssh_agent(seconds=SECONDS)
    assert_sane(row)
    assert row.name == "ssh-agent, 1 client"
    assert "not the token" in row.note
    assert "verified" in row.note
    assert children() <= before


def test_signd_agent_row(
    make_daemon: Callable[..., Daemon], tmp_path_factory: pytest.TempPathFactory, key_name: str
) -> None:
    """signd's own agent socket, measured as the ssh-agent row is (the run puts
    the two side by side)."""
    sock = tmp_path_factory.mktemp("agent") / "agent.sock"
    d = make_daemon(f'[agent]\nsocket = "{sock}"\nkeys = ["{key_name}"]\n')
    with d.client() as c:
        c.create_key(key_name, "ec-p256")
    assert d.proc is not None
    before = children()
    row = measure_signd_agent(str(sock), d.proc.pid, key_name, seconds=SECONDS)
    assert_sane(row)
    assert row.name == "signd ssh-agent front end, 1 client"
    assert "signed on the token" in row.note
    assert "verified" in row.note
    assert children() <= before
    # A key the socket does not list: the row says so instead of measuring.
    with pytest.raises(PeerUnavailable, match="does not list"):
        measure_signd_agent(str(sock), d.proc.pid, "not-exposed", seconds=SECONDS)
