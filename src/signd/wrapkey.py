"""``signd wrap-key``: put the token's backup wrap key on it, as M-of-N shares.

Backups of private keys are wrapped under one AES-256 *wrap key* a token
(``token/wrapping.py``: ``WRAP_KEY_LABEL``, ``CKA_TRUSTED``, which only the
token's Security Officer can set).  The key is never kept anywhere but on
tokens: a ceremony makes it and hands it out as shares, and the same shares
put the same key on another token.

* ``signd wrap-key create --config FILE --so-pin-file FILE --shares N
  --threshold M``: draws a fresh 32-byte secret, creates the wrap key from it
  on the config's ``[token]`` (with the backup MAC key and the check value
  object made from the same secret, ``token/ceremony.py``), prints the N
  shares (one a line) and the key's check value to stdout, and drops the
  secret.
* ``signd wrap-key import --config FILE --so-pin-file FILE``: reads share
  lines from stdin (until EOF, or until the lines read combine), creates the
  same wrap key on this token and prints its check value, to be compared with
  the ceremony's.

The SO PIN comes from a file only (never argv or the environment), checked as
``trusted.py`` checks signd's secrets, and not readable by group or others
either.  Exit codes: 0 done, 1 the token failed or refused, 2 bad usage, a
bad config or PIN file, bad shares, or a wrap key the token has already;
nothing is created on the token unless the answer is 0.

The secret lives in this process's memory only between drawing (or
combining) it and creating the key; Python cannot wipe it, so it is dropped
as early as possible, and ``cli.main`` turns core dumps off first.

This module does not import python-pkcs11 at import time (the daemon side
must not): the token is reached through ``token.session``, imported when a
command runs.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Final, TextIO

from .config import ConfigError, TokenConfig, load_config
from .errors import InvalidArgument, WireError
from .trusted import NotTrusted, open_trusted_file

__all__ = ["EXIT_OK", "EXIT_TOKEN", "EXIT_USAGE", "add_parser", "main", "read_so_pin"]

EXIT_OK: Final = 0
#: the token failed, or refused the key
EXIT_TOKEN: Final = 1
#: bad usage, config, PIN file or shares; or the token has a wrap key already
EXIT_USAGE: Final = 2

#: An SO PIN file is read up to this many bytes.
MAX_PIN_BYTES: Final = 4096
#: More share lines than this on stdin are refused (a share set has at most 16).
MAX_SHARE_LINES: Final = 64
#: The secret is an AES-256 key.
SECRET_BYTES: Final = 32


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``wrap-key create`` and ``wrap-key import`` to ``signd``'s subcommands."""
    wk = sub.add_parser(
        "wrap-key",
        help="create or import the token's backup wrap key (SO PIN needed)",
        description="The token's backup wrap key, made from M-of-N shares. "
        "Exit codes: 0 done, 1 token failure, 2 bad usage or shares.",
    )
    actions = wk.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create", help="make a fresh wrap key on the token; print N shares and its check value"
    )
    imp = actions.add_parser(
        "import", help="put the wrap key given by shares on stdin on this token"
    )
    for p in (create, imp):
        p.add_argument("--config", required=True, metavar="FILE", help="TOML config file")
        p.add_argument(
            "--so-pin-file",
            required=True,
            metavar="FILE",
            help="file holding the token's SO PIN (mode 0600)",
        )
    create.add_argument(
        "--shares", required=True, type=int, metavar="N", help="how many shares to print"
    )
    create.add_argument(
        "--threshold",
        required=True,
        type=int,
        metavar="M",
        help="how many shares restore the key",
    )


