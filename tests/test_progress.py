"""Tests of the step progress bar and the closing line of ``fit`` (lightning_diloco/progress.py)."""

import logging
from typing import Any, Optional

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from helpers.launch import run_script
from lightning_diloco import DiLoCoStrategy
from lightning_diloco.progress import DiLoCoProgressBar, FitSummary, human_bytes, ring_allreduce_bytes


def simulated_ring_allreduce_bytes(numel: int, workers: int, itemsize: int = 4) -> float:
    """Run a ring all-reduce of ``workers`` random fp32 vectors and count the bytes a worker sends, on average.

    Reduce-scatter then all-gather over ``workers`` chunks: in each of the ``2 (k - 1)`` rounds every worker sends one
    chunk to its right neighbour. The sums are checked against ``np.sum``.
    """
    rng = np.random.default_rng(0)
    data = [rng.standard_normal(numel).astype(np.float32) for _ in range(workers)]
    chunks = [np.array_split(d.copy(), workers) for d in data]
    sent = 0
    for phase in ("reduce-scatter", "all-gather"):
        for r in range(workers - 1):
            outgoing = []
            for w in range(workers):
                index = (w - r) % workers if phase == "reduce-scatter" else (w + 1 - r) % workers
                outgoing.append((index, chunks[w][index].copy()))
            sent += sum(chunk.size for _, chunk in outgoing) * itemsize
            for w, (index, chunk) in enumerate(outgoing):
                right = (w + 1) % workers
                if phase == "reduce-scatter":
                    chunks[right][index] += chunk
                else:
                    chunks[right][index] = chunk
    total = np.sum(data, axis=0)
    for w in range(workers):
        np.testing.assert_allclose(np.concatenate(chunks[w]), total, rtol=1e-5, atol=1e-5)
    return sent / workers


@pytest.mark.parametrize("numel, workers", [(1200, 2), (1201, 3), (1000, 8)])
def test_ring_allreduce_bytes_is_what_a_ring_sends(numel, workers):
    assert ring_allreduce_bytes(numel, workers) == pytest.approx(simulated_ring_allreduce_bytes(numel, workers))
    assert ring_allreduce_bytes(numel, 1) == 0
    with pytest.raises(ValueError, match="at least 1"):
        ring_allreduce_bytes(numel, 0)


def test_human_bytes():
    assert human_bytes(15_500_000) == "15.5 MB" and human_bytes(999) == "999 B" and human_bytes(2.5e9) == "2.5 GB"


# ------------------------------------------------------------------------------------------------------------------
# In-process fits (one worker), and a real two-worker run for the bytes
# ------------------------------------------------------------------------------------------------------------------


