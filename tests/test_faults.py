"""Faults and wrong input: non-finite workers, stalled peers, resumes on another number of workers, bad arguments.

The multi-process tests run ``tests/scripts/train_toy.py`` (two workers, gloo on CPU) with the fault injection of
``tests/helpers/toy.py`` and compare with the one-process simulation of ``tests/helpers/reference.py`` or with a
formula computed here from a checkpoint's contents. The table of wrong inputs at the end is ``docs/bad_input.md``,
row by row.
"""

import os
import shutil
import struct
import sys
import time
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO

from helpers import launch
from helpers.launch import LAUNCHER_ENV, load_ranks, run_script
from helpers.reference import closed_round, simulate
from helpers.toy import ToyModule, loaders
from helpers.checkpoints import read_checkpoint
from lightning_diloco import DiLoCoStrategy
from lightning_diloco.checkpoint_io import CorruptCheckpointError
from lightning_diloco.checkpointing import consolidate
from lightning_diloco.schedules import MomentumWarmupDecay

K, H = 2, 5
ATOL = 1e-6


@contextmanager
def _environment(**values: Optional[str]) -> Iterator[None]:
    """Set (or, for ``None``, unset) environment variables for the runs started inside.

    The variables that an in-process run of Lightning leaves behind (:data:`LAUNCHER_ENV`) are always unset: with
    ``LOCAL_RANK`` set, a new run would take its processes for started from outside and wait for them forever, and
    it must pick a free port of its own.
    """
    values = {**dict.fromkeys(LAUNCHER_ENV), **values}
    saved = {name: os.environ.get(name) for name in values}
    try:
        _set_environment(values)
        yield
    finally:
        _set_environment(saved)


