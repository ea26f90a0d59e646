"""Use DiLoCo as a DDP user would: a start method, DDP's keywords, callbacks that re-register parameters, then fit,
validate, test and predict; the main process saves what it got back (run as a file: launchers re-run or import it)."""

import argparse
import dataclasses
import os
import sys
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ModelPruning  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from lightning_diloco.clean_exit import close_process_groups  # noqa: E402
import lightning_diloco  # noqa: E402, F401
from helpers.toy import ToyModule, loaders  # noqa: E402
from lightning_diloco import DiLoCoStrategy  # noqa: E402


class EvalToy(ToyModule):
    """The toy model with a test and a predict step."""

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self.loss(batch))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.net(batch[1])


class Halve(nn.Module):
    """A parametrization that changes the weight's value, so that the global state must follow it exactly."""

    def forward(self, weight: Tensor) -> Tensor:
        return 0.5 * weight


class Parametrize(Callback):
    """Re-register the last layer's weight under a parametrization at the end of the first epoch, as a user might."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0:
            parametrize.register_parametrization(pl_module.net[3], "weight", Halve())


class CheckWorkerDDP(Callback):
    """In a worker of several processes, DDP's keywords reach the worker's DistributedDataParallel."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = trainer.strategy.model
        assert isinstance(model, DistributedDataParallel), type(model)
        assert model.find_unused_parameters is True and model.gradient_as_bucket_view is True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="object", help="'object' for DiLoCoStrategy(...), or a registry name")
    parser.add_argument("--start-method", default="popen")
    parser.add_argument("--prune", action="store_true")
    parser.add_argument("--parametrize", action="store_true")
    parser.add_argument("--worker-ddp", action="store_true", help="one worker of 2 processes, with DDP keywords")
    args = parser.parse_args()
    torch.set_num_threads(1)

    callbacks: list[Callback] = [ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), save_last=True)]
    if args.prune:
        callbacks.append(ModelPruning("l1_unstructured", amount=0.3, parameter_names=["weight"], verbose=0))
    if args.parametrize:
        callbacks.append(Parametrize())
    if args.strategy == "object":
        ddp_keywords: dict[str, Any] = {}
        if args.worker_ddp:
            ddp_keywords = {"processes_per_worker": 2, "find_unused_parameters": True, "gradient_as_bucket_view": True}
            callbacks.append(CheckWorkerDDP())
        strategy: Any = DiLoCoStrategy(inner_steps=3, start_method=args.start_method, **ddp_keywords)
    else:
        strategy = args.strategy
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=3, logger=False, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    if isinstance(strategy, str):
        assert isinstance(trainer.strategy, DiLoCoStrategy)
        # a registry name takes the paper's H=500; this run is 24 steps long
        trainer.strategy.config = dataclasses.replace(trainer.strategy.config, inner_steps=3)
    model = EvalToy()
    train, val = loaders()
    trainer.fit(model, train, val)
    result = {
        "final": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "best_model_path": trainer.checkpoint_callback.best_model_path,
        "validate": trainer.validate(model, val, verbose=False),
        "test": trainer.test(model, val, verbose=False),
        "predict": trainer.predict(model, val),
        "global_rank": trainer.global_rank,
    }
    os.makedirs(args.out, exist_ok=True)  # every rank under popen; the main process alone under spawn and fork
    torch.save(result, os.path.join(args.out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
    close_process_groups()  # with main's Trainer gone: no gloo thread outlives the interpreter
