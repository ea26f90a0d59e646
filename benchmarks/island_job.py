"""One job of :mod:`benchmarks.islands`: an island of islands mode (``--coordinator``), or a one-world DiLoCo run of
``--devices`` processes (no coordinator; Lightning's launcher starts the other ranks by re-running this module).

It trains an MLP of about ``--params`` parameters (two square layers) on random data of its own (the seed differs per
island and per rank; the initial weights are the same everywhere) and appends one JSON line per event to
``<out>/<name>.rank<R>.jsonl``, each with its ``time`` (``time.time()``, comparable between processes):

- ``life``: the process started (its pid, and whether it resumed from a checkpoint);
- ``train_start``: Lightning's ``on_train_start`` of the callbacks, which runs before the strategy's (where an island
  joins the others and heals if it is behind);
- ``first_batch``: the start of the first batch, after the join: the strategy's ``timings.outer_seconds`` then (the
  join's wall time on the training thread), its heals, its outer step, and the digest of its global state;
- ``healed``: the strategy reported a heal (its "healed from a live peer" message, read from Lightning's log);
- ``round_end``: the last inner step of a round is about to step the optimizer (the outer step follows at once);
- ``outer``: an outer step was committed (seen at the end of its batch): counters, islands, heals, the strategy's
  cumulative ``timings.outer_seconds`` and ``timings.steps``, ``diloco/sync_seconds`` of ``last_metrics`` and the
  digest (SHA-256 of the bytes of the global weights and of the outer optimizer's momentum);
- ``kill``: written just before the job SIGKILLs itself (``--kill-after-outer N --kill-phase K``: after the first
  inner step of phase K of a round, once this life has committed N outer steps after its join; not in a resumed
  life).

``--stop-file`` names a JSON file ``{"outer_step": N}`` the benchmark may write at any time: the job stops at the end
of the first batch whose committed outer step is at least N (every island stops after the same outer step).

    python -m benchmarks.island_job --out DIR --name a --coordinator http://127.0.0.1:PORT --params 10000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diloco import DiLoCoStrategy

HEALED_MESSAGE = "healed from a live peer"
SAMPLES = 64
BATCH = 8


def width_for(params: int) -> int:
    """The width ``d`` of two ``d x d`` layers with biases holding about ``params`` parameters."""
    return max(2, round((-2 + math.sqrt(4 + 8 * params)) / 4))


class MLP(L.LightningModule):
    """Two square layers with a tanh between them; AdamW (the inner optimizer of the paper)."""

    def __init__(self, width: int, step_seconds: float) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same initial weights on every island and rank
        self.net = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        self.step_seconds = step_seconds

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.step_seconds:
            time.sleep(self.step_seconds)  # pacing: the stand-in for a longer computation
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def digest(strategy: DiLoCoStrategy) -> Optional[str]:
    """SHA-256 of the global weights and the outer optimizer's momentum buffers, in order (``None`` before DiLoCo)."""
    outer = strategy.outer
    if outer is None:
        return None
    h = hashlib.sha256()
    state = outer.optimizer.state_dict()["state"]
    tensors = [p.detach() for p in outer.params]
    tensors += [state[k]["momentum_buffer"] for k in sorted(state) if state[k].get("momentum_buffer") is not None]
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    h.update(str(outer.outer_step).encode())
    return h.hexdigest()


def counters(strategy: DiLoCoStrategy, trainer: L.Trainer) -> dict[str, Any]:
    """The strategy's counters and cumulative timings now."""
    rounds, quorum = strategy.rounds, strategy.quorum
    return {
        "global_step": trainer.global_step,
        "rounds_step": rounds.step if rounds is not None else None,
        "outer_step": strategy.outer.outer_step if strategy.outer is not None else 0,
        "islands": quorum.islands if quorum is not None else strategy.num_workers,
        "heals": quorum.heals if quorum is not None else 0,
        "outer_seconds": strategy.timings.outer_seconds,
        "steps": strategy.timings.steps,
    }


