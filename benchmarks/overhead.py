"""What DiLoCoStrategy costs a single worker: step time and peak memory vs plain one-process Lightning.

Both sides train the same GPT from the same seed on the same random tokens with one CPU thread:
``Trainer(strategy="auto", devices=1)`` (Lightning's single-device strategy) and
``Trainer(strategy=DiLoCoStrategy(inner_steps=H), devices=1)`` (a world of one: every H steps the pseudo-gradient is
computed, "averaged" locally, the outer Nesterov step is taken and the weights are copied back). The time per step is
the mean over whole rounds (from the end of step H to the end of the run), so the outer steps are in it, taken as on
a core of its own: wall-clock time minus the time the training thread was runnable but waited for a CPU taken by
other jobs (Linux schedstat), since this machine's cores are shared. The wall-clock ratio is printed beside it.

The speed of this machine drifts from minute to minute, so the two sides alternate many times in ABBA order
(``--mode interleaved``, the default: all fits in one process, one after the other; ``sequential``: a fresh process
per fit; ``concurrent``: the two sides at the same time, one process each on the two cores, which showed a pairing
artefact here: two identical runs side by side differ by up to 10%). The ratio is the median over the A/B pairs.
Peak memory (RSS of a fresh process running one fit, Python, torch and Lightning included: the CPU allocator keeps no
statistics of its own) is measured in separate fresh processes.

    python -m benchmarks.overhead                 # about 8 minutes on 2 CPU cores (12 when they are busy)

The strategy's own time is what it measures itself (``trainer.strategy.timings.own_seconds``: the time in
``DiLoCoStrategy.optimizer_step`` outside the inner step), read at the end of every batch.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ._common import human_bytes, median, run_plan, table, window

SIDES = ("lightning", "diloco")


def one(run: dict[str, Any]) -> dict[str, Any]:
    """One fit in a fresh process."""
    return run_plan([run], 1)[run["name"]][0]


def measure(result: dict[str, Any], h: int, steps: int) -> dict[str, float]:
    """One fit's numbers over whole rounds, from the end of step ``h`` to the end of step ``steps``."""
    w = window(result, h, steps)
    own_core = (w["seconds"] - w["run_delay"] + max(0.0, w["process_cpu"] - w["thread_cpu"])) / w["steps"]
    return {
        "step": own_core, "wall_step": w["step_seconds"],
        "run_delay_share": w["run_delay"] / w["seconds"], "outer_seconds": w["outer_seconds"],
        "outer_steps": len(w["outer"]), "loadavg": result["loadavg"][0], "params": result["num_parameters"],
        "own_step": w["own_seconds"] / w["steps"], "own_share": w["own_seconds"] / w["seconds"],
    }


