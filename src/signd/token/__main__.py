"""``python -m signd.token FD ROLE``: a token worker process."""

import sys

from .worker import worker_main

sys.exit(worker_main(int(sys.argv[1])))
