"""What a run shows while it trains and says when it ends: a step progress bar and a closing line.

:class:`DiLoCoProgressBar` is Lightning's :class:`~lightning.pytorch.callbacks.TQDMProgressBar` whose training bar
counts optimizer steps out of the run's total (``max_steps``, or what ``max_epochs`` gives) instead of batches out of
one epoch, and shows DiLoCo's outer step beside the logged metrics::

    Epoch 1:  45%|████▌     | 135/300 [00:41<00:50, 3.27it/s, outer=2, v_num=0, train_loss=4.61, ...]

:class:`FitSummary` ends ``fit`` with one line on rank 0: the run folder, the final ``val_ppl``, and the bytes each
worker sent in DiLoCo's outer syncs beside what DDP would have sent for the same steps::

    Run finished: runs/tiny/version_0 | val_ppl 60.12 | sent per worker: DiLoCo 20.9 MB (6 outer steps); DDP would
    send 1.04 GB for the same 300 steps (ring all-reduce of 869,248 fp32 gradients among 2 workers): 50x more

``lightning-diloco`` adds both to every run (the bar unless the config has its own progress bar or
``enable_progress_bar: false``); in your own code pass them to the Trainer:
``Trainer(callbacks=[DiLoCoProgressBar(), FitSummary()], ...)``. Both work with any strategy: under DDP the bar shows
steps only and the closing line gives DDP's own volume.
"""

from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.types import STEP_OUTPUT
from tqdm import tqdm
from typing_extensions import override

__all__ = ["DiLoCoProgressBar", "FitSummary", "human_bytes", "ring_allreduce_bytes"]

_OUTER_STEP = "diloco/outer_step"
_BYTES_SENT = "diloco/bytes_sent"


def ring_allreduce_bytes(numel: int, workers: int, bytes_per_element: int = 4) -> float:
    """Bytes each of ``workers`` sends in one ring all-reduce of ``numel`` elements: ``2 (k - 1) / k * numel * b``.

    This is what DDP sends per optimizer step for ``numel`` trainable parameters (fp32 gradients: ``b = 4``), the
    formula ``benchmarks/bytes.py`` compares DiLoCo with.

    Args:
        numel: Elements reduced (the trainable parameters).
        workers: ``k``, the processes taking part; one sends nothing.
        bytes_per_element: ``b``; 4 for fp32.

    Raises:
        ValueError: If ``workers`` is smaller than 1.
    """
    if workers < 1:
        raise ValueError(f"`workers` must be at least 1, got {workers}.")
    return 2 * (workers - 1) / workers * numel * bytes_per_element


