"""``python -m signd.token FD ROLE``: a token worker process."""

import sys

from .session import worker_main

sys.exit(worker_main(int(sys.argv[1])))
