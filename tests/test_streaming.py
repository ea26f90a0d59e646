"""Streaming DiLoCo (fragments, overlapped syncs) and compressed syncs, in real runs against the reference.

Every multi-process test runs ``tests/scripts/train_toy.py`` with two workers (gloo on CPU) and replays the batches
each worker saw through the one-process simulation of ``tests/helpers/reference.py``. Toy epochs are 8 optimizer
steps and runs last 3 epochs (24 steps).
"""

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from helpers.launch import load_ranks, run_script
from helpers.reference import Simulation, simulate
from helpers.toy import ToyModule, loaders
from helpers.checkpoints import read_checkpoint
from lightning_diloco import DiLoCoStrategy
from test_faults import check_resume

K = 2
TOY_FRAGMENTS = [[0], [1, 2, 3, 4]]  # net.0.weight (128) | BatchNorm weight, bias, net.3 weight, bias (49)
FIRST = 128  # elements of fragment 0 at the head of the flat parameter vector
ATOL = 1e-6


def _run(out: Path, *args: str, world: int = K) -> list[dict[str, Any]]:
    run_script("train_toy.py", "--out", str(out), *args)  # in a clean environment (helpers.launch.clean_env)
    return load_ranks(out, world)


def _simulate(ranks: list[dict[str, Any]], inner_steps: int, **kwargs: Any) -> Simulation:
    return simulate([r["indices"] for r in ranks], init_seed=1000, inner_steps=inner_steps, outer_lr=0.7,
                    outer_momentum=0.9, **kwargs)


def _assert_locals_equal(ranks: list[dict[str, Any]], sim: Simulation, atol: float = ATOL) -> None:
    for rank, record in enumerate(ranks):
        assert len(record["local"]) == len(sim.local[rank])
        for b, (local, expected) in enumerate(zip(record["local"], sim.local[rank])):
            torch.testing.assert_close(local, expected, rtol=0, atol=atol, msg=lambda m: f"rank {rank} batch {b}: {m}")


def _assert_finals_equal(ranks: list[dict[str, Any]], sim: Simulation, atol: float = ATOL) -> None:
    for rank, record in enumerate(ranks):
        for key, value in sim.final.items():
            torch.testing.assert_close(record["final"][key], value, rtol=0, atol=atol, msg=f"rank {rank} {key}")


# ------------------------------------------------------------------------------------------------------------------
# Fragments
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_fragments(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """F=2, H=4, tau=0, int8, a checkpoint at every epoch end.

    Fragment 0 syncs after steps 2, 6, 10, ...; fragment 1 after 4, 8, 12, ..., so also at the epoch ends.
    """
    out = tmp_path_factory.mktemp("f2")
    ranks = _run(out, "--inner-steps", "4", "--fragments", "2", "--compression", "int8", "--ckpt-dir",
                 str(out / "ckpt"), "--val", "0")
    return out, ranks


def test_two_int8_fragments_sync_in_turn_and_equal_the_reference(two_fragments):
    _, ranks = two_fragments
    assert ranks[0]["fragments"] == TOY_FRAGMENTS
    sim = _simulate(ranks, 4, fragments=TOY_FRAGMENTS, compression="int8")
    assert sim.syncs == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 24]  # the last: the end of fit closes fragment 0
    _assert_locals_equal(ranks, sim)
    _assert_finals_equal(ranks, sim)
    # only the fragment that synced is shared right after its sync; the other one stays local
    a, b = ranks[0]["local"], ranks[1]["local"]
    for step in (2, 6, 10):  # batch step - 1 ends with optimizer step `step`
        assert torch.equal(a[step - 1][:FIRST], b[step - 1][:FIRST])
        assert not torch.allclose(a[step - 1][FIRST:], b[step - 1][FIRST:])
    for step in (4, 8, 12):
        assert torch.equal(a[step - 1][FIRST:], b[step - 1][FIRST:])
        assert not torch.allclose(a[step - 1][:FIRST], b[step - 1][:FIRST])
    # the codec did change what was averaged: the uncompressed reference is off from the first sync on
    exact = _simulate(ranks, 4, fragments=TOY_FRAGMENTS)
    assert torch.equal(exact.local[0][0], sim.local[0][0])
    assert not torch.allclose(exact.local[0][1], sim.local[0][1], rtol=0, atol=ATOL)


