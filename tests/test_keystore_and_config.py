"""Pure logic: key records kept on the token, and config validation."""

from __future__ import annotations

import math
import os
import re
import types
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from signd.config import ConfigError, Secret, TokenConfig, load_config, read_pin
from signd.errors import InvalidArgument, VersionNotFound, VersionNotUsable
from signd.keys import algorithms, records, store
from signd.keys.records import (
    ACTIVE,
    DESTROYED,
    DISABLED,
    ENABLED,
    KEY_NAME,
    RETIRED,
    VERIFY_ONLY,
    KeyRecord,
    KeySettings,
    check_key_name,
)
from signd.keys.store import Keystore, load_key
from signd.protocol import KEY_NAME_RE

# ---------------------------------------------------------------- key records


def test_record_round_trip_and_rotation() -> None:
    rec = KeyRecord.new("k", algorithms.key_type("ec-p256"), 100.0, b"\1" * 8)
    assert rec.latest.version == 1
    assert rec.states(100.0)[0] == {1: ACTIVE}
    assert KeyRecord.from_bytes("k", rec.revision, rec.to_bytes()) == rec
    r2 = rec.rotated(200.0, b"\2" * 8)
    assert r2.revision == rec.revision + 1
    assert r2.states(200.0)[0] == {1: VERIFY_ONLY, 2: ACTIVE}
    assert r2.latest.object_id == b"\2" * 8
    assert r2.next_version == 3
    assert KeyRecord.from_bytes("k", r2.revision, r2.to_bytes()) == r2


def _three_versions(settings: KeySettings | None = None) -> KeyRecord:
    kt = algorithms.key_type("ec-p256")
    rec = KeyRecord.new("k", kt, 100.0, b"\1" * 8, settings or KeySettings())
    return rec.rotated(200.0, b"\2" * 8).rotated(300.0, b"\3" * 8)


def test_grace_counts_from_the_rotation_that_superseded_a_version() -> None:
    rec = _three_versions(KeySettings(verify_grace=50.0))
    # v1 was superseded at 200, v2 at 300: each verifies 50 s longer.
    assert rec.states(249.0) == ({1: VERIFY_ONLY, 2: VERIFY_ONLY, 3: ACTIVE}, 250.0)
    assert rec.states(250.0) == ({1: RETIRED, 2: VERIFY_ONLY, 3: ACTIVE}, 350.0)
    states, changes = rec.states(350.0)
    assert states == {1: RETIRED, 2: RETIRED, 3: ACTIVE}
    assert changes == math.inf  # nothing left to change by itself
    # No grace limit: older versions verify until something else retires them.
    assert _three_versions().states(1e12)[0] == {1: VERIFY_ONLY, 2: VERIFY_ONLY, 3: ACTIVE}


def test_min_versions_retire_and_keep_signing() -> None:
    rec = _three_versions(KeySettings(min_verify_version=2))
    assert rec.states(300.0)[0] == {1: RETIRED, 2: VERIFY_ONLY, 3: ACTIVE}
    rec = _three_versions(KeySettings(min_verify_version=2, min_sign_version=2))
    assert rec.states(300.0)[0] == {1: RETIRED, 2: ACTIVE, 3: ACTIVE}


def test_stored_states_win_and_destroyed_is_final() -> None:
    rec = _three_versions().with_state([3], DISABLED).with_state([1], DESTROYED)
    assert rec.states(300.0)[0] == {1: DESTROYED, 2: VERIFY_ONLY, 3: DISABLED}
    back = KeyRecord.from_bytes("k", rec.revision, rec.to_bytes())
    assert back == rec
    with pytest.raises(VersionNotUsable, match="destroyed"):
        rec.with_state([1], ENABLED)
    with pytest.raises(VersionNotFound):
        rec.with_state([9], DISABLED)
    assert rec.with_state([3], ENABLED).states(300.0)[0][3] == ACTIVE


