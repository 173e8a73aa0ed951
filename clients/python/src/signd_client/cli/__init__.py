"""``signctl``: the signd command line.

Exit codes: 0 success; 1 a negative answer (``verify``: invalid signature;
``health``: not ready; ``sign-batch``: some items failed); 2 an error (bad
usage, no daemon, or an error answer, printed to stderr as
``signctl: <name> (error <code>): <message>``).

The commands are grouped by family, one module each: ``_keys`` (keys and their
lifecycle), ``_signing`` (sign, verify, sign-batch), ``_status`` (health,
whoami) and ``_audit`` (audit verify); ``_main`` builds the parser from them
and maps each wire op to its command (``OP_COMMANDS``).
"""

from ._main import OP_COMMANDS, main

__all__ = ["OP_COMMANDS", "main"]
