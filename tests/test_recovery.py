"""Never lose work: atomic checkpoints, and exact recovery under ``torchrun --max-restarts`` after a SIGKILL.

The end-to-end tests run the real launcher (``python -m torch.distributed.run``) with two gloo workers on loopback
addresses, kill one worker with SIGKILL in the first attempt (mid-round, inside an outer sync, or halfway through a
checkpoint file), and compare the final weights bitwise with a run that was never interrupted.
"""

import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import AsyncCheckpointIO, TorchCheckpointIO

from helpers import launch
from lightning_diloco import DiLoCoStrategy, elastic
from lightning_diloco.checkpoint_io import AtomicCheckpointIO, CorruptCheckpointError
from lightning_diloco.elastic import STORE_PREFIX

WORLD = 2
RESTARTS = 2


def torchrun(out: Path, fault: Optional[str] = None, rdzv: str = "c10d", timeout: float = 240) -> str:
    """Train ``recovery_train.py`` under torchrun on two loopback workers; return the launcher's output."""
    port = launch.free_port()
    if rdzv == "c10d":
        rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--local-addr", "127.0.0.1"]
    else:
        rendezvous = ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    cmd = [
        *launch.TORCHRUN, "--nproc-per-node", str(WORLD), "--max-restarts", str(RESTARTS), "--monitor-interval", "0.2",
        *rendezvous, launch.SCRIPTS / "recovery_train.py", "--out", str(out), "--inner-steps", "5", "--max-epochs",
        "3", "--timeout", "30",
    ]
    env = launch.clean_env(**({"FAULT": fault} if fault else {}))
    return launch.run(cmd, timeout, env=env, merge=True).stdout


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("uninterrupted")
    torchrun(out)
    ranks = launch.load_ranks(out, WORLD)
    assert [r["attempt"] for r in ranks] == [0, 0]
    assert [r["resumed_from"] for r in ranks] == [None, None]
    return ranks


# ------------------------------------------------------------------------------------------------------------------
# End to end: SIGKILL under torchrun, restart from the last complete checkpoint, bitwise equal final weights
# ------------------------------------------------------------------------------------------------------------------

# 3 epochs of 8 steps, H = 5: epoch-end checkpoints at steps 8 and 16 fall mid-round.
# case: (FAULT, rendezvous backend, step of the checkpoint the restart resumes from)
FAULTS = {
    # rank 1 dies 3 steps after the checkpoint of step 8, in the middle of the third round; torchrun's default static
    # rendezvous keeps one store for all attempts, as c10d does
    "mid_round": ("kill:rank=1:step=11:where=mid_round", "static", 8),
    # rank 1 dies with the all-reduce of the outer step at step 20 in flight, while rank 0 waits inside it
    "in_sync": ("kill:rank=1:step=20:where=in_sync", "c10d", 16),
    # rank 0 dies halfway through writing last.ckpt at step 16: the complete last.ckpt of step 8 must be used
    "in_checkpoint_write": ("kill:rank=0:step=16:where=in_checkpoint_write:file=last.ckpt", "c10d", 8),
}


@pytest.mark.parametrize("case", list(FAULTS))
def test_sigkill_restarts_from_last_complete_checkpoint_bitwise(case: str, uninterrupted, tmp_path: Path):
    fault, rdzv, resume_step = FAULTS[case]
    log = torchrun(tmp_path, fault, rdzv=rdzv)
    assert "SIGKILL" in log, "the fault was not injected"
    ranks = launch.load_ranks(tmp_path, WORLD)
    for rank, (got, want) in enumerate(zip(ranks, uninterrupted)):
        # one restart was enough: the restarted workers connected at once
        assert got["attempt"] == 1, f"rank {rank} finished in attempt {got['attempt']}:\n{log[-6000:]}"
        assert got["global_step"] == want["global_step"]
        assert got["resumed_from"] == str(tmp_path / "ckpt" / "last.ckpt")
        assert got["start_step"] == resume_step
        for key, value in want["final"].items():
            assert torch.equal(got["final"][key], value), f"rank {rank}: {key} differs from the uninterrupted run"
    leftovers = [p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.endswith(".ckpt")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    if case == "in_checkpoint_write":
        assert "SIGKILL after writing" in log
    if case == "in_sync":
        # rank 0 failed inside the collective by itself (its dead peer's connection was reset): it did not hang
        failed = [line for line in log.splitlines() if line.startswith("[rank0]:") and "by peer" in line]
        assert failed, log[-6000:]


# ------------------------------------------------------------------------------------------------------------------
# The root cause: the agent's store outlives an attempt, and gloo finds the killed workers' addresses in it
# ------------------------------------------------------------------------------------------------------------------


def _attempt(port: int, restart: int, prefix: bool, stagger: bool, worker_timeout: float = 60) -> list[str]:
    """One attempt of two ``recovery_store.py`` workers against the store at ``port``; what each printed.

    With ``stagger``, rank 1 starts only once rank 0 has begun to join the process group, and 2 s later: long enough
    for rank 0 to have read rank 1's key on a loaded machine before the new rank 1 could publish it.
    """
    def start(rank: int) -> launch.Process:
        env = launch.clean_env(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), GROUP_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="test",
            TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT=str(restart),
        )
        cmd = [sys.executable, launch.SCRIPTS / "recovery_store.py", "--timeout", str(worker_timeout)]
        return launch.start(cmd + (["--prefix"] if prefix else []), env=env, merge=True)

    first = start(0)
    if stagger:
        while "JOINING" not in first.stdout() and first.popen.poll() is None:
            time.sleep(0.05)
        time.sleep(2.0)
    procs = [first, start(1)]
    done = launch.finish(procs, timeout=60 + 2 * worker_timeout)
    return [d.stdout + ("\n(killed: not connected in time)" if d.returncode is None else "") for d in done]


