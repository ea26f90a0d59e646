"""Lightning's signal handling under DiLoCo: no collective from a signal, and SLURM's requeue at an outer step.

Lightning 2.6 communicates in three places that DDP's lockstep makes safe and DiLoCo's independent rounds do not:

- before every training batch it broadcasts rank 0's SIGTERM flag (a collective per step, which DiLoCo exists to
  avoid);
- its SIGTERM handler broadcasts the flag again, from inside the handler;
- under SLURM with ``SLURMEnvironment(auto_requeue=True)`` (the default), its handler of the requeue signal
  (``#SBATCH --signal=SIGUSR1@90``) writes a checkpoint from inside the handler, then requeues the job.

A DiLoCo worker may be anywhere in its round when a signal arrives, and another one inside the outer sync: a
collective started from a handler would be paired with a different collective on another worker (or with none). Here
a SIGTERM only sets this process's flag (it stops at its next batch; the others at their next outer step). The
requeue signal becomes a request: the worker reports it in the census of its next outer step
(:class:`~lightning_diloco.census.Census`), every worker learns it from the same census, and when that outer step
lands all of them write the checkpoint at the end of the same batch (:class:`RequeueCheckpoint`, where a
``ModelCheckpoint(every_n_train_steps=...)`` writes). Rank 0 then requeues the job and every process ends ``fit``
with ``SystemExit(0)``; the requeued job resumes from that checkpoint (``fit(ckpt_path=None)`` finds the newest
``hpc_ckpt_<n>.ckpt``, as in Lightning). With a loader that resumes mid-epoch (one with ``state_dict``, such as
:class:`~lightning_diloco.data.ResumableDataLoader`), the resumed run is bitwise the run never stopped.

The signal must come early enough for the round to end: ``--signal=SIGUSR1@T`` with ``T`` above the time of one
round (``inner_steps`` steps) plus the time to write a checkpoint.
"""

import logging
import os
import re
import subprocess
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Optional

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message, rank_zero_info, rank_zero_warn

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger("lightning.pytorch")  # Lightning's own logger: its handler prints on every rank


