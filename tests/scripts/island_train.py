"""One island of islands mode: the toy model under a coordinator, with an optional fault; records every outer step.

Run one launch per island (``python island_train.py --coordinator http://127.0.0.1:PORT --island a --index 0 ...``,
with ``MASTER_PORT`` of its own). The island trains on samples ``index::num_islands`` of the toy data, in order. At
every committed outer step it appends a line to ``<out>/<island>.jsonl`` (step, outer step, islands, digest of the
global state), and at the end writes ``<out>/<island>-rank<R>.pt`` (global weights, outer momentum, records).

Faults (``--fault KIND:STEP``), once, in the first life of the island (not after ``--resume``):
- ``kill:S``: SIGKILL after optimizer step S (mid-round).
- ``kill_in_sync:S``: SIGKILL inside the sum between islands of the outer step after step S (the others are in it).
- ``stop:S``: SIGSTOP after step S (the test continues or kills it).
- ``slow:S``: sleep ``--slow-seconds`` after step S (a straggler past the coordinator's grace window).
"""

import argparse
import json
import os
import signal
import sys
import time
from datetime import timedelta
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
torch_threads = int(os.environ.get("OMP_NUM_THREADS", "1"))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from lightning_diloco.clean_exit import close_process_groups  # noqa: E402
from helpers.toy import ToyData, ToyModule  # noqa: E402
from lightning_diloco import DiLoCoStrategy  # noqa: E402
from lightning_diloco.islands import Quorum, fingerprint  # noqa: E402


