"""The sliced outer sync of worker groups against a plain whole-world average (run under torchrun, gloo, CPU).

Every rank builds the topology for several values of ``processes_per_worker`` (G), gives every process of a worker
the same per-worker tensors, and records what :meth:`~lightning_diloco.workers.ProcessGroupWorkers.average_` returned next
to a plain ``all_reduce`` over the whole world of the same tensors. The test reads the records.
"""

import argparse
import os
import sys
from datetime import timedelta

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lightning_diloco.clean_exit import close_process_groups  # noqa: E402
from lightning_diloco.collectives import average_  # noqa: E402
from lightning_diloco.topology import build_topology  # noqa: E402
from lightning_diloco.workers import ProcessGroupWorkers  # noqa: E402

# odd sizes, so that the flat pseudo-gradient does not split evenly into G slices
SHAPES = [(7, 3), (5,), (1,), (4, 4), (3, 2, 2)]
TIMEOUT = timedelta(seconds=120)


def worker_tensors(worker: int) -> list[torch.Tensor]:
    """The tensors of worker ``worker``: identical in all its processes, different between workers."""
    g = torch.Generator().manual_seed(100 + worker)
    return [torch.randn(shape, generator=g) for shape in SHAPES]


def whole_world_mean(tensors: list[torch.Tensor], weight: float, divisor: float) -> list[torch.Tensor]:
    """``sum over all processes of weight * tensor / divisor`` with one plain all-reduce per tensor."""
    out = []
    for t in tensors:
        total = (t * weight).clone()
        dist.all_reduce(total)
        out.append(total / divisor)
    return out


def group_ranks(group: dist.ProcessGroup | None) -> list[int] | None:
    return None if group is None else dist.get_process_group_ranks(group)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=TIMEOUT)
    rank, world = dist.get_rank(), dist.get_world_size()
    record: dict = {"rank": rank, "world_size": world, "shapes": SHAPES, "by_g": {}}

    for g in (1, 2, 4):
        topology = build_topology(g, None, TIMEOUT)
        worker = topology.worker
        entry: dict = {
            "worker": worker,
            "index_in_worker": topology.index_in_worker,
            "num_workers": topology.num_workers,
            "outer_ranks": group_ranks(topology.outer),
            "intra_ranks": group_ranks(topology.intra),
            "intra_sync_ranks": group_ranks(topology.intra_sync),
            "control_ranks": group_ranks(topology.control),
            "input": worker_tensors(worker),
        }
        k = topology.num_workers
        # plain average: every worker counted once; every worker's tensor is held by its G processes
        sliced = worker_tensors(worker)
        stats = ProcessGroupWorkers(topology).average_(sliced, "none", 128.0, 1.0, float(k), None)
        entry["sliced"], entry["sliced_bytes"] = sliced, stats.bytes_sent
        entry["whole"] = whole_world_mean(worker_tensors(worker), 1.0, float(k * g))
        # weighted, as speed-weighted rounds use it: worker w weighs w + 1
        weight, divisor = float(worker + 1), float(sum(range(1, k + 1)))
        weighted = worker_tensors(worker)
        ProcessGroupWorkers(topology).average_(weighted, "none", 128.0, weight, divisor, None)
        entry["weighted"] = weighted
        entry["weighted_whole"] = whole_world_mean(worker_tensors(worker), weight, divisor * g)
        # a tiny bucket cap: many buckets must give the same result
        small = worker_tensors(worker)
        ProcessGroupWorkers(topology).average_(small, "none", 16 / 2**20, 1.0, float(k), None)
        entry["small_buckets"] = small
        # lossy compression: the slices are quantized separately, so only closeness can be asked of it
        lossy = worker_tensors(worker)
        ProcessGroupWorkers(topology).average_(lossy, "int8", 128.0, 1.0, float(k), None)
        entry["int8"] = lossy
        record["by_g"][g] = entry

    # the bytes of the same average without groups: the full tensors over one process per worker (G = 2 layout:
    # ranks 0 and 2), and over all four processes
    topology = build_topology(2, None, TIMEOUT)
    full = worker_tensors(topology.worker)
    record["per_worker_bytes"] = average_(full, "none", topology.outer, 128.0, divisor=2.0).bytes_sent
    record["world_bytes"] = average_(worker_tensors(topology.worker), "none", None, 128.0).bytes_sent

    os.makedirs(args.out, exist_ok=True)
    torch.save(record, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    close_process_groups()  # with main's Trainer gone: no gloo thread outlives the interpreter