def _set_environment(values: dict[str, Optional[str]]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@dataclass
class Launched:
    returncode: int
    stderr: str
    seconds: float


def _launch_failing(out: Path, *args: str, env: dict[str, str], timeout: float) -> Launched:
    """Run ``train_toy.py`` until rank 0 exits, then stop the ranks it started (they may be stalled on purpose)."""
    command = [sys.executable, launch.SCRIPTS / "train_toy.py", "--out", str(out), *args]
    begin = time.monotonic()
    (done,) = launch.finish([launch.start(command, env=launch.clean_env(**env))], timeout)
    seconds = time.monotonic() - begin
    assert done.returncode is not None, f"train_toy.py did not stop in {timeout:g} s:\n{done.stderr[-3000:]}"
    return Launched(done.returncode, done.stderr, seconds)


def _simulate(ranks: list[dict[str, Any]], inner_steps: int = H, **kwargs: Any):
    return simulate([r["indices"] for r in ranks], init_seed=1000, inner_steps=inner_steps, outer_lr=0.7,
                    outer_momentum=0.9, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# A worker whose replica becomes NaN
# ------------------------------------------------------------------------------------------------------------------

POISON_STEP = 11  # worker 1's replica gets a NaN after step 11; the outer step after step 15 must drop it


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """H=5, 3 epochs of 8 steps."""
    out = tmp_path_factory.mktemp("poisoned")
    with _environment(TOY_NAN=f"1:{POISON_STEP}"):
        run_script("train_toy.py", "--out", str(out), "--inner-steps", str(H), "--val", "0")
    return out, load_ranks(out, K)


def test_nonfinite_worker_is_dropped_and_restarts_from_the_global_weights(poisoned):
    _, ranks = poisoned
    sim = _simulate(ranks, poison={1: POISON_STEP})
    assert sim.dropped == [(15, [1])]
    assert any("The pseudo-gradient of worker(s) [1] is not finite (NaN or inf) at optimizer step 15" in w
               for w in ranks[0]["warnings"])
    for rank, record in enumerate(ranks):
        for b, (local, expected) in enumerate(zip(record["local"], sim.local[rank])):
            torch.testing.assert_close(local, expected, rtol=0, atol=ATOL, equal_nan=True,
                                       msg=lambda m: f"rank {rank} batch {b}: {m}")
        for key, value in sim.final.items():
            assert torch.isfinite(record["final"][key].float()).all(), key
            torch.testing.assert_close(record["final"][key], value, rtol=0, atol=ATOL, msg=key)
    assert torch.isnan(ranks[1]["local"][POISON_STEP - 1]).any()  # the poison did reach worker 1
    assert torch.isfinite(ranks[1]["local"][14]).all()  # and was gone after the outer step of step 15
    # the reference is sensitive to the rule: keeping the NaN worker's inner optimizer state would leave it NaN
    kept = _simulate(ranks, poison={1: POISON_STEP}, final_sync=False)
    assert torch.isfinite(kept.local[1][15]).all()


def test_nonfinite_worker_with_raise_stops_the_run(tmp_path):
    run = _launch_failing(tmp_path, "--inner-steps", str(H), "--nonfinite", "raise", "--max-epochs", "2", "--val",
                          "0", env={"TOY_NAN": f"1:{POISON_STEP}"}, timeout=240)
    assert run.returncode != 0
    assert "OuterSyncError: The pseudo-gradient of worker(s) [1] is not finite (NaN or inf) at optimizer step 15." \
        " Nothing reached the global weights." in run.stderr, run.stderr[-3000:]


# ------------------------------------------------------------------------------------------------------------------
# A stalled peer
# ------------------------------------------------------------------------------------------------------------------


def test_stalled_peer_fails_the_outer_step_after_sync_timeout(tmp_path):
    stall = 300.0  # worker 1 sleeps this long after step 2; the outer step after step 5 waits for it
    run = _launch_failing(tmp_path, "--inner-steps", str(H), "--sync-timeout", "3", "--max-epochs", "1", "--val",
                          "0", env={"TOY_STALL": f"1:2:{stall}"}, timeout=stall)
    assert run.returncode != 0
    assert "OuterSyncError: Outer step 1 (step 5) failed while waiting for other workers: a peer is dead, stalled" \
        " or unreachable (sync_timeout=3.0s)." in run.stderr, run.stderr[-3000:]
    assert run.seconds < stall / 2  # start-up and 3 seconds of waiting, not the stall


# ------------------------------------------------------------------------------------------------------------------
# Resuming on a different number of workers
# ------------------------------------------------------------------------------------------------------------------


def _assert_same_optimizer_state(got: dict[str, Any], saved: dict[str, Any]) -> None:
    assert got["state"].keys() == saved["state"].keys()
    for index, values in saved["state"].items():
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(got["state"][index][key]), torch.as_tensor(value)), (index, key)


def check_resume(ckpt: Path, resumed: list[dict[str, Any]], inner_steps: int, **kwargs: Any) -> None:
    """A run resumed from ``ckpt`` on ``len(resumed)`` workers starts from the round its checkpoint closes (computed
    from the checkpoint alone, see ``reference.closed_round``) and then trains as the reference started there.

    Args:
        ckpt: the checkpoint.
        resumed: every worker's record of the resumed run.
        inner_steps: H.
        kwargs: ``fragments`` and the other options of the run, for ``reference.simulate``.

    """
    checkpoint = read_checkpoint(ckpt)
    state = checkpoint["diloco"]
    saved_k = len(state["workers"])
    assert saved_k != len(resumed)
    assert state["step"] > min(state["last_sync"])  # a round is open: the closing step has work to do
    start, expected = closed_round(state, len(resumed), kwargs.get("fragments"))
    for w, record in enumerate(resumed):
        for name, value in expected.items():
            torch.testing.assert_close(record["start"][name], value, rtol=0, atol=ATOL, msg=f"worker {w} {name}")
        _assert_same_optimizer_state(record["start_optimizer"], state["workers"][w % saved_k]["optimizer_states"][0])
    assert any(f"Resuming {saved_k} DiLoCo workers' checkpoint on {len(resumed)} workers" in w
               for w in resumed[0]["warnings"])
    # then training goes on from there, as the reference started from that state does
    sim = _simulate(resumed, inner_steps, start=start, **kwargs)
    assert sim.syncs and sim.syncs[0] > state["step"]
    for w, record in enumerate(resumed):
        assert len(record["local"]) == len(sim.local[w]) > 0
        for b, (local, want) in enumerate(zip(record["local"], sim.local[w])):
            torch.testing.assert_close(local, want, rtol=0, atol=ATOL, msg=lambda m: f"worker {w} batch {b}: {m}")
        for key, value in sim.final.items():
            if value.is_floating_point():  # (BatchNorm's step counter is no part of DiLoCo's state)
                torch.testing.assert_close(record["final"][key], value, rtol=0, atol=ATOL, msg=key)


# Two workers on one: tests/test_streaming.py::test_resume_on_fewer_workers_closes_only_the_open_rounds (two
# fragments, so that one of them has no open round), with the same check.


def test_resume_one_worker_on_two(tmp_path):
    # one worker in this process, H=6, one epoch of 16 steps: the epoch-end checkpoint is 4 steps into round 3
    ckpt_dir = tmp_path / "ckpt"
    trainer = L.Trainer(
        strategy=DiLoCoStrategy(inner_steps=6), accelerator="cpu", devices=1, max_epochs=1, logger=False,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)],
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False,
    )
    trainer.fit(ToyModule(), loaders()[0])
    ckpt = ckpt_dir / "epoch=0-step=16.ckpt"
    dist.destroy_process_group()  # the world of one of this process
    with _environment():
        run_script("train_toy.py", "--out", str(tmp_path / "two"), "--inner-steps", "6", "--resume", str(ckpt),
                   "--max-epochs", "2", "--val", "0")
    check_resume(ckpt, load_ranks(tmp_path / "two", K), 6)