def main(
    args: argparse.Namespace,
    hardening_problems: Sequence[str] = (),
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run ``signd wrap-key ACTION``; returns the exit code.  ``hardening_problems``:
    why core dumps may not be off (``hardening.no_core_dumps``), shown as warnings."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    for problem in hardening_problems:
        print(f"signd wrap-key: warning: core dumps not fully disabled: {problem}", file=err)
    try:
        cfg = load_config(args.config).token
        so_pin = read_so_pin(args.so_pin_file)
        if args.action == "create":
            check = create(cfg, so_pin, args.shares, args.threshold, out)
        else:
            check = import_shares(cfg, so_pin, stdin or sys.stdin, err)
        print(f"check value: {check}", file=out)
        out.flush()
    except OSError as exc:  # stdout: the key is on the token, its shares may be lost
        print(
            f"signd wrap-key: the wrap key is on the token, but writing the output failed "
            f"({exc.strerror or exc}): delete the objects labelled 'signd-wrap', "
            "'signd-backup-mac' and 'signd-wrap-check' from the token (as its SO) and "
            "run the command again",
            file=err,
        )
        return EXIT_TOKEN
    except ConfigError as exc:
        print(f"signd wrap-key: {exc}", file=err)
        return EXIT_USAGE
    except InvalidArgument as exc:
        print(f"signd wrap-key: {exc.message}", file=err)
        return EXIT_USAGE
    except WireError as exc:
        print(f"signd wrap-key: {exc.message}", file=err)
        return EXIT_TOKEN
    return EXIT_OK


def read_so_pin(path: str) -> str:
    """The SO PIN from ``path``: a regular file signd trusts (``trusted.py``),
    readable by its owner only.  One trailing newline is stripped.

    Raises:
        ConfigError: missing, unreadable, not trusted, readable by group or
            others, or empty.  The PIN never appears in a message.
    """
    what = "--so-pin-file"
    try:
        fd = open_trusted_file(path, what, secret=True)
    except NotTrusted as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{what}: cannot open {path}: {exc.strerror}") from None
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o044:
            raise ConfigError(
                f"{what}: {path} is readable by its group or others (mode {mode:04o}); "
                f"run: chmod 600 {path}"
            )
        data = os.read(fd, MAX_PIN_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_PIN_BYTES:
        raise ConfigError(f"{what}: {path} is larger than {MAX_PIN_BYTES} bytes")
    text = data.decode("utf-8", "replace")
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ConfigError(f"{what}: {path} is empty")
    return text


def create(cfg: TokenConfig, so_pin: str, count: int, threshold: int, out: TextIO) -> str:
    """Make a fresh wrap key on the token and print its ``count`` shares to ``out``;
    returns its check value.

    The shares are made (and checked to give the secret back) before the
    token is touched, so bad numbers change nothing; they are printed only
    once the key is on the token.

    Raises: InvalidArgument (ShareError for bad numbers; a wrap key exists);
    TokenError, TokenUnavailable, UnsupportedAlgorithm.
    """
    # signd.shares is written alongside; imported here so that the rest of
    # signd never depends on it.
    from .shares import (
        check_value,
        combine,
        split,
    )

    secret = secrets.token_bytes(SECRET_BYTES)
    shares = split(secret, threshold, count)
    if combine(shares[:threshold]) != secret:  # never hand out shares that do not work
        raise InvalidArgument("the shares made do not give the secret back; nothing created")
    check: str = check_value(secret)
    _install(cfg, so_pin, secret)
    del secret
    for share in shares:
        print(share, file=out)
    return check


def import_shares(cfg: TokenConfig, so_pin: str, stdin: TextIO, err: TextIO) -> str:
    """Combine the shares on ``stdin`` and create that wrap key on the token;
    returns its check value.

    Raises: InvalidArgument (ShareError: bad, too few or mixed shares; a wrap
    key exists); TokenError, TokenUnavailable, UnsupportedAlgorithm.
    """
    from .shares import (
        check_value,
        combine,
    )

    secret = read_shares(_share_lines(stdin, err), combine)
    check: str = check_value(secret)
    _install(cfg, so_pin, secret)
    del secret
    return check


def read_shares(lines: Iterator[str], combine: Callable[[Sequence[str]], bytes]) -> bytes:
    """The secret the share ``lines`` give: read until they combine, or to the end.

    Blank lines are skipped.  After each share the lines so far are tried;
    the first time they combine, reading stops (so a terminal's user need
    not type an end of file).  At the end, the error of combining them all
    is the answer.

    Raises: InvalidArgument (``combine``'s ShareError; no shares; too many lines).
    """
    got: list[str] = []
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        got.append(line)
        if len(got) > MAX_SHARE_LINES:
            raise InvalidArgument(f"more than {MAX_SHARE_LINES} share lines on standard input")
        try:
            return combine(got)
        except InvalidArgument:
            continue  # fewer than needed yet, or a bad line: the end decides
    if not got:
        raise InvalidArgument("no shares on standard input (one share a line)")
    return combine(got)


def _share_lines(stdin: TextIO, err: TextIO) -> Iterator[str]:
    """Share lines from stdin; from a terminal, asked for one by one without
    echo, until a blank line or end of file."""
    if not stdin.isatty():
        yield from stdin
        return
    print("Type or paste the shares, one a line; a blank line ends.", file=err)
    n = 1
    while True:
        try:
            line = getpass.getpass(f"share {n}: ", stream=err)
        except EOFError:
            return
        if not line.strip():
            return
        yield line
        n += 1


def _install(cfg: TokenConfig, so_pin: str, secret: bytes) -> None:
    """Create the wrap key, the backup MAC key and the check value object from
    ``secret`` on the config's token, as its SO (all three or none).

    Raises: InvalidArgument (a wrap key, MAC key or check value exists);
    TokenError, TokenUnavailable, UnsupportedAlgorithm.
    """
    from .token.session import TokenSession, map_error

    wrap_id = cfg.profile.new_object_id()
    mac_id = cfg.profile.new_object_id()
    while mac_id == wrap_id:  # short ids (a YubiHSM's 16 bits) can collide
        mac_id = cfg.profile.new_object_id()
    session = TokenSession()
    try:
        # A token without an SO login (a YubiHSM 2's PKCS#11 module answers
        # UserTypeInvalid) gets a one-line error, not a traceback.
        session.open_so(cfg.module, cfg.label, so_pin, cfg.profile)
    except WireError:
        raise
    except Exception as exc:
        raise map_error(exc, "logging in as the token's Security Officer") from None
    try:
        session.create_wrap_key(secret, wrap_id, mac_id)
    except Exception as exc:
        raise map_error(exc, "creating the wrap key") from None
    finally:
        session.close()
