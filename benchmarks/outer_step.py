"""One outer step against its memory-bandwidth bound, from 1M to 1B parameters; and against torchft's DiLoCo.

    python -m benchmarks.outer_step                      # about 5 minutes on 2 CPU cores
    python -m benchmarks.outer_step --sizes tiny 60m     # a subset
    python -m benchmarks.outer_step --torchft-only       # only the side-by-side with torchft

**Bound.** For each model size (the GPT presets and a 1B configuration, as large as the machine's free memory
holds), one worker takes outer steps as the strategy does (:mod:`benchmarks._outer_timing`: the pseudo-gradient
written into the sync's bucket, the mean of a world of one, so no collective, the outer Nesterov step of the bucket's
range of the flat global state, the copy back), in a fresh process started with ``MALLOC_MMAP_THRESHOLD_=65536`` so
that its peak resident memory counts every temporary. Beside each step: the bound, 24 bytes per parameter (read the
local weights, the global weights and the momentum; write all three) over the copy bandwidth measured in the same
process, and the temporary memory against one bucket (``outer_bucket_cap_mb``, 128 MiB).

**torchft.** The same work under both implementations (:mod:`benchmarks._outer_side_by_side`): two CPU workers over
gloo on loopback, a 1.08M-parameter MLP, H=10, fp32, AdamW inside, Nesterov outside, the same initial weights and the
batches Lightning's ``DistributedSampler(shuffle=True, seed=0)`` gives each rank. Ours is a Lightning fit with
``DiLoCoStrategy``; torchft's is its ``torchft.local_sgd.DiLoCo`` around the same inner optimizer, with a lighthouse
and ``Manager(init_sync=False)``. The two alternate (ABAB...), and each outer step is timed on the rank that arrived
last (the one that waited least for the other). The final weights of the two are compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._common import ROOT, human_bytes, median, table
from ._outer_timing import BOUND_BYTES_PER_PARAM, MEASURING_ENV

SIZES = ("tiny", "60m", "150m", "1b")
#: Bytes per parameter a size needs while measured: the model, the global weights, the momentum (4 each).
_NEEDED_BYTES_PER_PARAM = 12
_PARAMS = {"tiny": 0.87e6, "60m": 58.5e6, "150m": 145.2e6, "400m": 390.5e6, "1b": 973.7e6}


def measure_size(size: str, repeats: int, bucket_cap_mb: float) -> dict[str, Any]:
    """This process's measurement of one size (run by :func:`main` in a fresh process per size)."""
    import torch

    from ._outer_timing import build_gpt, copy_bandwidth, time_outer_step

    torch.set_num_threads(1)
    device = torch.device("cpu")
    bandwidth = copy_bandwidth(device, nbytes=1 << 28)
    module = build_gpt(size, device)
    timing = time_outer_step(module, repeats=repeats, outer_bucket_cap_mb=bucket_cap_mb)
    return {"size": size, "parameters": timing.parameters, "seconds": timing.seconds, "median": timing.median,
            "temporary_bytes": timing.temporary_bytes, "state_bytes": timing.state_bytes,
            "kept_bytes": timing.kept_bytes, "bandwidth": bandwidth,
            "bound": BOUND_BYTES_PER_PARAM * timing.parameters / bandwidth, "bucket_bytes": bucket_cap_mb * 2**20}


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def bound_table(sizes: list[str], repeats: int, bucket_cap_mb: float) -> list[dict[str, Any]]:
    """Measure every size that fits, each in a fresh process."""
    results = []
    for size in sizes:
        needed = _NEEDED_BYTES_PER_PARAM * _PARAMS.get(size, 0) + 2**30
        if needed > available_bytes():
            print(f"{size}: skipped, needs about {human_bytes(needed)} of free memory", file=sys.stderr)
            continue
        env = {**os.environ, **MEASURING_ENV, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", __spec__.name, "--one", size, "--repeats", str(repeats),
                   "--bucket-cap-mb", str(bucket_cap_mb)]
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"measuring {size} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def print_bound_table(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        rows.append([
            f"{r['size']} ({r['parameters'] / 1e6:.2f}M)", f"{1e3 * r['median']:.1f}",
            f"{1e3 * r['bound']:.1f}", f"**{r['median'] / r['bound']:.2f}x**", human_bytes(r["temporary_bytes"]),
            f"{human_bytes(r['kept_bytes'])} ({r['kept_bytes'] / r['bucket_bytes']:.2f})", human_bytes(r["state_bytes"]),
        ])
    bandwidth = median([r["bandwidth"] for r in results])
    print(f"One worker, one CPU thread, fp32; copy bandwidth {bandwidth / 1e9:.1f} GB/s (median over the sizes' runs);"
          " medians of the timed outer steps\n")
    print(table(["model", "outer step ms", "bound ms (24 B/param)", "step / bound", "temporaries of a step",
                 "sync buffer kept (in buckets)", "global state (weights + momentum)"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-cap-mb", type=float, default=128.0)
    parser.add_argument("--pairs", type=int, default=5, help="A/B repetitions of the torchft side-by-side")
    parser.add_argument("--torchft-only", action="store_true")
    parser.add_argument("--no-torchft", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_size(args.one, args.repeats, args.bucket_cap_mb)))
        return
    report: dict[str, Any] = {}
    if not args.torchft_only:
        report["bound"] = bound_table(args.sizes, args.repeats, args.bucket_cap_mb)
        print_bound_table(report["bound"])
    if not args.no_torchft:
        from ._outer_side_by_side import compare, print_comparison

        report["torchft"] = compare(args.pairs)
        print()
        print_comparison(report["torchft"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