def test_restarted_workers_never_read_keys_of_killed_ones():
    """Play torchrun's agent: one store for all attempts; in a restart, rank 0 joins before rank 1 has started.

    With the default keys, rank 0 of a restart reads the address that the killed rank 1 published and cannot connect
    to it. With :func:`lightning_diloco.elastic.attempt_store` every attempt has keys of its own.
    """
    agent_store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True, multi_tenant=True)
    port = agent_store.port
    stale_key = "default_pg/0//cpu//0/1"  # where gloo publishes rank 1's address
    first = _attempt(port, restart=0, prefix=False, stagger=False)
    assert all("SUM 3" in out for out in first), first
    # the workers are gone, but their keys are still in the store, as they are in torchrun's after a restart
    assert agent_store.check([stale_key])
    stale_address = agent_store.get(stale_key)
    prefixed_key = f"{STORE_PREFIX}1/{stale_key}"
    assert not agent_store.check([prefixed_key])
    prefixed = _attempt(port, restart=1, prefix=True, stagger=True)
    assert all("SUM 3" in out for out in prefixed), prefixed
    assert agent_store.check([prefixed_key]), "the restarted workers did not publish under the attempt's prefix"
    assert agent_store.get(stale_key) == stale_address, "the prefixed attempt wrote the default keys"
    # Without the prefix, rank 0 reads the killed rank's address. Whether the connection to it fails at once or rank
    # 1's fresh key comes first depends on timing, so a few restarts are tried; one failure shows the race (the
    # workers' timeout is short where the failure is expected: gloo retries a refused connection until it passes).
    failures = []
    for restart in range(2, 6):
        default = _attempt(port, restart=restart, prefix=False, stagger=True, worker_timeout=3)
        if not all("SUM 3" in out for out in default):
            failures.append(default)
            break
    assert failures, "every restart connected although the store held the killed workers' addresses"
    assert any("connectFullMesh" in out for out in failures[0]), failures[0]


