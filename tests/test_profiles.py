"""Token profiles (``signd.profiles``): pure rules, no token needed.

The YubiHSM profile's rules come from the device's documented limits
(../shared/FIELD-NOTES.md): PIN = auth key id as 4 hex digits + password,
labels of at most 40 bytes, 16-bit object ids, Ed25519 parameters only as the
string ``edwards25519``, one command at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from signd.config import ConfigError, TokenConfig, load_config, read_pin
from signd.errors import InvalidArgument
from signd.token.profiles import (
    ED25519_OID,
    ED25519_STRING,
    PROFILES,
    ProfileError,
    capable_key_types,
    profile_for,
)

YUBI = PROFILES["yubihsm"]
SOFT = PROFILES["softhsm"]
GENERIC = PROFILES["generic"]
YUBIHSM_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/yubihsm_pkcs11.so"


def test_auto_picks_by_module_file_name() -> None:
    assert profile_for("auto", "/usr/lib/softhsm/libsofthsm2.so") is SOFT
    assert profile_for("auto", YUBIHSM_MODULE) is YUBI
    assert profile_for("auto", "/usr/lib/x86_64-linux-gnu/opencryptoki/libopencryptoki.so") is (
        GENERIC
    )
    assert profile_for("yubihsm", "/anything.so") is YUBI
    with pytest.raises(ProfileError, match="must be auto, softhsm, yubihsm, generic"):
        profile_for("yubi", "/x.so")


def test_yubihsm_pin_is_the_auth_key_id_then_the_password() -> None:
    assert YUBI.login_pin("password", 1) == "0001password"
    assert YUBI.login_pin("s3cretpass", 0x1A2B) == "1a2bs3cretpass"
    # Without auth_key_id the file holds the whole form.
    assert YUBI.login_pin("0002password", None) == "0002password"
    for bad in ("hunter2xyz", "7f3e", "zz01hunter2xyz"):
        with pytest.raises(ProfileError, match="auth_key_id") as info:
            YUBI.login_pin(bad, None)
        assert bad not in str(info.value)  # the secret never shows
    # The device takes passwords of 8 to 64 characters.
    with pytest.raises(ProfileError, match="8 to 64 characters; this one has 7"):
        YUBI.login_pin("passwor", 2)
    with pytest.raises(ProfileError, match="has 65"):
        YUBI.login_pin("0002" + "p" * 65, None)
    # Other profiles take the PIN as it is, and no auth key id.
    assert SOFT.login_pin("1234", None) == "1234"
    with pytest.raises(ProfileError, match="only the yubihsm profile"):
        GENERIC.login_pin("1234", 2)


def test_yubihsm_labels_fit_40_bytes() -> None:
    longest = "k" * YUBI.max_key_name
    assert YUBI.max_key_name == 32
    YUBI.check_key_name(longest)
    label = YUBI.object_label(longest, 999_999)
    assert label == f"{longest}/v999999"
    assert len(label.encode()) <= 40
    with pytest.raises(InvalidArgument, match="at most 32"):
        YUBI.check_key_name(longest + "k")
    with pytest.raises(InvalidArgument, match="longer than the 40 bytes"):
        YUBI.object_label(longest, 1_000_000)
    # SoftHSM: names up to the protocol's 64 characters, labels unbounded.
    SOFT.check_key_name("s" * 64)
    assert SOFT.object_label("s" * 64, 12) == "s" * 64 + "/v12"


def test_yubihsm_object_ids_are_16_bit_and_random() -> None:
    ids = {YUBI.new_object_id() for _ in range(200)}
    assert {len(i) for i in ids} == {2}
    assert len(ids) > 150  # random, not a counter or a constant
    assert {len(SOFT.new_object_id()) for _ in range(10)} == {8}


def test_ed25519_parameters() -> None:
    # The PrintableString "edwards25519", DER: tag 0x13, length 12.
    assert ED25519_STRING == b"\x13\x0c" + b"edwards25519"
    assert YUBI.ed25519_params == ED25519_STRING  # the only form a YubiHSM takes
    assert SOFT.ed25519_params == ED25519_STRING
    # The OID 1.3.101.112 (id-Ed25519, RFC 8410), as in an Ed25519 SPKI.
    assert GENERIC.ed25519_params == ED25519_OID
    der = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert ED25519_OID in der


def test_yubihsm_records_and_probe() -> None:
    """The YubiHSM module refuses CKA_MODIFIABLE and a private CKA_PRIVATE on
    data objects, and answers C_GetTokenInfo from a cache: its profile writes
    records without them and probes with a search that reaches the device."""
    assert (YUBI.standard_records, YUBI.deep_probe) == (False, True)
    assert (SOFT.standard_records, SOFT.deep_probe) == (True, False)
    assert (GENERIC.standard_records, GENERIC.deep_probe) == (True, False)


def test_serial_device_gets_one_worker_and_small_batches() -> None:
    assert (YUBI.auto_workers, YUBI.max_workers, YUBI.batch) == (1, 1, 4)
    assert YUBI.probe_interval < 30  # keeps the device session from its 30 s idle expiry
    assert TokenConfig(module=YUBIHSM_MODULE, profile=YUBI).worker_count == 1
    assert TokenConfig(profile=GENERIC).worker_count == 1
    cores = os.cpu_count() or 1
    assert TokenConfig(profile=SOFT).worker_count == max(1, min(4, cores - 1))


def test_capabilities_come_from_the_mechanisms() -> None:
    softhsm = {  # as SoftHSM 2.6.1 reports them (measured)
        "CKM_RSA_PKCS_KEY_PAIR_GEN": (512, 16384),
        "CKM_RSA_PKCS": (512, 16384),
        "CKM_EC_KEY_PAIR_GEN": (112, 521),
        "CKM_ECDSA": (112, 521),
        "CKM_EC_EDWARDS_KEY_PAIR_GEN": (256, 456),
        "CKM_EDDSA": (256, 456),
        "CKM_GENERIC_SECRET_KEY_GEN": (1, 2147483648),
        "CKM_SHA256_HMAC": (32, 512),
        "CKM_SHA384_HMAC": (48, 512),
        "CKM_SHA512_HMAC": (64, 512),
    }
    assert all(why is None for why in capable_key_types(softhsm).values())
    no_edwards = {k: v for k, v in softhsm.items() if "EDWARDS" not in k and "EDDSA" not in k}
    caps = capable_key_types(no_edwards)
    assert caps["ed25519"] == "the token has no CKM_EC_EDWARDS_KEY_PAIR_GEN or CKM_EDDSA"
    assert caps["ec-p256"] is None
    # The YubiHSM module gives Ed25519 as 255 to 255 bits.
    yubihsm_edwards = {
        **softhsm,
        "CKM_EC_EDWARDS_KEY_PAIR_GEN": (255, 255),
        "CKM_EDDSA": (255, 255),
    }
    assert capable_key_types(yubihsm_edwards)["ed25519"] is None
    small_rsa = {**softhsm, "CKM_RSA_PKCS_KEY_PAIR_GEN": (512, 2048)}
    caps = capable_key_types(small_rsa)
    assert caps["rsa-2048"] is None
    assert caps["rsa-3072"] == "CKM_RSA_PKCS_KEY_PAIR_GEN takes keys of 512 to 2048 bits"
    # No sizes given (0, 0): the mechanism alone counts.
    assert capable_key_types(dict.fromkeys(softhsm, (0, 0)))["rsa-4096"] is None


def _config(tmp_path: Path, token: str) -> Path:
    pin = tmp_path / "pin"
    pin.write_text("password\n")
    pin.chmod(0o600)
    path = tmp_path / "signd.toml"
    path.write_text(f'[token]\npin_file = "pin"\n{token}')
    return path


def test_config_yubihsm(tmp_path: Path) -> None:
    cfg = load_config(str(_config(tmp_path, f'module = "{YUBIHSM_MODULE}"\nauth_key_id = 2\n')))
    assert cfg.token.profile is YUBI
    assert (cfg.token.batch, cfg.token.probe_interval, cfg.token.worker_count) == (4, 10.0, 1)
    assert (cfg.token.stall_timeout, cfg.token.label) == (30.0, "YubiHSM")
    assert read_pin(cfg.token).reveal() == "0002password"
    with pytest.raises(ConfigError, match="allows 1"):
        load_config(str(_config(tmp_path, f'module = "{YUBIHSM_MODULE}"\nworkers = 2\n')))
    assert cfg.token.bulk_worker_count == 0  # a serial device: no bulk worker
    with pytest.raises(ConfigError, match="allows no bulk workers"):
        load_config(str(_config(tmp_path, f'module = "{YUBIHSM_MODULE}"\nbulk_workers = 1\n')))
    # Without auth_key_id the PIN file must hold the id too.
    cfg = load_config(str(_config(tmp_path, 'profile = "yubihsm"\n')))
    with pytest.raises(ConfigError, match=r"token\.pin_file: .*auth_key_id"):
        read_pin(cfg.token)


def test_config_profile_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only the yubihsm profile"):
        load_config(str(_config(tmp_path, "auth_key_id = 2\n")))
    with pytest.raises(ConfigError, match="must be an integer 1 to 65535"):
        load_config(str(_config(tmp_path, 'profile = "yubihsm"\nauth_key_id = 70000\n')))
    with pytest.raises(ConfigError, match=r"token\.profile: must be auto"):
        load_config(str(_config(tmp_path, 'profile = "hsm"\n')))
    # Explicit settings win over the profile's defaults.
    cfg = load_config(str(_config(tmp_path, 'profile = "yubihsm"\nbatch = 1\n')))
    assert cfg.token.batch == 1


def test_config_bulk_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SoftHSM on two cores or more: one bulk worker unless told otherwise."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cfg = load_config(str(_config(tmp_path, 'profile = "softhsm"\n')))
    assert (cfg.token.worker_count, cfg.token.bulk_worker_count) == (1, 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert (cfg.token.worker_count, cfg.token.bulk_worker_count) == (1, 0)
    cfg = load_config(str(_config(tmp_path, 'profile = "softhsm"\nbulk_workers = 0\n')))
    assert cfg.token.bulk_worker_count == 0
    cfg = load_config(str(_config(tmp_path, 'profile = "generic"\nbulk_workers = 2\n')))
    assert cfg.token.bulk_worker_count == 2
    for bad in ("-1", "17", '"two"'):
        with pytest.raises(ConfigError, match=r"token\.bulk_workers: must be"):
            load_config(str(_config(tmp_path, f"bulk_workers = {bad}\n")))
