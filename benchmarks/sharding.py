"""Sharded workers against unsharded ones: memory per process and checkpoint time, and rank 0's memory while saving.

Two tables, from real multi-process Lightning fits of a GPT on CPU over gloo (:mod:`benchmarks.sharding_job`):

1. **DDP inside vs FSDP2 inside**, 2 workers of 2 processes, at several model sizes: what one process holds (weights,
   gradients, inner AdamW state and DiLoCo's global weights and momentum, counted from its tensors), its peak resident
   memory, and the median time of a checkpoint save and of a resume's restore.
2. **Rank 0 while saving against k**, unsharded workers of one process: how far rank 0's resident memory rises while
   ``trainer.save_checkpoint`` runs, for k = 1, 2 and 4 workers. Every rank writes its own part of the checkpoint
   directory, so this does not grow with k (rank 0 used to gather every worker's weights and optimizer state).

    python -m benchmarks.sharding            # three sizes, up to ~55M parameters (a few minutes)
    python -m benchmarks.sharding --quick    # the smallest size only in the first table, k = 1 and 2 in the second
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._common import ROOT

SIZES = {  # name: (n_layer, n_embd, vocab)
    "0.7M": (2, 128, 2048),
    "10M": (4, 384, 8192),
    "55M": (6, 768, 16384),
}
MB = 2**20


def run_job(out: Path, devices: int, g: int, sharding: str, size: tuple[int, int, int], timeout: float = 1200) -> list[dict[str, Any]]:
    n_layer, n_embd, vocab = size
    command = [sys.executable, "-m", "benchmarks.sharding_job", "--out", str(out), "--devices", str(devices),
               "--processes-per-worker", str(g), "--sharding", sharding, "--n-layer", str(n_layer),
               "--n-embd", str(n_embd), "--vocab", str(vocab)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the smallest model only, and k = 1, 2 while saving")
    parser.add_argument("--out", default=None, help="where the jobs write (a temporary directory by default)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="diloco-sharding-"))
    sizes = dict(list(SIZES.items())[:1]) if args.quick else SIZES
    report: dict[str, Any] = {"inside": [], "rank0_vs_k": []}

    print("DDP inside vs FSDP2 inside a worker (2 workers x 2 processes; per process, rank 0)")
    print(f"{'model':>6} {'inside':>6} {'weights':>9} {'grads':>9} {'AdamW':>9} {'DiLoCo':>9} {'held':>9}"
          f" {'peak RSS':>9} {'save s':>7} {'load s':>7} {'ckpt MB':>8}")
    for name, size in sizes.items():
        for sharding in ("none", "fsdp"):
            ranks = run_job(out / f"{name}-{sharding}", 4, 2, sharding, size)
            r = ranks[0]
            s = r["state_bytes"]
            row = {"model": name, "parameters": r["parameters"], "sharding": sharding, **s,
                   "held": sum(s.values()), "peak_rss": max(x["peak_rss_bytes"] for x in ranks),
                   "save_seconds": max(x["save_seconds"] for x in ranks),
                   "load_seconds": max(x["load_seconds"] for x in ranks), "checkpoint_bytes": r["checkpoint_bytes"]}
            report["inside"].append(row)
            label = "DDP" if sharding == "none" else "FSDP2"
            print(f"{name:>6} {label:>6} {s['weights'] / MB:9.1f} {s['gradients'] / MB:9.1f}"
                  f" {s['inner_optimizer'] / MB:9.1f} {s['diloco'] / MB:9.1f} {row['held'] / MB:9.1f}"
                  f" {row['peak_rss'] / MB:9.0f} {row['save_seconds']:7.2f} {row['load_seconds']:7.2f}"
                  f" {row['checkpoint_bytes'] / MB:8.1f}")
    name = "10M"  # large enough that one worker's state stands far above the noise of resident memory
    print(f"\nrank 0 while saving, unsharded workers of one process ({name} model)")
    print(f"{'k':>3} {'rank 0 growth MB':>17} {'one worker state MB':>20} {'save s':>7}")
    for k in (1, 2) if args.quick else (1, 2, 4):
        ranks = run_job(out / f"k{k}", k, 1, "none", SIZES[name])
        r = ranks[0]
        worker = r["state_bytes"]["weights"] + r["state_bytes"]["inner_optimizer"]
        row = {"k": k, "rank0_save_growth": r["save_peak_growth_bytes"], "worker_state": worker,
               "save_seconds": r["save_seconds"]}
        report["rank0_vs_k"].append(row)
        print(f"{k:>3} {row['rank0_save_growth'] / MB:17.1f} {worker / MB:20.1f} {row['save_seconds']:7.2f}")
    growth = [row["rank0_save_growth"] for row in report["rank0_vs_k"]]
    fsdp = [row for row in report["inside"] if row["sharding"] == "fsdp"]
    ddp = [row for row in report["inside"] if row["sharding"] == "none"]
    print("\nsummary")
    print(f"fsdp_held_over_ddp_held: {fsdp[-1]['held'] / ddp[-1]['held']:.3f}")
    print(f"fsdp_diloco_over_ddp_diloco: {fsdp[-1]['diloco'] / ddp[-1]['diloco']:.3f}")
    print(f"rank0_growth_k4_minus_k1_mb: {(growth[-1] - growth[0]) / MB:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
