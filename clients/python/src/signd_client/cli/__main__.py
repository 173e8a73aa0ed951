"""``python -m signd_client.cli``: the same as ``signctl``."""

import sys

from ._main import main

sys.exit(main())
