"""signd's wire format.

The codec lives in ``signd_client.protocol`` so that Python has exactly one
wire codec; the daemon imports it from here.
"""

from signd_client.protocol import *  # noqa: F403
from signd_client.protocol import __all__ as __all__
