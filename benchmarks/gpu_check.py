"""The accelerator paths, checked in one short run: correctness on the device, mixed devices, and what it costs.

    python -m benchmarks.gpu_check                 # on a CUDA machine: about 4 minutes on one H200
    python -m benchmarks.gpu_check --device cpu    # the same checks on CPU, small sizes (about a minute here)

It prints one table and exits non-zero when a correctness check fails (1 and 2 below). The cost rows (3 to 6) state
their targets and say whether each was met; ``--strict`` makes a missed target fail the run too.

1. **Correctness on the device.** One DiLoCo worker training the tiny GPT on the device with ``bf16-mixed`` against
   the same fit on the CPU in fp32 (within a tolerance stated in the row); on CUDA also fp32 on the device against fp32
   on the CPU. ``outer_device="cpu"`` against the global state on the device. Every compression format's round trip
   on the device against the format's error bound and against the same round trip on the CPU.
2. **Mixed devices.** Two processes, rank 0 training on the device and rank 1 on the CPU, Lightning's world and the
   outer syncs over gloo (:mod:`benchmarks._mixed_devices`): both end with bitwise identical weights, equal to an
   independent reference simulation of the two workers on their two devices.
3. **Overhead.** The step time of DiLoCo (one worker, ``H`` steps per round) against plain Lightning, in interleaved
   pairs; and the share of the step spent in the strategy's own code, measured in-run (target at most 1%).
4. **The outer step against its physical limit.** One outer step (pseudo-gradient, mean, Nesterov, copy back) of
   several model sizes against the memory-bandwidth bound (:mod:`benchmarks._outer_timing`), with its temporary
   memory; on CUDA also with the global state on the CPU. Target within 3x of the bound.
5. **Memory.** Peak GPU memory of DiLoCo against plain Lightning: at most the global copy and momentum more, and
   nothing more with ``outer_device="cpu"`` (CUDA only: the CPU allocator keeps no peak; see row 4's temporaries).
6. **Tokens per second** of the overhead runs, DiLoCo against DDP on the one device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from lightning_diloco.compression import COMPRESSOR_NAMES, get_compressor

from . import _mixed_devices
from ._common import human_bytes, median, run_plan, table, window
from ._outer_timing import (
    BOUND_BYTES_PER_PARAM, HOST_LINK_BYTES_PER_PARAM, MEASURING_ENV, build_gpt, copy_bandwidth, host_link_bandwidth,
    time_outer_step,
)

#: Distances between two fits' final weights, relative to how far the reference fit moved them from their common
#: start (``||a - b|| / ||b - start||``): between a ``bf16-mixed`` fit and the fp32 fit on the CPU,
BF16_TOLERANCE = 0.1
#: between fp32 on CUDA and fp32 on the CPU (different kernels, the same arithmetic),
FP32_TOLERANCE = 1e-3
#: and between the global state on the CPU and on the device (the outer step's arithmetic on another device).
OUTER_DEVICE_TOLERANCE = 1e-4


@dataclass
class Sizes:
    """What each check runs at, on CUDA or on the CPU."""

    correctness: dict[str, Any]
    overhead: dict[str, Any]
    overhead_window: tuple[int, int]
    memory: dict[str, Any]
    outer_sizes: tuple[str, ...]
    outer_repeats: int
    pairs: int


CUDA_SIZES = Sizes(
    correctness={"model": {"preset": "tiny"}, "inner_steps": 10, "max_steps": 30, "batch_size": 8, "seq_len": 128},
    overhead={"model": {"preset": "150m"}, "inner_steps": 500, "max_steps": 550, "batch_size": 8, "seq_len": 512,
              "precision": "bf16-mixed", "sync_at": [50, 550]},
    overhead_window=(50, 550),
    memory={"model": {"preset": "400m"}, "inner_steps": 4, "max_steps": 6, "batch_size": 8, "seq_len": 512,
            "precision": "bf16-mixed"},
    outer_sizes=("150m", "400m", "1b"), outer_repeats=5, pairs=2,
)
CPU_SIZES = Sizes(
    correctness={"model": {"preset": "tiny"}, "inner_steps": 5, "max_steps": 10, "batch_size": 4, "seq_len": 64},
    overhead={"model": {"preset": "tiny"}, "inner_steps": 20, "max_steps": 25, "batch_size": 4, "seq_len": 64},
    overhead_window=(5, 25),
    memory={},
    outer_sizes=("tiny", "60m"), outer_repeats=3, pairs=2,
)


@dataclass
class Row:
    check: str
    what: str
    measured: str
    target: str
    ok: Optional[bool]  # None: informational
    correctness: bool = False

    def cells(self) -> list[str]:
        verdict = "-" if self.ok is None else ("pass" if self.ok else "FAIL")
        if not self.correctness and self.ok is not None:
            verdict = "met" if self.ok else "missed"
        return [self.check, self.what, self.measured, self.target, verdict]


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """``||a - b|| / ||b - start||`` over all floating-point tensors of the state dicts: ``a``'s distance from ``b``
    relative to how far training moved ``b`` (0 for the same weights, 1 or more for an ``a`` that did not train)."""
    keys = [k for k in b if b[k].is_floating_point()]
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)
    moved = sum(float((b[k].double() - start[k].double()).pow(2).sum()) for k in keys)
    return (diff / moved) ** 0.5


def bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_correctness(device: str, sizes: Sizes, out: Path) -> list[Row]:
    """Check 1: the tiny GPT's fit on the device against the CPU, ``outer_device``, and the codecs."""
    base = {**sizes.correctness, "strategy": "diloco", "save": True, "threads": 1}
    on_device = [{**base, "name": "bf16", "accelerator": device, "precision": "bf16-mixed"},
                 {**base, "name": "bf16-outer-cpu", "accelerator": device, "precision": "bf16-mixed",
                  "outer_device": "cpu"}]
    cpu_run = {**base, "name": "cpu-fp32", "accelerator": "cpu"}
    if device == "cpu":
        run_plan([cpu_run, *on_device], 1, out / "device")
    else:
        on_device.append({**base, "name": "fp32", "accelerator": device})
        run_plan([cpu_run], 1, out / "cpu")
        run_plan(on_device, 1, out / "device")
    weights = {run["name"]: torch.load(next(out.glob(f"*/{run['name']}.rank0.pt"))) for run in [cpu_run, *on_device]}
    start = torch.load(next(out.glob("*/cpu-fp32.rank0.init.pt")))
    rows = []
    moved = "of the fp32 fit's movement"
    distance = relative_distance(weights["bf16"], weights["cpu-fp32"], start)
    rows.append(Row("1", f"tiny GPT, bf16-mixed on {device} vs fp32 on cpu: final weights",
                    f"{distance:.2e} {moved}", f"<= {BF16_TOLERANCE:g}", distance <= BF16_TOLERANCE, True))
    if "fp32" in weights:
        distance = relative_distance(weights["fp32"], weights["cpu-fp32"], start)
        rows.append(Row("1", f"tiny GPT, fp32 on {device} vs fp32 on cpu", f"{distance:.2e} {moved}",
                        f"<= {FP32_TOLERANCE:g}", distance <= FP32_TOLERANCE, True))
    distance = relative_distance(weights["bf16-outer-cpu"], weights["bf16"], start)
    same = bitwise(weights["bf16-outer-cpu"], weights["bf16"])
    rows.append(Row("1", f'bf16-mixed, outer_device="cpu" vs "{device}"',
                    f"{distance:.2e} of the fit's movement" + (" (bitwise)" if same else ""),
                    f"<= {OUTER_DEVICE_TOLERANCE:g}", distance <= OUTER_DEVICE_TOLERANCE, True))
    rows += check_codecs(device)
    return rows


