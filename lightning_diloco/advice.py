"""Warnings at the start of training about set-ups that run, but not as the user expects.

Two mistakes cost a DiLoCo user a whole run without an error: an H so large for the run that no outer step happens
before the end (or before the first validation, which then shows the untrained global weights), and Lightning
features that broadcast rank 0's decision at every training step (``max_time``, a time-based ``ModelCheckpoint``),
which puts a collective back into every step. Both are read off the Trainer at ``on_train_start``.
"""

import math
from typing import TYPE_CHECKING

from lightning.pytorch.callbacks import ModelCheckpoint, Timer

from lightning_diloco.config import DiLoCoConfig
from lightning_diloco.fragments import sync_offset

if TYPE_CHECKING:
    import lightning.pytorch as pl


def no_outer_step_in_time(
    trainer: "pl.Trainer", config: DiLoCoConfig, steps_done: int, outer_steps_done: int
) -> str:
    """Why the first outer step comes too late for this run (``""`` if it does not).

    Args:
        trainer: the Trainer at the start of training.
        config: DiLoCo's options.
        steps_done: optimizer steps of DiLoCo and its warm-up already taken (a resumed run is part-way).
        outer_steps_done: outer steps already taken.

    """
    f, h = config.num_fragments, config.inner_steps
    first_outer = config.sync_warmup_steps + min(sync_offset(p, f, h) or h for p in range(f)) - steps_done
    total = trainer.estimated_stepping_batches - trainer.global_step
    what = (
        f"The first outer step comes after {first_outer} more optimizer steps (`sync_warmup_steps="
        f"{config.sync_warmup_steps}` + `inner_steps={h}`)"
    )
    if math.isfinite(total) and first_outer > total:
        return (
            f"{what}, but training ends after {int(total)}: the workers never meet before the final outer step at"
            " the end of `fit`, and validation during `fit` sees the initial global weights. Lower `inner_steps`"
            " (or `sync_warmup_steps`), or train longer."
        )
    # with a warm-up the global weights are the synchronously trained ones, not untrained ones
    if config.eval_weights != "global" or config.sync_warmup_steps or outer_steps_done or not trainer.enable_validation:
        return ""
    batches = trainer.num_training_batches
    if not isinstance(trainer.val_check_batch, int) or not math.isfinite(batches):
        return ""
    first_val_batch = trainer.val_check_batch
    if trainer.check_val_every_n_epoch is not None:
        first_val_batch += (trainer.check_val_every_n_epoch - 1) * int(batches)
    first_val = first_val_batch // max(trainer.accumulate_grad_batches, 1)
    if first_val >= first_outer:
        return ""
    return (
        f"{what}, but validation first runs after {first_val}: until the first outer step it sees the untrained"
        " global weights. Lower `inner_steps`, start with `sync_warmup_steps`, validate later, or use"
        " `eval_weights='local'`."
    )


def per_step_collectives(trainer: "pl.Trainer") -> str:
    """Which of the Trainer's callbacks broadcast at every training step (``""`` if none)."""
    if trainer.world_size == 1:
        return ""
    per_step = []
    for callback in trainer.callbacks:
        if isinstance(callback, Timer) and callback._duration is not None and callback._interval == "step":
            per_step.append("`Trainer(max_time=...)` / `Timer(interval='step')`")
        if isinstance(callback, ModelCheckpoint) and callback._train_time_interval is not None:
            per_step.append("`ModelCheckpoint(train_time_interval=...)`")
    if not per_step:
        return ""
    return (
        f"{' and '.join(per_step)} broadcast rank 0's decision at every training step: a collective per step between"
        " all workers, which DiLoCo otherwise avoids (every worker then waits for the slowest at every step). It"
        " works; to communicate only at outer steps use `Timer(interval='epoch')` or `max_steps`, and"
        " `ModelCheckpoint(every_n_train_steps=...)`."
    )
