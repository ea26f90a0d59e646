"""One worker of a gloo process group that starts the way DiLoCoStrategy starts it under torchrun.

The test plays torchrun's agent: it hosts the store (``TORCHELASTIC_USE_AGENT_STORE=True``) and starts the workers of
an attempt with ``TORCHELASTIC_RESTART_COUNT`` set. ``--prefix`` makes the store of ``lightning_diloco.elastic``;
without it, ``init_process_group`` makes its own, as Lightning's ``_init_dist_connection`` does. Prints ``JOINING``
before it joins the process group and ``SUM <value>`` after an all-reduce of the ranks + 1.
"""

import argparse
import importlib.util
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

# `lightning_diloco.elastic` needs only torch; load it without the package's `__init__`, which imports Lightning
_ELASTIC = Path(__file__).resolve().parents[2] / "lightning_diloco" / "elastic.py"
_spec = importlib.util.spec_from_file_location("lightning_diloco_elastic", _ELASTIC)
assert _spec is not None and _spec.loader is not None
elastic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(elastic)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix", action="store_true", help="use lightning_diloco.elastic.attempt_store")
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args()
    print("JOINING", flush=True)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(seconds=args.timeout)
    store = elastic.attempt_store(rank, world_size, timeout) if args.prefix else None
    if store is None:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    print(f"SUM {value.item():g}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
