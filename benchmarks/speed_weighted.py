"""How long the fast worker waits at outer steps when the other worker is twice as slow, with and without
``speed_weighted``.

Two DiLoCo workers (two processes under torchrun, gloo, CPU) train a small MLP whose training step sleeps
``--step-seconds`` on rank 0 and twice that on rank 1, so the slowdown does not depend on how busy the cores are.
Each mode runs ``--rounds`` rounds of H = ``--inner-steps`` steps in the same two processes. Per outer step the
script records, on every rank, what the strategy measured itself: the wall time of the whole outer step (the growth
of ``trainer.strategy.timings.outer_seconds`` in that batch: the exchange of step counts and speeds over the control
group, where a fast worker waits for a slow one, plus the averaging and the outer update), and the outer step's
``diloco/exchange_seconds``, ``diloco/blocked_seconds`` and ``diloco/sync_seconds``; and the wall time of the round
and the steps the worker computed.

The table gives medians over the rounds after the first (the first round has no speed measurement yet, so in both
modes every worker computes all H steps).

    python -m benchmarks.speed_weighted                 # H=10, 8 rounds, 20 ms / 40 ms per step
    python -m benchmarks.speed_weighted --inner-steps 20 --rounds 6 --step-seconds 0.05
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: The repository root, where torchrun runs this module (``python -m``) from.
ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    """One rank under torchrun: both modes, one after the other; writes ``rank<r>.json``.

    Args:
        args: the command line: the folder ``out``, ``inner_steps``, ``rounds`` and ``step_seconds``.

    """
    import lightning as L
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_diloco import DiLoCoStrategy

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    seconds = args.step_seconds * (2.0 if rank == 1 else 1.0)

    class SleepyMLP(L.LightningModule):
        """A small MLP whose every computed training step also sleeps ``seconds`` (the stand-in for compute)."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))
            self.computed: list[int] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            time.sleep(seconds)
            self.computed.append(self.trainer.global_step + 1)
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class OuterSteps(L.Callback):
        """At the end of every batch that took an outer step: its wall time and the metrics the strategy reported."""

        def __init__(self) -> None:
            self.outer_steps: list[dict[str, float]] = []
            self._outer_seconds = 0.0
            self._last: float | None = None  # `diloco/outer_step` of the latest outer step seen

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            strategy = trainer.strategy
            assert isinstance(strategy, DiLoCoStrategy)
            outer_seconds, metrics = strategy.timings.outer_seconds, strategy.last_metrics
            if metrics.get("diloco/outer_step") != self._last:
                self._last = metrics["diloco/outer_step"]
                self.outer_steps.append({
                    "outer_step_seconds": outer_seconds - self._outer_seconds,
                    "end": time.perf_counter(),
                    "blocked_seconds": metrics["diloco/blocked_seconds"],
                    "sync_seconds": metrics["diloco/sync_seconds"],
                    "exchange_seconds": metrics["diloco/exchange_seconds"],
                })
            self._outer_seconds = outer_seconds

    steps = args.inner_steps * args.rounds
    g = torch.Generator().manual_seed(rank)
    data = TensorDataset(torch.randn(steps * 8, 32, generator=g), torch.randn(steps * 8, 1, generator=g))
    results: dict[str, Any] = {"rank": rank, "step_seconds": seconds}
    for mode in ("plain", "speed_weighted"):
        outer_steps = OuterSteps()
        trainer = L.Trainer(
            accelerator="cpu", devices=2, max_steps=steps, logger=False, callbacks=[outer_steps],
            strategy=DiLoCoStrategy(inner_steps=args.inner_steps, speed_weighted=mode == "speed_weighted"),
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            use_distributed_sampler=False,
        )
        model = SleepyMLP()
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        trainer.fit(model, DataLoader(data, batch_size=8))
        rounds = []
        previous = start
        for r, timing in enumerate(outer_steps.outer_steps):
            computed = sum(1 for s in model.computed if r * args.inner_steps < s <= (r + 1) * args.inner_steps)
            rounds.append({**timing, "round_seconds": timing["end"] - previous, "computed": computed})
            previous = timing["end"]
        results[mode] = {"rounds": rounds, "fit_seconds": time.perf_counter() - start}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(results))


def _median(rounds: list[dict[str, float]], key: str) -> float:
    """The median of ``key`` over the rounds after the first."""
    return statistics.median(r[key] for r in rounds[1:])


def report(out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Print the table of both modes from the ranks' files in ``out``.

    Args:
        out: the folder the ranks wrote ``rank<r>.json`` to.
        args: the command line the ranks ran with.

    Returns:
        What each rank recorded, rank 0 (the fast worker) first.

    """
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    fast, slow = ranks
    print(f"2 workers, H={args.inner_steps}, {args.rounds} rounds; sleep per computed step: rank 0"
          f" {fast['step_seconds'] * 1e3:.0f} ms, rank 1 {slow['step_seconds'] * 1e3:.0f} ms; medians over rounds"
          f" 2-{args.rounds}\n")
    header = ("mode", "fast: outer step wall (s)", "fast: exchange_seconds", "fast: blocked_seconds",
              "fast: sync_seconds", "round wall (s)", "slow: steps computed", "fit wall (s)")
    rows = []
    for mode in ("plain", "speed_weighted"):
        f, s = fast[mode], slow[mode]
        rows.append((
            mode,
            f"{_median(f['rounds'], 'outer_step_seconds'):.3f}",
            f"{_median(f['rounds'], 'exchange_seconds'):.3f}",
            f"{_median(f['rounds'], 'blocked_seconds'):.3f}",
            f"{_median(f['rounds'], 'sync_seconds'):.3f}",
            f"{_median(f['rounds'], 'round_seconds'):.3f}",
            f"{_median(s['rounds'], 'computed'):.0f} / {args.inner_steps}",
            f"{f['fit_seconds']:.1f}",
        ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    plain = _median(fast["plain"]["rounds"], "outer_step_seconds")
    weighted = _median(fast["speed_weighted"]["rounds"], "outer_step_seconds")
    print(f"\nfast worker's wait at outer steps: {plain:.3f} s -> {weighted:.3f} s per round"
          f" ({plain / max(weighted, 1e-9):.1f}x less with speed_weighted)")
    return ranks


def main() -> None:
    """Start the two ranks under torchrun (``--out`` given: be one of them), print their table, write ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--step-seconds", type=float, default=0.02, help="rank 0's sleep per step; rank 1 sleeps 2x")
    parser.add_argument("--json", type=Path, help="also write what every rank recorded here")
    parser.add_argument("--out", default=None, help="(internal) where the ranks write their results")
    args = parser.parse_args()
    if args.out is not None:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        this = ["-m", __spec__.name] if __spec__ is not None else [__file__]  # `python -m` or as a file
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *this,
                   "--out", out, "--inner-steps", str(args.inner_steps), "--rounds", str(args.rounds),
                   "--step-seconds", str(args.step_seconds)]
        proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"the benchmark's ranks failed:\n{proc.stderr[-5000:]}")
        ranks = report(Path(out), args)
    if args.json:
        args.json.write_text(json.dumps({"ranks": ranks, "args": vars(args)}, indent=1, default=str))


if __name__ == "__main__":
    main()
