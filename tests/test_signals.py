"""Lightning's signal handling under DiLoCo (lightning_diloco/signals.py): no collective from a signal handler, and
the requeue signal answered by a checkpoint that every worker writes after the same outer step. The real signals
under a real SLURM job are in tests/test_slurm.py."""

import signal
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch

from helpers import launch
from helpers.checkpoints import read_checkpoint
from helpers.toy import ToyModule, loaders
from lightning_diloco import DiLoCoStrategy
from lightning_diloco.census import Census
from lightning_diloco.signals import RequeueCheckpoint, _no_collective_per_step, quiet_signals


class AskAt(L.Callback):
    """Calls the requeue handler that Lightning registers (what SIGUSR1 runs under SLURM) after step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer._signal_connector._slurm_sigusr_handler_fn(signal.SIGUSR1, None)


def _fit(root: Path, *callbacks: L.Callback, steps: int = 12, **options: Any) -> tuple[L.Trainer, ToyModule]:
    module = ToyModule()
    train, _ = loaders()
    strategy = DiLoCoStrategy(inner_steps=5, **options)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, strategy=strategy,
                        callbacks=list(callbacks), default_root_dir=root, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(module, train)
    return trainer, module


@pytest.mark.parametrize(("options", "answered"), [({}, 5), ({"overlap_steps": 2}, 7), ({"eager_rounds": 1}, 10)],
                         ids=["blocking", "overlapped", "eager"])
def test_a_requeue_request_is_answered_when_the_next_outer_step_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: dict[str, Any], answered: int
):
    """Asked at step 3 of a 5-step round: the census of the outer step at step 5 carries the request, and the
    checkpoint is written when that outer step lands (at once; 2 steps later with ``overlap_steps=2``; a round later
    with ``eager_rounds=1``), named as Lightning names it (``hpc_ckpt_1.ckpt``). Without a SLURM job to requeue, the
    run trains on, bitwise as a run never asked."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    with pytest.warns(UserWarning, match="could not be requeued"):
        trainer, asked = _fit(tmp_path / "asked", AskAt(3), **options)
    assert sum(isinstance(c, RequeueCheckpoint) for c in trainer.callbacks) == 1
    written = sorted(p.name for p in (tmp_path / "asked").glob("hpc_ckpt_*"))
    assert written == ["hpc_ckpt_1.ckpt"]
    checkpoint = read_checkpoint(tmp_path / "asked" / "hpc_ckpt_1.ckpt")
    assert checkpoint["global_step"] == answered  # where the outer step landed, not the step of the request
    _, plain = _fit(tmp_path / "plain", **options)
    assert all(torch.equal(a, b) for a, b in zip(asked.record["local"], plain.record["local"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(asked.state_dict().values(), plain.state_dict().values()))
    if not options:  # the checkpoint holds the global weights of that outer step: the local ones right after it
        state = checkpoint["state_dict"]
        flat = torch.cat([state[name].reshape(-1) for name, _ in plain.named_parameters()])
        assert plain.record["steps"][4] == 5 and torch.equal(flat, plain.record["local"][4])


def test_census_rows_carry_the_request_and_any_worker_decides():
    asked = {"now": False}
    census = Census(5, False, "skip", print, checkpoint_asked=lambda: asked["now"])
    quiet = census.row(True)
    asked["now"] = True
    loud = census.row(True)
    assert quiet.tolist()[2] == 0.0 and loud.tolist()[2] == 1.0 and len(quiet) == Census.COLUMNS
    assert not Census.checkpoint_agreed(torch.stack([quiet, quiet]))
    assert Census.checkpoint_agreed(torch.stack([quiet, loud]))
    assert not Census.checkpoint_agreed(Census.blank_row()[None])


def test_lightnings_signal_collectives_are_replaced_or_their_absence_said(tmp_path: Path):
    trainer, _ = _fit(tmp_path, steps=2)
    assert trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor.__name__ == "check_own_sigterm"
    connector = trainer._signal_connector
    assert connector._sigterm_notifier_fn.__name__ == "note_sigterm"
    assert connector._slurm_sigusr_handler_fn.__name__ == "note_requeue"
    renamed = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace()))  # a Lightning without them
    with pytest.warns(UserWarning, match="could not find Lightning's per-step SIGTERM broadcast"):
        _no_collective_per_step(renamed)
    renamed._signal_connector = SimpleNamespace()
    renamed.callbacks = []
    with pytest.warns(UserWarning, match="could not find Lightning's signal handlers"):
        quiet_signals(renamed, SimpleNamespace(), lambda: 0)


def test_sigterm_to_one_worker_ends_the_run_at_once(tmp_path: Path):
    """Rank 1 receives SIGTERM mid-round (a preemption of one worker). It stops at its next batch; rank 0 fails at
    its next outer step with OuterSyncError. Lightning's own handler would broadcast from inside the handler, which
    the other worker never joins: both processes then wait forever."""
    process = launch.start([sys.executable, launch.SCRIPTS / "train_toy.py", "--out", str(tmp_path),
                            "--inner-steps", "5", "--sigterm", "1:7", "--max-epochs", "3"], merge=True)
    (done,) = launch.finish([process], 120)
    assert done.returncode is not None, f"the run hung after a SIGTERM to one worker:\n{done.stdout[-3000:]}"
    assert done.returncode != 0
    assert "[rank: 1] Received SIGTERM" in done.stdout
    assert "OuterSyncError: Outer step 2 (step 10) failed" in done.stdout, done.stdout[-3000:]