def codec_input(numel: int = 3 * 4096 + 1001) -> torch.Tensor:
    """Values of several magnitudes with outliers, not a multiple of any block size."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(numel, generator=generator) * torch.logspace(-3, 1, numel)[torch.randperm(numel, generator=generator)]
    x[torch.randint(0, numel, (numel // 500,), generator=generator)] *= 100
    return x


def check_codecs(device: str) -> list[Row]:
    """Every compression format's round trip on ``device``: within its error bound, and as on the CPU."""
    x = codec_input()
    rows = []
    for name in COMPRESSOR_NAMES:
        codec = get_compressor(name)
        on_cpu = codec.decode(codec.encode(x), x.numel())
        on_device = codec.decode(codec.encode(x.to(device)), x.numel()).cpu()
        within = bool(((on_device - x).abs() <= codec.error_bound(x) * (1 + 1e-6)).all())
        equal = float((on_device == on_cpu).float().mean())
        gap = float((on_device - on_cpu).abs().max())
        ok = within and equal >= 0.999 and gap <= 2 * float(codec.error_bound(x).max())
        measured = "bitwise as on cpu" if equal == 1.0 else f"{100 * equal:.3f}% equal to cpu, max gap {gap:.2e}"
        rows.append(Row("1", f"{name}: round trip on {device}", measured,
                        "within its bound; >= 99.9% equal to cpu", ok, True))
    return rows


