"""Typed, validated configuration from TOML; secrets redacted in repr.

Every problem is reported as ``ConfigError`` naming the field, e.g.
``limits.max_frame: must be between 1024 and 67108864, got 12``.

This module reads the files (the config, the PIN, the metrics token), each
checked as ``trusted.py`` says; the section types are in ``config_sections``
(and exported from here), the checks of every field in ``config_parse``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from .config_parse import parse
from .config_sections import (
    AccessConfig,
    AgentConfig,
    AuditConfig,
    Config,
    ConfigError,
    KeysConfig,
    LimitsConfig,
    LogConfig,
    MetricsConfig,
    RateLimitsConfig,
    ReplayConfig,
    Secret,
    ServerConfig,
    StateConfig,
    TokenConfig,
    find_softhsm_module,
)
from .token.profiles import ProfileError
from .trusted import NotTrusted, open_trusted_file

__all__ = [
    "AccessConfig",
    "AgentConfig",
    "AuditConfig",
    "RateLimitsConfig",
    "Config",
    "ConfigError",
    "KeysConfig",
    "LimitsConfig",
    "LogConfig",
    "MetricsConfig",
    "Secret",
    "ReplayConfig",
    "ServerConfig",
    "StateConfig",
    "TokenConfig",
    "find_softhsm_module",
    "load_config",
    "read_metrics_token",
    "read_pin",
]

#: A config file larger than this is refused (it is a few kB).
MAX_CONFIG_BYTES: Final = 1 << 20
#: A PIN file is read up to this many bytes.
MAX_PIN_BYTES: Final = 4096


def _read_trusted(path: str, what: str, limit: int, *, secret: bool, walk: bool = True) -> bytes:
    """Up to ``limit`` bytes of a file signd trusts, after checking its owner,
    mode and type and every directory above it (see ``trusted.py``).

    Raises:
        NotTrusted: another user could change (or, for a secret, read) it.
        OSError: it cannot be opened or read.
    """
    fd = open_trusted_file(path, what, secret=secret, walk=walk)
    try:
        chunks = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_secret(
    what: str,
    file: str | None,
    credential: str | None,
    limit: int,
    environ: Mapping[str, str] | None,
) -> tuple[bytes, str, str]:
    """A secret from its file or systemd credential (``what``: the setting's
    prefix, e.g. ``token.pin``): (up to ``limit`` bytes, the setting, the path).

    The file is checked as ``trusted.py`` says (a credential's directory is
    systemd's, so only the file itself is checked there).

    Raises:
        ConfigError: missing, unreadable, or not trusted.
    """
    env = os.environ if environ is None else environ
    if credential is not None:
        creds = env.get("CREDENTIALS_DIRECTORY")
        if not creds:
            raise ConfigError(
                f"{what}_credential: $CREDENTIALS_DIRECTORY is not set; "
                "is signd running under systemd with LoadCredential=?"
            )
        where, path = f"{what}_credential", os.path.join(creds, credential)
    else:
        assert file is not None
        where, path = f"{what}_file", file
    try:
        data = _read_trusted(path, where, limit, secret=True, walk=credential is None)[:limit]
    except NotTrusted as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot open {path}: {exc.strerror}") from None
    return data, where, path


def load_config(path: str) -> Config:
    """Read and validate a TOML config file.

    Relative paths in it (socket, pin_file) are taken relative to the file.
    The file must be a regular file that only root or the user signd runs as
    can change, in directories only they can change (see ``trusted.py``).

    Raises:
        ConfigError: unreadable, not trusted, not TOML, or a field is invalid.
    """
    try:
        data = _read_trusted(path, "config", MAX_CONFIG_BYTES, secret=False)
    except NotTrusted as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        doc = tomllib.loads(data.decode())
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    return parse(doc, path, Path(path).resolve().parent)


def read_pin(token: TokenConfig, environ: Mapping[str, str] | None = None) -> Secret:
    """Read the user PIN from its file or systemd credential.

    The PIN file must be a regular file owned by root or the user signd runs
    as, not writable by group or others and not readable by others, in
    directories only they can change (see ``trusted.py``).  A credential is
    checked the same way but for its directory, which systemd makes.  One
    trailing newline is stripped.  The PIN itself never appears in an error
    message.

    Raises:
        ConfigError: missing, unreadable, not trusted, or empty.
    """
    data, where, path = _read_secret(
        "token.pin", token.pin_file, token.pin_credential, MAX_PIN_BYTES, environ
    )
    text = data.decode("utf-8", "replace")
    if text.endswith("\n"):
        text = text[:-1]
    if text.endswith("\r"):
        text = text[:-1]
    if not text:
        raise ConfigError(f"{where}: {path} is empty")
    try:
        return Secret(token.profile.login_pin(text, token.auth_key_id))
    except ProfileError as exc:
        raise ConfigError(f"{where}: {exc}") from None


#: A metrics token: printable ASCII without spaces (it travels in an HTTP
#: header), long enough that guessing it over loopback is hopeless.
METRICS_TOKEN_MIN: Final = 16
METRICS_TOKEN_MAX: Final = 4096


def read_metrics_token(
    metrics: MetricsConfig, environ: Mapping[str, str] | None = None
) -> Secret | None:
    """Read the bearer token that /metrics asks for, or None if none is configured.

    The file (or systemd credential) must be a regular file, not a symlink,
    owned by root or the daemon's user, and not readable or writable by
    others.  Surrounding whitespace is stripped, as Prometheus does with its
    ``credentials_file``.  The token never appears in an error message.

    Raises:
        ConfigError: missing, unreadable, too open, or not a usable token.
    """
    if metrics.token_credential is None and metrics.token_file is None:
        return None
    data, where, path = _read_secret(
        "metrics.token",
        metrics.token_file,
        metrics.token_credential,
        METRICS_TOKEN_MAX + 2,
        environ,
    )
    token = data.strip(b" \t\r\n")
    if not METRICS_TOKEN_MIN <= len(token) <= METRICS_TOKEN_MAX or not all(
        0x21 <= b <= 0x7E for b in token
    ):
        raise ConfigError(
            f"{where}: {path} must hold one token of {METRICS_TOKEN_MIN} to "
            f"{METRICS_TOKEN_MAX} printable ASCII characters without spaces "
            "(e.g. the output of: openssl rand -hex 32)"
        )
    return Secret(token.decode("ascii"))
