"""Run a list of training runs that share a number of processes, one ``Trainer.fit`` after the other.

    python -m benchmarks._repro_train PLAN.json         # from the repository root

``PLAN.json`` holds ``{"workers": k, "runs": [spec, ...]}`` (specs from ``_repro_lib.build_plan``).
:mod:`benchmarks.reproduce` starts the ``k`` processes at once with ``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_PORT`` set,
as torchrun would (started alone, Lightning starts the other ``k - 1`` by re-running the same ``python -m`` command).
Every process runs the same list, so the processes and their process group are set up once for all of the runs. Rank
0 writes each run's result file as soon as that run is done; ``reproduce`` leaves finished runs out of the next plan,
so a crash loses only the run in progress.
"""

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy

from lightning_diloco import DiLoCoStrategy
from lightning_diloco.data import LMDataModule

from . import _repro_lib as lib


class Recorder(Logger):
    """Keeps the metrics every logger receives: the strategy's count of its bytes and the training loss."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes_sent = 0.0
        self.outer_syncs = 0
        self.train: list[tuple[int, float]] = []
        self.pseudo_grad_norms: list[tuple[int, float]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "diloco/bytes_sent_total" in metrics:  # an outer step, with the bytes the strategy sent in this fit so far
            self.bytes_sent = float(metrics["diloco/bytes_sent_total"])
            self.outer_syncs += 1
            self.pseudo_grad_norms.append((int(step or 0), float(metrics.get("diloco/pseudo_grad_norm", 0.0))))
        if "train_loss" in metrics:
            self.train.append((int(step or 0), float(metrics["train_loss"])))


class Curves(Callback):
    """On rank 0: validation loss of the weights the run would publish (global ones for DiLoCo), every few steps."""

    def __init__(self, spec: dict[str, Any], recorder: Recorder, bytes_per_step: float) -> None:
        self.spec = spec
        self.recorder = recorder
        self.bytes_per_step = bytes_per_step  # gradient all-reduce of DDP; 0 otherwise
        self.points: list[dict[str, float]] = []
        self.indices: list[int] = []

    def bytes_sent(self, step: int) -> float:
        return self.recorder.bytes_sent + self.bytes_per_step * step

    def measure(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        step = trainer.global_step
        model = lib.global_copy(module, trainer.strategy)
        loss = lib.evaluate(model, trainer.datamodule.val_dataset, self.indices)
        self.points.append({"step": step, "val_loss": loss, "val_ppl": lib.ppl(loss), "bytes": self.bytes_sent(step)})

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.indices = lib.eval_indices(len(trainer.datamodule.val_dataset), self.spec["eval"]["curve_sequences"])
            self.measure(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and step % self.spec["eval"]["eval_every"] == 0 and step < self.spec["steps"]:
            self.measure(trainer, module)


def strategy_for(spec: dict[str, Any]) -> Any:
    timeout = timedelta(minutes=15)
    if spec["kind"] == "single":
        return "auto"
    if spec["kind"] == "ddp":
        return DDPStrategy(process_group_backend="gloo", timeout=timeout)
    d = spec["diloco"]
    return DiLoCoStrategy(
        inner_steps=d["inner_steps"], compression=d["compression"], error_feedback=d["error_feedback"],
        num_fragments=d["num_fragments"], overlap_steps=d["overlap_steps"], overlap_mixing=d["overlap_mixing"],
        eager_rounds=d.get("eager_rounds", 0), process_group_backend="gloo", timeout=timeout,
        **lib.outer_optimizer(d["outer"]), **lib.outer_schedules(d, spec["steps"]),
    )


def wait_for(path: Path, timeout: float = 4 * 3600.0) -> None:
    """Wait until the pre-training has written its checkpoint (``reproduce.py`` starts groups while it runs)."""
    deadline = time.time() + timeout
    while not path.is_file():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:.0f}s: did the pre-training fail?")
        time.sleep(2.0)


def run(spec: dict[str, Any], workers: int) -> None:
    if spec.get("init"):
        wait_for(Path(spec["init"]))
    started = time.time()
    L.seed_everything(spec["seed"], verbose=False)
    data = spec["data"]
    dm = LMDataModule(
        dataset=data["dataset"], max_chars=data["max_chars"], val_fraction=data["val_fraction"],
        vocab_size=data["vocab_size"], seq_len=data["seq_len"], batch_size=data["batch_size"],
        sharding=data["sharding"], seed=data["seed"],
    )
    module = lib.build_module(spec)
    params = sum(p.numel() for p in module.parameters())
    ring = 2 * (workers - 1) / workers
    bytes_per_step = float(int(ring * 4 * params)) if spec["kind"] == "ddp" else 0.0
    recorder = Recorder()
    curves = Curves(spec, recorder, bytes_per_step)
    trainer = L.Trainer(
        accelerator="cpu", devices=workers, strategy=strategy_for(spec), max_steps=spec["steps"],
        gradient_clip_val=1.0, logger=recorder, callbacks=[curves], log_every_n_steps=10,
        limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    if not trainer.is_global_zero:
        return
    # after fit every DiLoCo worker holds the global weights (a last outer step closes an open round)
    final_indices = lib.eval_indices(len(dm.val_dataset), spec["eval"]["final_sequences"])
    final = lib.evaluate(module.model, dm.val_dataset, final_indices)
    curve_final = lib.evaluate(module.model, dm.val_dataset, curves.indices)
    step = trainer.global_step
    curves.points.append({"step": step, "val_loss": curve_final, "val_ppl": lib.ppl(curve_final),
                          "bytes": curves.bytes_sent(step)})
    result = {
        "name": spec["name"], "label": spec.get("label", spec["name"]), "key": lib.spec_key(spec), "spec": spec,
        "workers": workers, "parameters": params, "steps": step,
        "tokens_per_worker": step * data["batch_size"] * data["seq_len"],
        "final_val_loss": final, "final_val_ppl": lib.ppl(final), "final_val_sequences": len(final_indices),
        "bytes_sent": curves.bytes_sent(step), "outer_syncs": recorder.outer_syncs,
        "curve": curves.points, "train_curve": recorder.train,
        "pseudo_grad_norms": recorder.pseudo_grad_norms, "wall_seconds": time.time() - started,
    }
    if spec.get("save_checkpoint"):
        optimizer = trainer.optimizers[0]
        path = Path(spec["save_checkpoint"])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state_dict": module.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, tmp)
        os.replace(tmp, path)
    out = Path(spec["result"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    print(f"[reproduce] {spec['name']}: val ppl {result['final_val_ppl']:.3f}, bytes/worker {result['bytes_sent']:.3g},"
          f" {result['wall_seconds']:.0f}s", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    plan = json.loads(Path(sys.argv[1]).read_text())
    for spec in plan["runs"]:
        run(spec, plan["workers"])


if __name__ == "__main__":
    main()
