"""The census at every outer step: which workers count, with what share, and how fast each one is.

Before the pseudo-gradients are averaged, every worker reports one row: its share in the mean (0 if its
pseudo-gradient is not finite; else 1, or with ``speed_weighted`` the steps it computed this round), its measured
seconds per step, and whether it asks every worker for a checkpoint after this outer step (SLURM's requeue signal,
:mod:`lightning_diloco.signals`). The shares decide the mean (``sum share * delta / sum share``); a worker with
share 0 is dropped from that outer step and restarts from the global weights. With ``speed_weighted`` the speeds
set each worker's budget for the next round: about ``H * its speed / the fastest speed`` computed steps, so fast
workers do not wait at syncs. This module holds all of ``speed_weighted``.
"""

from typing import Any, Callable

import torch
from torch import Tensor


class OuterSyncError(RuntimeError):
    """An outer step could not complete: a peer died or stalled, or every worker's pseudo-gradient was not finite."""


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class Census:
    """This worker's side of the census: what it reports, and what it does with everyone's reports.

    Args:
        inner_steps: H.
        speed_weighted: shares are the steps computed, and slow workers get smaller budgets.
        nonfinite: ``"skip"`` drops workers whose pseudo-gradient is not finite, ``"raise"`` stops.
        warn: how a dropped worker is reported (rank zero's warning).
        checkpoint_asked: whether this worker asks for a checkpoint after the next outer step.

    """

    COLUMNS = 3  # share, seconds per step, checkpoint asked

    def __init__(
        self, inner_steps: int, speed_weighted: bool, nonfinite: str, warn: Callable[[str], None],
        checkpoint_asked: Callable[[], bool] = lambda: False,
    ) -> None:
        self.inner_steps = inner_steps
        self.speed_weighted = speed_weighted
        self.nonfinite = nonfinite
        self._warn = warn
        self._checkpoint_asked = checkpoint_asked
        self.budget = inner_steps  # steps this worker computes in the current round
        self.computed = 0  # steps it computed so far in this round
        self.compute_seconds = 0.0
        self.seconds_per_step: list[float] = []  # every worker's, from the latest census

    def skips_step(self) -> bool:
        """Whether this worker has used up this round's budget of computed steps."""
        return self.speed_weighted and self.computed >= self.budget

    def record_step(self, seconds: float) -> None:
        """A computed inner step that took ``seconds``."""
        self.computed += 1
        self.compute_seconds += seconds

    def row(self, finite: bool) -> Tensor:
        """This worker's report: its share in the mean (0 if its pseudo-gradient is not ``finite``), its seconds
        per step, and whether it asks for a checkpoint."""
        share = float(self.computed) if self.speed_weighted else 1.0
        seconds_per_step = self.compute_seconds / max(self.computed, 1)
        asked = float(self._checkpoint_asked())
        return torch.tensor([share if finite else 0.0, seconds_per_step, asked], dtype=torch.float64)

    @classmethod
    def blank_row(cls) -> Tensor:
        """The row of a worker with nothing to report (an island that heals in this outer step)."""
        return torch.zeros(cls.COLUMNS, dtype=torch.float64)

    @staticmethod
    def checkpoint_agreed(table: Tensor) -> bool:
        """Whether any worker asked for a checkpoint after this outer step (then every worker writes one)."""
        return bool((table[:, 2] > 0).any())

    def shares(self, table: Tensor, step: int) -> list[float]:
        """Every worker's share in the mean, from the table of everyone's rows (outer step started at ``step``).

        Raises:
            OuterSyncError: if a worker's pseudo-gradient is not finite and ``nonfinite="raise"``.
        """
        self.seconds_per_step = table[:, 1].tolist()
        shares = table[:, 0].tolist()
        dropped = [w for w, share in enumerate(shares) if share == 0]
        if dropped:
            message = f"The pseudo-gradient of worker(s) {dropped} is not finite (NaN or inf) at optimizer step {step}."
            if self.nonfinite == "raise":
                raise OuterSyncError(
                    message + " Nothing reached the global weights. Lower the learning rate, clip gradients, or use"
                    " `nonfinite='skip'` to drop such workers from the outer step."
                )
            if len(dropped) == len(shares):
                self._warn(message + " No worker is healthy: this outer step leaves the global weights as they were,"
                           " and every worker restarts from them with a fresh inner optimizer state. Lower the"
                           " learning rate or clip gradients if it happens again.")
            else:
                self._warn(message + " Their contribution is dropped from this outer step and they restart from the"
                           " global weights with a fresh inner optimizer state.")
        return shares

    def next_round(self, me: int) -> None:
        """Start a new round; with ``speed_weighted``, worker ``me`` gets about ``H * its speed / the fastest``."""
        speeds = self.seconds_per_step
        if self.speed_weighted and speeds:
            fastest = min((s for s in speeds if s > 0), default=0.0)
            mine = speeds[me]
            self.budget = self.inner_steps if not fastest or not mine else max(
                1, min(self.inner_steps, round(self.inner_steps * fastest / mine))
            )
        self.computed, self.compute_seconds = 0, 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "computed": self.computed, "compute_seconds": self.compute_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.budget = int(state.get("budget", self.inner_steps))
        self.computed = int(state.get("computed", 0))
        self.compute_seconds = float(state.get("compute_seconds", 0.0))