def test_resume_on_fewer_workers_closes_only_the_open_rounds(two_fragments, tmp_path):
    """Two workers' checkpoint of step 8, resumed on one: fragment 0 (last sync at step 6) has an open round, closed
    by one outer step with the saved workers' mean pseudo-gradient; fragment 1 synced at step 8 itself, so it has no
    round to close and its global weights must not move (an outer step with a zero gradient would still move them
    by the momentum). Then training goes on as the reference started from there."""
    out, _ = two_fragments
    ckpt = out / "ckpt" / "epoch=0-step=8.ckpt"
    state = read_checkpoint(ckpt)["diloco"]
    assert (state["step"], state["last_sync"]) == (8, [6, 8])
    resumed = _run(tmp_path, "--devices", "1", "--inner-steps", "4", "--fragments", "2", "--compression", "int8",
                   "--resume", str(ckpt), "--val", "0", world=1)
    for name, value in zip(state["outer"]["names"][1:], state["outer"]["params"][1:]):
        assert torch.equal(resumed[0]["start"][name], value), name  # fragment 1: no open round, not moved
    check_resume(ckpt, resumed, 4, fragments=TOY_FRAGMENTS, compression="int8")


@pytest.fixture(scope="module")
def overlapped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """F=2, H=6, tau=2, alpha=0.5, a checkpoint at every epoch end.

    Fragment 0 starts after steps 3, 9, 15, 21 and lands 2 steps later; fragment 1 starts after 6, 12, 18, 24. The
    epoch end at step 16 falls while fragment 0's sync of step 15 is in flight, and fragment 1's sync of step 24 is
    in flight when fit ends.
    """
    out = tmp_path_factory.mktemp("overlap")
    ranks = _run(out, "--inner-steps", "6", "--fragments", "2", "--overlap", "2", "--mixing", "0.5",
                 "--ckpt-dir", str(out / "ckpt"), "--val", "0")
    return out, ranks


def test_overlapped_fragments_equal_the_reference(overlapped):
    _, ranks = overlapped
    sim = _simulate(ranks, 6, fragments=TOY_FRAGMENTS, overlap=2, mixing=0.5)
    assert [(f, s, landed) for f, s, landed in sim.landed if landed < 24] == [
        (0, 3, 5), (1, 6, 8), (0, 9, 11), (1, 12, 14), (0, 15, 17), (1, 18, 20), (0, 21, 23)
    ]
    _assert_locals_equal(ranks, sim)
    # mixing keeps half of the local weights: right after a sync lands the workers still differ in that fragment
    a, b = ranks[0]["local"], ranks[1]["local"]
    assert not torch.allclose(a[4][:FIRST], b[4][:FIRST])  # step 5: fragment 0 landed with alpha = 0.5
    # and without mixing the same run would be different (the reference is sensitive to alpha)
    unmixed = _simulate(ranks, 6, fragments=TOY_FRAGMENTS, overlap=2, mixing=0.0)
    assert not torch.allclose(unmixed.local[0][10], sim.local[0][10])


def test_overlap_too_short_for_the_sync_warns_once(overlapped, tmp_path, monkeypatch):
    """Rank 1 stalls 1.5 s before the sync of step 4 starts: rank 0's sync, overlapped for one step, cannot land in
    time, and rank 0 says to raise `overlap_steps`. The overlapped run without a stall does not warn."""
    _, quiet = overlapped
    assert not [w for w in quiet[0]["warnings"] if "overlap_steps" in w], quiet[0]["warnings"]
    monkeypatch.setenv("TOY_STALL", "1:3:1.5")
    ranks = _run(tmp_path, "--inner-steps", "4", "--overlap", "1", "--max-steps", "12", "--max-epochs", "2",
                 "--val", "0")
    warned = [w for w in ranks[0]["warnings"] if "overlap_steps=1" in w]
    assert len(warned) == 1, ranks[0]["warnings"]
    waited = float(warned[0].split("the training loop waited ")[1].split(" s")[0])
    assert 1.0 < waited < 10.0, warned[0]
    assert "started at step 4" in warned[0]


