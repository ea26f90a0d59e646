"""Train the toy model under a strategy and save what every rank saw and held (run as a file: Lightning re-runs it)."""

import argparse
import functools
import os
import signal
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
torch_threads = int(os.environ.get("OMP_NUM_THREADS", "1"))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_diloco.clean_exit import close_process_groups  # noqa: E402
import lightning_diloco  # noqa: E402, F401
from helpers.toy import ToyModule, loaders  # noqa: E402
from lightning_diloco import DiLoCoStrategy  # noqa: E402
from lightning_diloco.schedules import MomentumWarmupDecay  # noqa: E402


class SigtermAt(L.Callback):
    """Rank ``rank`` sends itself SIGTERM after optimizer step ``step`` (a preemption of one worker, mid-round)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="diloco", choices=["diloco", "ddp"])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--inner-steps", type=int, default=3)
    parser.add_argument("--outer-lr", type=float, default=0.7)
    parser.add_argument("--outer-momentum", type=float, default=0.9)
    parser.add_argument("--outer-lr-decay", type=float, default=None, help="ExponentialLR(gamma) on the outer lr")
    parser.add_argument("--momentum-warmup", type=int, default=None, help="MomentumWarmupDecay(warmup_steps=N)")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--max-epochs", type=int, default=3)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--ckpt-dir", default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--compression", default="none")
    parser.add_argument("--error-feedback", action="store_true")
    parser.add_argument("--fragments", type=int, default=1)
    parser.add_argument("--overlap", type=int, default=0)
    parser.add_argument("--mixing", type=float, default=0.5)
    parser.add_argument("--eager", type=int, default=0, help="eager_rounds")
    parser.add_argument("--processes-per-worker", type=int, default=1)
    parser.add_argument("--nonfinite", default="skip")
    parser.add_argument("--speed-weighted", action="store_true")
    parser.add_argument("--sync-timeout", type=float, default=None)
    parser.add_argument("--outer-backend", default=None)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--sync-warmup-steps", type=int, default=0)
    parser.add_argument("--summary", action="store_true", help="end fit with lightning_diloco.progress.FitSummary")
    parser.add_argument("--max-time", default=None, help="Trainer(max_time=...), e.g. 00:00:10:00")
    parser.add_argument("--val", type=int, default=1, help="validate at every epoch end")
    parser.add_argument("--sigterm", default=None, help="RANK:STEP: that rank sends itself SIGTERM after that step")
    args = parser.parse_args()
    torch.set_num_threads(torch_threads)

    if args.strategy == "diloco":
        strategy = DiLoCoStrategy(
            inner_steps=args.inner_steps,
            outer_lr=args.outer_lr,
            outer_momentum=args.outer_momentum,
            outer_momentum_schedule=(MomentumWarmupDecay(warmup_steps=args.momentum_warmup, total_steps=6,
                                                         decay_steps=2, final=0.5)
                                     if args.momentum_warmup is not None else None),
            outer_lr_scheduler=(functools.partial(torch.optim.lr_scheduler.ExponentialLR, gamma=args.outer_lr_decay)
                                if args.outer_lr_decay is not None else None),
            compression=args.compression,
            error_feedback=args.error_feedback,
            num_fragments=args.fragments,
            overlap_steps=args.overlap,
            overlap_mixing=args.mixing,
            eager_rounds=args.eager,
            processes_per_worker=args.processes_per_worker,
            nonfinite=args.nonfinite,
            speed_weighted=args.speed_weighted,
            sync_timeout=args.sync_timeout,
            outer_backend=args.outer_backend,
            sync_warmup_steps=args.sync_warmup_steps,
        )
    else:
        strategy = "ddp"
    callbacks = []
    if args.sigterm:
        callbacks.append(SigtermAt(*map(int, args.sigterm.split(":"))))
    if args.summary:
        from lightning_diloco.progress import FitSummary

        callbacks.append(FitSummary())
    if args.ckpt_dir:
        callbacks.append(
            ModelCheckpoint(dirpath=args.ckpt_dir, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        max_steps=args.max_steps,
        max_epochs=args.max_epochs,
        max_time=args.max_time,
        accumulate_grad_batches=args.accumulate,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=bool(args.ckpt_dir),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1 if args.val else 0,
        limit_val_batches=None if args.val else 0,
    )
    model = ToyModule(optimizer=args.optimizer, lr=args.lr)
    train, val = loaders()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train, val, ckpt_path=args.resume)
    record = dict(model.record)
    record["init"] = model.init_flat
    record["final"] = {k: v.clone() for k, v in model.state_dict().items()}
    record["warnings"] = [str(w.message) for w in caught]
    record["fragments"] = getattr(trainer.strategy, "fragments", None)
    record["bytes_sent"] = getattr(trainer.strategy, "bytes_sent", None)
    outer = getattr(trainer.strategy, "outer", None)
    record["outer_steps"] = outer.outer_step if outer is not None else None
    os.makedirs(args.out, exist_ok=True)
    torch.save(record, os.path.join(args.out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
    close_process_groups()  # with main's Trainer gone: no gloo thread outlives the interpreter