def check_mixed_devices(device: str, out: Path) -> list[Row]:
    """Check 2: rank 0 on the device, rank 1 on the CPU, gloo between them, against the reference."""
    devices = [device, "cpu"]
    started = time.perf_counter()
    ranks = _mixed_devices.launch(devices, out / "mixed")
    seconds = time.perf_counter() - started
    expected = _mixed_devices.reference(devices)
    same = all(torch.equal(a, b) for a, b in zip(ranks[0]["weights"], ranks[1]["weights"]))
    gap = max(float(((a - e).abs() / e.abs().clamp_min(1e-3)).max()) for a, e in zip(ranks[0]["weights"], expected))
    exact = all(torch.equal(a, e) for a, e in zip(ranks[0]["weights"], expected))
    where = " and ".join(f"rank {r} on {rank['device']}" for r, rank in enumerate(ranks))
    return [
        Row("2", f"{where}: final weights of the two ranks", "bitwise equal" if same else "DIFFER", "bitwise equal",
            same, True),
        Row("2", f"{where}: against the reference simulation ({seconds:.0f} s)",
            "bitwise equal" if exact else f"max rel. gap {gap:.2e}", "<= 1e-5 rel.", exact or gap <= 1e-5, True),
    ]


def check_overhead(device: str, sizes: Sizes, out: Path) -> tuple[list[Row], dict[str, Any]]:
    """Checks 3 and 6: DiLoCo against plain Lightning in interleaved pairs, and against DDP."""
    common = {**sizes.overhead, "accelerator": device, "threads": 1 if device == "cpu" else 4}
    h = common["inner_steps"]
    sides = {"lightning": {**common, "strategy": "auto"}, "diloco": {**common, "strategy": "diloco"}}
    runs = []
    for p in range(sizes.pairs):
        order = ["lightning", "diloco"] if p % 2 == 0 else ["diloco", "lightning"]
        runs += [{**sides[name], "name": f"{name}-p{p}"} for name in order]
    runs.append({**common, "strategy": "ddp", "name": "ddp"})
    results = run_plan(runs, 1, out / "overhead")
    start, end = sizes.overhead_window
    w = {name: window(result[0], start, end) for name, result in results.items()}
    pairs = [(w[f"lightning-p{p}"], w[f"diloco-p{p}"]) for p in range(sizes.pairs)]
    ratio = median([d["step_seconds"] / lt["step_seconds"] for lt, d in pairs])
    own = median([d["own_seconds"] / d["seconds"] for _, d in pairs])
    outer = median([d["outer_seconds"] for _, d in pairs])
    tokens = {"diloco": median([d["tokens_per_second"] for _, d in pairs]),
              "lightning": median([lt["tokens_per_second"] for lt, _ in pairs]), "ddp": w["ddp"]["tokens_per_second"]}
    preset = common["model"]["preset"]
    precision = common.get("precision", "32-true")
    rows = [
        Row("3", f"{preset}, {precision}, H={h}: step time DiLoCo / Lightning (median of {sizes.pairs} pairs)",
            f"{ratio:.4f} ({1e3 * pairs[0][1]['step_seconds']:.1f} ms/step)", "-", None),
        Row("3", "strategy's own code, share of the step (in-run; outer step included)",
            f"{100 * own:.2f}% (outer step {1e3 * outer:.0f} ms per {h} steps)", "<= 1%", own <= 0.01),
        Row("6", f"tokens/s: DiLoCo / DDP / Lightning (devices=1, {precision})",
            f"{tokens['diloco']:,.0f} / {tokens['ddp']:,.0f} / {tokens['lightning']:,.0f}"
            f" ({tokens['diloco'] / tokens['ddp']:.3f}x DDP)", "-", None),
    ]
    peaks = {name: results[f"{name}-p0"][0]["cuda_peak_bytes"] for name in sides}
    return rows, {"peaks": peaks, "params": results["diloco-p0"][0]["num_parameters"], "tokens": tokens}