def test_fit_ends_on_the_global_weights_with_a_sync_in_flight(overlapped):
    """The sync that fragment 1 starts after the last step is still in flight when fit ends: it must land without
    mixing (no inner step happened since it started), so that every worker ends on the same global weights."""
    _, ranks = overlapped
    for key, value in ranks[0]["final"].items():
        assert torch.equal(ranks[1]["final"][key], value), key
    sim = _simulate(ranks, 6, fragments=TOY_FRAGMENTS, overlap=2, mixing=0.5)
    assert sim.landed[-2:] == [(1, 24, 24), (0, 24, 24)]  # in flight at the end, then fragment 0's open round
    _assert_finals_equal(ranks, sim)


def test_mid_round_resume_with_a_sync_in_flight_is_bitwise_exact(overlapped, tmp_path):
    out, ranks = overlapped
    ckpt = out / "ckpt" / "epoch=1-step=16.ckpt"
    state = read_checkpoint(ckpt)["diloco"]
    assert [(p["fragment"], p["step"], p["apply_at"]) for p in state["pending"]] == [(0, 15, 17)]
    resumed = _run(tmp_path / "resumed", "--inner-steps", "6", "--fragments", "2", "--overlap", "2", "--mixing",
                   "0.5", "--resume", str(ckpt), "--val", "0")
    for rank in range(K):
        assert resumed[rank]["indices"] == ranks[rank]["indices"][16:]
        for b, local in enumerate(resumed[rank]["local"]):
            assert torch.equal(local, ranks[rank]["local"][16 + b]), f"rank {rank} step {17 + b}"
        for key, value in ranks[rank]["final"].items():
            assert torch.equal(resumed[rank]["final"][key], value), key


# ------------------------------------------------------------------------------------------------------------------
# One fragment, in this process (one worker)
# ------------------------------------------------------------------------------------------------------------------


def _fit_one(strategy: DiLoCoStrategy, epochs: int = 1) -> tuple[ToyModule, DiLoCoStrategy]:
    module = ToyModule()
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, use_distributed_sampler=False)
    trainer.fit(module, loaders()[0])
    return module, strategy


