"""Tables, plots and raw numbers of :mod:`benchmarks.reproduce` from the finished runs' result files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import _repro_lib as lib

#: The papers' numbers (validation perplexity unless said otherwise). DiLoCo: Douillard et al. 2023 (150M model, C4,
#: 8 workers, H = 500). Streaming DiLoCo: Douillard et al. 2025 (1B model, loss).
PAPER = {
    "baseline": 16.23,
    "ddp_8x_batch": 15.30,
    "8x_updates": 14.72,
    "diloco": 15.02,
    "replicas_iid": {1: 16.23, 4: 15.23, 8: 15.08, 16: 15.02, 64: 14.95},
    "replicas_noniid": {4: 15.18, 8: 15.02, 16: 14.91, 64: 14.96},
    "h1000_vs_h50": 1.029,
    "streaming_loss": {"data-parallel": 2.49, "DiLoCo H=30": 2.49, "streaming + overlap + 4-bit H=30": 2.48},
}

#: The tables: (file stem, title, run names in row order).
TABLES = ("table2", "h_sweep", "workers", "outer_optimizer", "iid_noniid", "compression", "frontier")


def load_results(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The result of every finished run whose result matches its configuration, by name."""
    results = {}
    for spec in runs:
        path = Path(spec["result"])
        if path.is_file():
            result = json.loads(path.read_text())
            if result.get("key") == lib.spec_key(spec):
                results[spec["name"]] = result
    return results


def fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def fmt_bytes(value: Optional[float]) -> str:
    if value is None:
        return "—"
    if value == 0:
        return "0"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or not b else a / b


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def build_tables(size: str, runs: list[dict[str, Any]], res: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every table as ``{"title", "markdown", "runs": [names plotted], "rows": [raw dicts]}``."""
    cfg = lib.SIZES[size]
    k, h0 = cfg["k"], cfg["inner_steps"]
    spec = {r["name"]: r for r in runs}

    def p(name: str) -> Optional[float]:
        return res[name]["final_val_ppl"] if name in res else None

    def b(name: str) -> Optional[float]:
        return res[name]["bytes_sent"] if name in res else None

    ddp, single, main = f"ddp_k{k}", "single", "diloco_main"
    tables: dict[str, dict[str, Any]] = {}

    # Table 2
    rows, raw = [], []
    paper_rows = [
        (single, "1 worker (baseline)", PAPER["baseline"], "never"),
        (ddp, f"DDP, {k}x batch (paper: 8x batch)", PAPER["ddp_8x_batch"], "every step"),
        (main, f"DiLoCo, k={k}, H={h0} (paper: k=8, H=500)", PAPER["diloco"], f"every {h0} steps (paper: 500)"),
    ]
    for name, label, paper, when in paper_rows:
        rows.append([label, fmt(p(name)), fmt(ratio(p(name), p(single))), fmt(ratio(p(name), p(ddp))),
                     fmt_bytes(b(name)), when, fmt(paper, 2), fmt(paper / PAPER["baseline"]),
                     fmt(paper / PAPER["ddp_8x_batch"])])
        raw.append({"run": name, "ppl": p(name), "bytes": b(name), "paper_ppl": paper})
    rows.append(["4x updates (one worker, 4x steps; paper: 8x updates)", "not run", "—", "—", "0", "—",
                 fmt(PAPER["8x_updates"], 2), fmt(PAPER["8x_updates"] / PAPER["baseline"]),
                 fmt(PAPER["8x_updates"] / PAPER["ddp_8x_batch"])])
    tables["table2"] = {
        "title": f"Table 2 in miniature: one worker, DDP with {k}x batch, DiLoCo with {k} workers",
        "headers": ["run", "val ppl", "/ 1 worker", "/ DDP", "bytes sent per worker", "communicates",
                    "paper ppl", "paper / baseline", "paper / DDP"],
        "rows": rows, "raw": raw, "runs": [single, ddp, main],
    }

    # H sweep
    hs = sorted({cfg["inner_steps"], *cfg["h_sweep"]})
    names = [main if h == h0 else f"diloco_h{h}" for h in hs]
    first = p(names[0])
    rows = [[f"DDP, {k}x batch (every step)", fmt(p(ddp)), fmt(ratio(p(ddp), first)), "1.000", fmt_bytes(b(ddp)),
             "1x", str(cfg["steps"])]]
    raw = [{"run": ddp, "H": 1, "ppl": p(ddp), "bytes": b(ddp)}]
    for h, name in zip(hs, names):
        syncs = res[name]["outer_syncs"] if name in res else None
        rows.append([f"DiLoCo, H={h}", fmt(p(name)), fmt(ratio(p(name), first)), fmt(ratio(p(name), p(ddp))),
                     fmt_bytes(b(name)), fmt(ratio(b(ddp), b(name)), 0) + "x fewer" if b(name) else "—",
                     str(syncs) if syncs is not None else "—"])
        raw.append({"run": name, "H": h, "ppl": p(name), "bytes": b(name), "outer_syncs": syncs})
    last = ratio(p(names[-1]), first)
    tables["h_sweep"] = {
        "title": f"Fig. 4 in miniature: inner steps H at k={k}"
                 f" (outer {lib.outer_label(spec[main]['diloco']['outer'])})",
        "headers": ["run", "val ppl", f"/ H={hs[0]}", "/ DDP", "bytes sent per worker", "vs DDP bytes", "syncs"],
        "rows": rows, "raw": raw, "runs": [ddp, *names],
        "note": f"Paper (Fig. 4): H = 1000 costs {PAPER['h1000_vs_h50']:.3f}x the perplexity of H = 50 for 20x fewer"
                f" bytes. Here H = {hs[-1]} costs {fmt(last)}x the perplexity of H = {hs[0]} for"
                f" {hs[-1] // hs[0]}x fewer bytes.",
    }

    # Workers
    rows, raw, names = [], [], []
    base = p(single)
    rows.append(["1 worker, no DiLoCo (baseline)", fmt(base), "1.000", "0", fmt(PAPER["baseline"], 2), "1.000"])
    for kk in cfg["workers"]:
        name = main if kk == k else f"diloco_k{kk}"
        names.append(name)
        paper = PAPER["replicas_iid"].get(kk) if kk > 1 else None  # the paper's 1-replica row is the baseline
        rows.append([f"DiLoCo, k={kk}, H={h0}", fmt(p(name)), fmt(ratio(p(name), base)), fmt_bytes(b(name)),
                     fmt(paper, 2) if kk > 1 else "below the baseline (Fig. 9)", fmt(ratio(paper, PAPER["baseline"]))])
        raw.append({"run": name, "workers": kk, "ppl": p(name), "bytes": b(name), "paper_ppl": paper})
    paper = PAPER["replicas_noniid"].get(k)
    rows.append([f"DiLoCo, k={k}, H={h0}, non-i.i.d.", fmt(p("noniid")), fmt(ratio(p("noniid"), base)),
                 fmt_bytes(b("noniid")), fmt(paper, 2), fmt(ratio(paper, PAPER["baseline"]))])
    tables["workers"] = {
        "title": f"Table 3 in miniature: number of workers (H={h0}, i.i.d. shards; same steps per worker)",
        "headers": ["run", "val ppl", "/ 1 worker", "bytes sent per worker", "paper ppl (Table 3)",
                    "paper / baseline"],
        "rows": rows, "raw": raw, "runs": [single, *names],
    }

    # Outer optimizer
    outer_runs = [main] + [n for n in ("outer_paper", "outer_fedavg", "outer_adam") if n in spec]
    rows, raw = [], []
    paper_note = {"outer_fedavg": "worse than Nesterov", "outer_adam": "worse than Nesterov",
                  main: "best, robust" if spec[main]["diloco"]["outer"] == lib.PAPER_OUTER else "—",
                  "outer_paper": "best, robust (the paper's choice)"}
    for name in outer_runs:
        rows.append([lib.outer_label(spec[name]["diloco"]["outer"]), fmt(p(name)), fmt(ratio(p(name), p(main))),
                     fmt(ratio(p(name), p(ddp))), fmt(ratio(p(name), p(single))), paper_note[name]])
        raw.append({"run": name, "outer": spec[name]["diloco"]["outer"], "ppl": p(name)})
    tables["outer_optimizer"] = {
        "title": f"Fig. 6 in miniature: outer optimizer (k={k}, H={h0})",
        "headers": ["outer optimizer", "val ppl", "/ main", "/ DDP", "/ 1 worker", "paper (Fig. 6)"],
        "rows": rows, "raw": raw, "runs": [ddp, *outer_runs],
    }

    # iid vs non-iid
    noniid_ddp = f"ddp_k{k}_noniid"
    paper_k = 4  # the paper's Table 3 row closest to the miniature
    paper_ratio = PAPER["replicas_noniid"][paper_k] / PAPER["replicas_iid"][paper_k]
    rows = [
        [f"DiLoCo, k={k}, H={h0}", fmt(p(main)), fmt(p("noniid")), fmt(ratio(p("noniid"), p(main))),
         f"{PAPER['replicas_noniid'][paper_k]:.2f} / {PAPER['replicas_iid'][paper_k]:.2f} = {paper_ratio:.3f}"],
    ]
    if noniid_ddp in spec:
        rows.append([f"DDP, {k}x batch", fmt(p(ddp)), fmt(p(noniid_ddp)), fmt(ratio(p(noniid_ddp), p(ddp))), "—"])
    tables["iid_noniid"] = {
        "title": f"Fig. 5 in miniature: i.i.d. vs non-i.i.d. shards (k={k})",
        "headers": ["run", "i.i.d. ppl", "non-i.i.d. ppl", "non-i.i.d. / i.i.d.", "paper (Table 3, k=4)"],
        "rows": rows, "raw": [{"run": n, "ppl": p(n)} for n in (main, "noniid", ddp, noniid_ddp)],
        "runs": [single, ddp, *([noniid_ddp] if noniid_ddp in spec else []), main, "noniid"],
    }

    # Compression and streaming
    comp_runs = [main, "comp_bf16", "comp_int8", "comp_e3m0", "comp_e3m0_ef", "stream", "stream_overlap",
                 "stream_overlap_a0", "stream_overlap_e3m0"]
    paper_note = {
        main: "—", "comp_bf16": "fp16: no loss (OpenDiLoCo)", "comp_int8": "int8: no loss (INTELLECT-1)",
        "comp_e3m0": "4-bit E3M0: no regression (Streaming DiLoCo)", "comp_e3m0_ef": "—", "stream": "—",
        "stream_overlap_a0": "—",
        "stream_overlap": "tau <= 5 costs < 0.2% (Streaming DiLoCo)",
        "stream_overlap_e3m0": "loss 2.48 vs DiLoCo 2.49: 0.996 (loss ratio)",
    }
    rows, raw = [], []
    for name in comp_runs:
        syncs = res[name]["outer_syncs"] if name in res else None
        per_sync = ratio(b(name), syncs)
        loss_ratio = ratio(res[name]["final_val_loss"], res[main]["final_val_loss"]) if name in res and main in res \
            else None
        rows.append([spec[name]["label"], fmt(p(name)),
                     fmt(ratio(p(name), p(main))), fmt(loss_ratio), fmt_bytes(b(name)), fmt_bytes(per_sync),
                     fmt(ratio(b(ddp), b(name)), 0) + "x" if b(name) else "—", paper_note[name]])
        raw.append({"run": name, "ppl": p(name), "bytes": b(name), "bytes_per_sync": per_sync})
    tables["compression"] = {
        "title": f"Compression and Streaming DiLoCo (k={k}, H={h0})",
        "headers": ["run", "val ppl", "ppl / fp32", "loss / fp32", "bytes sent per worker", "bytes per sync",
                    "fewer bytes than DDP", "papers"],
        "rows": rows, "raw": raw, "runs": [ddp, *comp_runs],
    }
    # The 2025-2026 options, each beside the run it changes
    frontier = [
        ("eager", "outer_paper", "eager loss 2.69 vs blocking 2.67 (+0.7%); naive delayed 3.01 (Kale et al. 2025)"),
        ("eager_stream", "outer_paper", "as above, with fragments"),
        ("sparse_ef", main, "matches or beats DiLoCo at 1-3% density; 146x smaller (SparseLoCo)"),
        ("comp_int2_ef", main, "—"),
        ("outer_cosine", main, "—"),
        ("outer_momentum_schedule", main, "2.7-3.7x faster to target on 256 A100s, GPT-2 XL (Pier)"),
        ("muon", main, "Muon-DiLoCo beats AdamW-DiLoCo (MuLoCo)"),
        ("muon_int2_ef", "muon", "2-bit + error feedback: no loss, 8x fewer bytes (MuLoCo)"),
    ]
    rows, raw = [], []
    for name, against, paper in frontier:
        if name not in spec:
            continue
        syncs = res[name]["outer_syncs"] if name in res else None
        rows.append([spec[name]["label"], fmt(p(name)), spec[against]["label"] if against in spec else against,
                     fmt(p(against)), fmt(ratio(p(name), p(against))), fmt_bytes(b(name)),
                     fmt_bytes(ratio(b(name), syncs)), fmt(ratio(b(main), b(name)), 0) + "x" if b(name) else "—",
                     paper])
        raw.append({"run": name, "against": against, "ppl": p(name), "ppl_against": p(against), "bytes": b(name)})
    tables["frontier"] = {
        "title": f"The 2025-2026 options (k={k}, H={h0})",
        "headers": ["run", "val ppl", "against", "its ppl", "ratio", "bytes sent per worker", "bytes per sync",
                    "fewer bytes than fp32 DiLoCo", "papers"],
        "rows": rows, "raw": raw, "runs": [main, *[n for n, _, _ in frontier if n in spec]],
    }
    for table in tables.values():
        table["markdown"] = markdown(table["headers"], table["rows"])
    return tables


def plot_table(
    path: Path, title: str, names: list[str], res: dict[str, dict[str, Any]], labels: dict[str, str]
) -> Path:
    """Validation perplexity against steps (left) and against bytes sent per worker (right, log scale)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    for name in names:
        if name not in res:
            continue
        curve = res[name]["curve"]
        label = labels.get(name, res[name]["label"])
        steps = [c["step"] for c in curve]
        values = [c["val_ppl"] for c in curve]
        (line,) = left.plot(steps, values, marker="o", markersize=2.5, linewidth=1.2, label=label)
        pairs = [(c["bytes"], c["val_ppl"]) for c in curve if c["bytes"] > 0]
        if pairs:
            right.plot(*zip(*pairs), marker="o", markersize=2.5, linewidth=1.2, color=line.get_color(), label=label)
    left.set_xlabel("step (after the shared pre-training)")
    right.set_xlabel("bytes sent per worker (cumulative)")
    right.set_xscale("log")
    for ax in (left, right):
        ax.set_ylabel("validation perplexity")
        ax.grid(True, alpha=0.3)
    if left.lines:
        left.legend(fontsize=7)
    if right.lines:
        right.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(size: str, pretrain: dict[str, Any], runs: list[dict[str, Any]], out: Path,
                 seconds: float) -> list[Path]:
    """Write ``tables.md``, ``results.json``, ``results.csv``, ``curves.csv`` and the PNGs into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    res = load_results(runs)
    pre = load_results([pretrain]).get("pretrain")
    tables = build_tables(size, runs, res)
    written: list[Path] = []
    for stem in TABLES:
        labels = {r["name"]: r["label"] for r in runs}
        written.append(plot_table(out / f"{stem}.png", tables[stem]["title"], tables[stem]["runs"], res, labels))
    missing = [r["name"] for r in runs if r["name"] not in res]
    cfg = lib.SIZES[size]
    run_seconds = sum(r["wall_seconds"] for r in res.values()) + (pre["wall_seconds"] if pre else 0.0)
    lines = [f"# DiLoCo in miniature: results (`--size {size}`)", ""]
    if pre:
        lines.append(f"Shared pre-training: {pre['steps']} steps on one worker, validation perplexity"
                     f" {pre['final_val_ppl']:.3f}. Every run then takes {cfg['steps']} steps of"
                     f" {cfg['batch_size']} x {lib.DATA['seq_len']} tokens per worker.")
    lines.append(f"Runs finished: {len(res)} of {len(runs)}; training time of the finished runs {run_seconds:.0f} s.")
    if missing:
        lines.append(f"Not finished: {', '.join(missing)}.")
    for stem in TABLES:
        lines += ["", f"## {tables[stem]['title']}", "", tables[stem]["markdown"], ""]
        if tables[stem].get("note"):
            lines += [tables[stem]["note"], ""]
        lines.append(f"![{stem}]({stem}.png)")
    (out / "tables.md").write_text("\n".join(lines) + "\n")
    written.append(out / "tables.md")
    summary = {
        "size": size, "config": cfg, "model": lib.MODEL, "data": lib.DATA, "inner": lib.INNER,
        "paper": {k: (v if not isinstance(v, dict) else {str(a): c for a, c in v.items()}) for k, v in PAPER.items()},
        "pretrain": pre, "runs": res, "missing": missing, "tables": {k: v["raw"] for k, v in tables.items()},
        "seconds_this_invocation": seconds, "training_seconds": run_seconds,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    written.append(out / "results.json")
    columns = ["name", "label", "kind", "workers", "H", "outer", "compression", "num_fragments", "overlap_steps",
               "sharding", "steps", "tokens_per_worker", "final_val_loss", "final_val_ppl", "bytes_sent",
               "outer_syncs", "wall_seconds"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for name in [pretrain["name"], *[r["name"] for r in runs]]:
            r = pre if name == "pretrain" else res.get(name)
            if r is None:
                continue
            s, d = r["spec"], r["spec"].get("diloco") or {}
            writer.writerow([name, r["label"], s["kind"], r["workers"], d.get("inner_steps", ""),
                             lib.outer_label(d["outer"]) if d else "", d.get("compression", ""),
                             d.get("num_fragments", ""), d.get("overlap_steps", ""), s["data"]["sharding"],
                             r["steps"], r["tokens_per_worker"], f"{r['final_val_loss']:.5f}",
                             f"{r['final_val_ppl']:.4f}", int(r["bytes_sent"]), r["outer_syncs"],
                             f"{r['wall_seconds']:.1f}"])
    written.append(out / "results.csv")
    with open(out / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "step", "val_loss", "val_ppl", "bytes_sent"])
        for name, r in ([("pretrain", pre)] if pre else []) + list(res.items()):
            for c in r["curve"]:
                writer.writerow([name, c["step"], f"{c['val_loss']:.5f}", f"{c['val_ppl']:.4f}", int(c["bytes"])])
    written.append(out / "curves.csv")
    return written