def test_records_written_before_computed_states_still_load() -> None:
    blob = (
        b'{"format": 1, "name": "k", "type": "ec-p256", "created": 1, "versions": ['
        b'{"version": 1, "created": 1, "state": "verify-only", "id": "01"},'
        b'{"version": 2, "created": 2, "state": "active", "id": "02"}]}'
    )
    rec = KeyRecord.from_bytes("k", 1, blob)
    assert [v.state for v in rec.versions] == [ENABLED, ENABLED]
    assert rec.settings == KeySettings()
    assert rec.states(3.0)[0] == {1: VERIFY_ONLY, 2: ACTIVE}


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        (KeySettings(auto_rotate_period=10.0), "auto_rotate_period"),
        (KeySettings(auto_rotate_period=-1.0), "auto_rotate_period"),
        (KeySettings(auto_rotate_period=math.nan), "auto_rotate_period"),
        (KeySettings(verify_grace=-1.0), "verify_grace"),
        (KeySettings(verify_grace=math.nan), "verify_grace"),
        (KeySettings(min_verify_version=4), "min_verify_version"),
        (KeySettings(min_sign_version=4), "min_sign_version"),
        (KeySettings(min_verify_version=3, min_sign_version=2), "min_sign_version"),
    ],
)
def test_settings_that_cannot_apply_name_their_field(settings: KeySettings, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        settings.check(latest=3, min_rotate_period=3600.0)


def test_good_settings_pass() -> None:
    s = KeySettings(
        auto_rotate_period=3600.0, verify_grace=60.0, min_sign_version=2, min_verify_version=2
    )
    assert s.check(latest=3, min_rotate_period=3600.0) is s


@pytest.mark.parametrize(
    "blob",
    [
        b"not json",
        b"{}",
        b'{"format": 1, "name": "other", "type": "ec-p256", "created": 1, "versions": []}',
        b'{"format": 1, "name": "k", "type": "dsa", "created": 1, "versions": '
        b'[{"version": 1, "created": 1, "state": "active", "id": "01"}]}',
        b'{"format": 1, "name": "k", "type": "ec-p256", "created": 1, "versions": []}',
        b'{"format": 1, "name": "k", "type": "ec-p256", "created": 1, "versions": '
        b'[{"version": 1, "created": 1, "state": "weird", "id": "01"}]}',
    ],
)
def test_bad_records_are_refused(blob: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - every problem is a ValueError
        KeyRecord.from_bytes("k", 1, blob)


@pytest.mark.parametrize("name", ["", "-x", ".x", "a b", "a/b", "x" * 65, "ключ"])
def test_bad_key_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        check_key_name(name)


def test_good_key_names() -> None:
    for name in ("a", "A-b_c.d", "x" * 64, "9lives"):
        assert check_key_name(name) == name


def test_the_key_name_rule_is_the_wires() -> None:
    """The store keeps its own rule (it knows nothing of the wire); it is
    the one the clients check too."""
    assert KEY_NAME.pattern == KEY_NAME_RE.pattern


@pytest.mark.parametrize("module", [records, store, algorithms])
def test_the_key_modules_know_nothing_of_the_wire(module: types.ModuleType) -> None:
    source = Path(module.__file__ or "").read_text()
    assert not re.search(r"^from \S*protocol import|^import \S*protocol", source, re.MULTILINE)


# ---------------------------------------------------------------- config


def _write(tmp_path: Path, text: str) -> str:
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    cfg = tmp_path / "signd.toml"
    cfg.write_text(text)
    return str(cfg)


GOOD = '[token]\npin_file = "pin"\n'


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, GOOD + '[server]\nsocket = "s.sock"\n'))
    assert cfg.server.socket == str(tmp_path / "s.sock")
    assert cfg.server.socket_mode == 0o660
    assert cfg.token.pin_file == str(tmp_path / "pin")
    assert cfg.limits.max_frame == 1 << 20
    assert (cfg.token.probe_interval, cfg.token.stall_timeout) == (1.0, 5.0)
    assert read_pin(cfg.token).reveal() == "1234"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("[limits]\nmax_frame = 12\n", "limits.max_frame"),
        ('[limits]\nmax_frame = "big"\n', "limits.max_frame"),
        ("[limits]\nrequest_timeout = 0\n", "limits.request_timeout"),
        ("[limits]\nmax_inflight_per_connection = true\n", "limits.max_inflight_per_connection"),
        ('[server]\nsocket_mode = "0666"\n', "server.socket_mode"),
        ('[server]\nsocket_mode = "0400"\n', "server.socket_mode"),
        ('[server]\nsocket_mode = "rw"\n', "server.socket_mode"),
        ("[server]\nsocket = 5\n", "server.socket"),
        ("[server]\nport = 5\n", "server.port"),
        ('[token]\nmodule = "relative.so"\n', "token.module"),
        ('[token]\nlabel = "' + "x" * 33 + '"\n', "token.label"),
        ("[token]\nprobe_interval = 0\n", "token.probe_interval"),
        ('[token]\nstall_timeout = "5s"\n', "token.stall_timeout"),
        ('[log]\nlevel = "loud"\n', "log.level"),
        ("[telemetry]\n", "telemetry"),
        ('[metrics]\nlisten = "9464"\n', "metrics.listen"),
        ('[metrics]\nlisten = "::1:9464"\n', "metrics.listen"),
        ('[metrics]\nenabled = "yes"\n', "metrics.enabled"),
        ("[keys]\nmin_rotate_period = 0\n", "keys.min_rotate_period"),
        ("[keys]\nsync_interval = 0\n", "keys.sync_interval"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, extra: str, field: str) -> None:
    # Merge into the [token] table when the extra line is for it.
    text = GOOD + extra if not extra.startswith("[token]") else extra + 'pin_file = "pin"\n'
    with pytest.raises(ConfigError, match=rf"^{field}"):
        load_config(_write(tmp_path, text))