def test_one_fragment_without_overlap_is_plain_diloco():
    """``num_fragments=1, overlap_steps=0`` is plain DiLoCo, so ``overlap_mixing`` must have no effect there.

    (Bitwise equality of that configuration with the default one would test nothing: they are the same arguments.
    What can differ is a mixing factor leaking into blocking syncs, and overlap itself, tested below.)
    """
    plain, _ = _fit_one(DiLoCoStrategy(inner_steps=5))
    mixed, _ = _fit_one(DiLoCoStrategy(inner_steps=5, num_fragments=1, overlap_steps=0, overlap_mixing=0.9))
    assert len(plain.record["local"]) == 16
    for a, b in zip(plain.record["local"], mixed.record["local"]):
        assert torch.equal(a, b)
    sim = simulate([plain.record["indices"]], init_seed=1000, inner_steps=5, outer_lr=0.7, outer_momentum=0.9)
    for a, b in zip(plain.record["local"], sim.local[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


def test_one_fragment_overlapped_without_mixing_equals_the_reference():
    """tau=1, alpha=0: each outer update lands one step late and replaces the local weights, so the inner step taken
    meanwhile is lost; by definition this differs from tau=0, and must equal the delayed reference."""
    delayed, _ = _fit_one(DiLoCoStrategy(inner_steps=5, overlap_steps=1, overlap_mixing=0.0))
    sim = simulate([delayed.record["indices"]], init_seed=1000, inner_steps=5, outer_lr=0.7, outer_momentum=0.9,
                   overlap=1, mixing=0.0)
    assert [(s, landed) for _, s, landed in sim.landed] == [(5, 6), (10, 11), (15, 16), (16, 16)]
    for a, b in zip(delayed.record["local"], sim.local[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    blocking = simulate([delayed.record["indices"]], init_seed=1000, inner_steps=5, outer_lr=0.7, outer_momentum=0.9)
    assert not torch.allclose(delayed.record["local"][5], blocking.local[0][5], atol=1e-4)


def test_one_worker_ends_on_the_global_weights_when_the_last_sync_is_in_flight():
    """H=4 over 16 steps with tau=1: the sync started after step 16 is in flight when fit ends."""
    module, strategy = _fit_one(DiLoCoStrategy(inner_steps=4, overlap_steps=1, overlap_mixing=0.5))
    for name, (p, g) in zip(strategy.outer.names, zip(module.parameters(), strategy.outer.params)):
        assert torch.equal(p, g), name
    sim = simulate([module.record["indices"]], init_seed=1000, inner_steps=4, outer_lr=0.7, outer_momentum=0.9,
                   overlap=1, mixing=0.5)
    for a, b in zip(module.record["local"], sim.local[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    for key, value in sim.final.items():
        torch.testing.assert_close(module.state_dict()[key], value, rtol=0, atol=ATOL, msg=key)


# ------------------------------------------------------------------------------------------------------------------
# Compression
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def e3m0_feedback(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """H=5, 4-bit E3M0 pseudo-gradients with error feedback."""
    return _run(tmp_path_factory.mktemp("e3m0"), "--inner-steps", "5", "--compression", "e3m0", "--error-feedback",
                "--val", "0")


def test_e3m0_with_error_feedback_equals_the_reference_that_carries_residuals(e3m0_feedback):
    """The E3M0 codec of every contribution and each worker's residual carried into its next sync, as the reference
    does them. (The compressed path without error feedback is the int8 run above.)"""
    ranks = e3m0_feedback
    sim = _simulate(ranks, 5, compression="e3m0", error_feedback=True)
    _assert_locals_equal(ranks, sim)
    _assert_finals_equal(ranks, sim)
    assert any(r.abs().max() > 0 for r in sim.residuals[0].values())  # there was something to carry
    # error feedback off: the same up to the first sync (no residual yet), different from the second sync on
    off = _simulate(ranks, 5, compression="e3m0")
    assert torch.equal(off.local[0][4], sim.local[0][4])
    for rank in range(K):
        assert not torch.allclose(ranks[rank]["local"][9], off.local[rank][9], rtol=0, atol=ATOL)
    # and the codec did change what was averaged
    exact = _simulate(ranks, 5)
    assert torch.equal(exact.local[0][3], sim.local[0][3])
    assert not torch.allclose(exact.local[0][4], sim.local[0][4], rtol=0, atol=ATOL)


def test_sparse_with_error_feedback_equals_the_reference_that_carries_residuals(tmp_path):
    """SparseLoCo's format (top 64 of every block of 4096, 2-bit values) on every contribution, with each worker's
    residual carried into its next sync, as the reference does them; the bytes sent are the format's exact payloads
    (all-gathered: 2 workers send one payload each per bucket)."""
    ranks = _run(tmp_path, "--inner-steps", "5", "--compression", "sparse", "--error-feedback", "--val", "0")
    sim = _simulate(ranks, 5, compression="sparse", error_feedback=True)
    _assert_locals_equal(ranks, sim)
    _assert_finals_equal(ranks, sim)
    assert any(r.abs().max() > 0 for r in sim.residuals[0].values())
    exact = _simulate(ranks, 5)
    assert not torch.allclose(exact.local[0][4], sim.local[0][4], rtol=0, atol=ATOL)
    from lightning_diloco.collectives import plan_buckets
    from lightning_diloco.compression import get_compressor

    codec = get_compressor("sparse")
    final = ranks[0]["final"]
    params = [t.numel() for k, t in final.items() if not k.endswith(("running_mean", "running_var", "tracked"))]
    buffers = sum(t.numel() for k, t in final.items() if k.endswith(("running_mean", "running_var")))
    per_sync = sum(codec.payload_nbytes(b.numel) for b in plan_buckets(params, codec.block_size, 128.0))
    per_sync += 4 * buffers  # the buffers' fp32 all-reduce: 2 (k - 1) / k of 4 bytes each, k = 2
    assert ranks[0]["bytes_sent"]["outer"] == ranks[0]["outer_steps"] * per_sync
