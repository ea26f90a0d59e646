"""Eager updates (``eager_rounds``), in real runs against the one-process simulation of ``helpers.reference_eager``.

Multi-process tests run ``tests/scripts/train_toy.py`` with two workers (gloo on CPU); toy epochs are 8 optimizer
steps and runs last 3 epochs (24 steps).
"""

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from helpers.checkpoints import read_checkpoint
from helpers.launch import load_ranks, run_script
from helpers.reference import simulate
from helpers.reference_eager import simulate_eager
from helpers.toy import ToyModule, loaders
from lightning_diloco import DiLoCoStrategy, checkpointing

K = 2
TOY_FRAGMENTS = [[0], [1, 2, 3, 4]]
FIRST = 128  # elements of fragment 0 at the head of the flat parameter vector


def _run(out: Path, *args: str, world: int = K, **kwargs: Any) -> list[dict[str, Any]]:
    run_script("train_toy.py", "--out", str(out), *args, **kwargs)
    return load_ranks(out, world)


def _assert_equal(ranks: list[dict[str, Any]], sim: Any) -> None:
    """Every worker's weights after every step, and the final model, are the simulation's, bit for bit."""
    for rank, record in enumerate(ranks):
        assert len(record["local"]) == len(sim.local[rank])
        for b, (local, expected) in enumerate(zip(record["local"], sim.local[rank])):
            torch.testing.assert_close(local, expected, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"rank {rank} step {b + 1}: {m}")
        for key, value in sim.final.items():
            assert torch.equal(record["final"][key], value), f"rank {rank} {key}"  # no NaN is left at the end