# ------------------------------------------------------------------------------------------------------------------
# Wrong input: one row of docs/bad_input.md per case
# ------------------------------------------------------------------------------------------------------------------


def _fit(strategy: Any, module: Optional[L.LightningModule] = None, ckpt_path: Optional[Path] = None,
         steps: int = 3, **trainer_kwargs: Any) -> L.Trainer:
    kwargs = dict(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  use_distributed_sampler=False)
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(strategy=strategy, **kwargs)
    trainer.fit(module or ToyModule(), loaders()[0], ckpt_path=ckpt_path)
    return trainer


class Checkpoints:
    """Checkpoints for the rows that resume, written on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[str, Path] = {}

    def get(self, name: str) -> Path:
        if name not in self._made:
            path = self.root / f"{name}.ckpt"
            if name == "ddp":  # another strategy: no DiLoCo state
                _fit("auto").save_checkpoint(path)
            elif name == "file":  # a DiLoCo checkpoint as one Lightning file
                consolidate(self.get("diloco"), path)
            else:
                _fit(DiLoCoStrategy(inner_steps=2)).save_checkpoint(path)
            self._made[name] = path
        return self._made[name]

    def edited(self, name: str, edit: Callable[[dict[str, Any]], None]) -> Path:
        """A copy of the DiLoCo checkpoint directory with ``edit`` applied to its ``meta.pt``."""
        path = self.root / f"{name}.ckpt"
        shutil.copytree(self.get("diloco"), path)
        meta = torch.load(path / "meta.pt", weights_only=False)
        edit(meta)
        torch.save(meta, path / "meta.pt")
        return path

    def cut_meta(self, name: str) -> Path:
        """A copy of the DiLoCo checkpoint directory whose ``meta.pt`` lost its second half."""
        path = self.root / f"{name}.ckpt"
        shutil.copytree(self.get("diloco"), path)
        data = (path / "meta.pt").read_bytes()
        (path / "meta.pt").write_bytes(data[: len(data) // 2])
        return path

    def cut(self, name: str, keep: float) -> Path:
        data = self.get("file").read_bytes()
        path = self.root / f"{name}.ckpt"
        path.write_bytes(data[: int(len(data) * keep)])
        return path

    def flipped(self, name: str) -> Path:
        """The checkpoint with one byte inverted in the middle of its largest tensor's bytes, its length unchanged."""
        source = self.get("file")
        with zipfile.ZipFile(source) as archive:
            largest = max(archive.infolist(), key=lambda info: info.compress_size)
        data = bytearray(source.read_bytes())
        # a zip record's data follows its 30-byte local header, its file name and its extra field
        name_length, extra_length = struct.unpack_from("<HH", data, largest.header_offset + 26)
        start = largest.header_offset + 30 + name_length + extra_length
        data[start + largest.compress_size // 2] ^= 0xFF
        path = self.root / f"{name}.ckpt"
        path.write_bytes(bytes(data))
        return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("bad_ckpt"))


