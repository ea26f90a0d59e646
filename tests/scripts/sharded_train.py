"""Train a small stack of blocks with workers of several processes, sharded (FSDP2) or not (DDP inside the worker),
and save what every rank held (run as a file: Lightning re-runs it).

Every rank writes ``rank<R>.pt``: the whole global model at the end (``final``), the whole weights and inner
optimizer state the run started from after a resume (``start``, ``start_optimizer``), and the bytes of its DiLoCo
state (global weights and outer optimizer state) beside the parameters of the model and of its own chunks.
"""

import argparse
import copy
import os
import sys
import warnings
from typing import Any, Optional

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository root, for `benchmarks`

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from benchmarks.sharding_job import reset_peak, status  # noqa: E402
from lightning_diloco.clean_exit import close_process_groups  # noqa: E402
from lightning_diloco import DiLoCoStrategy  # noqa: E402


def whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


class Blocks(L.LightningModule):
    """Four blocks in a ``ModuleList`` (FSDP units) between an input and an output layer; widths that do not divide
    by the processes of a worker, so that chunks are uneven."""

    def __init__(self, width: int = 30, depth: int = 4, shard_itself: bool = False,
                 nan_at: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(7, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
                                    for _ in range(depth))
        self.out = nn.Linear(width, 1)
        self.shard_itself = shard_itself
        self.nan_at = nan_at  # (rank, step): that rank's chunk of `inp.weight` becomes NaN in that optimizer step
        self.start: dict[str, Any] = {}

    def configure_model(self) -> None:
        if self.shard_itself:  # as under Lightning's ModelParallelStrategy
            from torch.distributed.fsdp import fully_shard

            for block in self.blocks:
                fully_shard(block, mesh=self.device_mesh)
            fully_shard(self, mesh=self.device_mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.nan_at == (self.global_rank, self.trainer.global_step):  # no forward sees it before the outer step
            with torch.no_grad():
                weight = self.inp.weight
                (weight.to_local() if isinstance(weight, DTensor) else weight).fill_(float("nan"))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)

    def on_train_start(self) -> None:
        self.start = {k: whole(v) for k, v in self.state_dict().items()}
        optimizer = self.trainer.optimizers[0].state_dict()
        self.start_optimizer = {i: {k: whole(v) for k, v in s.items()} for i, s in optimizer["state"].items()}
        outer = self.trainer.strategy.outer
        self.start_outer = {"params": [p.detach().clone() for p in outer.params],
                            "optimizer": copy.deepcopy(outer.optimizer.state_dict()),
                            "step": self.trainer.strategy.rounds.step}


def loader(world: int) -> DataLoader:
    """Six batches of 4 per process and epoch (so that epoch ends fall inside rounds of H=4)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24 * world, 7, generator=g)
    y = (x[:, :1] * 0.5 - x[:, 1:2]).tanh()
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--processes-per-worker", type=int, default=2)
    parser.add_argument("--sharding", default="fsdp")
    parser.add_argument("--shard-itself", action="store_true")
    parser.add_argument("--inner-steps", type=int, default=4)
    parser.add_argument("--max-epochs", type=int, default=2, help="epochs of 6 steps")
    parser.add_argument("--fragments", type=int, default=1)
    parser.add_argument("--compression", default="none")
    parser.add_argument("--error-feedback", action="store_true")
    parser.add_argument("--overlap", type=int, default=0)
    parser.add_argument("--eager", type=int, default=0, help="eager_rounds")
    parser.add_argument("--ckpt", action="store_true", help="a checkpoint at every epoch end (every 6 steps)")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--width", type=int, default=30)
    parser.add_argument("--find-unused-parameters", action="store_true", help="a DDP keyword (no effect sharded)")
    parser.add_argument("--nan-at", type=int, nargs=2, default=None, metavar=("RANK", "STEP"))
    parser.add_argument("--save-only", action="store_true", help="measure rank 0's memory while saving, then stop")
    args = parser.parse_args()
    torch.set_num_threads(1)

    strategy = DiLoCoStrategy(
        inner_steps=args.inner_steps, processes_per_worker=args.processes_per_worker, sharding=args.sharding,
        num_fragments=args.fragments, compression=args.compression, error_feedback=args.error_feedback,
        overlap_steps=args.overlap, eager_rounds=args.eager,
        find_unused_parameters=True if args.find_unused_parameters else None,
    )
    callbacks = []
    if args.ckpt:
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), every_n_epochs=1, save_top_k=-1,
                                         save_on_train_epoch_end=True))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_epochs=args.max_epochs, logger=False,
        callbacks=callbacks, enable_checkpointing=args.ckpt, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    model = Blocks(width=args.width, shard_itself=args.shard_itself,
                   nan_at=tuple(args.nan_at) if args.nan_at else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader(args.devices), ckpt_path=args.resume)
    outer = trainer.strategy.outer
    momentum = [s["momentum_buffer"] for s in outer.optimizer.state.values() if "momentum_buffer" in s]
    record = {
        "final": {k: whole(v) for k, v in model.state_dict().items()},
        "fragments": trainer.strategy.fragments,
        "start": model.start,
        "start_optimizer": model.start_optimizer,
        "start_outer": model.start_outer,
        "diloco_state_bytes": sum(t.numel() * t.element_size() for t in [*outer.params, *momentum]),
        "chunk_numel": sum(p.numel() for p in outer.params),
        "model_numel": sum(p.numel() for p in model.parameters()),
        "sharded": trainer.strategy.sharded,
        "bytes_sent": trainer.strategy.bytes_sent["outer"],
        "warnings": [str(w.message) for w in caught],
    }
    if args.save_only:
        record["save_peak_bytes"] = _peak_while_saving(trainer, os.path.join(args.out, "k.ckpt"))
    os.makedirs(args.out, exist_ok=True)
    torch.save(record, os.path.join(args.out, f"rank{trainer.global_rank}.pt"))


def _peak_while_saving(trainer: L.Trainer, path: str) -> int:
    """The growth of this process's peak resident memory while ``trainer.save_checkpoint`` runs (Linux)."""
    reset_peak()
    before = status("VmRSS")
    trainer.save_checkpoint(path)
    return status("VmHWM") - before


if __name__ == "__main__":
    main()
    close_process_groups()