def die(why: str) -> None:
    print(f"[island {os.environ.get('ISLAND')}] SIGKILL {why}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class Record(Callback):
    """Logs every committed outer step and injects the step faults."""

    def __init__(self, out: str, island: str, fault: str) -> None:
        self.out, self.island = out, island
        kind, _, step = fault.partition(":")
        self.kind, self.step = kind, int(step or -1)
        self.slow = 0.0
        self.seen = -1
        self.wait_for = 0
        self.records: list[dict[str, Any]] = []
        self.states: list[dict[str, Any]] = []  # the global state at every committed outer step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # callbacks run before the strategy's join: with --wait-for N, every island's coordinator link is up before
        # any island asks for its first quorum, so the first quorum holds all N
        if self.wait_for and trainer.global_rank == 0:
            open(os.path.join(self.out, f"{self.island}.ready"), "w").close()
            deadline = time.time() + 120
            while len([f for f in os.listdir(self.out) if f.endswith(".ready")]) < self.wait_for:
                if time.time() > deadline:
                    raise TimeoutError("the other islands did not start")
                time.sleep(0.05)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, "end")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._log(trainer, "step")
        if trainer.global_rank != 0 or trainer.global_step != self.step:
            return
        if self.kind == "kill":
            die(f"after step {self.step}")
        if self.kind == "stop":
            print(f"[island {self.island}] SIGSTOP after step {self.step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        if self.kind == "slow":
            time.sleep(self.slow)

    def _log(self, trainer: L.Trainer, when: str) -> None:
        strategy = trainer.strategy
        assert isinstance(strategy, DiLoCoStrategy)
        if strategy.rounds is None or strategy.quorum is None:
            return
        outer = strategy.rounds.outer
        if outer.outer_step == self.seen and when == "step":
            return
        self.seen = outer.outer_step
        state = outer.optimizer.state_dict()["state"]
        momentum = [state[k]["momentum_buffer"].clone() for k in sorted(state)]
        self.states.append({"outer_step": outer.outer_step, "global": [p.detach().clone() for p in outer.params],
                            "momentum": momentum, "buffers": {n: b.clone() for n, b in outer.buffers.items()},
                            "heals": strategy.quorum.heals})
        digest = fingerprint([p.detach() for p in outer.params] + momentum)
        record = {
            "when": when, "global_step": trainer.global_step, "rounds_step": strategy.rounds.step,
            "outer_step": outer.outer_step, "islands": strategy.quorum.islands, "heals": strategy.quorum.heals,
            "forks": strategy.quorum.forks, "digest": digest, "time": time.time(), "pid": os.getpid(),
            "committed": strategy.quorum.state_dict()["step"],
        }
        self.records.append(record)
        if trainer.global_rank == 0:
            with open(os.path.join(self.out, f"{self.island}.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")


def patch_kill_in_sync(step_after: int, strategy: DiLoCoStrategy) -> None:
    """SIGKILL this island's leader with its sum between islands in flight, at the outer step after ``step_after``."""
    real = Quorum.sum_

    def sum_then_die(self: Quorum, flat: torch.Tensor) -> None:
        if self.leader and strategy.rounds is not None and strategy.rounds.step == step_after and flat.numel() > 8:
            self._manager.allreduce(flat)  # in flight: the others are inside it
            time.sleep(0.05)
            die(f"inside the sum between islands after step {step_after}")
        real(self, flat)

    Quorum.sum_ = sum_then_die  # type: ignore[method-assign]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator", required=True)
    p.add_argument("--island", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--num-islands", type=int, default=3)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, default=24)
    p.add_argument("--inner-steps", type=int, default=4)
    p.add_argument("--fault", default="")
    p.add_argument("--slow-seconds", type=float, default=0.0)
    p.add_argument("--step-seconds", type=float, default=0.0, help="sleep this long in every step (pacing)")
    p.add_argument("--resume", action="store_true", help="resume from <out>/<island>-ckpt/last.ckpt if it exists")
    p.add_argument("--sync-timeout", type=float, default=5.0)
    p.add_argument("--quorum-timeout", type=float, default=60.0)
    p.add_argument("--num-fragments", type=int, default=1)
    p.add_argument("--wait-for", type=int, default=0, help="start training once this many islands are up")
    args = p.parse_args()
    torch.set_num_threads(torch_threads)
    os.environ["ISLAND"] = args.island
    os.makedirs(args.out, exist_ok=True)

    strategy = DiLoCoStrategy(
        inner_steps=args.inner_steps, coordinator=args.coordinator, island=args.island, island_address="127.0.0.1",
        sync_timeout=args.sync_timeout, quorum_timeout=args.quorum_timeout, num_fragments=args.num_fragments,
        timeout=timedelta(seconds=120),
    )
    fault = "" if args.resume else args.fault
    if fault.startswith("kill_in_sync:"):
        patch_kill_in_sync(int(fault.split(":")[1]), strategy)
    record = Record(args.out, args.island, fault)
    record.slow, record.wait_for = args.slow_seconds, 0 if args.resume else args.wait_for
    callbacks: list[Callback] = [record]
    ckpt_dir = os.path.join(args.out, f"{args.island}-ckpt")
    callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True, save_top_k=0))
    if args.step_seconds:
        class Pace(Callback):
            def on_train_batch_end(self, *a: Any) -> None:
                time.sleep(args.step_seconds)
        callbacks.append(Pace())
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.max_steps, callbacks=callbacks,
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    data = Subset(ToyData(), list(range(args.index, 64, args.num_islands)))
    model = ToyModule()
    last = os.path.join(ckpt_dir, "last.ckpt")
    resume = last if args.resume and os.path.exists(last) else None
    trainer.fit(model, DataLoader(data, batch_size=4, drop_last=True), ckpt_path=resume)

    assert strategy.rounds is not None
    outer = strategy.rounds.outer
    state = outer.optimizer.state_dict()["state"]
    torch.save({
        "global": [p.detach().clone() for p in outer.params],
        "momentum": [state[k]["momentum_buffer"].clone() for k in sorted(state)],
        "records": record.records,
        "states": record.states,
        "indices": model.record["indices"],
        "global_step": trainer.global_step,
    }, os.path.join(args.out, f"{args.island}-rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
    close_process_groups()  # with main's Trainer gone: no gloo thread outlives the interpreter