class Wider(ToyModule):
    def __init__(self) -> None:
        super().__init__()
        self.net[3] = torch.nn.Linear(16, 2)


class TwoOptimizers(ToyModule):
    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[3].parameters(), lr=0.1)]


def _gpt_module(**kwargs: Any) -> Any:
    from lightning_diloco.gpt import GPTLightningModule

    return GPTLightningModule(**kwargs)


def _lm(**kwargs: Any) -> Any:
    from lightning_diloco.data import LMDataModule

    return LMDataModule(**kwargs)


def _data_module(tmp_path: Path, files: dict[str, str], **kwargs: Any) -> Any:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return _lm(data_files=str(tmp_path / "*.txt"), cache_dir=str(tmp_path / "cache"), **kwargs)


def _set_version(c: dict[str, Any]) -> None:
    c["diloco"]["version"] = 99


def _rename_outer(c: dict[str, Any]) -> None:
    c["diloco"]["outer"]["names"] = [f"other.{n}" for n in c["diloco"]["outer"]["names"]]


@dataclass
class Bad:
    """One wrong input: what is done, and the exception (or warning) it must give."""

    id: str
    act: Callable[[Path, Checkpoints], Any]
    error: type
    match: str


def _new(**kwargs: Any) -> Callable[[Path, Checkpoints], Any]:
    return lambda tmp_path, ckpts: DiLoCoStrategy(**kwargs)