def test_attempt_prefix_follows_torchelastic_environment(monkeypatch):
    for var in ("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE", "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert elastic.attempt_store_prefix() is None  # not under torchrun
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert elastic.attempt_store_prefix() is None  # a new store for every attempt (TORCH_DISABLE_SHARE_RDZV_TCP_STORE)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    assert elastic.attempt_store_prefix() == "lightning_diloco/attempt3/"
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    with pytest.warns(UserWarning, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        assert elastic.attempt_store_prefix() is None


# ------------------------------------------------------------------------------------------------------------------
# AtomicCheckpointIO
# ------------------------------------------------------------------------------------------------------------------

_WRITER = """
import os, signal, sys, torch

class Killing:
    def __init__(self, file): self.file, self.written = file, 0
    def write(self, data):
        data = memoryview(data).cast("B")
        if self.written + len(data) >= {limit}:
            self.file.write(data[: {limit} - self.written]); self.file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self.written += self.file.write(data)
        return len(data)
    def flush(self): self.file.flush()

checkpoint = {{"weights": torch.arange({n}, dtype=torch.float32)}}
if {naive}:
    with open({path!r}, "wb") as f:
        torch.save(checkpoint, Killing(f))
else:
    sys.path.insert(0, {root!r})
    from lightning_diloco.checkpoint_io import AtomicCheckpointIO

    class IO(AtomicCheckpointIO):
        def _wrap_file(self, file): return Killing(file)

    IO().save_checkpoint(checkpoint, {path!r})
"""


def _kill_while_writing(path: Path, naive: bool, n: int = 200_000) -> None:
    """Write a checkpoint of ``n`` floats to ``path`` in a subprocess that SIGKILLs itself halfway through."""
    code = _WRITER.format(root=str(launch.ROOT), limit=2 * n, n=n, path=str(path), naive=naive)
    launch.run([sys.executable, "-c", code], timeout=120, returncode=-signal.SIGKILL)


def test_sigkill_halfway_leaves_the_previous_checkpoint(tmp_path: Path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"weights": torch.zeros(3)}, path)
    _kill_while_writing(path, naive=False)
    assert torch.equal(io.load_checkpoint(path)["weights"], torch.zeros(3))  # still the complete, older file
    partial = [p for p in tmp_path.iterdir() if p != path]
    assert len(partial) == 1 and partial[0].name.startswith(".last.ckpt.") and partial[0].stat().st_size > 0
    # neither ModelCheckpoint nor ckpt_path="last" take the partial file for a checkpoint
    trainer = type("T", (), {"log_dir": None, "default_root_dir": str(tmp_path)})()
    assert ModelCheckpoint(dirpath=tmp_path)._find_last_checkpoints(trainer) == {str(path)}
    # the next save of that name removes the dead process's partial file
    io.save_checkpoint({"weights": torch.ones(3)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.equal(io.load_checkpoint(path)["weights"], torch.ones(3))


def test_sigkill_halfway_through_a_plain_write_is_caught_on_load(tmp_path: Path):
    """What atomic writes prevent: a file written in place and cut short. Loading it names it and says what to do."""
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"weights": torch.zeros(3)}, path)
    _kill_while_writing(path, naive=True)
    with pytest.raises(CorruptCheckpointError, match=r"last\.ckpt is not a complete checkpoint.*truncated") as err:
        AtomicCheckpointIO().load_checkpoint(path)
    assert "earlier checkpoint" in str(err.value) and "ckpt_path" in str(err.value)


def test_corrupt_and_missing_checkpoints_raise_clear_errors(tmp_path: Path):
    io = AtomicCheckpointIO()
    good = tmp_path / "good.ckpt"
    io.save_checkpoint({"weights": torch.randn(1000)}, good)
    data = good.read_bytes()

    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="empty"):
        io.load_checkpoint(tmp_path / "empty.ckpt")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside the tensor's bytes: torch.load alone would not notice
    (tmp_path / "flipped.ckpt").write_bytes(bytes(flipped))
    with pytest.raises(CorruptCheckpointError, match="flipped.ckpt .*checksum"):
        io.load_checkpoint(tmp_path / "flipped.ckpt")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        io.load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "dangling.ckpt").symlink_to("gone.ckpt")
    with pytest.raises(FileNotFoundError, match="symbolic link"):
        io.load_checkpoint(tmp_path / "dangling.ckpt")


def test_saving_onto_a_symlink_replaces_the_link_not_its_target(tmp_path: Path):
    io = AtomicCheckpointIO()
    target, link = tmp_path / "epoch=0-step=8.ckpt", tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 8}, target)
    link.symlink_to(target.name)
    io.save_checkpoint({"step": 16}, link)
    assert not link.is_symlink()
    assert io.load_checkpoint(target)["step"] == 8 and io.load_checkpoint(link)["step"] == 16


def test_storage_options_are_refused():
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint({}, "x.ckpt", storage_options={"a": 1})


def test_strategy_writes_checkpoints_atomically_unless_told_otherwise():
    assert type(DiLoCoStrategy().checkpoint_io) is AtomicCheckpointIO
    trainer = L.Trainer(strategy=DiLoCoStrategy(), plugins=[TorchCheckpointIO()], accelerator="cpu", devices=1,
                        logger=False)
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO  # the user's plugin wins, without an error
    trainer = L.Trainer(strategy=DiLoCoStrategy(), plugins=[AsyncCheckpointIO()], accelerator="cpu", devices=1,
                        logger=False)
    assert type(trainer.strategy.checkpoint_io.checkpoint_io) is AtomicCheckpointIO  # the wrapper writes atomically
