import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))  # the tests import ``helpers`` (tests/helpers/) as a top-level package
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_process_group():
    """In-process single-device runs create a world of one, set launcher variables and change torch's thread count;
    never let any of it leak into the next test."""
    environment, threads = dict(os.environ), torch.get_num_threads()
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)
    torch.set_num_threads(threads)