BAD_INPUT = [
    # --- constructor arguments
    Bad("inner_steps=0", _new(inner_steps=0), ValueError,
        r"`inner_steps` must be an integer >= 1 \(the optimizer steps between outer steps\), got 0\."),
    Bad("inner_steps=2.5", _new(inner_steps=2.5), ValueError, r"`inner_steps` must be an integer >= 1 .*got 2\.5\."),
    Bad("inner_steps=True", _new(inner_steps=True), ValueError, r"`inner_steps` must be an integer >= 1 .*got True\."),
    Bad("outer_lr=0", _new(outer_lr=0.0), ValueError,
        r"`outer_lr` must be a positive number \(the paper uses 0\.7\), got 0\.0\."),
    Bad("outer_lr=nan", _new(outer_lr=float("nan")), ValueError, r"`outer_lr` must be a positive number .*got nan\."),
    Bad("outer_momentum=1", _new(outer_momentum=1.0), ValueError,
        r"`outer_momentum` must be in \[0, 1\) \(the paper uses 0\.9; 0 gives plain SGD\), got 1\.0\."),
    Bad("outer_momentum=-0.1", _new(outer_momentum=-0.1), ValueError, r"`outer_momentum` must be in \[0, 1\)"),
    Bad("outer_optimizer-not-callable", _new(outer_optimizer="sgd"), TypeError,
        r"`outer_optimizer` must be a callable that takes the global parameters and returns a"
        r" `torch\.optim\.Optimizer`, got str\."),
    Bad("outer_optimizer-and-outer_lr", _new(outer_optimizer=lambda p: torch.optim.Adam(p), outer_lr=0.5), ValueError,
        r"`outer_lr` configure the default outer optimizer, which `outer_optimizer` replaces\. Set the learning rate"
        r" and momentum inside `outer_optimizer` instead\."),
    Bad("outer_lr_scheduler-not-callable", _new(outer_lr_scheduler="cosine"), TypeError,
        r"`outer_lr_scheduler` must be a callable that takes the outer optimizer and returns a learning-rate"
        r" scheduler, got str\."),
    Bad("outer_momentum_schedule-not-callable", _new(outer_momentum_schedule=0.9), TypeError,
        r"`outer_momentum_schedule` must be a callable that takes the number of outer steps taken and returns the"
        r" outer momentum, got float\. Pass for example `lightning_diloco\.schedules\.MomentumWarmupDecay"),
    Bad("MomentumWarmupDecay-peak=1", lambda t, c: MomentumWarmupDecay(peak=1.0), ValueError,
        r"`peak` must be a momentum in \[0, 1\), got 1\.0\."),
    Bad("MomentumWarmupDecay-longer-than-the-run",
        lambda t, c: MomentumWarmupDecay(warmup_steps=8, total_steps=10, decay_steps=4), ValueError,
        r"`warmup_steps \+ decay_steps` \(8 \+ 4\) must fit in `total_steps` \(10\), the outer steps of the run"),
    Bad("outer_device=gpu0", _new(outer_device="gpu0"), ValueError,
        r"`outer_device='gpu0'` is not a device; use 'cpu', 'cuda' or 'cuda:N'\."),
    Bad("eval_weights=best", _new(eval_weights="best"), ValueError,
        r"`eval_weights` must be 'global' or 'local', got 'best'\."),
    Bad("compression=int3", _new(compression="int3"), ValueError,
        r"`compression` must be one of none, bf16, fp16, int8, int4, int2, e3m0, sparse; got 'int3'\."),
    Bad("sparse-without-error_feedback", _new(compression="sparse"), UserWarning,
        r"`compression='sparse'` sends the top 1\.56% of every pseudo-gradient; without `error_feedback=True` the rest"
        r" is lost at every outer step\."),
    Bad("error_feedback-without-compression", _new(error_feedback=True), ValueError,
        r"`error_feedback=True` needs a lossy `compression` \(for example 'int8'\); 'none' loses nothing\."),
    Bad("num_fragments=0", _new(num_fragments=0), ValueError, r"`num_fragments` must be an integer >= 1, got 0\."),
    Bad("num_fragments>inner_steps", _new(inner_steps=4, num_fragments=5), ValueError,
        r"`num_fragments=5` is more than `inner_steps=4`: fragments would share sync steps\. Use at most"
        r" `inner_steps` fragments\."),
    Bad("overlap_steps=inner_steps", _new(inner_steps=4, overlap_steps=4), ValueError,
        r"`overlap_steps` must be an integer in \[0, inner_steps\) = \[0, 4\), got 4: a sync must land before the"
        r" same fragment syncs again\."),
    Bad("overlap_steps=-1", _new(overlap_steps=-1), ValueError,
        r"`overlap_steps` must be an integer in \[0, inner_steps\) = \[0, 500\), got -1"),
    Bad("overlap_mixing=1", _new(overlap_mixing=1.0), ValueError, r"`overlap_mixing` must be in \[0, 1\), got 1\.0\."),
    Bad("eager_rounds=-1", _new(eager_rounds=-1), ValueError,
        r"`eager_rounds` must be an integer >= 0 \(the rounds a sync may take, hidden behind training\), got -1\. 0"
        r" turns eager updates off; 1 is the paper's one-round delay\."),
    Bad("eager_rounds-with-overlap_steps", _new(eager_rounds=1, overlap_steps=2), ValueError,
        r"`eager_rounds=1` and `overlap_steps=2` are two ways of overlapping a sync: eager updates hide whole rounds"
        r" \(own pseudo-gradient at once, the others' later\), `overlap_steps` part of one \(mixing\)\. Set one of"
        r" them to 0\."),
    Bad("eager_rounds-with-islands", _new(eager_rounds=1, coordinator="http://127.0.0.1:1"), ValueError,
        r"Islands mode \(`coordinator=...`\) does not support `eager_rounds` yet"),
    Bad("processes_per_worker=0", _new(processes_per_worker=0), ValueError,
        r"`processes_per_worker` must be an integer >= 1, got 0\."),
    Bad("sharding=zero", _new(sharding="zero"), ValueError,
        r"`sharding` must be 'none' \(DistributedDataParallel inside a worker\) or 'fsdp' \(FSDP2 inside a worker\), got"
        r" 'zero'\."),
    Bad("sharding-with-one-process-per-worker", _new(sharding="fsdp"), ValueError,
        r"`sharding='fsdp'` shards each worker's replica over the worker's processes, but `processes_per_worker=1`\."
        r" Set `processes_per_worker` to the processes that share one replica"),
    Bad("sharding-with-sync_warmup_steps", _new(sharding="fsdp", processes_per_worker=2, sync_warmup_steps=4),
        ValueError, r"`sharding='fsdp'` does not support a synchronous warm-up \(`sync_warmup_steps > 0`\) yet\."),
    Bad("sharding-with-islands", _new(sharding="fsdp", processes_per_worker=2, coordinator="http://127.0.0.1:1"),
        ValueError, r"Islands mode \(`coordinator=...`\) does not support `processes_per_worker`, `sharding` yet"),
    Bad("sync_timeout=0", _new(sync_timeout=0), ValueError,
        r"`sync_timeout` must be a positive number of seconds, got 0\."),
    Bad("nonfinite=ignore", _new(nonfinite="ignore"), ValueError,
        r"`nonfinite` must be 'skip' or 'raise', got 'ignore'\."),
    Bad("outer_backend=tcp", _new(outer_backend="tcp"), ValueError,
        r"`outer_backend` must be 'gloo', 'nccl' or None, got 'tcp'\."),
    Bad("speed_weighted-with-fragments", _new(inner_steps=4, num_fragments=2, speed_weighted=True), ValueError,
        r"`speed_weighted=True` works with whole-model, blocking outer steps\. Use `num_fragments=1`,"
        r" `overlap_steps=0` and `eager_rounds=0` with it\."),
    Bad("speed_weighted-with-overlap", _new(inner_steps=4, overlap_steps=1, speed_weighted=True), ValueError,
        r"`speed_weighted=True` works with whole-model, blocking outer steps\."),
    Bad("outer_bucket_cap_mb=0", _new(outer_bucket_cap_mb=0), ValueError, r"`outer_bucket_cap_mb` must be positive, got 0\."),
    # --- arguments that only meet the model, the trainer or the world at fit
    Bad("num_fragments>parameter-tensors", lambda t, c: _fit(DiLoCoStrategy(inner_steps=10, num_fragments=6)),
        ValueError, r"`num_fragments=6` is more than the model's 5 parameter tensors\. Use at most 5 fragments\."),
    Bad("processes_per_worker-not-dividing-world",
        lambda t, c: _fit(DiLoCoStrategy(inner_steps=2, processes_per_worker=2)), ValueError,
        r"`processes_per_worker=2` does not divide the 1 processes of this run\. Use a divisor of the world size"
        r" \(devices x num_nodes\), for example the devices of one node\."),
    Bad("speed_weighted-with-manual-optimization",
        lambda t, c: _fit(DiLoCoStrategy(inner_steps=2, speed_weighted=True), ToyModule(manual=True)), ValueError,
        r"`speed_weighted=True` skips the computation of some steps, which needs automatic optimization\. Use"
        r" `automatic_optimization = True` or `speed_weighted=False`\."),
    Bad("sync_batchnorm=True", lambda t, c: _fit(DiLoCoStrategy(inner_steps=2), sync_batchnorm=True), ValueError,
        r"`Trainer\(sync_batchnorm=True\)` would all-reduce BatchNorm statistics at every step, which DiLoCo exists to"
        r" avoid\. Set `sync_batchnorm=False`"),
    Bad("two-optimizers", lambda t, c: _fit(DiLoCoStrategy(inner_steps=2), TwoOptimizers(manual=True)), ValueError,
        r"DiLoCoStrategy supports one inner optimizer, but `configure_optimizers` returned 2\. Put all parameters into"
        r" one optimizer"),
    Bad("outer_optimizer-returns-no-optimizer",
        lambda t, c: _fit(DiLoCoStrategy(inner_steps=2, outer_optimizer=lambda params: list(params))), TypeError,
        r"`outer_optimizer` must return a `torch\.optim\.Optimizer`, got list\. Pass a callable such as"
        r" `functools\.partial\(torch\.optim\.SGD, lr=0\.7, momentum=0\.9, nesterov=True\)`\."),
    Bad("outer_lr_scheduler-returns-no-scheduler",
        lambda t, c: _fit(DiLoCoStrategy(inner_steps=2, outer_lr_scheduler=lambda optimizer: None)), TypeError,
        r"`outer_lr_scheduler` must return a `torch\.optim\.lr_scheduler\.LRScheduler`, got NoneType\."),
    Bad("outer_momentum_schedule-with-adam",
        lambda t, c: _fit(DiLoCoStrategy(inner_steps=2, outer_optimizer=lambda p: torch.optim.Adam(p),
                                         outer_momentum_schedule=lambda n: 0.9)), ValueError,
        r"`outer_momentum_schedule` sets the outer optimizer's `momentum`, which Adam does not have\. Use SGD \(the"
        r" default outer optimizer\) with it, or leave `outer_momentum_schedule=None`\."),
    # --- checkpoints
    Bad("checkpoint-of-another-model", lambda t, c: _fit(DiLoCoStrategy(inner_steps=2), Wider(), c.get("diloco")),
        ValueError, r"(?s)The checkpoint's `state_dict` does not fit this LightningModule \(it was written for a"
                    r" different model\): .*net\.3\.weight.*Pass the checkpoint of this model as `ckpt_path`"),
    Bad("checkpoint-of-another-strategy", lambda t, c: _fit(DiLoCoStrategy(inner_steps=2), None, c.get("ddp"), steps=5),
        UserWarning, r"The checkpoint has no DiLoCo state \(it was written by another strategy or with weights"
                     r" only\): DiLoCo starts a new round from its weights, with a fresh outer optimizer"),
    Bad("checkpoint-with-other-num_fragments",
        lambda t, c: _fit(DiLoCoStrategy(inner_steps=2, num_fragments=2), None, c.get("diloco"), steps=5), ValueError,
        r"The checkpoint was written with `num_fragments=1` but this run has `num_fragments=2`\. Resume with the"
        r" same number of fragments\."),
    Bad("checkpoint-with-other-eager_rounds",
        lambda t, c: _fit(DiLoCoStrategy(inner_steps=2, eager_rounds=1), None, c.get("diloco"), steps=5), ValueError,
        r"The checkpoint was written with `eager_rounds=0` but this run has `eager_rounds=1`: the syncs in flight and"
        r" the global state are kept differently\. Resume with the same `eager_rounds`"),
    Bad("checkpoint-of-another-version",
        lambda t, c: _fit(DiLoCoStrategy(inner_steps=2), None, c.edited("v99", _set_version), steps=5), ValueError,
        r"The checkpoint's DiLoCo state has version 99; this version of lightning-diloco reads version 2\. Resume with"
        r" the version that wrote it\."),
    Bad("checkpoint-with-diloco-state-of-another-model",
        lambda t, c: _fit(DiLoCoStrategy(inner_steps=2), None, c.edited("renamed", _rename_outer), steps=5),
        ValueError, r"The checkpoint's DiLoCo state was written for a different model \(parameter names or shapes"
                    r" differ\)\. Resume with the model that wrote it"),
    Bad("checkpoint-missing", lambda t, c: _fit(DiLoCoStrategy(inner_steps=2), None, t / "missing.ckpt"),
        FileNotFoundError, r"Checkpoint file not found: .*missing\.ckpt"),
    Bad("checkpoint-truncated", lambda t, c: _fit(DiLoCoStrategy(inner_steps=2), None, c.cut("half", 0.5)),
        CorruptCheckpointError,
        r"The checkpoint .*half\.ckpt is not a complete checkpoint: it has \d+ bytes and ends before the archive's"
        r" table of contents: it was truncated\..* resume from an earlier checkpoint"),
    Bad("checkpoint-directory-truncated", lambda t, c: _fit(DiLoCoStrategy(inner_steps=2), None, c.cut_meta("cut")),
        CorruptCheckpointError,
        r"The checkpoint .*cut\.ckpt/meta\.pt is not a complete checkpoint: it has \d+ bytes and ends before the"
        r" archive's table of contents: it was truncated\."),
    Bad("checkpoint-empty", lambda t, c: _fit(DiLoCoStrategy(inner_steps=2), None, c.cut("empty", 0.0)),
        CorruptCheckpointError, r"The checkpoint .*empty\.ckpt is not a complete checkpoint: the file is empty\."),
    Bad("checkpoint-damaged", lambda t, c: _fit(DiLoCoStrategy(inner_steps=2), None, c.flipped("flipped")),
        CorruptCheckpointError,
        r"The checkpoint .*flipped\.ckpt is not a complete checkpoint: its record '.*' does not match its checksum\."),
    Bad("checkpoint-truncated-torch-io",
        lambda t, c: _fit(DiLoCoStrategy(inner_steps=2, checkpoint_io=TorchCheckpointIO()), None, c.cut("half", 0.5)),
        OSError, r"\[Errno 22\] Invalid argument"),
    Bad("checkpoint-empty-torch-io",
        lambda t, c: _fit(DiLoCoStrategy(inner_steps=2, checkpoint_io=TorchCheckpointIO()), None, c.cut("empty", 0.0)),
        EOFError, r"^$"),
    # --- data (lightning_diloco.data.LMDataModule)
    Bad("data-file-missing", lambda t, c: _lm(data_files=str(t / "missing.jsonl"), cache_dir=str(t)),
        FileNotFoundError, r"Data file '.*missing\.jsonl' does not exist\. Check the path given in `data_files`\."),
    Bad("data-glob-matches-nothing", lambda t, c: _lm(data_files=str(t / "*.parquet"), cache_dir=str(t)),
        FileNotFoundError, r"No file matches '.*\*\.parquet'\. Check the pattern given in `data_files`\."),
    Bad("data-empty-corpus", lambda t, c: _data_module(t, {"a.txt": "", "b.txt": "  \n\n "}).prepare_data(), ValueError,
        r"The corpus .* has no training documents \(all files empty, or too few documents for val_fraction=.*\)\. Point"
        r" `data_files`/`dataset` at a non-empty corpus"),
    Bad("data-seq_len-too-long", lambda t, c: _data_module(
        t, {f"{i}.txt": f"document number {i} " * 10 for i in range(4)}, vocab_size=300, val_fraction=0.25,
        seq_len=100_000).setup("fit"), ValueError,
        r"seq_len=100000 is too large for the train split, which has only \d+ tokens \(one sample needs seq_len \+ 1 ="
        r" 100001\)\. Lower `seq_len` or read more data"),
    # --- the GPT module
    Bad("model-optimizer=sgd", lambda t, c: _gpt_module(optimizer="sgd"), ValueError,
        r"`optimizer` must be 'adamw' or 'muon', got 'sgd'\."),
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[case.id for case in BAD_INPUT])
def test_bad_input(case: Bad, tmp_path: Path, checkpoints: Checkpoints):
    if issubclass(case.error, Warning):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with pytest.warns(case.error, match=case.match):
                case.act(tmp_path, checkpoints)
        return
    with pytest.raises(case.error, match=case.match):
        case.act(tmp_path, checkpoints)


def test_bad_input_table_is_documented():
    doc = (Path(__file__).parent.parent / "docs" / "bad_input.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    documented = [row.split("`")[1] for row in rows]
    assert documented == [case.id for case in BAD_INPUT]
    assert len(documented) >= 20