class Events:
    """Appends the job's events to its JSON-lines file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, event: str, **fields: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
            f.flush()


class HealLog(logging.Handler):
    """Notes the moment the strategy reports a heal (Lightning's rank-zero log carries its message)."""

    def __init__(self, events: Events) -> None:
        super().__init__(logging.INFO)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        if HEALED_MESSAGE in record.getMessage():
            self.events("healed")


class Record(Callback):
    """Writes the events of the module's documentation; kills the job and stops it when told to."""

    def __init__(self, events: Events, args: argparse.Namespace, resumed: bool) -> None:
        self.events, self.args, self.resumed = events, args, resumed
        self.seen_outer = -1
        self.first = True
        self.commits = 0  # outer steps committed in this life, after the join

    def _strategy(self, trainer: L.Trainer) -> DiLoCoStrategy:
        strategy = trainer.strategy
        assert isinstance(strategy, DiLoCoStrategy)
        return strategy

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.events("train_start", global_step=trainer.global_step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self.first:
            return
        self.first = False
        strategy = self._strategy(trainer)
        now = counters(strategy, trainer)
        self.seen_outer = now["outer_step"]
        self.events("first_batch", join_seconds=strategy.timings.outer_seconds, digest=self._digest(strategy),
                    **now)

    def on_before_optimizer_step(self, trainer: L.Trainer, *args: Any) -> None:
        strategy = self._strategy(trainer)
        if strategy.rounds is not None and (strategy.rounds.step + 1) % self.args.inner_steps == 0:
            self.events("round_end", rounds_step=strategy.rounds.step + 1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        strategy = self._strategy(trainer)
        now = counters(strategy, trainer)
        if now["outer_step"] != self.seen_outer:
            self.seen_outer = now["outer_step"]
            self.commits += 1
            metrics = strategy.last_metrics
            self.events("outer", sync_seconds=metrics.get("diloco/sync_seconds"), digest=self._digest(strategy),
                        **now)
        a = self.args
        if (a.kill_after_outer is not None and not self.resumed and trainer.global_rank == 0
                and self.commits >= a.kill_after_outer and now["rounds_step"] % a.inner_steps == a.kill_phase):
            self.events("kill", **now)
            os.kill(os.getpid(), signal.SIGKILL)
        if a.stop_file and os.path.exists(a.stop_file):
            try:
                stop_at = json.loads(Path(a.stop_file).read_text())["outer_step"]
            except (ValueError, KeyError):  # being written
                return
            if now["outer_step"] >= stop_at:
                trainer.should_stop = True

    def _digest(self, strategy: DiLoCoStrategy) -> Optional[str]:
        return digest(strategy) if self.args.digest else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", required=True, help="the island's name (and the name of its files)")
    p.add_argument("--coordinator", default=None, help="islands mode: the coordinator's address")
    p.add_argument("--devices", type=int, default=1, help="processes of the job (one-world mode: the workers)")
    p.add_argument("--params", type=int, default=10_000, help="about this many parameters")
    p.add_argument("--seed", type=int, default=0, help="the data's seed (plus the rank)")
    p.add_argument("--inner-steps", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=1000, help="a safety bound; --stop-file ends the job normally")
    p.add_argument("--step-seconds", type=float, default=0.0)
    p.add_argument("--ckpt-every", type=int, default=0, help="a checkpoint every this many steps (0: none)")
    p.add_argument("--resume", default=None, help="a checkpoint to resume from (ckpt_path)")
    p.add_argument("--kill-after-outer", type=int, default=None)
    p.add_argument("--kill-phase", type=int, default=1)
    p.add_argument("--stop-file", default=None)
    p.add_argument("--digest", action="store_true", help="digest the global state at every outer step")
    p.add_argument("--sync-timeout", type=float, default=5.0)
    p.add_argument("--quorum-timeout", type=float, default=60.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    events = Events(args.out / f"{args.name}.rank{rank}.jsonl")
    resumed = args.resume is not None
    events("life", pid=os.getpid(), resumed=resumed)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addHandler(HealLog(events))

    islands = {}
    if args.coordinator:
        islands = {"coordinator": args.coordinator, "island": args.name, "island_address": "127.0.0.1",
                   "quorum_timeout": args.quorum_timeout}
    strategy = DiLoCoStrategy(inner_steps=args.inner_steps, sync_timeout=args.sync_timeout,
                              timeout=timedelta(seconds=120), **islands)
    callbacks: list[Callback] = [Record(events, args, resumed)]
    if args.ckpt_every:
        callbacks.append(ModelCheckpoint(dirpath=args.out / f"{args.name}-ckpt", every_n_train_steps=args.ckpt_every,
                                         save_last=True, save_top_k=0))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.max_steps, callbacks=callbacks,
        logger=False, enable_checkpointing=bool(args.ckpt_every), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    width = width_for(args.params)
    g = torch.Generator().manual_seed(1000 * args.seed + rank)
    data = TensorDataset(torch.randn(SAMPLES, width, generator=g), torch.randn(SAMPLES, width, generator=g))
    model = MLP(width, args.step_seconds)
    events("model", params=sum(p.numel() for p in model.parameters()))
    trainer.fit(model, DataLoader(data, batch_size=BATCH, shuffle=False), ckpt_path=args.resume)
    events("end", **counters(strategy, trainer))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
