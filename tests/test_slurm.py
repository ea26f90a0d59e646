"""DiLoCo under SLURM, on a one-node cluster of this machine (tests/helpers/slurm_cluster.sh brings it up; without
root or apt these tests skip). The scripts are the ones docs/launching.md shows: examples/slurm/."""

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from helpers import launch
from helpers.launch import ROOT
from lightning_diloco.checkpoint_dir import read_meta

pytestmark = pytest.mark.slurm

CLUSTER = ROOT / "tests" / "helpers" / "slurm_cluster.sh"
TRAIN = ROOT / "examples" / "slurm" / "train.py"
SBATCH = ROOT / "examples" / "slurm" / "diloco.sbatch"
ISLAND = ROOT / "examples" / "slurm" / "island.sbatch"
H = 5  # the scripts' inner_steps
ANSWERED = re.compile(r"\[rank: (\d)\] Received the requeue signal at DiLoCo step (\d+); checkpointing at step (\d+)")


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


def wait_for(predicate, timeout: float, what: str, logs: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{logs()}"
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


def task_pid(job: str, rank: int) -> int:
    """The process id of task ``rank`` of the job's running step (``scontrol listpids``)."""
    listed = subprocess.run(["scontrol", "listpids", job], capture_output=True, text=True).stdout.splitlines()[1:]
    pids = [int(f[0]) for f in map(str.split, listed) if len(f) == 5 and f[2] != "batch" and f[4] == str(rank)]
    assert len(pids) == 1, listed
    return pids[0]


def requeued_to_start(job: str) -> None:
    wait_for(lambda: job_state(job) == "PENDING", 60, f"job {job} to be pending again")
    run(["scontrol", "update", f"jobid={job}", "StartTime=now"])  # requeued jobs wait two minutes otherwise


def test_the_documented_sbatch_script_signalled_requeued_or_cancelled_resumes_bitwise(cluster, tmp_path):
    """docs/launching.md's sbatch script, as written, ends bitwise equal to the same script run without interruption
    when its job is:

    - signalled as SLURM does before the time limit (``--signal=USR1@90``; here ``scancel --signal=USR1``, every
      task), then again in its second run, to one task only (``kill -USR1``): each time the workers checkpoint after
      the outer step that ends the round they were in, the job requeues itself and resumes mid-epoch from that
      checkpoint;
    - requeued after some epochs (``scontrol requeue``, which stops its tasks as a preemption does): it resumes from
      its last complete checkpoint;
    - stopped with ``scancel``: its last complete checkpoint stays, and the script resumes from it.
    """
    assert SBATCH.read_text() in (ROOT / "docs" / "launching.md").read_text()
    epochs = "12"

    def submit(name: str, epochs: str) -> str:
        command = ["sbatch", "--parsable", f"--export=ALL,OUT={tmp_path / name},EPOCHS={epochs}", "--open-mode=append",
                   f"--output={tmp_path / name}.out", str(SBATCH)]
        return run(command).stdout.strip()

    def reached(name: str, epoch: int) -> None:
        path = tmp_path / name / "checkpoints" / f"epoch={epoch}-step={40 * (epoch + 1)}.ckpt"
        wait_for(path.exists, 120, f"{name}'s epoch {epoch}")

    def log(name: str) -> str:
        return (tmp_path / f"{name}.out").read_text()

    plain = submit("plain", epochs)
    signalled, requeued, cancelled = submit("signalled", epochs), submit("requeued", epochs), submit("cancelled", "60")
    reached("signalled", 0)
    run(["scancel", "--signal=USR1", signalled])  # every task
    reached("requeued", 1)
    run(["scontrol", "requeue", requeued])
    reached("cancelled", 1)
    run(["scancel", cancelled])
    for job in (signalled, requeued):
        requeued_to_start(job)
    # the second run of the signalled job: its handlers are set (after the restore), then one task alone is signalled
    wait_for(lambda: log("signalled").count("Setting signal handlers") == 4, 120, "the second run's signal handlers")
    os.kill(task_pid(signalled, 1), 10)  # SIGUSR1
    requeued_to_start(signalled)
    wait_for(lambda: job_state(cancelled) in ("CANCELLED", "GONE"), 60, "the job to be cancelled")
    tasks = ["pgrep", "-f", "--", f"--out {tmp_path / 'cancelled'} "]
    wait_for(lambda: subprocess.run(tasks, capture_output=True).returncode != 0, 60, "the cancelled tasks to end")
    assert not (tmp_path / "cancelled" / "rank0.pt").exists()  # stopped before its end
    resumed = submit("cancelled", epochs)  # the same script again, on what the cancelled job left
    for job in (plain, signalled, requeued, resumed):
        wait_for(lambda: job_state(job) in ("COMPLETED", "FAILED", "GONE"), 240, f"job {job} to end")
        assert job_state(job) in ("COMPLETED", "GONE")
    for name, restored in (("signalled", 2), ("requeued", 1), ("cancelled", 1)):
        assert log(name).count("Restored all states") == restored, log(name)[-3000:]
    # the signals: both ranks the first time, rank 1 alone the second; each answered at the end of its round
    answers = [tuple(map(int, m)) for m in ANSWERED.findall(log("signalled"))]
    assert sorted(rank for rank, _, _ in answers[:2]) == [0, 1] and [r for r, _, _ in answers[2:]] == [1], answers
    for _, asked, answered in answers:
        assert answered % H == 0 and asked <= answered <= asked + H, answers
    for n, (_, _, answered) in enumerate([answers[0], answers[2]], start=1):
        checkpoint = tmp_path / "signalled" / f"hpc_ckpt_{n}.ckpt"
        assert read_meta(checkpoint, torch.load)["global_step"] == answered
        assert f"Restored all states from the checkpoint at {checkpoint}" in log("signalled")
    uninterrupted = weights(tmp_path / "plain")
    for name in ("signalled", "requeued", "cancelled"):
        resumed = weights(tmp_path / name)
        assert bitwise(resumed[0], resumed[1]) and bitwise(resumed[0], uninterrupted[0]), name


def test_two_island_jobs_form_one_run_a_requeued_one_heals_a_cancelled_one_leaves_the_other(cluster, tmp_path):
    """docs/islands.md's island job, as written, submitted twice against one coordinator: the two jobs meet at outer
    steps (quorums of both islands). Island a, signalled for requeue, checkpoints, requeues its own job, resumes from
    its checkpoint and heals from b while b trains on; after ``scancel`` of a, b commits alone and trains to its end."""
    assert ISLAND.read_text() in (ROOT / "docs" / "islands.md").read_text()
    port = launch.free_port()
    coordinator = launch.start([sys.executable, "-m", "lightning_diloco", "coordinator", "--port", str(port),
                                "--min-islands", "1", "--grace", "2", "--heartbeat-timeout", "3"], merge=True)

    def log(name: str) -> str:
        return (tmp_path / f"{name}.out").read_text() if (tmp_path / f"{name}.out").exists() else ""

    def both_logs() -> str:
        return f"--- a:\n{log('a')[-3000:]}\n--- b:\n{log('b')[-3000:]}"

    def quorums_of_both() -> int:
        return sum('replica_id: "a:' in line and 'replica_id: "b:' in line
                   for line in log("b").splitlines() if "got lighthouse quorum" in line)

    try:
        wait_for(lambda: "listening" in coordinator.stdout(), 30, "the coordinator")
        jobs = {}
        for index, (name, epochs) in enumerate((("a", 60), ("b", 80))):
            exports = (f"ALL,OUT={tmp_path / name},EPOCHS={epochs},COORDINATOR=http://127.0.0.1:{port},ISLAND={name},"
                       f"INDEX={index}")
            jobs[name] = run(["sbatch", "--parsable", f"--export={exports}", "--open-mode=append",
                              f"--output={tmp_path / name}.out", str(ISLAND)]).stdout.strip()
        wait_for(lambda: quorums_of_both() > 0, 180, "a quorum of both islands", both_logs)
        run(["scancel", "--signal=USR1", jobs["a"]])
        requeued_to_start(jobs["a"])
        wait_for(lambda: "healed from a live peer" in log("a"), 120, "island a to heal after its requeue",
                 both_logs)
        before = quorums_of_both()
        wait_for(lambda: quorums_of_both() > before + 5, 120, "both islands together again", both_logs)
        run(["scancel", jobs["a"]])
        wait_for(lambda: job_state(jobs["b"]) in ("COMPLETED", "FAILED", "GONE"), 300, "island b to end",
                 both_logs)
    finally:
        launch.finish([coordinator], 1)
    tails = both_logs()
    assert job_state(jobs["b"]) in ("COMPLETED", "GONE") and job_state(jobs["a"]) in ("CANCELLED", "GONE"), tails
    assert not (tmp_path / "a" / "rank0.pt").exists() and (tmp_path / "b" / "rank0.pt").exists(), tails
    assert "`Trainer.fit` stopped: `max_epochs=80` reached." in log("b"), tails
    assert f"Restored all states from the checkpoint at {tmp_path / 'a' / 'hpc_ckpt_1.ckpt'}" in log("a"), tails
    answers = [tuple(map(int, m)) for m in ANSWERED.findall(log("a"))]
    assert len(answers) == 1, tails
    (answer,) = answers
    assert answer[2] % H == 0 and answer[1] <= answer[2] <= answer[1] + H, answers
    with open(tmp_path / "b" / "metrics.csv") as f:
        islands = [float(row["diloco/islands"]) for row in csv.DictReader(f) if row.get("diloco/islands")]
    runs = [n for i, n in enumerate(islands) if i == 0 or n != islands[i - 1]]  # b's record, repeats collapsed
    assert runs[-4:] == [2.0, 1.0, 2.0, 1.0], runs  # together, a requeued, together again, a cancelled
    last_pair = max(i for i, n in enumerate(islands) if n == 2.0)
    assert len(islands) - last_pair > 10, runs  # b trained on alone, many rounds after a was gone
