import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
torch.set_num_threads(1)


def run_script(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``tests/scripts/<script>`` in a fresh interpreter (Lightning re-runs it for the other ranks)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    for name in ("PL_GLOBAL_SEED", *LAUNCHER_ENV):  # left by in-process runs; a new run must launch its own ranks
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, str(TESTS / "scripts" / script), *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    if proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


#: What an in-process Lightning run leaves in the environment; with ``LOCAL_RANK`` set a new run would take its
#: processes for started from outside and wait for them forever.
LAUNCHER_ENV = ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def load_ranks(out: Path, world: int) -> list[dict[str, Any]]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


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
