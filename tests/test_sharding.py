"""Sharded workers (FSDP2 inside a worker) and checkpoints that every rank writes its own part of.

Every run is a real multi-process Lightning fit over gloo (``tests/scripts/sharded_train.py``): 2 workers of 2
processes, a stack of blocks whose widths do not divide by 2 (uneven chunks). The independent references are the same
run with DistributedDataParallel inside the worker (the same mathematics), the checkpoint's own contents read whole
in one process, and the one-process simulator's closing of an open round (``helpers.reference.closed_round``).
"""

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.checkpoints import read_checkpoint
from helpers.launch import load_ranks, run_script
from helpers.reference import closed_round

SCRIPT = "sharded_train.py"
H, K, G = 4, 2, 2
COMMON = ("--inner-steps", str(H), "--fragments", "2", "--compression", "bf16")


def _run(out: Path, *args: str, world: int = K * G) -> list[dict[str, Any]]:
    run_script(SCRIPT, "--out", str(out), "--devices", str(world), *args, timeout=300)
    return load_ranks(out, world)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sharded")
    return {
        "root": root,
        "fsdp": _run(root / "fsdp", *COMMON, "--ckpt"),
        "ddp": _run(root / "ddp", *COMMON, "--sharding", "none"),
    }


def test_fsdp_inside_a_worker_trains_as_ddp_inside(runs):
    fsdp, ddp = runs["fsdp"], runs["ddp"]
    assert [r["sharded"] for r in fsdp] == [True] * 4 and [r["sharded"] for r in ddp] == [False] * 4
    for key, value in ddp[0]["final"].items():
        for rank in range(K * G):  # every process ends with the same global model
            assert torch.equal(fsdp[rank]["final"][key], fsdp[0]["final"][key]), (rank, key)
        torch.testing.assert_close(fsdp[0]["final"][key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("overlap", [("--overlap", "1"), ("--eager", "1")], ids=["overlap", "eager"])
def test_overlapped_syncs_of_fsdp_workers_train_as_ddp_inside(tmp_path, overlap):
    """Overlapped syncs, and eager updates (every worker's own global chunks, averaged at the end)."""
    args = ("--inner-steps", str(H), "--fragments", "2", *overlap)
    fsdp, ddp = _run(tmp_path / "fsdp", *args), _run(tmp_path / "ddp", *args, "--sharding", "none")
    for key, value in ddp[0]["final"].items():
        torch.testing.assert_close(fsdp[0]["final"][key], value, rtol=0, atol=1e-6, msg=key)


def test_compressed_overlapped_sharded_run_resumes_bitwise_with_a_sync_in_flight(tmp_path):
    """int8 with error feedback and overlap: the checkpoint at step 6 holds fragment 0's sync in flight and every
    process's residuals; the resumed run ends bitwise where the uninterrupted one does."""
    args = ("--inner-steps", str(H), "--fragments", "2", "--overlap", "1", "--compression", "int8", "--error-feedback")
    full = _run(tmp_path / "full", *args, "--ckpt")
    ckpt = tmp_path / "full" / "ckpt" / "epoch=0-step=6.ckpt"
    state = read_checkpoint(ckpt)["diloco"]
    assert [(p["fragment"], p["step"], p["apply_at"]) for p in state["pending"]] == [(0, 6, 7)]
    assert sorted(state["workers"][0]["error_feedback"]) == list(range(G))  # one set of residuals per process
    resumed = _run(tmp_path / "resumed", *args, "--resume", str(ckpt))
    for rank in range(K * G):
        for key, value in full[rank]["final"].items():
            assert torch.equal(resumed[rank]["final"][key], value), (rank, key)


def test_a_nan_in_one_chunk_drops_the_whole_worker(tmp_path):
    """Rank 3's chunk of a weight becomes NaN in the last inner step of the first round (no forward sees it): worker 1
    (ranks 2 and 3, whose rank 2 is finite) is dropped from that outer step as a whole, and every process ends with
    the same finite global model."""
    proc = run_script(SCRIPT, "--out", str(tmp_path), "--devices", str(K * G), "--inner-steps", str(H), "--nan-at", "3",
                      "3", "--find-unused-parameters", timeout=300)
    ranks = load_ranks(tmp_path, K * G)
    # (a DDP keyword is accepted, and said to do nothing: a sharded worker has no DistributedDataParallel)
    assert "find_unused_parameters configure the DistributedDataParallel inside a worker of several processes. Each" \
        " worker here is sharded with FSDP2" in proc.stdout + proc.stderr
    assert any("The pseudo-gradient of worker(s) [1] is not finite" in w for w in ranks[0]["warnings"])
    for key, value in ranks[0]["final"].items():
        assert torch.isfinite(value).all(), key
        for rank in range(1, K * G):
            assert torch.equal(ranks[rank]["final"][key], value), (rank, key)


def test_diloco_state_per_process_is_8_bytes_per_parameter_over_g(runs):
    fsdp, ddp = runs["fsdp"], runs["ddp"]
    params = fsdp[0]["model_numel"]
    for rank, record in enumerate(fsdp):
        assert record["diloco_state_bytes"] == 8 * record["chunk_numel"]  # fp32 global weights + Nesterov momentum
        assert abs(record["diloco_state_bytes"] - 8 * params / G) <= 8 * params / G * 0.05, rank
    for w in range(K):  # a worker's processes hold disjoint chunks that make up the whole model
        assert sum(r["diloco_state_bytes"] for r in fsdp[w * G : (w + 1) * G]) == 8 * params
    assert all(r["diloco_state_bytes"] == 8 * params for r in ddp)


def test_checkpoint_is_a_directory_every_rank_writes(runs):
    ckpt = runs["root"] / "fsdp" / "ckpt" / "epoch=0-step=6.ckpt"
    assert ckpt.is_dir()
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", *(f"__{r}_0.distcp" for r in range(K * G)), "meta.pt"]
    meta = torch.load(ckpt / "meta.pt", weights_only=False)
    assert "state_dict" not in meta and "optimizer_states" not in meta  # rank 0's file holds no tensor of a model
    assert (meta["diloco"]["num_workers"], meta["diloco"]["processes_per_worker"], meta["diloco"]["sharded"]) == (K, G, True)
    assert not [p.name for p in ckpt.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_mid_round_resume_is_bitwise_exact(runs, tmp_path):
    ckpt = runs["root"] / "fsdp" / "ckpt" / "epoch=0-step=6.ckpt"  # 2 steps into the second round
    resumed = _run(tmp_path, *COMMON, "--resume", str(ckpt))
    for rank in range(K * G):
        for key, value in runs["fsdp"][rank]["final"].items():
            assert torch.equal(resumed[rank]["final"][key], value), (rank, key)


@pytest.fixture(scope="module")
def on_2x1(runs: dict[str, Any]) -> list[dict[str, Any]]:
    """The sharded run's mid-round checkpoint resumed on 2 workers of one unsharded process each."""
    ckpt = runs["root"] / "fsdp" / "ckpt" / "epoch=0-step=6.ckpt"
    return _run(runs["root"] / "on_2x1", *COMMON, "--processes-per-worker", "1", "--sharding", "none", "--resume",
                str(ckpt), world=K)


def test_resume_on_one_process_per_worker_restores_every_worker_whole(runs, on_2x1):
    """2 workers x 2 sharded processes onto 2 x 1 unsharded: each worker starts exactly where the checkpoint has it."""
    state = read_checkpoint(runs["root"] / "fsdp" / "ckpt" / "epoch=0-step=6.ckpt")["diloco"]
    for w, record in enumerate(on_2x1):
        saved = state["workers"][w]
        for key, value in record["start"].items():
            assert torch.equal(value, saved["module"][key]), (w, key)
        optimizer = saved["optimizer_states"][0]["state"]
        for i, values in optimizer.items():
            for key, value in values.items():
                assert torch.equal(record["start_optimizer"][i][key], value), (w, i, key)
        for got, want in zip(record["start_outer"]["params"], state["outer"]["params"]):
            assert torch.equal(got, want)
        assert record["start_outer"]["step"] == state["step"] == 6


def test_resume_on_one_worker_closes_the_open_round(runs, tmp_path):
    """2 x 2 onto 1 x 2 (sharded): the open round closes with the mean of both saved workers, read one at a time."""
    ckpt = runs["root"] / "fsdp" / "ckpt" / "epoch=0-step=6.ckpt"
    state = read_checkpoint(ckpt)["diloco"]
    resumed = _run(tmp_path, *COMMON, "--resume", str(ckpt), world=G)
    _, expected = closed_round(state, 1, runs["fsdp"][0]["fragments"])
    for record in resumed:
        for name, value in expected.items():
            torch.testing.assert_close(record["start"][name], value, rtol=0, atol=1e-6, msg=name)
        optimizer = state["workers"][0]["optimizer_states"][0]["state"]
        for i, values in optimizer.items():
            for key, value in values.items():
                assert torch.equal(record["start_optimizer"][i][key], value), (i, key)


def test_a_module_that_shards_itself_in_configure_model(runs, tmp_path):
    own = _run(tmp_path, *COMMON, "--sharding", "none", "--shard-itself")
    assert all(r["sharded"] for r in own)
    for key, value in runs["fsdp"][0]["final"].items():
        assert torch.equal(own[0]["final"][key], value), key  # the same FSDP units as the strategy's own sharding


def test_consolidate_gives_the_global_model_as_one_file(runs, on_2x1, tmp_path):
    """The file of ``lightning-diloco consolidate`` holds the global weights that a run resumed from the directory
    starts from (read there by every process into its own model)."""
    ckpt = runs["root"] / "fsdp" / "ckpt" / "epoch=0-step=6.ckpt"
    out = tmp_path / "model.ckpt"
    cli = Path(sys.executable).parent / "lightning-diloco"
    subprocess.run([str(cli), "consolidate", str(ckpt), str(out)], check=True, timeout=120)
    sys.path.insert(0, str(Path(__file__).parent / "scripts"))
    from sharded_train import Blocks

    model = Blocks.load_from_checkpoint(out)
    names = [name for name, _ in model.named_parameters()]
    for name, value in zip(names, on_2x1[0]["start_outer"]["params"]):
        assert torch.equal(model.state_dict()[name], value), name
    assert torch.load(out, weights_only=False)["global_step"] == 6


def test_rank_zero_memory_while_saving_does_not_grow_with_workers(tmp_path):
    """Unsharded workers of one process: rank 0 writes its own part only (it used to gather every worker's state)."""
    width = 500  # about 1.0M parameters: 12 MB of weights and AdamW state per worker
    peaks = {}
    for k in (1, 4):
        ranks = _run(tmp_path / f"k{k}", "--processes-per-worker", "1", "--sharding", "none", "--width", str(width),
                     "--max-epochs", "1", "--save-only", world=k)
        peaks[k] = ranks[0]["save_peak_bytes"]
        params = ranks[0]["model_numel"]
    worker_state = 12 * params  # what one more worker's gathered state would add on rank 0
    assert peaks[4] - peaks[1] < worker_state / 2, (peaks, worker_state)  # three more workers: not one more state
