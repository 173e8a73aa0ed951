"""What every signctl command shares: exit codes, option types, input and output."""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import math
import re
from typing import Any, BinaryIO, Final

from ..protocol import Message

__all__ = [
    "DURATION_HELP",
    "EXIT_CODES",
    "EXIT_ERROR",
    "EXIT_NEGATIVE",
    "EXIT_OK",
    "HASHES",
    "UsageError",
    "boolean",
    "common_options",
    "duration",
    "jsonable",
    "print_json",
    "read_input",
    "span",
    "version_number",
    "when",
]

EXIT_OK: Final = 0
EXIT_NEGATIVE: Final = 1
EXIT_ERROR: Final = 2

HASHES = ("sha256", "sha384", "sha512", "keccak256")


EXIT_CODES = (
    "exit codes: 0 success; 1 negative answer (verify: invalid signature, health: not ready,\n"
    "            sign-batch: some items failed);\n"
    "            2 error (bad usage, daemon unreachable, or an error answer)"
)


DURATION_HELP = "seconds, or a number with s, m, h or d (90d, 12h, 30m)"


_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhd]?)")


class UsageError(Exception):
    """A command line that cannot be carried out: printed as ``signctl: ...``, exit 2."""


def duration(text: str) -> float:
    """A duration option: ``90d``, ``12h``, ``30m``, ``45s`` or plain seconds."""
    match = _DURATION_RE.fullmatch(text.strip().lower())
    seconds = float(match[1]) * _UNITS[match[2]] if match else math.nan
    if not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: use seconds, or a number with s, m, h or d "
            "(e.g. 90d, 12h; 0 = off)"
        )
    return seconds


def boolean(text: str) -> bool:
    value = {"true": True, "false": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: use true or false")
    return value


def version_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid version {text!r}: use a number, 0 or more")
    return value


def common_options(p: argparse.ArgumentParser, default: Any) -> None:
    """Options accepted both before and after the command."""
    p.add_argument("--socket", metavar="PATH", default=default, help="signd's Unix socket")
    p.add_argument("--json", action="store_true", default=default, help="print answers as JSON")
    p.add_argument(
        "--timeout",
        type=float,
        default=default,
        metavar="SECONDS",
        help="give up after this long (default 30)",
    )


def read_input(path: str, stdin: BinaryIO) -> bytes:
    if path == "-":
        return stdin.read()
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def jsonable(value: Any) -> Any:
    if isinstance(value, Message):
        return {k: jsonable(v) for k, v in value.to_wire().items()}
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def print_json(value: Any) -> None:
    print(json.dumps(jsonable(value), indent=2, sort_keys=True))


def when(t: float) -> str:
    """A wire time as UTC, to the second: 2025-01-31T12:00:00Z."""
    moment = datetime.datetime.fromtimestamp(t, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def span(seconds: float) -> str:
    """A duration the way the options take it: 90d, 12h, 30m, 45s, 1.5s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
