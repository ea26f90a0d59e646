"""The test scripts' import of :mod:`lightning_diloco.clean_exit` (they run with ``tests/`` on ``sys.path``)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from lightning_diloco.clean_exit import close_process_groups, gloo_threads  # noqa: E402,F401
