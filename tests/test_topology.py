"""Worker groups' process groups and their sliced outer sync, on four real gloo processes (torchrun).

The sliced sync (process ``j`` of each worker averages slice ``j`` with the other workers' process ``j``, then the
worker all-gathers the slices) is compared with a plain ``all_reduce`` of the same per-worker tensors over the whole
world, for G = 1, 2 and 4 processes per worker.
"""

import math
import subprocess
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

from helpers import launch
from helpers.launch import load_ranks
from lightning_diloco.topology import Topology, build_topology, check_processes_per_worker

WORLD = 4


def torchrun(script: str, *args: str, nproc: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` of ``tests/scripts/<script>`` on this machine."""
    command = [*launch.TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", launch.SCRIPTS / script, *args]
    return launch.run(command, timeout)


@pytest.fixture(scope="module")
def averages(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("islands_average")
    torchrun("islands_average.py", "--out", str(out), nproc=WORLD)
    return load_ranks(out, WORLD)


@pytest.mark.parametrize(
    ("g", "outer", "intra"),
    [
        (1, lambda r: [0, 1, 2, 3], lambda r: None),
        (2, lambda r: [r % 2, r % 2 + 2], lambda r: [r - r % 2, r - r % 2 + 1]),
        (4, lambda r: [r], lambda r: [0, 1, 2, 3]),
    ],
)
def test_groups_of_each_rank(averages, g: int, outer, intra):
    for rank, record in enumerate(averages):
        entry = record["by_g"][g]
        assert (entry["worker"], entry["index_in_worker"], entry["num_workers"]) == (rank // g, rank % g, WORLD // g)
        assert entry["outer_ranks"] == outer(rank)
        assert entry["intra_ranks"] == intra(rank)
        assert entry["intra_sync_ranks"] == intra(rank)
        assert entry["control_ranks"] == list(range(WORLD))


def _max_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [t.shape for t in a] == [t.shape for t in b]
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("g", [1, 2, 4])
def test_sliced_average_equals_whole_world_average(averages, g: int):
    workers = [averages[w * g]["by_g"][g]["input"] for w in range(WORLD // g)]
    # the inputs really differ between workers and agree inside one, so the average is not trivial
    if len(workers) > 1:
        assert _max_error(workers[0], workers[1]) > 0.1
    for record in averages:
        entry = record["by_g"][g]
        assert _max_error(entry["sliced"], entry["whole"]) <= 1e-6
        assert _max_error(entry["small_buckets"], entry["whole"]) <= 1e-6
        assert _max_error(entry["weighted"], entry["weighted_whole"]) <= 1e-6
        if g == 2:  # weights 1 and 2 really move the average away from the plain one
            assert _max_error(entry["weighted"], entry["whole"]) > 1e-2
    # every process ends with the same bits, within a worker and across workers
    for key in ("sliced", "weighted", "small_buckets", "int8"):
        for record in averages[1:]:
            for a, b in zip(record["by_g"][g][key], averages[0]["by_g"][g][key]):
                assert torch.equal(a, b), key


@pytest.mark.parametrize("g", [1, 2, 4])
def test_sliced_int8_average_is_within_one_quantization_step(averages, g: int):
    """int8 slices are quantized separately: the result is not the whole-world one, but within a step of 1/127 of
    the largest magnitude (one rounding of each contribution, and one of the reduced sum for three or more ranks)."""
    largest = max(float(t.abs().max()) for record in averages for t in record["by_g"][g]["input"])
    for record in averages:
        entry = record["by_g"][g]
        error = _max_error(entry["int8"], entry["whole"])
        assert 0 < error <= largest / 127


def test_sliced_sync_sends_one_gth_over_the_slow_link(averages):
    """Per process, G = 2 sends half of what the same average of the full tensors over one process per worker sends
    (a ring all-reduce of 2 ranks: 4 bytes per element), and a third of a whole-world (4-rank) all-reduce."""
    numel = sum(math.prod(shape) for shape in averages[0]["shapes"])
    per_worker, world = averages[0]["per_worker_bytes"], averages[0]["world_bytes"]
    assert per_worker == 2 * 1 * 4 * numel // 2
    assert world == 2 * 3 * 4 * numel // 4
    slice_numel = math.ceil(numel / 2)
    for record in averages:
        entry = record["by_g"][2]
        assert entry["sliced_bytes"] == 2 * 1 * 4 * slice_numel // 2
        assert entry["sliced_bytes"] / per_worker == pytest.approx(1 / 2, abs=1 / numel)
        assert entry["sliced_bytes"] / world == pytest.approx(1 / 3, abs=1 / numel)
        assert record["by_g"][4]["sliced_bytes"] == 0  # one worker: nothing crosses a slow link
        assert record["by_g"][1]["sliced_bytes"] == world


def test_processes_per_worker_must_divide_the_world():
    check_processes_per_worker(2, 4)
    with pytest.raises(ValueError, match=r"`processes_per_worker=3` does not divide the 4 processes"):
        check_processes_per_worker(3, 4)


def test_topology_without_distributed_is_one_local_process():
    assert not dist.is_initialized()
    topology = build_topology(2, None, timedelta(seconds=5))
    assert isinstance(topology, Topology)
    assert (topology.rank, topology.world_size, topology.num_workers, topology.worker) == (0, 1, 1, 0)
    assert topology.outer is None and topology.control is None