class RequeueRequest:
    """The requeue signal, from its arrival to the checkpoint that answers it.

    Attributes:
        asked: this process received the signal; the census of its next outer step carries the request.
        due: an outer step whose census carried a request has landed: checkpoint at the end of this batch.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """No request (at the start of every ``fit``)."""
        self.asked = False
        self.due = False
        self.step: Optional[int] = None  # the DiLoCo step at which this process received the signal
        self.answered_at: Optional[int] = None  # the DiLoCo step of the outer step that answers it

    def ask(self, step: int) -> None:
        """What the signal handler does: remember the request, received at DiLoCo step ``step`` (a handler may
        interrupt anything, a collective or a write to stdout, so it does nothing else)."""
        self.asked, self.step = True, step

    def agree(self, step: int) -> None:
        """Every worker saw the request in the same census: the checkpoint is due after this outer step (``step``)."""
        self.asked, self.due, self.answered_at = False, True, step


def quiet_signals(trainer: "pl.Trainer", request: RequeueRequest, step: Callable[[], int]) -> None:
    """Make Lightning's signal handling collective-free for this ``fit``; call before Lightning registers its handlers.

    Args:
        trainer: the Trainer whose signal handling to change.
        request: what the requeue signal sets.
        step: returns the DiLoCo step, for the log line of the request.
    """
    _no_collective_per_step(trainer)
    connector = trainer._signal_connector
    missing = [name for name in ("_sigterm_notifier_fn", "_slurm_sigusr_handler_fn") if not hasattr(connector, name)]
    if missing:
        rank_zero_warn(
            f"DiLoCoStrategy could not find Lightning's signal handlers {missing} (`_SignalConnector`), which it"
            " replaces so that no signal starts a collective. A SIGTERM or a SLURM requeue signal may then hang or"
            " mismatch the workers' collectives; lightning-diloco is tested with Lightning 2.5 and 2.6."
        )
        return

    def note_sigterm(signum: int, frame: Optional[FrameType]) -> None:
        log.info(rank_prefixed_message(f"Received SIGTERM: {signum}", trainer.global_rank))
        if not trainer._signal_connector.received_sigterm and trainer.strategy.launcher is not None:
            trainer.strategy.launcher.kill(signum)  # Lightning's: the launcher's children get it too
        trainer._signal_connector.received_sigterm = True

    def note_requeue(signum: int, frame: Optional[FrameType]) -> None:
        request.ask(step())

    # instance attributes, read when Lightning composes its handlers (after the strategy's setup)
    connector._sigterm_notifier_fn = note_sigterm
    connector._slurm_sigusr_handler_fn = note_requeue
    if not any(isinstance(c, RequeueCheckpoint) for c in trainer.callbacks):
        trainer.callbacks.append(RequeueCheckpoint(request))


def _no_collective_per_step(trainer: "pl.Trainer") -> None:
    """Replace Lightning's per-batch broadcast of rank 0's SIGTERM flag by a check of this process's own flag."""
    epoch_loop = trainer.fit_loop.epoch_loop
    if not hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
        rank_zero_warn(
            "DiLoCoStrategy could not find Lightning's per-step SIGTERM broadcast"
            " (`_TrainingEpochLoop._broadcast_sigterm_tensor`), which it replaces so that nothing is communicated"
            " between outer steps. This Lightning version may communicate at every step; lightning-diloco is tested"
            " with Lightning 2.5 and 2.6."
        )
        return

    def check_own_sigterm() -> None:
        if getattr(trainer, "received_sigterm", False):
            raise SIGTERMException()

    epoch_loop._broadcast_sigterm_tensor = check_own_sigterm


class RequeueCheckpoint(Callback):
    """Writes the checkpoint that answers a requeue request, on every rank at the end of the same batch, then has
    rank 0 requeue the SLURM job and ends ``fit`` on every rank (``SystemExit(0)``). If ``scontrol requeue`` fails,
    every rank trains on (the checkpoint stays)."""

    def __init__(self, request: RequeueRequest) -> None:
        self.request = request

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.request.due:
            return
        self.request.due = False
        for logger in trainer.loggers:
            logger.finalize("finished")
        strategy = trainer.strategy
        asked_at, self.request.step = self.request.step, None
        if asked_at is not None:  # on the ranks that received the signal
            said = (f"Received the requeue signal at DiLoCo step {asked_at}; checkpointing at step"
                    f" {self.request.answered_at}, after the outer step.")
            print(rank_prefixed_message(said, trainer.global_rank), flush=True)
        # every rank writes to the path rank 0 chose (the next free `hpc_ckpt_<n>.ckpt`, as Lightning names them)
        path = strategy.broadcast(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        trainer.save_checkpoint(path, weights_only=False)
        requeued = strategy.broadcast(requeue_job() if trainer.is_global_zero else False)
        if not requeued:
            rank_zero_warn(f"Wrote {path} for the requeue signal, but the job could not be requeued (see the log"
                           " above): training goes on.")
            return
        rank_zero_info(f"Requeue signal: wrote {path} at DiLoCo step {self.request.answered_at} and requeued the job;"
                       " this run ends here.")
        raise SystemExit(0)


def requeue_job() -> bool:
    """``scontrol requeue`` this SLURM job (an array job's own task); whether it worked."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job):
        rank_zero_warn(f"Not requeueing: no SLURM job id in the environment (SLURM_JOB_ID={job!r}).")
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        rank_zero_warn(f"`scontrol requeue {job}` failed: {err}")
        return False
    if done.returncode != 0:
        rank_zero_warn(f"`scontrol requeue {job}` exited with {done.returncode}: {done.stderr.strip()}")
        return False
    return True
