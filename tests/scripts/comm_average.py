"""Run :func:`lightning_diloco.collectives.average_` scenarios on a real gloo process group.

Usage: ``python comm_average.py OUT_DIR [WORLD_SIZE]``. Spawns WORLD_SIZE (default 2) CPU processes; rank ``r`` saves
``OUT_DIR/rank{r}.pt``: for each scenario its name, its arguments, the inputs this rank contributed, the averaged
outputs and the returned stats. ``tests/test_collectives.py`` computes the expected averages from the saved inputs.
"""

import os
import sys
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_diloco.collectives import average_
from lightning_diloco.compression import COMPRESSOR_NAMES, ErrorFeedback, get_compressor

#: Shapes of the averaged tensors: odd lengths, lengths that are not multiples of any block size, one larger tensor.
SHAPES = [(37,), (16, 33), (4099,), (3, 7, 11), (1,), (300,)]
LOSSY = [name for name in COMPRESSOR_NAMES if name != "none"]
TINY_CAP_MB = 0.004  # ~1000 fp32 elements: splits SHAPES into several buckets
ERROR_FEEDBACK_SYNCS = 8


def make_inputs(seed: int, rank: int) -> list[torch.Tensor]:
    """Random non-zero tensors whose scales differ per tensor, with a few large outliers."""
    generator = torch.Generator().manual_seed(1000 * seed + rank)
    tensors = []
    for shape in SHAPES:
        scale = 10 ** float(torch.empty(()).uniform_(-3, 2, generator=generator))
        tensor = torch.randn(shape, generator=generator) * scale
        flat = tensor.view(-1)
        outliers = torch.randint(0, flat.numel(), (max(1, flat.numel() // 500),), generator=generator)
        flat[outliers] *= 100
        tensors.append(tensor)
    return tensors


def scenarios(rank: int) -> list[dict[str, Any]]:
    """Every averaging call to make, with the seed of its inputs."""
    cases: list[dict[str, Any]] = [
        {"name": "none", "compressor": "none"},
        {"name": "none_buckets", "compressor": "none", "bucket_cap_mb": TINY_CAP_MB},
        {"name": "none_weighted", "compressor": "none", "weight": float(rank == 0), "divisor": 1.0},
        {"name": "int8_weighted", "compressor": "int8", "algorithm": "all_gather", "weight": float(rank == 0),
         "divisor": 1.0},
    ]
    for compressor in LOSSY:
        for algorithm in ("all_gather",) if get_compressor(compressor).gather_only else ("all_gather", "reduce_scatter"):
            name = f"{compressor}_{algorithm}"
            cases.append({"name": name, "compressor": compressor, "algorithm": algorithm})
            cases.append({"name": f"{name}_buckets", "compressor": compressor, "algorithm": algorithm,
                          "bucket_cap_mb": TINY_CAP_MB})
    for algorithm in ("all_gather", "reduce_scatter"):
        cases.append({"name": f"int8_saturated_{algorithm}", "compressor": "int8", "algorithm": algorithm})
    return cases


def saturated_inputs() -> list[torch.Tensor]:
    """Blocks where every value is its block's absmax, so every rank sends codes of +-127."""
    return [torch.full((1000,), 5.0), torch.full((513,), -3.0)]


def input_seed(name: str) -> int:
    """Seed of a scenario's inputs; a ``*_buckets`` scenario reuses the inputs of its one-bucket twin."""
    return zlib.crc32(name.removesuffix("_buckets").encode())


def run_case(case: dict[str, Any], rank: int, seed: int) -> dict[str, Any]:
    name = case["name"]
    inputs = saturated_inputs() if "saturated" in name else make_inputs(seed, rank)
    if case.get("weight") == 0.0:  # an unhealthy rank: its values must not leak into the average
        inputs = [torch.full_like(t, float("nan")) for t in inputs]
    outputs = [t.clone() for t in inputs]
    kwargs = {key: value for key, value in case.items() if key != "name"}
    stats = average_(outputs, **kwargs)
    return {**case, "inputs": inputs, "outputs": outputs, "stats": stats.to_dict()}


def run_error_feedback(rank: int, seed: int) -> dict[str, Any]:
    """Average the same inputs several times with int4 and error feedback; keep the running sum and residuals."""
    inputs = make_inputs(seed, rank)
    feedback = ErrorFeedback()
    total = [torch.zeros_like(t) for t in inputs]
    for _ in range(ERROR_FEEDBACK_SYNCS):
        outputs = [t.clone() for t in inputs]
        average_(outputs, "int4", algorithm="all_gather", error_feedback=feedback)
        for acc, out in zip(total, outputs):
            acc += out
    return {"name": "int4_error_feedback", "inputs": inputs, "total": total, "feedback": feedback.state_dict()}


def worker(rank: int, world_size: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world_size
    )
    try:
        results = {}
        for case in scenarios(rank):
            results[case["name"]] = run_case(case, rank, seed=input_seed(case["name"]))
        results["int4_error_feedback"] = run_error_feedback(rank, seed=99)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def main() -> None:
    out_dir = os.path.abspath(sys.argv[1])
    world_size = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    os.makedirs(out_dir, exist_ok=True)
    # Forked children inherit the imports, which start slowly; fork happens before any thread pool exists.
    start_method = "fork" if sys.platform == "linux" else "spawn"
    mp.start_processes(worker, args=(world_size, out_dir), nprocs=world_size, start_method=start_method)


if __name__ == "__main__":
    main()