@pytest.fixture(scope="module")
def eager_fragments(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """F=2, H=6, d=1, a checkpoint at every epoch end (step 16 falls in a round of each fragment, with a sync of each
    in flight)."""
    out = tmp_path_factory.mktemp("eager")
    ranks = _run(out, "--inner-steps", "6", "--fragments", "2", "--eager", "1", "--ckpt-dir", str(out / "ckpt"),
                 "--val", "0")
    return out, ranks


def test_eager_fragments_equal_the_reference(eager_fragments):
    _, ranks = eager_fragments
    indices = [r["indices"] for r in ranks]
    sim = simulate_eager(indices, 1000, 6, 1, fragments=TOY_FRAGMENTS)
    # fragment 0 ends rounds at 3, 9, 15, 21, fragment 1 at 6, 12, 18, 24; each sync's others' part one round later,
    # and the end of fit applies those still out
    assert sim.applied == [(0, 3, 9), (1, 6, 12), (0, 9, 15), (1, 12, 18), (0, 15, 21), (1, 18, 24), (0, 21, 24),
                           (1, 24, 24)]
    _assert_equal(ranks, sim)
    # each worker restarts from its own global weights: right after a round end the workers differ in that fragment
    a, b = ranks[0]["local"], ranks[1]["local"]
    assert not torch.allclose(a[8][:FIRST], b[8][:FIRST])  # after step 9
    assert torch.equal(ranks[0]["final"]["net.0.weight"], ranks[1]["final"]["net.0.weight"])  # and agree at the end
    # eager is neither blocking DiLoCo nor naive delayed application
    blocking = simulate(indices, init_seed=1000, inner_steps=6, outer_lr=0.7, outer_momentum=0.9,
                        fragments=TOY_FRAGMENTS)
    assert not torch.allclose(blocking.local[0][8], sim.local[0][8], atol=1e-4)
    later = simulate_eager(indices, 1000, 6, 2, fragments=TOY_FRAGMENTS)
    assert not torch.allclose(later.local[0][14], sim.local[0][14], atol=1e-4)


def test_eager_mid_round_resume_with_syncs_in_flight_is_bitwise_exact(eager_fragments, tmp_path):
    out, ranks = eager_fragments
    ckpt = out / "ckpt" / "epoch=1-step=16.ckpt"
    state = read_checkpoint(ckpt)["diloco"]
    assert [(p["fragment"], p["step"], p["apply_at"]) for p in state["pending"]] == [(1, 12, 18), (0, 15, 21)]
    assert state["eager_rounds"] == 1
    resumed = _run(tmp_path, "--inner-steps", "6", "--fragments", "2", "--eager", "1", "--resume", str(ckpt),
                   "--val", "0")
    for rank in range(K):
        assert resumed[rank]["indices"] == ranks[rank]["indices"][16:]
        for b, local in enumerate(resumed[rank]["local"]):
            assert torch.equal(local, ranks[rank]["local"][16 + b]), f"rank {rank} step {17 + b}"
        for key, value in ranks[rank]["final"].items():
            assert torch.equal(resumed[rank]["final"][key], value), key


def test_eager_checkpoint_keeps_every_workers_global_state_and_refuses_other_layouts(eager_fragments, tmp_path):
    out, _ = eager_fragments
    ckpt = out / "ckpt" / "epoch=1-step=16.ckpt"
    from lightning_diloco import checkpoint_dir

    keys = checkpoint_dir.keys(ckpt)
    assert not [k for k in keys if k.startswith(("outer/", "pending/"))]
    for w in range(K):
        assert f"workers/{w}/outer/params/0" in keys and f"workers/{w}/pending/0/deltas/1" in keys
    values = checkpoint_dir.read(ckpt, ("workers/0/outer/params/0", "workers/1/outer/params/0"))
    assert not torch.equal(values["workers/0/outer/params/0"], values["workers/1/outer/params/0"])
    consolidated = tmp_path / "model.ckpt"
    checkpointing.consolidate(ckpt, consolidated)
    model = torch.load(consolidated, weights_only=False)["state_dict"]
    assert torch.equal(model["net.0.weight"], values["workers/0/outer/params/0"])
    for args, message in ((("--devices", "1"), "Resume on 2 workers"), ((), "Resume with the same `eager_rounds`")):
        with pytest.raises(AssertionError, match=message):
            _run(tmp_path / str(len(args)), "--inner-steps", "6", "--fragments", "2", *args,
                 *(("--eager", "1") if args else ()), "--resume", str(ckpt), "--val", "0", world=K - len(args) // 2,
                 timeout=120)


def test_eager_with_int8_feedback_and_a_nonfinite_worker_equals_the_reference(tmp_path, monkeypatch):
    """d=2, int8 with error feedback, and worker 1's weights poisoned after step 7: it applies nothing of its own at
    the round end of step 8, is dropped from that sync's mean, and restarts from its global weights."""
    monkeypatch.setenv("TOY_NAN", "1:7")
    ranks = _run(tmp_path, "--inner-steps", "4", "--eager", "2", "--compression", "int8", "--error-feedback",
                 "--val", "0")
    sim = simulate_eager([r["indices"] for r in ranks], 1000, 4, 2, compression="int8", error_feedback=True,
                         poison={1: 7})
    assert [s for _, s, at in sim.applied if at == s + 8] == [4, 8, 12, 16]
    assert torch.isnan(ranks[1]["local"][6]).any()  # the poison reached worker 1
    _assert_equal(ranks, sim)
    assert any("not finite" in w for w in ranks[0]["warnings"])


def _fit_one(strategy: DiLoCoStrategy) -> ToyModule:
    module = ToyModule()
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, use_distributed_sampler=False)
    trainer.fit(module, loaders()[0])
    return module


def test_one_eager_worker_is_blocking_diloco():
    """With one worker the mean is the worker's own pseudo-gradient, which it applies whole at once: eager updates
    are then plain DiLoCo, bit for bit, whatever d."""
    plain = _fit_one(DiLoCoStrategy(inner_steps=5))
    eager = _fit_one(DiLoCoStrategy(inner_steps=5, eager_rounds=2))
    assert len(plain.record["local"]) == 16
    for a, b in zip(plain.record["local"], eager.record["local"]):
        assert torch.equal(a, b)
    sim = simulate_eager([eager.record["indices"]], 1000, 5, 2)  # on one thread: equal to rounding
    for a, b in zip(eager.record["local"], sim.local[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