def main() -> None:
    """Run the A/B pairs and the memory fits, print the table and optionally write ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inner-steps", type=int, default=100, help="H")
    parser.add_argument("--rounds", type=int, default=1, help="measured rounds of H steps (after a first one)")
    parser.add_argument("--pairs", type=int, default=10, help="A/B pairs (alternating ABBA)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--mode", choices=["interleaved", "sequential", "concurrent"], default="interleaved")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    h = args.inner_steps
    steps = h * (args.rounds + 1)
    common = {"max_steps": steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "model": {"preset": args.preset}}
    sides = {"lightning": {"strategy": "auto", **common}, "diloco": {"strategy": "diloco", "inner_steps": h, **common}}
    orders = [list(SIDES) if p % 2 == 0 else list(reversed(SIDES)) for p in range(args.pairs)]
    started = time.perf_counter()

    pairs: list[dict[str, dict[str, Any]]] = []
    if args.mode == "interleaved":
        runs = [{**sides[name], "name": f"{name}-p{p}"} for p, order in enumerate(orders) for name in order]
        results = run_plan(runs, 1)
        pairs = [{name: results[f"{name}-p{p}"][0] for name in SIDES} for p in range(args.pairs)]
    else:
        for p, order in enumerate(orders):
            runs = [{**sides[name], "name": f"{name}-p{p}"} for name in order]
            if args.mode == "concurrent":
                with ThreadPoolExecutor(2) as pool:
                    pairs.append(dict(zip(order, pool.map(one, runs))))
            else:
                pairs.append({name: one(run) for name, run in zip(order, runs)})

    measured = [{name: measure(pair[name], h, steps) for name in SIDES} for pair in pairs]
    for m in measured:
        m["ratio"] = m["diloco"]["step"] / m["lightning"]["step"]  # type: ignore[assignment,operator]
        m["wall_ratio"] = m["diloco"]["wall_step"] / m["lightning"]["wall_step"]  # type: ignore[assignment,operator]

    # peak memory: one fit per fresh process (the interleaved fits share one)
    if args.mode == "interleaved":
        memory = {name: one({**sides[name], "name": f"{name}-memory"}) for name in SIDES}
    else:
        memory = pairs[0]
    rss = {name: memory[name]["maxrss_kib"] * 1024 for name in SIDES}
    state = memory["diloco"]["diloco_state_bytes"]

    def med(side: str, key: str) -> float:
        return median([m[side][key] for m in measured])

    ratio = median([m["ratio"] for m in measured])
    ratios = sorted(m["ratio"] for m in measured)
    own_share = med("diloco", "own_share")
    own_ratio = 1 / (1 - own_share)  # its step time over the same step without the strategy's own work
    wall_ratio = median([m["wall_ratio"] for m in measured])
    params = measured[0]["lightning"]["params"]
    rows = []
    for side, label in (("lightning", 'Lightning, strategy="auto", devices=1'),
                        ("diloco", f"DiLoCoStrategy(inner_steps={h}), world size 1")):
        rows.append([
            label, f"{1e3 * med(side, 'step'):.1f}", f"**{ratio:.4f}**" if side == "diloco" else "1",
            f"{1e3 * med(side, 'wall_step'):.1f}", f"{wall_ratio:.4f}" if side == "diloco" else "1",
            f"{1e3 * med(side, 'outer_seconds') / max(1, measured[0][side]['outer_steps']):.1f}"
            if side == "diloco" else "-",
            human_bytes(rss[side]), ("+" + human_bytes(rss[side] - rss["lightning"])) if side == "diloco" else "-",
            human_bytes(state) if side == "diloco" else "-",
            f"{1e6 * med(side, 'own_step'):.0f} ({100 * own_share:.2f}%)" if side == "diloco" else "-",
            f"**{own_ratio:.4f}**" if side == "diloco" else "1",
        ])
    loads = [m[s]["loadavg"] for m in measured for s in SIDES]
    print(f"GPT preset {args.preset!r} ({params:,} parameters), {args.batch_size} x {args.seq_len} tokens per step,"
          f" 1 CPU thread; {args.rounds} round(s) of H={h} measured after a first one; medians of {args.pairs} A/B pairs"
          f" ({args.mode}); load average {min(loads):.1f} to {max(loads):.1f}\n")
    print(table(["run", "ms/step", "step-time ratio", "wall-clock ms/step", "wall-clock ratio", "ms per outer step",
                 "peak RSS", "vs Lightning", "DiLoCo state (global weights + momentum)",
                 "strategy's own µs/step (share)", "in-run ratio"], rows))
    print("\nms/step: mean over whole rounds (outer steps included), as on a core of its own (wall-clock time minus"
          " the time the training thread waited for a CPU taken by other jobs). Peak RSS: of a fresh process running"
          " one fit (Python, torch and Lightning included). Strategy's own time: DiLoCoStrategy.optimizer_step outside"
          " the inner step it wraps (bookkeeping and outer steps), per step and as a share of the step time, measured"
          " within each run; in-run ratio = 1 / (1 - share), free of the drift between runs.")
    print(f"step-time ratio per pair: {' '.join(format(r, '.3f') for r in ratios)} (sorted; quartiles"
          f" {ratios[len(ratios) // 4]:.3f} to {ratios[(3 * len(ratios)) // 4]:.3f})"
          f" ({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"pairs": measured, "ratio": ratio, "wall_ratio": wall_ratio, "rss": rss,
                                         "state_bytes": state, "own_share": own_share,
                                         "own_ratio": own_ratio, "args": vars(args)}, indent=1, default=str))


if __name__ == "__main__":
    main()
