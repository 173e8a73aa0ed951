"""signd's error tree.

There is one tree, shared with the clients: it lives in ``signd_client.errors``
so that a code on the wire means the same class on both sides.  The daemon
imports it from here.
"""

from signd_client.errors import *  # noqa: F403
from signd_client.errors import __all__ as __all__
