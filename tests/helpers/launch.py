"""The one way the tests start other processes: a clean environment, a free port, a session of their own.

Every command runs in a session of its own with its output going to temporary files (not pipes, which a stalled
child would hold open), so that :func:`finish` can stop it and everything it started, and nothing else. :func:`run`
and :func:`run_script` are the blocking forms; their failures name the command and show every rank's exception.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Optional, Union

import torch

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
SCRIPTS = TESTS / "scripts"
#: ``torchrun`` of this interpreter; append its options, the script and the script's arguments.
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")

#: What a launcher (Lightning's, torchrun) sets for the processes it starts. An in-process Lightning run leaves them
#: behind; with ``LOCAL_RANK`` set a new run would take its processes for started from outside and wait for them
#: forever.
LAUNCHER_ENV = ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
#: Prefixes of the variables of torchelastic, Lightning (``PL_GLOBAL_SEED``) and SLURM, which a new run must not see.
_FOREIGN_PREFIXES = ("TORCHELASTIC_", "PL_", "SLURM_")
#: Fault injection of ``scripts/recovery_train.py``: a run gets it only when it asks for it.
_FAULT = "FAULT"

Command = Sequence[Union[str, Path]]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what a launcher or a previous run left in it, plus ``extra``.

    Drops :data:`LAUNCHER_ENV`, ``TORCHELASTIC_*``, ``PL_*``, ``SLURM_*`` and ``FAULT``; sets ``OMP_NUM_THREADS=1``
    (several processes share the machine's cores), ``PYTHONWARNINGS=ignore::DeprecationWarning`` and puts the
    repository root first on ``PYTHONPATH``.

    Args:
        **extra: variables to set on top (they win over all of the above).

    """
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in LAUNCHER_ENV and name != _FAULT and not name.startswith(_FOREIGN_PREFIXES)
    }
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::DeprecationWarning", PYTHONPATH=os.pathsep.join(path))
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A command started by :func:`start` (see there): ``popen``, leader of its own session, and its output files."""

    def __init__(self, command: Command, env: Optional[dict[str, str]], cwd: Optional[Path], merge: bool) -> None:
        self.args = [str(part) for part in command]
        self._stdout = tempfile.TemporaryFile()
        self._stderr = None if merge else tempfile.TemporaryFile()
        self.popen = subprocess.Popen(
            self.args, stdout=self._stdout, stderr=subprocess.STDOUT if merge else self._stderr,
            env=clean_env() if env is None else env, cwd=cwd, start_new_session=True,
        )

    def stdout(self) -> str:
        """What it wrote to stdout so far (with ``merge``, to stderr too)."""
        return _read(self._stdout)

    def stderr(self) -> Optional[str]:
        """What it wrote to stderr so far; ``None`` with ``merge``."""
        return None if self._stderr is None else _read(self._stderr)

    def kill_session(self) -> None:
        """SIGKILL every process left in its session (the ranks it started, a stalled peer)."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Remove its output files."""
        for file in (self._stdout, self._stderr):
            if file is not None:
                file.close()


def _read(file: IO[bytes]) -> str:
    # the child writes through the same open file: reading at an offset leaves the position it writes at alone
    fd = file.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


def start(command: Command, env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None,
          merge: bool = False) -> Process:
    """Start ``command`` in a session of its own, its output captured; :func:`finish` waits for it.

    Args:
        command: the program and its arguments.
        env: its environment; :func:`clean_env` when ``None``.
        cwd: its working directory; this one when ``None``.
        merge: write its stderr into its stdout, in the order it wrote them.

    """
    return Process(command, env, cwd, merge)


def finish(processes: Sequence[Process], timeout: float) -> list[subprocess.CompletedProcess]:
    """Wait for ``processes`` (all within ``timeout`` seconds), then kill whatever is left in their sessions.

    Once one of them runs past the deadline, every session is killed at once.

    Args:
        processes: what :func:`start` returned.
        timeout: seconds for all of them together.

    Returns:
        One ``CompletedProcess`` each, in order: ``returncode`` is ``None`` for one that was still running at the
        deadline; ``stderr`` is ``None`` for a merged one.

    """
    deadline = time.monotonic() + timeout
    codes: list[Optional[int]] = []
    try:
        for process in processes:
            try:
                codes.append(process.popen.wait(timeout=max(deadline - time.monotonic(), 0)))
            except subprocess.TimeoutExpired:
                codes.append(None)
    finally:
        for process in processes:
            process.kill_session()
            process.popen.wait()
    done = [subprocess.CompletedProcess(p.args, code, p.stdout(), p.stderr()) for p, code in zip(processes, codes)]
    for process in processes:
        process.close()
    return done


def run(command: Command, timeout: float, env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None,
        returncode: int = 0, merge: bool = False) -> subprocess.CompletedProcess:
    """Run ``command`` to its end and check its exit status.

    Args:
        command: the program and its arguments.
        timeout: seconds it may take; then it and everything it started are killed.
        env: its environment; :func:`clean_env` when ``None``.
        cwd: its working directory; this one when ``None``.
        returncode: the exit status it must end with (``-signal.SIGKILL`` for one that kills itself).
        merge: write its stderr into its stdout, in the order it wrote them.

    Raises:
        AssertionError: it ran out of time or ended with another status; the message shows its output.

    """
    (done,) = finish([start(command, env, cwd, merge)], timeout)
    if done.returncode != returncode:
        what = f"did not finish in {timeout:g} s" if done.returncode is None else f"exited with {done.returncode}"
        output = done.stdout + ("" if done.stderr is None else "\n" + done.stderr)
        raise AssertionError(f"{' '.join(done.args)} {what} (expected {returncode}):\n{failure_summary(output)}")
    return done


def run_script(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``tests/scripts/<script>`` as a file in a fresh interpreter (Lightning re-runs it for the other ranks).

    Args:
        script: the script's file name.
        *args: its arguments.
        timeout: seconds it may take.

    """
    return run([sys.executable, SCRIPTS / script, *args], timeout)


def failure_summary(output: str) -> str:
    """Every rank's exception line first (the first failure is often buried under its peers'), then the tail."""
    pattern = re.compile(r"(\[rank\d+\]: )?[\w.]+(Error|Exception): ")
    errors = dict.fromkeys(line[:500] for line in output.splitlines() if pattern.match(line))
    return "\n".join(errors) + "\n...\n" + output[-6000:]


def load_ranks(out: Path, world: int) -> list[dict[str, Any]]:
    """The records ``rank0.pt`` ... that the ranks of a run wrote into ``out``."""
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
