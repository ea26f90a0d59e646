"""Streaming fragments: the model's parameters cut into groups that sync at staggered steps.

Streaming DiLoCo (Douillard et al. 2025) syncs fragment ``p`` of ``F`` every ``H`` steps, shifted by ``p * H / F``
steps, so that each sync moves about ``1 / F`` of the model and the peak bandwidth falls by ``F``. A
:class:`Fragment` owns what is its own across rounds: its parameters, its place in the schedule, the step its last
sync started at, and its error-feedback residuals. Without streaming there is one fragment, the whole model.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from lightning_diloco.compression import ErrorFeedback


@dataclass
class Fragment:
    """One band of parameters that syncs on its own schedule.

    Attributes:
        index: its place among the fragments, from 0.
        params: the indices of its parameters in the outer state.
        offset: the step, modulo H, after which its syncs start.
        carries_buffers: the last fragment also carries the floating-point buffers (BatchNorm statistics).
        last_sync: the DiLoCo step at which its last sync started (0 before the first).
        feedback: what compression dropped from its last sync (with ``error_feedback``), else ``None``.

    """

    index: int
    params: list[int]
    offset: int
    carries_buffers: bool
    last_sync: int = 0
    feedback: Optional[ErrorFeedback] = field(default=None, repr=False)

    def is_due(self, step: int, inner_steps: int) -> bool:
        """Whether a sync of this fragment starts after DiLoCo step ``step`` (counted from 1)."""
        return step > 0 and (step - self.offset) % inner_steps == 0

    def has_open_round(self, step: int) -> bool:
        """Whether inner steps were taken since this fragment's last sync started."""
        return step > self.last_sync


def make_fragments(
    numels: Sequence[int], num_fragments: int, inner_steps: int, error_feedback: bool,
    last_sync: Optional[Sequence[int]] = None,
) -> list[Fragment]:
    """Cut parameters into :class:`Fragment` objects on the staggered schedule.

    Args:
        numels: the number of elements of every parameter, in the outer state's order.
        num_fragments: F.
        inner_steps: H.
        error_feedback: give every fragment fresh error-feedback residuals.
        last_sync: the step each fragment's last sync started at; 0 for all by default.

    """
    groups = split_into_fragments(numels, num_fragments)
    starts = list(last_sync) if last_sync is not None else [0] * num_fragments
    return [
        Fragment(p, params, sync_offset(p, num_fragments, inner_steps), p == num_fragments - 1, starts[p],
                 ErrorFeedback() if error_feedback else None)
        for p, params in enumerate(groups)
    ]


def split_into_fragments(numels: Sequence[int], num_fragments: int) -> list[list[int]]:
    """Cut parameters, in model order, into ``num_fragments`` contiguous groups of about equal size.

    A tensor is never split. Consecutive parameters are mostly consecutive layers, so each fragment is a band of
    layers.

    Args:
        numels: the number of elements of every parameter, in ``module.parameters()`` order.
        num_fragments: how many fragments.

    Returns:
        For every fragment, the indices of its parameters.

    """
    if num_fragments > len(numels):
        raise ValueError(
            f"`num_fragments={num_fragments}` is more than the model's {len(numels)} parameter tensors. Use at most"
            f" {len(numels)} fragments."
        )
    before = [0]
    for numel in numels:
        before.append(before[-1] + numel)  # before[i]: elements in the tensors ahead of tensor i
    starts = [0]
    for p in range(1, num_fragments):
        ideal = p * before[-1] / num_fragments
        candidates = range(starts[-1] + 1, len(numels) - (num_fragments - p) + 1)
        starts.append(min(candidates, key=lambda i: abs(before[i] - ideal)))
    ends = [*starts[1:], len(numels)]
    return [list(range(a, b)) for a, b in zip(starts, ends)]


def sync_offset(fragment: int, num_fragments: int, inner_steps: int) -> int:
    """The step (modulo ``inner_steps``) at which ``fragment`` syncs; the last fragment syncs at multiples of H."""
    return ((fragment + 1) * inner_steps // num_fragments) % inner_steps


def is_due(step: int, fragment: int, num_fragments: int, inner_steps: int) -> bool:
    """Whether ``fragment`` has an outer step after optimizer step ``step`` (counted from 1)."""
    return step > 0 and (step - sync_offset(fragment, num_fragments, inner_steps)) % inner_steps == 0