def check_outer_step(device: str, sizes: Sizes) -> list[Row]:
    """Check 4: one outer step against the memory-bandwidth bound, with its temporaries."""
    dev = torch.device(device)
    bandwidth = copy_bandwidth(dev)
    rows = [Row("4", f"copy bandwidth of {device}", f"{bandwidth / 1e9:.0f} GB/s", "-", None)]
    link = host_link_bandwidth(dev) if dev.type == "cuda" else None
    modes = [("on the device", None)] + ([("outer_device=cpu", torch.device("cpu"))] if link else [])
    for size in sizes.outer_sizes:
        module = build_gpt(size, dev)
        for label, outer_device in modes:
            timing = time_outer_step(module, outer_device, repeats=sizes.outer_repeats)
            if outer_device is None:
                bound = BOUND_BYTES_PER_PARAM * timing.parameters / bandwidth
            else:  # the host link twice, then the fused step in host memory
                assert link is not None
                bound = HOST_LINK_BYTES_PER_PARAM * timing.parameters / link
            times = timing.median / bound
            rows.append(Row("4", f"{size} ({timing.parameters / 1e6:.0f}M), outer step {label}",
                            f"{1e3 * timing.median:.1f} ms = {times:.1f}x the bound ({1e3 * bound:.1f} ms);"
                            f" temporaries {human_bytes(timing.temporary_bytes)}", "<= 3x the bound", times <= 3))
        del module
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def check_memory(device: str, sizes: Sizes, out: Path, overhead: dict[str, Any]) -> list[Row]:
    """Check 5: peak GPU memory of DiLoCo over plain Lightning (CUDA only)."""
    if device == "cpu":
        return [Row("5", "peak memory", "not measured on cpu (no allocator peak; see row 4's temporaries)", "-",
                    None)]
    common = {**sizes.memory, "accelerator": device}
    runs = [{**common, "strategy": "auto", "name": "lightning"}, {**common, "strategy": "diloco", "name": "diloco"},
            {**common, "strategy": "diloco", "outer_device": "cpu", "name": "diloco-outer-cpu"}]
    results = run_plan(runs, 1, out / "memory")
    rows = []
    sets = [(overhead["params"], overhead["peaks"], CUDA_SIZES.overhead["model"]["preset"]),
            (results["diloco"][0]["num_parameters"], {n: r[0]["cuda_peak_bytes"] for n, r in results.items()},
             common["model"]["preset"])]
    for params, peaks, preset in sets:
        state = 8 * params  # fp32 global copy and momentum
        extra = peaks["diloco"] - peaks["lightning"]
        rows.append(Row("5", f"{preset}: peak GPU memory, DiLoCo - Lightning ({human_bytes(peaks['lightning'])})",
                        f"+{human_bytes(extra)} ({extra / params:.1f} B/param)",
                        f"<= global + momentum ({human_bytes(state)})", extra <= state * 1.01))
        if "diloco-outer-cpu" in peaks:
            extra = peaks["diloco-outer-cpu"] - peaks["lightning"]
            rows.append(Row("5", f'{preset}: the same with outer_device="cpu"', f"{human_bytes(extra)}",
                            "nothing (<= 1% of the model)", extra <= 0.04 * params))
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--out", type=Path, help="folder for the runs' files (a temporary one by default)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--strict", action="store_true", help="a missed cost target fails the run too")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    sizes = CUDA_SIZES if device == "cuda" else CPU_SIZES
    out = args.out or Path(tempfile.mkdtemp(prefix="diloco-gpu-check-"))
    started = time.perf_counter()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    rows = check_correctness(device, sizes, out)
    rows += check_mixed_devices(device, out)
    overhead_rows, overhead = check_overhead(device, sizes, out)
    rows += overhead_rows
    rows += check_outer_step(device, sizes)
    rows += check_memory(device, sizes, out, overhead)
    print(f"gpu_check on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
          f" ({time.perf_counter() - started:.0f} s)\n")
    print(table(["check", "what", "measured", "target", "result"], [row.cells() for row in rows]))
    if args.json:
        args.json.write_text(json.dumps([row.__dict__ for row in rows], indent=1))
    failed = [row for row in rows if row.ok is False and (row.correctness or args.strict)]
    if failed:
        print(f"\n{len(failed)} check(s) failed: " + "; ".join(row.what for row in failed), file=sys.stderr)
    return 1 if failed else 0


def _with_measuring_env() -> None:
    """Run again with :data:`MEASURING_ENV` if this process did not start with it (glibc reads it at start-up)."""
    if all(os.environ.get(k) == v for k, v in MEASURING_ENV.items()):
        return
    env = {**os.environ, **MEASURING_ENV}
    os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *sys.argv[1:]], env)


if __name__ == "__main__":
    _with_measuring_env()
    sys.exit(main())
