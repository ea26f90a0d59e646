"""Schedules of the outer optimizer's momentum, a function of the number of outer steps taken.

Pier (arXiv 2511.17849) warms the outer momentum up at the start of training, when pseudo-gradients are large and
point in changing directions, and decays it at the end. :class:`MomentumWarmupDecay` is that shape; any callable
``outer_step -> momentum`` works as ``DiLoCoStrategy(outer_momentum_schedule=...)``. The momentum of an outer step
depends on the outer step count alone, which checkpoints hold, so a resume continues the schedule exactly.
"""

from typing import Callable

OuterMomentumSchedule = Callable[[int], float]


class MomentumWarmupDecay:
    """Outer momentum rising linearly from ``start`` to ``peak`` over the first ``warmup_steps`` outer steps, held at
    ``peak``, then falling linearly to ``final`` over the last ``decay_steps`` of ``total_steps`` outer steps.

    Args:
        warmup_steps: outer steps of the warm-up (0: start at ``peak``).
        peak: the momentum between warm-up and decay (the paper's 0.9).
        start: the momentum of the first outer step.
        total_steps: the outer steps of the run (every fragment's sync counts as one); needed with ``decay_steps``.
        decay_steps: outer steps of the final decay (0: none).
        final: the momentum of the last outer step of the decay.

    """

    def __init__(self, warmup_steps: int = 0, peak: float = 0.9, start: float = 0.0, total_steps: int = 0,
                 decay_steps: int = 0, final: float = 0.0) -> None:
        for name, value in (("warmup_steps", warmup_steps), ("total_steps", total_steps),
                            ("decay_steps", decay_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"`{name}` must be an integer >= 0 (a number of outer steps), got {value!r}.")
        for name, value in (("peak", peak), ("start", start), ("final", final)):
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"`{name}` must be a momentum in [0, 1), got {value!r}.")
        if decay_steps and warmup_steps + decay_steps > total_steps:
            raise ValueError(
                f"`warmup_steps + decay_steps` ({warmup_steps} + {decay_steps}) must fit in `total_steps`"
                f" ({total_steps}), the outer steps of the run: about max_steps / inner_steps * num_fragments."
            )
        self.warmup_steps, self.peak, self.start = warmup_steps, float(peak), float(start)
        self.total_steps, self.decay_steps, self.final = total_steps, decay_steps, float(final)

    def __call__(self, outer_step: int) -> float:
        """The momentum of the outer step after ``outer_step`` outer steps (counting from 0)."""
        if outer_step < self.warmup_steps:
            return self.start + (self.peak - self.start) * outer_step / self.warmup_steps
        decay_from = self.total_steps - self.decay_steps
        if self.decay_steps and outer_step >= decay_from:
            done = min(outer_step - decay_from + 1, self.decay_steps)
            return self.peak + (self.final - self.peak) * done / self.decay_steps
        return self.peak

    def __repr__(self) -> str:
        return (f"MomentumWarmupDecay(warmup_steps={self.warmup_steps}, peak={self.peak}, start={self.start},"
                f" total_steps={self.total_steps}, decay_steps={self.decay_steps}, final={self.final})")