def test_several_tokens(tmp_path: Path) -> None:
    """[[token]]: the first is ``token``, the others ``replicas``, each read alone."""
    text = (
        '[[token]]\nlabel = "a"\npin_file = "pin"\nworkers = 2\n'
        '[[token]]\nlabel = "b"\npin_file = "pin"\n'
    )
    cfg = load_config(_write(tmp_path, text))
    assert (cfg.token.label, cfg.token.workers) == ("a", 2)
    assert [(t.label, t.workers, t.pin_file) for t in cfg.replicas] == [
        ("b", None, str(tmp_path / "pin"))
    ]
    assert load_config(_write(tmp_path, GOOD)).replicas == ()
    # errors name the table they are in
    with pytest.raises(ConfigError, match=r"^token\[2\].label"):
        load_config(_write(tmp_path, text.replace('label = "b"', 'label = ""')))
    with pytest.raises(ConfigError, match=r"^token\[2\]: set exactly one"):
        load_config(_write(tmp_path, text.replace('label = "b"\npin_file = "pin"', 'label = "b"')))
    with pytest.raises(ConfigError, match="named twice"):
        load_config(_write(tmp_path, text.replace('label = "b"', 'label = "a"')))
    with pytest.raises(ConfigError, match="1 to 8"):
        load_config(
            _write(
                tmp_path,
                "".join(f'[[token]]\nlabel = "t{i}"\npin_file = "pin"\n' for i in range(9)),
            )
        )


def test_pin_source_is_exactly_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one of pin_file and pin_credential"):
        load_config(_write(tmp_path, "[token]\n"))
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(_write(tmp_path, '[token]\npin_file = "pin"\npin_credential = "pin"\n'))


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[token"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(tmp_path / "absent.toml"))


def test_pin_file_rules(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    token = TokenConfig(pin_file=str(pin))
    with pytest.raises(ConfigError, match="cannot open"):
        read_pin(token)
    pin.write_text("s3cret-pin\r\n")
    pin.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others") as info:
        read_pin(token)
    assert "s3cret" not in str(info.value)
    pin.chmod(0o640)  # the group may read it (e.g. a service group); others may not
    assert read_pin(token).reveal() == "s3cret-pin"
    pin.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        read_pin(token)
    link = tmp_path / "link"
    os.symlink(pin, link)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        read_pin(TokenConfig(pin_file=str(link)))


def test_pin_credential(tmp_path: Path) -> None:
    (tmp_path / "user-pin").write_text("9876")
    (tmp_path / "user-pin").chmod(0o400)
    token = TokenConfig(pin_credential="user-pin")
    assert read_pin(token, {"CREDENTIALS_DIRECTORY": str(tmp_path)}).reveal() == "9876"
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        read_pin(token, {})


def test_secret_never_prints() -> None:
    s = Secret("hunter2")
    assert "hunter2" not in repr(s)
    assert "hunter2" not in str(s)
    assert "hunter2" not in f"{s}"


def test_the_cache_never_goes_back_to_an_older_revision() -> None:
    """A read that started before a change finished must not undo it in the cache."""
    kt = algorithms.key_type("ed25519")
    spki = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    r1 = KeyRecord.new("k", kt, 100.0, b"\1" * 8)
    r2 = r1.rotated(200.0, b"\2" * 8)
    store = Keystore()
    store.put(load_key(r2, {b"\1" * 8: spki, b"\2" * 8: spki}, 300.0))
    store.put(load_key(r1, {b"\1" * 8: spki}, 300.0))  # a stale read arrives late
    assert store.get("k").record == r2
    r3 = r2.with_state([1], DISABLED)
    store.put(load_key(r3, {b"\1" * 8: spki, b"\2" * 8: spki}, 300.0))
    assert store.get("k").record == r3
