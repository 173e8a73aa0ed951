"""signctl's import command: bring an existing key onto the token (BYOK)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import BinaryIO

from cryptography.hazmat.primitives import serialization

from .._sync import Client
from ..errors import InvalidArgument
from ..importing import read_material, wrap_for_import
from ._common import EXIT_CODES, EXIT_OK, UsageError, print_json, read_input
from ._keys import _idempotency_option, _print_key, _settings_args, _settings_options

__all__ = ["HANDLERS", "add_parsers"]

_EPILOG = (
    "FILE (or - for stdin) holds the key: a PEM private key (PKCS#8 or traditional),\n"
    "PKCS#8 DER; for ec-secp256k1 also an Ethereum private key (32 raw bytes, or 64\n"
    "hex digits, 0x optional); for hmac-* types the secret's bytes as they are.\n"
    "It is wrapped here, under the token's import key (RSA-OAEP + AES key wrap), and\n"
    "only the token unwraps it. Check the import key's id against the one your\n"
    "operators published with --expect-import-key. Destroy FILE afterwards.\n"
    "Needs the import grant on NAME.\n\n" + EXIT_CODES
)


def add_parsers(add: Callable[..., argparse.ArgumentParser]) -> None:
    i = add("import", help="import an existing private key or HMAC secret", epilog=_EPILOG)
    i.add_argument("name")
    i.add_argument(
        "--type",
        required=True,
        metavar="TYPE",
        help="ec-p256, ec-p384, ec-secp256k1, rsa-2048, rsa-3072, rsa-4096, hmac-sha256, ...",
    )
    i.add_argument("--in", dest="file", required=True, metavar="FILE", help="the key, or -")
    i.add_argument(
        "--new-version",
        action="store_true",
        help="import as the next version of the existing key NAME (a rotation to it)",
    )
    i.add_argument(
        "--expect-import-key",
        metavar="ID",
        help="refuse unless the token's import key has this id (hex SHA-256 of its DER)",
    )
    _settings_options(i, versions=False)
    backup = i.add_mutually_exclusive_group()
    backup.add_argument(
        "--backup",
        dest="backup",
        action="store_const",
        const=True,
        help="the imported key may be exported wrapped under the token's wrap key "
        "(signctl backup); fixed for the key's life",
    )
    backup.add_argument(
        "--no-backup",
        dest="backup",
        action="store_const",
        const=False,
        help="the imported key never leaves the token, under any key",
    )
    _idempotency_option(i, "import")
    k = add(
        "import-key",
        help="show the token's import key (made on first need): its id, algorithm and PEM",
    )
    k.add_argument("name", help="the key to be imported (needs the import grant on it)")


def _import(args: argparse.Namespace, client: Client, stdin: BinaryIO) -> int:
    settings = _settings_args(args)
    if args.new_version and (settings or args.backup is not None):
        raise UsageError("--new-version takes the key's settings: change them with signctl update")
    # Read and checked before anything is sent: a public key is refused here.
    try:
        material = read_material(args.type, read_input(args.file, stdin))
    except InvalidArgument as exc:
        raise UsageError(f"{args.file}: {exc.message}; nothing was sent") from None
    params = client.import_params(args.name)
    expected = args.expect_import_key
    if expected is not None and expected.strip().lower() != params.import_key_id:
        raise UsageError(
            f"the token's import key is {params.import_key_id}, not {expected}: nothing was sent"
        )
    wrapped = wrap_for_import(params, material)
    del material
    info = client.import_key(
        args.name,
        args.type,
        wrapped,
        new_version=args.new_version,
        backup=args.backup,
        idempotency_key=args.idempotency_key,
        **settings,
    )
    if args.json:
        print_json(info)
        return EXIT_OK
    print(
        f"imported {args.file} as {info.name} version {info.created_version} "
        f"(import key {params.import_key_id})"
    )
    _print_key(info, pems=False)
    return EXIT_OK


def _import_key(args: argparse.Namespace, client: Client, stdin: BinaryIO) -> int:
    params = client.import_params(args.name)
    if args.json:
        print_json(params)
        return EXIT_OK
    pem = (
        serialization.load_der_public_key(params.public_key)
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )
    print(
        f"import key id: {params.import_key_id}\nalgorithm:     {params.algorithm}\n{pem}", end=""
    )
    return EXIT_OK


#: command -> what runs it
HANDLERS: dict[str, Callable[[argparse.Namespace, Client, BinaryIO], int]] = {
    "import": _import,
    "import-key": _import_key,
}
