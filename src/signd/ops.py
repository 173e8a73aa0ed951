"""The daemon's table of operations: one row per wire operation.

A row names the operation, its wire spec (argument and result types, retry
class: ``signd_client.protocol.OPS``, the one place of the wire), the verb a
rule must grant on the key (None: anyone connected may ask), its kind, and
the handler that answers it.  The service dispatches from this table and the
policy checks the row's verb; nothing else lists the operations.

Adding an operation: a row here and its handler in ``signd.service``; the
client's spec and call; its section in PROTOCOL.md; its golden frames in
``tests/vectors/frames.json`` (``tests/test_ops.py`` checks they agree).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .protocol import OPS, OpSpec, Request
from .service.admin import Admin
from .service.backup import Backups
from .service.importing import Imports
from .service.reads import Reads
from .service.signing import Signing

if TYPE_CHECKING:
    from .service.context import Batch
    from .service.core import Service

__all__ = ["TABLE", "Kind", "Op"]


class Kind(enum.Enum):
    #: answered at once from what the daemon holds
    READ = "read"
    #: work for the token (its workers), answered in their callback
    TOKEN = "token"  # noqa: S105 - a kind of operation, not a secret
    #: changes a key: one at a time, as a task, re-reading the key first
    ADMIN = "admin"


#: ``handler(service, request, batch)``: answer the request through
#: ``batch.reply``, or leave work in ``batch``.  Raises: WireError (the request
#: is answered with it).
Handler = Callable[["Service", Request, "Batch"], None]


@dataclass(frozen=True, slots=True)
class Op:
    name: str
    spec: OpSpec
    #: what a rule must grant on the request's key (``signd.access.policy``)
    verb: str | None
    kind: Kind
    handler: Handler


def _row(name: str, verb: str | None, kind: Kind, handler: Handler) -> tuple[str, Op]:
    return name, Op(name, OPS[name], verb, kind, handler)


TABLE: Final[Mapping[str, Op]] = dict(
    [
        _row("create_key", "create", Kind.ADMIN, Admin.op_admin),
        _row("list_keys", "read", Kind.READ, Reads.op_list_keys),
        _row("key_info", "read", Kind.READ, Reads.op_key_info),
        _row("public_key", "read", Kind.READ, Reads.op_public_key),
        _row("jwks", "read", Kind.READ, Reads.op_jwks),
        _row("sign", "sign", Kind.TOKEN, Signing.op_sign),
        _row("sign_batch", "sign", Kind.TOKEN, Signing.op_sign_batch),
        _row("verify", "verify", Kind.TOKEN, Signing.op_verify),
        _row("rotate", "rotate", Kind.ADMIN, Admin.op_admin),
        _row("update_key", "admin", Kind.ADMIN, Admin.op_admin),
        _row("disable", "admin", Kind.ADMIN, Admin.op_admin),
        _row("enable", "admin", Kind.ADMIN, Admin.op_admin),
        _row("destroy", "admin", Kind.ADMIN, Admin.op_admin),
        _row("health", None, Kind.READ, Reads.op_health),
        _row("whoami", None, Kind.READ, Reads.op_whoami),
        _row("backup", "admin", Kind.ADMIN, Backups.op_backup),
        _row("restore", "admin", Kind.ADMIN, Backups.op_restore),
        _row("import_params", "import", Kind.ADMIN, Imports.op_import_params),
        _row("import_key", "import", Kind.ADMIN, Imports.op_import_key),
    ]
)
