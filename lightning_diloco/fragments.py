"""Streaming fragments: the model's parameters cut into groups that sync at staggered steps.

Streaming DiLoCo (Douillard et al. 2025) syncs fragment ``p`` of ``F`` every ``H`` steps, shifted by ``p * H / F``
steps, so that each sync moves about ``1 / F`` of the model and the peak bandwidth falls by ``F``.
"""

from collections.abc import Sequence


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
