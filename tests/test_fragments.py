"""The streaming schedule: how parameters are cut into fragments and when each fragment syncs."""

import random

import pytest

from lightning_diloco.fragments import is_due, split_into_fragments, sync_offset


def _check_partition(fragments: list[list[int]], n: int, num_fragments: int) -> None:
    """Exactly ``num_fragments`` non-empty runs of consecutive indices that cover ``0..n-1`` in order."""
    assert len(fragments) == num_fragments
    assert all(fragments), fragments
    assert [i for f in fragments for i in f] == list(range(n))
    for f in fragments:
        assert f == list(range(f[0], f[-1] + 1)), f


@pytest.mark.parametrize(
    ("numels", "num_fragments", "expected"),
    [
        ([10, 10, 10, 10], 1, [[0, 1, 2, 3]]),
        ([10, 10, 10, 10], 2, [[0, 1], [2, 3]]),
        ([10, 10, 10, 10], 4, [[0], [1], [2], [3]]),
        ([5] * 12, 3, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]),
        # the first tensor alone is over half of the model: it is a fragment by itself
        ([100, 1, 1, 1], 2, [[0], [1, 2, 3]]),
        # a large last tensor: the small ones share the first fragment
        ([1, 1, 1, 100], 2, [[0, 1, 2], [3]]),
        # 30 | 30 | 40: the cut after 30 is at 1/3, the one after 60 at 2/3
        ([10, 20, 30, 40], 3, [[0, 1], [2], [3]]),
        # every fragment gets a tensor, even when one tensor holds nearly everything
        ([1, 1000, 1], 3, [[0], [1], [2]]),
        # the toy model of the tests: 128 | 16 16 16 1
        ([128, 16, 16, 16, 1], 2, [[0], [1, 2, 3, 4]]),
    ],
)
def test_split_examples(numels: list[int], num_fragments: int, expected: list[list[int]]):
    assert split_into_fragments(numels, num_fragments) == expected


def test_split_layers_of_a_transformer_into_bands():
    # embedding, then 6 blocks of (attention 4 x 64, mlp 2 x 128) elements, then a norm of 8
    numels = [512] + [64, 64, 64, 64, 128, 128] * 6 + [8]
    fragments = split_into_fragments(numels, 3)
    _check_partition(fragments, len(numels), 3)
    sizes = [sum(numels[i] for i in f) for f in fragments]
    total = sum(numels)
    assert all(abs(s - total / 3) <= max(numels) for s in sizes), sizes


@pytest.mark.parametrize("seed", range(20))
def test_split_is_contiguous_never_empty_and_balanced(seed: int):
    rng = random.Random(seed)
    n = rng.randint(1, 30)
    numels = [rng.choice([1, 3, 16, 64, 100, 1000]) for _ in range(n)]
    num_fragments = rng.randint(1, n)
    fragments = split_into_fragments(numels, num_fragments)
    _check_partition(fragments, n, num_fragments)
    # balanced: each cut lies at the tensor boundary nearest to its ideal place p * total / F among the cuts that
    # leave every fragment at least one tensor (checked against every such boundary, independently)
    boundaries = [0]
    for numel in numels:
        boundaries.append(boundaries[-1] + numel)
    total = boundaries[-1]
    for p in range(1, num_fragments):
        cut = fragments[p][0]
        ideal = p * total / num_fragments
        lowest = fragments[p - 1][0] + 1
        highest = n - (num_fragments - p)
        assert lowest <= cut <= highest
        best = min(abs(boundaries[i] - ideal) for i in range(lowest, highest + 1))
        assert abs(boundaries[cut] - ideal) == best, (p, cut, ideal)


def test_equal_tensors_split_equally():
    for num_fragments in (1, 2, 3, 4, 6, 12):
        fragments = split_into_fragments([7] * 12, num_fragments)
        assert {len(f) for f in fragments} == {12 // num_fragments}


def test_more_fragments_than_tensors_is_refused():
    with pytest.raises(
        ValueError, match=r"`num_fragments=6` is more than the model's 5 parameter tensors\. Use at most 5"
    ):
        split_into_fragments([128, 16, 16, 16, 1], 6)
    with pytest.raises(ValueError, match=r"more than the model's 0 parameter tensors"):
        split_into_fragments([], 1)


@pytest.mark.parametrize(
    ("num_fragments", "inner_steps", "expected"),
    [
        (1, 5, [0]),
        (2, 5, [2, 0]),  # fragment 0 after steps 2, 7, 12, ...; fragment 1 after 5, 10, ...
        (2, 6, [3, 0]),
        (3, 9, [3, 6, 0]),
        (4, 10, [2, 5, 7, 0]),
        (5, 5, [1, 2, 3, 4, 0]),
    ],
)
def test_sync_offsets(num_fragments: int, inner_steps: int, expected: list[int]):
    assert [sync_offset(p, num_fragments, inner_steps) for p in range(num_fragments)] == expected


@pytest.mark.parametrize(("num_fragments", "inner_steps"), [(1, 1), (1, 4), (2, 5), (3, 7), (4, 4), (3, 100)])
def test_every_fragment_syncs_once_every_h_steps_and_never_two_at_once(num_fragments: int, inner_steps: int):
    horizon = 5 * inner_steps
    due = {p: [t for t in range(horizon + 1) if is_due(t, p, num_fragments, inner_steps)] for p in range(num_fragments)}
    for p, steps in due.items():
        assert 0 not in steps  # nothing is due before the first step
        assert 1 <= steps[0] <= inner_steps, p  # once in the first round, then every H steps
        assert steps == list(range(steps[0], horizon + 1, inner_steps)), p
        assert steps[0] % inner_steps == sync_offset(p, num_fragments, inner_steps)
    every = sorted(t for steps in due.values() for t in steps)
    assert len(every) == len(set(every)), "two fragments share a sync step"
    # the last fragment syncs at the multiples of H, as plain DiLoCo does
    assert due[num_fragments - 1] == list(range(inner_steps, horizon + 1, inner_steps))


def test_syncs_are_spread_evenly_over_the_round():
    # with F | H the starts are H / F steps apart; otherwise the gaps differ by at most one step
    for num_fragments, inner_steps in [(2, 10), (4, 12), (3, 10), (4, 10), (7, 30)]:
        starts = sorted(sync_offset(p, num_fragments, inner_steps) or inner_steps for p in range(num_fragments))
        assert starts[-1] == inner_steps
        gaps = [b - a for a, b in zip([0, *starts], starts)]
        assert set(gaps) <= {inner_steps // num_fragments, -(-inner_steps // num_fragments)}, gaps
