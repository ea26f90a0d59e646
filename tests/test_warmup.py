"""The synchronous warm-up (`sync_warmup_steps`): DDP's steps first, then DiLoCo from the shared state."""

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.launch import load_ranks, run_script
from helpers.reference import simulate
from helpers.checkpoints import read_checkpoint

K, H, W = 2, 3, 5  # 3 epochs of 8 steps: 5 synchronous steps, then DiLoCo syncs at 8, 11, ..., 23 and a final one


def _run(out: Path, *args: str) -> list[dict[str, Any]]:
    run_script("train_toy.py", "--out", str(out), *args)
    return load_ranks(out, K)


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("warm")
    ranks = _run(out, "--inner-steps", str(H), "--sync-warmup-steps", str(W), "--ckpt-dir", str(out / "ckpt"))
    return out, ranks


def test_warmup_then_diloco_equals_the_simulation(warm_run):
    _, ranks = warm_run
    sim = simulate([r["indices"] for r in ranks], init_seed=1000, inner_steps=H, outer_lr=0.7, outer_momentum=0.9,
                   warmup=W)
    assert sim.syncs == [3, 6, 9, 12, 15, 18, 19]  # DiLoCo's own steps: 3 = trainer step 8, ..., 19 = step 24
    for rank, record in enumerate(ranks):
        for b, local in enumerate(record["local"]):
            torch.testing.assert_close(local, sim.local[rank][b], rtol=0, atol=1e-6, msg=f"rank {rank} batch {b}")
        for key, value in sim.final.items():
            torch.testing.assert_close(record["final"][key], value, rtol=0, atol=1e-6)
    # during the warm-up the workers hold the same weights at every step, as under DDP
    for b in range(W):
        torch.testing.assert_close(ranks[0]["local"][b], ranks[1]["local"][b], rtol=0, atol=0)
    assert not torch.equal(ranks[0]["local"][W + 1], ranks[1]["local"][W + 1])  # then each trains its own replica


def test_warmup_steps_are_ddp_steps(tmp_path):
    """With every step synchronous, the run is Lightning's own DDP (a different code path) up to rounding."""
    steps = ["--max-steps", "6", "--max-epochs", "1", "--val", "0"]
    warm = _run(tmp_path / "warm", "--sync-warmup-steps", "6", "--inner-steps", "2", *steps)
    ddp = _run(tmp_path / "ddp", "--strategy", "ddp", *steps)
    for rank, (w, d) in enumerate(zip(warm, ddp)):
        assert w["indices"] == d["indices"]
        for key, value in d["final"].items():
            if rank > 0 and "running" in key:
                continue  # DDP's buffers are rank 0's, updated by each rank's last forward; the warm-up ends on rank 0's
            torch.testing.assert_close(w["final"][key], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {key}")
    assert not torch.allclose(warm[0]["final"]["net.0.weight"], warm[0]["init"][:128].view(16, 8))


def test_checkpoint_during_warmup_resumes_exactly(warm_run, tmp_path):
    out, ranks = warm_run
    ckpt = out / "ckpt" / "epoch=0-step=8.ckpt"  # written after DiLoCo started: 3 steps into the first round
    state = read_checkpoint(ckpt)["diloco"]
    assert state["warmup_taken"] == W and state["step"] == 8 - W
    resumed = _run(tmp_path / "resumed", "--inner-steps", str(H), "--sync-warmup-steps", str(W), "--resume",
                   str(ckpt))
    for rank in range(K):
        for key, value in ranks[rank]["final"].items():
            torch.testing.assert_close(resumed[rank]["final"][key], value, rtol=0, atol=0, msg=key)


def test_resume_inside_the_warmup(tmp_path):
    """A checkpoint of the synchronous phase holds no DiLoCo round; the resumed run finishes the warm-up first."""
    args = ["--inner-steps", str(H), "--sync-warmup-steps", "12", "--ckpt-dir", str(tmp_path / "ckpt")]
    full = _run(tmp_path / "full", *args)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=8.ckpt"
    state = read_checkpoint(ckpt)["diloco"]
    # every warm-up step all-reduces the gradients (one fp32 bucket) and a flag per parameter tensor: a ring sends
    # 2 (k - 1) / k of each
    shapes = [tuple(t.shape) for k, t in full[0]["final"].items() if "running" not in k and "tracked" not in k]
    per_step = 2 * (K - 1) * 4 * (sum(math.prod(s) for s in shapes) + len(shapes)) // K
    assert state == {"version": 2, "warmup_taken": 8, "bytes_sent": {"outer": 0.0, "warmup": 8 * per_step}}
    resumed = _run(tmp_path / "resumed", *args[:4], "--resume", str(ckpt))
    for rank in range(K):
        for key, value in full[rank]["final"].items():
            torch.testing.assert_close(resumed[rank]["final"][key], value, rtol=0, atol=0, msg=key)


def test_bad_warmup_is_refused():
    from lightning_diloco import DiLoCoStrategy

    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="`sync_warmup_steps` must be an integer >= 0"):
            DiLoCoStrategy(sync_warmup_steps=bad)