class Regression(L.LightningModule):
    def __init__(self, frozen: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("val_ppl", torch.exp(loss), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


def _loader(n: int = 12, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch_size)


def _fit(strategy: Any, callbacks: list, tmp_path, max_steps: int, val: bool = True, **kwargs: Any) -> L.Trainer:
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", max_steps=max_steps, max_epochs=-1, callbacks=callbacks,
        default_root_dir=tmp_path, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run"),
        limit_val_batches=1 if val else 0, num_sanity_val_steps=0, enable_model_summary=False,
        enable_checkpointing=False, **kwargs,
    )
    module = Regression()
    trainer.fit(module, _loader(), _loader() if val else None)
    return trainer


class RecordingBar(DiLoCoProgressBar):
    """Records the training bar after every batch: (counter, total, metrics shown)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: list[tuple[int, Optional[int], dict[str, Any]]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_batch_end(trainer, *args)
        bar = self.train_progress_bar
        outer = getattr(trainer.strategy, "outer", None)
        self.seen.append((bar.n, bar.total, self.get_metrics(trainer, trainer.lightning_module), trainer.global_step,
                          outer.outer_step if outer is not None else None))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_bar_counts_steps_of_the_whole_fit_and_shows_the_outer_step(tmp_path, accumulate):
    bar = RecordingBar()
    # 3 batches per epoch, 7 optimizer steps: the bar must run across epochs up to max_steps
    trainer = _fit(DiLoCoStrategy(inner_steps=2), [bar], tmp_path, max_steps=7, accumulate_grad_batches=accumulate)
    assert trainer.current_epoch >= 2 and trainer.global_step == 7
    assert bar.seen[-1][0] == 7
    for n, total, metrics, step, outer in bar.seen:
        assert (n, total) == (step, trainer.max_steps)
        assert metrics.get("outer") == (outer or None)  # shown once the first outer step happened
        assert "train_loss" in metrics


def test_bar_under_a_strategy_without_outer_steps_shows_steps_only(tmp_path):
    bar = RecordingBar()
    trainer = _fit("auto", [bar], tmp_path, max_steps=5)
    assert [(n, total) for n, total, *_ in bar.seen] == [(s, trainer.max_steps) for s in range(1, 6)]
    assert all("outer" not in metrics for _, _, metrics, *_ in bar.seen)


def test_bar_total_follows_max_epochs_without_max_steps(tmp_path):
    bar = RecordingBar()
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, callbacks=[bar], logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, limit_val_batches=0, enable_model_summary=False)
    trainer.fit(Regression(), _loader(n=20, batch_size=4))
    assert trainer.global_step == 10
    assert [(n, total) for n, total, *_ in bar.seen] == [(s, 10) for s in range(1, 11)]


def test_bar_is_a_tqdm_progress_bar_lightning_accepts():
    assert issubclass(DiLoCoProgressBar, TQDMProgressBar)
    trainer = L.Trainer(accelerator="cpu", callbacks=[DiLoCoProgressBar()], logger=False)
    assert isinstance(trainer.progress_bar_callback, DiLoCoProgressBar)


def _summary_line(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Run finished:")]
    assert len(lines) == 1, caplog.text
    return lines[0]


def _amount(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


def _outer_sync_bytes(k: int) -> float:
    """What one fp32 outer sync of the toy model sends per worker: a ring all-reduce (``2 (k - 1) / k`` of the
    bytes) of its 177 parameters, and one of its 32 BatchNorm statistics."""
    return 2 * (k - 1) * 4 * 177 // k + 2 * (k - 1) * 4 * 32 // k


@pytest.mark.parametrize("warmup", [0, 5])
def test_closing_line_of_two_workers_counts_every_outer_step_and_the_warmup(tmp_path, warmup):
    # 24 steps, H = 5 after the warm-up: outer steps at 5, 10, 15, 20 and a final one at 24 (warm-up 0), or at
    # 10, 15, 20 and a final one (warm-up 5), the final one in the strategy's own on_train_end
    proc = run_script("train_toy.py", "--out", str(tmp_path), "--inner-steps", "5", "--sync-warmup-steps",
                      str(warmup), "--summary")
    (line,) = [text for text in (proc.stdout + proc.stderr).splitlines() if "Run finished:" in text]  # rank 0 only
    record = torch.load(tmp_path / "rank0.pt", weights_only=False)
    outer_steps = 5 if warmup == 0 else 4
    assert record["outer_steps"] == outer_steps
    warm = warmup * (2 * 4 * (177 + 5) // 2)  # the gradients and a flag per parameter tensor, see test_warmup.py
    expected = outer_steps * _outer_sync_bytes(2) + warm
    assert record["bytes_sent"] == {"outer": outer_steps * _outer_sync_bytes(2), "warmup": warm}
    assert _amount(line.split("DiLoCo ")[1].split(" (")[0]) == pytest.approx(expected, rel=5e-3)
    assert f"in {outer_steps} outer steps" in line or f"({outer_steps} outer steps" in line
    assert ("in the synchronous warm-up" in line) == bool(warmup)
    ddp = 24 * simulated_ring_allreduce_bytes(177, 2)
    assert _amount(line.split("DDP would send ")[1].split(" for")[0]) == pytest.approx(ddp, rel=5e-3)
    assert "for the same 24 steps" in line and "177 fp32 gradients among 2 workers" in line
    assert f"{ddp / expected:.3g}x more" in line


def test_closing_line_of_a_second_fit_counts_that_fit_only(tmp_path, caplog):
    summary = FitSummary()
    trainer = _fit(DiLoCoStrategy(inner_steps=2), [summary], tmp_path, max_steps=4)
    trainer.fit_loop.epoch_loop.max_steps = 7
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer.fit(trainer.lightning_module, _loader(), _loader())
    assert trainer.global_step == 7
    line = _summary_line(caplog)
    assert "one worker: nothing sent between workers" in line
    assert line.startswith(f"Run finished: {trainer.logger.log_dir} |")
    assert f"val_ppl {float(trainer.callback_metrics['val_ppl']):.2f}" in line


def test_closing_line_on_one_device_and_under_ddp(tmp_path, caplog):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    with caplog.at_level(logging.INFO):
        trainer = _fit("auto", [FitSummary()], tmp_path, max_steps=3, val=False)
    assert _summary_line(caplog) == f"Run finished: {trainer.logger.log_dir}"  # no val_ppl, no communication
    # DDP among 3 processes for 5 steps: DDP's own volume, and no DiLoCo part
    summary = FitSummary()
    summary.on_train_start(SimpleNamespace(global_step=0, strategy=DDPStrategy()), Regression())
    text = summary._traffic(SimpleNamespace(strategy=DDPStrategy(), world_size=3, global_step=5))
    assert text is not None and "DiLoCo" not in text and "for the same 5 steps" in text
    assert _amount(text.split("DDP ")[1].split(" for")[0]) == pytest.approx(
        5 * simulated_ring_allreduce_bytes(41, 3), rel=5e-3
    )


def test_no_val_ppl_no_logger(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        trainer = L.Trainer(accelerator="cpu", max_steps=2, callbacks=[FitSummary()], logger=False,
                            enable_checkpointing=False, default_root_dir=tmp_path, enable_model_summary=False,
                            enable_progress_bar=False)
        trainer.fit(Regression(), _loader())
    assert _summary_line(caplog) == f"Run finished: {tmp_path}"
