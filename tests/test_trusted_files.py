"""Files the daemon trusts (its config, the PIN) are checked as OpenSSH's
StrictModes does: regular files, owned by root or signd's user, writable by
no one else, in directories no one else can change.  ``signd check-config``,
startup and a SIGHUP reload refuse anything else, naming the file and the fix.

Another owner is uid 65534 (``nobody``), set with chown: we run as root.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from signd_client.errors import RateLimited

if TYPE_CHECKING:
    from conftest import Daemon, TokenEnv

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown to another uid)")


def config_text(token: TokenEnv, pin_file: Path, sock: Path) -> str:
    return (
        f'[server]\nsocket = "{sock}"\n\n'
        f'[token]\nmodule = "{token.module}"\nlabel = "{token.label}"\n'
        f'pin_file = "{pin_file}"\n'
    )


def check_config(token: TokenEnv, cfg: Path) -> subprocess.CompletedProcess[str]:
    # A timeout far above the run's time: a FIFO must never make it hang.
    return subprocess.run(
        [sys.executable, "-m", "signd", "check-config", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=token.env(),
    )


def pin_copy(token: TokenEnv, path: Path, mode: int = 0o600) -> Path:
    path.write_text(token.pin + "\n")
    path.chmod(mode)
    return path


def refused(token: TokenEnv, cfg: Path, *expected: str) -> str:
    out = check_config(token, cfg)
    assert out.returncode == 2, (out.stdout, out.stderr)
    for text in expected:
        assert text in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert token.pin not in out.stdout + out.stderr
    return out.stderr


def test_a_good_pin_file_and_config_pass(token_env: TokenEnv, tmp_path: Path) -> None:
    pin = pin_copy(token_env, tmp_path / "user.pin")
    cfg = tmp_path / "signd.toml"
    cfg.write_text(config_text(token_env, pin, tmp_path / "s.sock"))
    out = check_config(token_env, cfg)
    assert out.returncode == 0, out.stderr


def test_group_writable_pin_is_refused(token_env: TokenEnv, tmp_path: Path) -> None:
    pin = pin_copy(token_env, tmp_path / "user.pin", 0o620)
    cfg = tmp_path / "signd.toml"
    cfg.write_text(config_text(token_env, pin, tmp_path / "s.sock"))
    refused(token_env, cfg, f"token.pin_file: {pin} is writable by its group (mode 0620)")
    refused(token_env, cfg, f"run: chmod 600 {pin}")


def test_pin_owned_by_another_uid_is_refused(token_env: TokenEnv, tmp_path: Path) -> None:
    pin = pin_copy(token_env, tmp_path / "user.pin")
    os.chown(pin, NOBODY, NOBODY)
    cfg = tmp_path / "signd.toml"
    cfg.write_text(config_text(token_env, pin, tmp_path / "s.sock"))
    refused(token_env, cfg, f"{pin} is owned by nobody (uid {NOBODY})", f"run: chown root {pin}")


def test_pin_behind_a_symlinked_parent_is_refused(token_env: TokenEnv, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    pin_copy(token_env, real / "user.pin")
    cfg = tmp_path / "signd.toml"
    # A link that another user owns: they could point it anywhere.
    link = tmp_path / "link"
    link.symlink_to(real)
    os.lchown(link, NOBODY, NOBODY)
    cfg.write_text(config_text(token_env, link / "user.pin", tmp_path / "s.sock"))
    refused(
        token_env, cfg, f"token.pin_file {link}/user.pin: {link} is a symbolic link owned by nobody"
    )
    # A root-owned link to a directory another user owns: that directory is refused.
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    pin_copy(token_env, theirs / "user.pin")
    link2 = tmp_path / "link2"
    link2.symlink_to(theirs)
    cfg.write_text(config_text(token_env, link2 / "user.pin", tmp_path / "s.sock"))
    refused(
        token_env,
        cfg,
        f"token.pin_file {link2}/user.pin: directory {theirs} is owned by nobody",
        f"chown root {theirs}",
    )
    # A root-owned link in a root-owned directory is followed.
    link3 = tmp_path / "link3"
    link3.symlink_to(real)
    cfg.write_text(config_text(token_env, link3 / "user.pin", tmp_path / "s.sock"))
    out = check_config(token_env, cfg)
    assert out.returncode == 0, out.stderr


def test_pin_in_a_group_writable_directory_is_refused(token_env: TokenEnv, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o770)
    pin = pin_copy(token_env, shared / "user.pin")
    cfg = tmp_path / "signd.toml"
    cfg.write_text(config_text(token_env, pin, tmp_path / "s.sock"))
    refused(token_env, cfg, f"{pin}: directory {shared} is writable by its group (mode 0770)")


def test_a_fifo_as_pin_file_is_refused_without_hanging(token_env: TokenEnv, tmp_path: Path) -> None:
    fifo = tmp_path / "user.pin"
    os.mkfifo(fifo, 0o600)
    cfg = tmp_path / "signd.toml"
    cfg.write_text(config_text(token_env, fifo, tmp_path / "s.sock"))
    refused(token_env, cfg, f"token.pin_file: {fifo} is a FIFO, not a regular file")


def test_world_writable_config_owned_by_nobody_is_refused(
    token_env: TokenEnv, tmp_path: Path
) -> None:
    pin = pin_copy(token_env, tmp_path / "user.pin")
    cfg = tmp_path / "signd.toml"
    cfg.write_text(config_text(token_env, pin, tmp_path / "s.sock"))
    cfg.chmod(0o666)
    everyone = f"config: {cfg} is writable by its group and others (mode 0666)"
    refused(token_env, cfg, everyone, f"run: chmod go-w {cfg}")
    os.chown(cfg, NOBODY, NOBODY)
    refused(token_env, cfg, f"config: {cfg} is owned by nobody (uid {NOBODY})")
    # serve refuses it the same way, before it listens.
    out = subprocess.run(
        [sys.executable, "-m", "signd", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=token_env.env(),
    )
    assert out.returncode == 2, out.stderr
    assert f"{cfg} is owned by nobody" in out.stderr
    assert not (tmp_path / "s.sock").exists()


def test_pin_credential_must_be_a_regular_file(token_env: TokenEnv, tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    cfg = tmp_path / "signd.toml"
    cfg.write_text(
        config_text(token_env, Path("x"), tmp_path / "s.sock").replace(
            'pin_file = "x"', 'pin_credential = "signd-pin"'
        )
    )
    env = {**token_env.env(), "CREDENTIALS_DIRECTORY": str(creds)}

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "signd", "check-config", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )

    os.mkfifo(creds / "signd-pin", 0o400)
    out = run()
    assert out.returncode == 2
    assert f"token.pin_credential: {creds}/signd-pin is a FIFO" in out.stderr
    (creds / "signd-pin").unlink()
    pin_copy(token_env, tmp_path / "elsewhere", 0o400)
    (creds / "signd-pin").symlink_to(tmp_path / "elsewhere")
    out = run()
    assert out.returncode == 2
    assert "is a symbolic link" in out.stderr
    (creds / "signd-pin").unlink()
    pin_copy(token_env, creds / "signd-pin", 0o400)
    assert run().returncode == 0, out.stderr


def test_reload_of_an_untrusted_config_is_refused(
    make_daemon: Callable[..., Daemon], key_name: str
) -> None:
    d = make_daemon("[rate_limits]\nper_key = 0.001\nper_key_burst = 1\n")
    with d.client(retries=0) as c:
        c.create_key(key_name, "ec-p256")
        c.sign(key_name, b"1")
        # Another user could have written this one: it lifts the limit.
        d.extra_config = ""
        d.write_config()
        d.config.chmod(0o666)
        line = d.reload(None, "config reload refused; the running config stays")
        everyone = "is writable by its group and others (mode 0666)"
        assert f"config: {d.config} {everyone}" in line["error"]
        with pytest.raises(RateLimited):  # the old config is in force
            c.sign(key_name, b"2")
        d.config.chmod(0o600)
        d.reload(None, "config reloaded")
        c.sign(key_name, b"3")
    assert d.stop() == 0
