"""What DiLoCoStrategy costs a single worker: step time and peak memory vs plain one-process Lightning.

Both sides train the same GPT from the same seed on the same random tokens in a fresh process with one CPU thread:
``Trainer(strategy="auto", devices=1)`` (Lightning's single-device strategy) and
``Trainer(strategy=DiLoCoStrategy(inner_steps=H), devices=1)`` (a world of one: every H steps the pseudo-gradient is
computed, "averaged" locally, the outer Nesterov step is taken and the weights are copied back). The time per step is
the mean over whole rounds (from the end of step H to the end of the run), so the outer steps are in it.

This machine's CPU cores are shared with other jobs, whose load changes from minute to minute. So each repeat runs the
two sides at the same time, one process each on the two cores (``--mode concurrent``): both see the same load, and
the ratio of their step times is what is reported (median over repeats, which alternate which side starts first).
``--mode sequential`` runs them one after the other in alternating order instead. Step times are taken as on a core
of its own (wall-clock time minus the time the training thread was runnable but waited for a CPU, from Linux
schedstat); the wall-clock ratio is printed beside it.

    python benchmarks/overhead.py                 # about 10 minutes on 2 busy CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import human_bytes, median, run_plan, table, window  # noqa: E402


def one(run: dict[str, Any]) -> dict[str, Any]:
    return run_plan([run], 1)[run["name"]][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inner-steps", type=int, default=100, help="H")
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds of H steps (after a first one)")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--mode", choices=["concurrent", "sequential"], default="concurrent")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    h = args.inner_steps
    steps = h * (args.rounds + 1)
    common = {"max_steps": steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "model": {"preset": args.preset}}
    sides = {"lightning": {"strategy": "auto", **common}, "diloco": {"strategy": "diloco", "inner_steps": h, **common}}
    started = time.perf_counter()
    repeats = []
    for r in range(args.repeats):
        order = ["lightning", "diloco"] if r % 2 == 0 else ["diloco", "lightning"]
        runs = [{**sides[name], "name": f"{name}-r{r}"} for name in order]
        if args.mode == "concurrent":
            with ThreadPoolExecutor(2) as pool:
                results = dict(zip(order, pool.map(one, runs)))
        else:
            results = {name: one(run) for name, run in zip(order, runs)}
        measured = {}
        for name, result in results.items():
            w = window(result, h, steps)
            per_step = [b - a for a, b in zip(result["times"][h - 1 : steps - 1], result["times"][h:steps])]
            # as on a core of its own: minus the time the training thread waited for a CPU taken by other jobs
            own_core = (w["seconds"] - w["run_delay"] + max(0.0, w["process_cpu"] - w["thread_cpu"])) / w["steps"]
            measured[name] = {
                "mean_step": own_core, "wall_step": w["step_seconds"], "median_step": statistics.median(per_step),
                "run_delay_share": w["run_delay"] / w["seconds"],
                "outer_seconds": w["outer_seconds"], "maxrss": result["maxrss_kib"] * 1024,
                "rss_fit": (result["maxrss_kib"] - result["maxrss_kib_before_fit"]) * 1024,
                "state_bytes": result["diloco_state_bytes"], "params": result["num_parameters"],
                "outer_steps": len(w["outer"]), "loadavg": result["loadavg"][0],
            }
        measured["ratio"] = measured["diloco"]["mean_step"] / measured["lightning"]["mean_step"]
        measured["wall_ratio"] = measured["diloco"]["wall_step"] / measured["lightning"]["wall_step"]
        measured["median_ratio"] = measured["diloco"]["median_step"] / measured["lightning"]["median_step"]
        repeats.append(measured)
        print(f"repeat {r + 1}/{args.repeats} ({' then '.join(order) if args.mode == 'sequential' else 'together'}):"
              f" lightning {1e3 * measured['lightning']['mean_step']:.1f} ms/step, diloco"
              f" {1e3 * measured['diloco']['mean_step']:.1f} ms/step, ratio {measured['ratio']:.4f}"
              f" (wall clock {measured['wall_ratio']:.4f})", flush=True)

    def med(side: str, key: str) -> float:
        return median([m[side][key] for m in repeats])

    ratio = median([m["ratio"] for m in repeats])
    wall_ratio = median([m["wall_ratio"] for m in repeats])
    params = repeats[0]["lightning"]["params"]
    rows = []
    for side, label in (("lightning", 'Lightning, strategy="auto", devices=1'),
                        ("diloco", f"DiLoCoStrategy(inner_steps={h}), world size 1")):
        rows.append([
            label, f"{1e3 * med(side, 'mean_step'):.1f}", f"{ratio:.4f}" if side == "diloco" else "1",
            f"{1e3 * med(side, 'wall_step'):.1f}", f"{wall_ratio:.4f}" if side == "diloco" else "1",
            f"{1e3 * med(side, 'outer_seconds') / max(1, repeats[0][side]['outer_steps']):.1f}"
            if side == "diloco" else "-",
            human_bytes(med(side, "maxrss")), human_bytes(med(side, "maxrss") - med("lightning", "maxrss")),
            human_bytes(med(side, "state_bytes")) if side == "diloco" else "-",
        ])
    print(f"\nGPT preset {args.preset!r} ({params:,} parameters), {args.batch_size} x {args.seq_len} tokens per step,"
          f" 1 CPU thread per process, {args.rounds} rounds of H={h} measured after a first one; medians of"
          f" {args.repeats} repeats ({args.mode}); load average {min(m['lightning']['loadavg'] for m in repeats):.1f}"
          f" to {max(m['lightning']['loadavg'] for m in repeats):.1f}\n")
    print(table(["run", "ms/step", "step-time ratio", "wall-clock ms/step", "wall-clock ratio", "ms per outer step",
                 "peak RSS", "vs Lightning", "DiLoCo state (global weights + momentum)"], rows))
    print("\nms/step: mean over whole rounds (outer steps included), as on a core of its own: wall-clock time minus the"
          " time the training thread waited for a CPU taken by other jobs (schedstat). Peak RSS: of the whole process"
          " (Python, torch and Lightning included); the CPU allocator keeps no statistics of its own.")
    per_repeat = " ".join(f"{m['ratio']:.4f}" for m in repeats)
    print(f"\nstep-time ratio per repeat: {per_repeat}; wall-clock ratio per repeat:"
          f" {' '.join(format(m['wall_ratio'], '.4f') for m in repeats)};"
          f" ratio of median wall-clock step times: {median([m['median_ratio'] for m in repeats]):.4f}"
          f" ({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"repeats": repeats, "ratio": ratio, "args": vars(args)}, indent=1,
                                        default=str))


if __name__ == "__main__":
    main()
