"""DiLoCo under SLURM, on a one-node cluster of this machine (tests/helpers/slurm_cluster.sh brings it up; without
root or apt these tests skip). The scripts are the ones docs/launching.md shows: examples/slurm/."""

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers.launch import ROOT

pytestmark = pytest.mark.slurm

CLUSTER = ROOT / "tests" / "helpers" / "slurm_cluster.sh"
TRAIN = ROOT / "examples" / "slurm" / "train.py"
SBATCH = ROOT / "examples" / "slurm" / "diloco.sbatch"


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """The local cluster, up for these tests; taken down after them unless it was running before."""
    if shutil.which("bash") is None:
        pytest.skip("no bash to run the cluster script")
    running = subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0
    done = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=900)
    if done.returncode == 3:
        pytest.skip(f"no local SLURM cluster: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    yield
    if not running:
        subprocess.run(["bash", str(CLUSTER), "down"], timeout=60)


def env() -> dict[str, str]:
    """This interpreter's environment for the jobs: its ``python`` first on ``PATH``, one thread per task."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command} exited with {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done


def weights(out: Path) -> list[list[torch.Tensor]]:
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def job_state(job: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\w+)", shown)
    return match.group(1) if match else "GONE"


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_srun_runs_exit_cleanly_and_end_bitwise_equal_to_torchrun(cluster, tmp_path):
    """``srun -N1 --ntasks-per-node=2``: Lightning's SLURMEnvironment, both ranks equal, equal to torchrun's run, and
    every task exits with 0 (no abort at exit from gloo threads, see lightning_diloco/clean_exit.py). ``srun -n2`` is
    refused by Lightning, as docs/launching.md says."""
    run(["srun", "-N1", "--ntasks-per-node=2", "python", str(TRAIN), "--out", str(tmp_path / "srun")])
    run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(TRAIN), "--out",
         str(tmp_path / "torchrun")])
    srun, torchrun = weights(tmp_path / "srun"), weights(tmp_path / "torchrun")
    assert bitwise(srun[0], srun[1]) and bitwise(srun[0], torchrun[0])
    done = subprocess.run(["srun", "-N1", "-n2", "python", str(TRAIN), "--out", str(tmp_path / "n2")], env=env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--ntasks-per-node=2" in done.stdout + done.stderr


def test_the_documented_sbatch_script_requeued_or_cancelled_resumes_bitwise(cluster, tmp_path):
    """docs/launching.md's sbatch script, as written. A job requeued after some epochs (``scontrol requeue``, which
    stops its tasks as a preemption does) resumes from its last complete checkpoint; a job stopped with ``scancel``
    leaves its last complete checkpoint, from which the script resumes. Both end bitwise equal to the same script run
    without interruption."""
    assert SBATCH.read_text() in (ROOT / "docs" / "launching.md").read_text()
    epochs = "10"

    def submit(name: str, epochs: str, wait: bool = False) -> str:
        command = ["sbatch", "--parsable", f"--export=ALL,OUT={tmp_path / name},EPOCHS={epochs}", "--open-mode=append",
                   f"--output={tmp_path / name}.out", *(["--wait"] if wait else []), str(SBATCH)]
        return run(command).stdout.strip()

    def reached_epoch_1(name: str) -> None:
        wait_for(lambda: (tmp_path / name / "checkpoints" / "epoch=1-step=80.ckpt").exists(), 120, f"{name}'s epoch 1")

    requeued, cancelled = submit("requeued", epochs), submit("cancelled", "50")
    reached_epoch_1("requeued")
    run(["scontrol", "requeue", requeued])
    reached_epoch_1("cancelled")
    run(["scancel", cancelled])
    wait_for(lambda: job_state(requeued) == "PENDING", 60, "the requeued job to be pending")
    run(["scontrol", "update", f"jobid={requeued}", "StartTime=now"])  # requeued jobs wait two minutes otherwise
    wait_for(lambda: job_state(cancelled) in ("CANCELLED", "GONE"), 60, "the job to be cancelled")
    tasks = ["pgrep", "-f", "--", f"--out {tmp_path / 'cancelled'} "]
    wait_for(lambda: subprocess.run(tasks, capture_output=True).returncode != 0, 60, "the cancelled tasks to end")
    assert not (tmp_path / "cancelled" / "rank0.pt").exists()  # stopped before its end
    resumed = submit("cancelled", epochs)  # the same script again, on what the cancelled job left
    submit("plain", epochs, wait=True)
    for job in (requeued, resumed):
        wait_for(lambda: job_state(job) in ("COMPLETED", "FAILED", "GONE"), 240, f"job {job} to end")
        assert job_state(job) in ("COMPLETED", "GONE")
    for name in ("requeued", "cancelled"):
        log = (tmp_path / f"{name}.out").read_text()
        assert log.count("Restored all states") == 1, log[-3000:]
    plain = weights(tmp_path / "plain")
    for name in ("requeued", "cancelled"):
        resumed = weights(tmp_path / name)
        assert bitwise(resumed[0], resumed[1]) and bitwise(resumed[0], plain[0]), name
