"""Bytes each worker sends per inner step: DDP vs DiLoCo with every compression, formula vs measured.

The formula is the ring all-reduce volume ``2 (k - 1) / k * P * b`` per sync (``P`` parameters of ``b`` bytes, ``k``
workers); DDP pays it every step, DiLoCo every ``H`` steps. "Exact" adds what the strategy really moves: one fp32
scale per 256-element block for int8/int4/e3m0 and the padding that aligns each tensor to a block. "Measured" is the
strategy's own ``diloco/bytes_sent`` from a short run of ``k`` real processes (gloo on this machine) training the
tiny GPT, and for DDP the bytes of the gradient buckets its reducer hands to the all-reduce (a comm hook), times the
ring factor. The paper's 150M model is counted on the meta device (formula only).

    python -m benchmarks.bytes                      # k = 2 and 8 measured; about 3-4 minutes on 2 CPU cores
    python -m benchmarks.bytes --measure-k 2        # quicker
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from lightning_diloco.compression import COMPRESSOR_NAMES
from lightning_diloco.fragments import split_into_fragments
from lightning_diloco.gpt import GPT, GPTConfig

from ._common import NOMINAL_BITS, exact_sync_bytes, human_bytes, ring_bytes, run_plan, table


def meta_numels(preset: str) -> list[int]:
    """Parameter sizes of a preset, in ``module.parameters()`` order, without allocating it."""
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(preset))
    return [p.numel() for p in model.parameters()]


def outer_syncs(result: dict[str, Any], max_steps: int) -> list[dict[str, float]]:
    """The outer steps of a run up to ``max_steps``, without the end-of-fit flush (a second sync at the last step)."""
    seen: set[tuple[int, int]] = set()
    syncs = []
    for record in result["outer"]:
        key = (int(record["step"]), int(record["diloco/fragment"]))
        if record["step"] <= max_steps and key not in seen and not any(s[0] == key[0] for s in seen if s[1] > key[1]):
            seen.add(key)
            syncs.append(record)
    return syncs


def measure(k: int, compressions: list[str], fragments: list[int], inner_steps: int, steps: int,
            batch_size: int) -> dict[str, Any]:
    """Run DDP, DiLoCo with each compression and DiLoCo with each F on ``k`` processes; bytes per sync per worker."""
    common = {"max_steps": steps, "batch_size": batch_size, "seq_len": 32, "model": {"preset": "tiny"}}
    runs = [{"name": f"diloco-{c}", "strategy": "diloco", "inner_steps": inner_steps, "compression": c, **common}
            for c in compressions]
    runs += [{"name": f"fragments-{f}", "strategy": "diloco", "inner_steps": inner_steps, "fragments": f, **common}
             for f in fragments if f > 1]
    runs.append({"name": "ddp", "strategy": "ddp", **common})
    results = run_plan(runs, k)
    out: dict[str, Any] = {"numels": results["ddp"][0]["parameter_numels"]}
    for name, ranks in results.items():
        if name == "ddp":
            # the bytes of the buckets handed to the all-reduce, per step, as a ring all-reduce sends them
            per_step = max(r["ddp_bucket_bytes"] for r in ranks) / steps
            out[name] = {"bucket_bytes_per_step": per_step, "sent_per_step": 2 * (k - 1) / k * per_step}
        else:
            per_sync = [max(s["diloco/bytes_sent"] for s in outer_syncs(r, steps)) for r in ranks]
            syncs = outer_syncs(ranks[0], steps)
            out[name] = {"peak_sync": max(per_sync), "syncs": len(syncs),
                         "per_sync": [s["diloco/bytes_sent"] for s in syncs]}
    if "diloco-none" in results and 1 in fragments:
        out["fragments-1"] = out["diloco-none"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure, print both tables and return (and optionally write to ``--json``) every number.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The report: parameter counts, one row per model, k and method, the fragments' peaks, the raw measurements.

    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measure-k", type=int, nargs="*", default=[2, 8], help="worker counts to run for real")
    parser.add_argument("--compressions", nargs="+", default=list(COMPRESSOR_NAMES), choices=COMPRESSOR_NAMES)
    parser.add_argument("--fragments", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--inner-steps", type=int, default=4, help="H of the measured runs (bytes per sync do not"
                        " depend on it)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args(argv)
    if "none" not in args.compressions:
        args.compressions.insert(0, "none")

    start = time.perf_counter()
    measured = {k: measure(k, args.compressions, args.fragments, args.inner_steps, args.steps, args.batch_size)
                for k in args.measure_k}
    tiny = measured[args.measure_k[0]]["numels"] if args.measure_k else meta_numels("tiny")
    models = {"tiny": tiny, "150m": meta_numels("150m")}
    report: dict[str, Any] = {"models": {m: sum(n) for m, n in models.items()}, "rows": [], "fragments": []}

    rows = []
    all_exact = True
    for model, numels in models.items():
        params = sum(numels)
        for k in (2, 8):
            got = measured.get(k) if model == "tiny" else None
            ddp = ring_bytes(params, 32, k)
            entries = [("DDP", 32, 1, ddp, got["ddp"]["sent_per_step"] if got else None)]
            for c in args.compressions:
                entries.append((f"DiLoCo {c}", NOMINAL_BITS[c], None, exact_sync_bytes(numels, c, k),
                                got[f"diloco-{c}"]["peak_sync"] if got else None))
            for label, bits, h_fixed, exact, per_sync in entries:
                formula = ring_bytes(params, bits, k)
                row: dict[str, Any] = {"model": model, "k": k, "method": label, "bits": bits,
                                       "formula_per_sync": formula, "exact_per_sync": exact,
                                       "measured_per_sync": per_sync}
                cells = [model, k, label]
                for h in (50, 500):
                    h = h_fixed or h
                    row[f"formula_per_step_H{h}"] = formula / h
                    row[f"measured_per_step_H{h}"] = None if per_sync is None else per_sync / h
                    cells += [human_bytes(formula / h), "-" if per_sync is None else human_bytes(per_sync / h)]
                row["measured_over_formula"] = None if per_sync is None else per_sync / formula
                if per_sync is not None and label != "DDP":
                    all_exact &= per_sync == exact
                cells += ["-" if per_sync is None else f"{per_sync / formula:.4f}"]
                cells += [f"{ddp / (formula / 50):.0f}x" if h_fixed is None else "1x",
                          f"{ddp / (formula / 500):.0f}x" if h_fixed is None else "1x"]
                report["rows"].append(row)
                rows.append(cells)
    report["measured_equals_exact"] = all_exact
    print(f"Parameters P: tiny {report['models']['tiny']:,}, 150m {report['models']['150m']:,} (tied embeddings"
          " counted once)")
    print("Bytes each worker sends per inner step: ring all-reduce volume 2(k-1)/k * P * b / H (DDP: H = 1)\n")
    print(table(["model", "k", "method", "formula H=50", "measured H=50", "formula H=500", "measured H=500",
                 "measured / formula", "less than DDP, H=50", "H=500"], rows))
    print("\nmeasured / formula above 1: one fp32 scale per 256 elements (fp16, int8, int4, e3m0) and block padding."
          f" Measured equals the exact formula (scales and padding included) in every DiLoCo row: {all_exact}.")

    frag_rows = []
    for model, numels in models.items():
        for k in (2, 8):
            got = measured.get(k) if model == "tiny" else None
            base = None
            for f in args.fragments:
                bands = split_into_fragments(numels, f)
                exact = max(exact_sync_bytes([numels[i] for i in band], "none", k) for band in bands)
                meas = got[f"fragments-{f}"]["peak_sync"] if got and f"fragments-{f}" in got else None
                base = base or exact
                report["fragments"].append({"model": model, "k": k, "F": f, "exact_peak": exact, "measured_peak": meas,
                                            "fall": base / exact})
                frag_rows.append([model, k, f, human_bytes(ring_bytes(sum(numels), 32, k) / f), human_bytes(exact),
                                  "-" if meas is None else human_bytes(meas), f"{base / exact:.2f}x"])
    print("\nStreaming fragments: bytes of the largest single sync per worker (fp32; F fragments of whole tensors)\n")
    print(table(["model", "k", "F", "formula P*b*2(k-1)/k/F", "exact (largest fragment)", "measured",
                 "fall vs F=1"], frag_rows))
    print(f"\n({time.perf_counter() - start:.0f} s; measured with k = {args.measure_k} gloo processes on this machine)")
    report["measured"] = {str(k): v for k, v in measured.items()}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