def human_bytes(value: float) -> str:
    """``value`` bytes with a decimal unit and three significant digits: ``15.5 MB``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.3g} B"


def outer_step_of(strategy: Any) -> Optional[int]:
    """DiLoCo's latest outer step as the strategy reports it in ``last_metrics``; ``None`` before the first one and
    for strategies without ``last_metrics`` (DDP)."""
    metrics = getattr(strategy, "last_metrics", None)
    if not isinstance(metrics, dict) or _OUTER_STEP not in metrics:
        return None
    return int(metrics[_OUTER_STEP])


class DiLoCoProgressBar(TQDMProgressBar):
    """Lightning's TQDM progress bar with one training bar for the whole ``fit``, in optimizer steps.

    The training bar reads ``trainer.global_step`` out of ``trainer.estimated_stepping_batches`` (``max_steps``, or
    the steps ``max_epochs`` allow if fewer), so it runs once from start to end instead of starting over every epoch;
    a resumed run starts at its checkpoint's step. The description names the current epoch. Beside the metrics the
    bar shows ``outer``, the DiLoCo outer step the strategy reported last (``trainer.strategy.last_metrics``); under a
    strategy without ``last_metrics`` (DDP) it shows steps only. Validation, test and prediction bars are
    Lightning's.

    Args:
        refresh_rate: Update the training bar every this many optimizer steps (and the other bars every this many
            batches); ``0`` disables the bars.
        process_position: As in :class:`~lightning.pytorch.callbacks.TQDMProgressBar`.
        leave: Leave the finished validation, test and prediction bars on screen; the training bar covers the whole
            ``fit`` and always stays.
    """

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        try:
            total: Optional[Union[int, float]] = trainer.estimated_stepping_batches
        except MisconfigurationException:  # an accumulation schedule that changes between epochs
            total = None
        bar.reset(total=convert_inf(total))
        bar.initial = trainer.global_step  # the rate counts the steps of this fit only
        _show(bar, trainer.global_step)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", *_: Any) -> None:
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}")

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if self.is_enabled and not bar.disable and (step % self.refresh_rate == 0 or step == bar.total):
            _show(bar, step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    @override
    def get_metrics(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule"
    ) -> dict[str, Union[int, str, float, dict[str, float]]]:
        """Lightning's progress-bar metrics, after ``outer``: DiLoCo's latest outer step, once there is one."""
        metrics = super().get_metrics(trainer, pl_module)
        outer = outer_step_of(trainer.strategy)
        return metrics if outer is None else {"outer": outer, **metrics}


def _show(bar: tqdm, n: int) -> None:
    if not bar.disable:
        bar.n = n
        bar.refresh()


class FitSummary(Callback):
    """One closing line at the end of ``fit``, on rank 0: where the run went, what it reached, what it sent.

    The line names the run folder (the logger's ``log_dir``), the final ``val_ppl`` of ``trainer.callback_metrics``
    (when the module logs one), and the bytes each worker sent:

    - under DiLoCo, what the strategy counted in this ``fit`` (``trainer.strategy.bytes_sent``: its outer syncs, and
      the gradient all-reduces of its synchronous warm-up, ``sync_warmup_steps``, which the line names apart);
    - beside it, what DDP would have sent for the same optimizer steps: a ring all-reduce of the ``P`` trainable
      parameters' fp32 gradients per step, ``2 (k - 1) / k * P * 4`` bytes (:func:`ring_allreduce_bytes`) with ``k``
      the DiLoCo workers (``trainer.strategy.num_workers``, else the world size), and the ratio of the two;
    - under DDP, that volume alone. Other strategies get no byte count.

    The DDP inside a worker of several processes (``processes_per_worker``) is not counted. A resumed ``fit`` counts
    from the step it resumed at. The line is printed at ``on_fit_end``, after the strategy's own ``on_train_end``
    (which Lightning calls after the callbacks' ``on_train_end``) has run the final outer step of a ``fit`` that
    stops in the middle of a round.
    """

    def __init__(self) -> None:
        super().__init__()
        self._start_step = 0
        self._start_outer = 0
        self._start_bytes: dict[str, float] = {}
        self._trainable = 0

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._start_step = trainer.global_step
        self._start_outer = _outer_steps(trainer.strategy)
        self._start_bytes = dict(getattr(trainer.strategy, "bytes_sent", {}))
        self._trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.is_global_zero:
            rank_zero_info(self.summary(trainer))

    def summary(self, trainer: "pl.Trainer") -> str:
        """The closing line."""
        parts = [f"Run finished: {_run_folder(trainer)}"]
        ppl = trainer.callback_metrics.get("val_ppl")
        if ppl is not None:
            parts.append(f"val_ppl {float(ppl):.2f}")
        traffic = self._traffic(trainer)
        if traffic:
            parts.append(traffic)
        return " | ".join(parts)

    def _traffic(self, trainer: "pl.Trainer") -> Optional[str]:
        strategy = trainer.strategy
        steps = trainer.global_step - self._start_step
        sent = getattr(strategy, "bytes_sent", None)
        diloco = isinstance(sent, dict)
        if not diloco and not isinstance(strategy, DDPStrategy):
            return None
        workers = int(getattr(strategy, "num_workers", trainer.world_size)) if diloco else trainer.world_size
        quorum = getattr(strategy, "quorum", None)
        if diloco and quorum is not None:  # islands mode: the workers are the islands met at outer steps
            workers = max(int(quorum.most_islands), 1)
        if workers <= 1:
            return "one worker: nothing sent between workers"
        ddp = steps * ring_allreduce_bytes(self._trainable, workers)
        ddp_text = (
            f"for the same {steps} steps (ring all-reduce of {self._trainable:,} fp32 gradients among {workers}"
            " workers)"
        )
        if not diloco:
            return f"sent per worker: DDP {human_bytes(ddp)} {ddp_text}"
        outer = sent.get("outer", 0.0) - self._start_bytes.get("outer", 0.0)
        warmup = sent.get("warmup", 0.0) - self._start_bytes.get("warmup", 0.0)
        total = outer + warmup
        what = f"{_outer_steps(strategy) - self._start_outer} outer steps"
        if warmup:
            what = f"{human_bytes(warmup)} in the synchronous warm-up, {human_bytes(outer)} in {what}"
        text = f"sent per worker: DiLoCo {human_bytes(total)} ({what}); DDP would send {human_bytes(ddp)} {ddp_text}"
        if total > 0:
            text += f": {ddp / total:.3g}x more"
        return text


def _outer_steps(strategy: Any) -> int:
    outer = getattr(strategy, "outer", None)
    return int(getattr(outer, "outer_step", 0))


def _run_folder(trainer: "pl.Trainer") -> str:
    """The run folder: the first logger's ``log_dir`` (``save_dir`` if it has none), else ``default_root_dir``."""
    logger = trainer.logger
    folder = (getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)) if logger is not None else None
    return str(folder or trainer.default_root_dir)
