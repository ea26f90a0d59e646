"""Islands of devices: workers made of several processes, two emulated nodes, a separate outer process group and
speed-weighted rounds, in real multi-process runs (gloo on CPU) against the one-process simulation of
``tests/helpers/reference_groups.py``.
"""

import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DistributedSampler

from helpers import launch
from helpers.launch import failure_summary, load_ranks
from helpers.reference_groups import Batches, simulate_groups
from helpers.toy import ToyData
from test_topology import torchrun

BATCH = 4


def sampler_batches(world: int, rank: int, epochs: int) -> list[list[int]]:
    """The batches Lightning's DistributedSampler gives ``rank`` of ``world`` processes, epoch after epoch."""
    batches = []
    for epoch in range(epochs):
        sampler = DistributedSampler(ToyData(), num_replicas=world, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches += [order[i : i + BATCH] for i in range(0, len(order), BATCH)]
    return batches


def float_state(record: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in record["final"].items() if v.is_floating_point()}


def assert_states_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=atol, msg=key)


# ------------------------------------------------------------------------------------------------------------------
# Two emulated nodes of two processes each: one DiLoCo worker per node (processes_per_worker=2)
# ------------------------------------------------------------------------------------------------------------------

NODES, PER_NODE, H = 2, 2, 5
WORLD = NODES * PER_NODE
STEPS = 12  # 3 epochs of 16 samples per process in batches of 4; outer steps after 5, 10 and (partial) 12


def _launch_nodes(out: Path, port: int, timeout: float) -> list[subprocess.CompletedProcess]:
    """Start the two nodes' torchrun at once and wait for both (their output merged into ``stdout``)."""
    procs = []
    for node in range(NODES):
        command = [
            *launch.TORCHRUN, "--nnodes", str(NODES), "--node-rank", str(node), "--nproc-per-node", str(PER_NODE),
            "--master-addr", "127.0.0.1", "--master-port", str(port), launch.SCRIPTS / "train_toy.py",
            "--out", str(out), "--devices", str(PER_NODE), "--num-nodes", str(NODES), "--processes-per-worker",
            str(PER_NODE), "--inner-steps", str(H), "--max-epochs", "3", "--val", "0",
        ]
        procs.append(launch.start(command, merge=True))
    return launch.finish(procs, timeout)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("two_nodes")
    for _ in range(2):  # a second try only if the rendezvous port was taken in the meantime
        results = _launch_nodes(out, launch.free_port(), timeout=300)
        if all(done.returncode == 0 for done in results):
            return load_ranks(out, WORLD)
        if not any("address already in use" in done.stdout.lower() for done in results):
            break
    raise AssertionError("\n\n".join(
        f"node {n} {'timed out' if done.returncode is None else f'exited with {done.returncode}'}:\n"
        f"{failure_summary(done.stdout)}" for n, done in enumerate(results)
    ))


def _group_batches(ranks: list[dict[str, Any]], g: int) -> Batches:
    """Every worker's steps: the micro-batches of its g processes."""
    steps = len(ranks[0]["indices"])
    return [[[ranks[w * g + p]["indices"][s] for p in range(g)] for s in range(steps)] for w in range(len(ranks) // g)]


def test_every_process_trains_on_its_own_shard(two_nodes):
    for rank, record in enumerate(two_nodes):
        assert record["steps"] == list(range(1, STEPS + 1))
        assert record["indices"] == sampler_batches(WORLD, rank, epochs=3)


def test_processes_of_a_worker_hold_identical_replicas_at_every_step(two_nodes):
    for step in range(STEPS):
        for worker in range(NODES):
            first, second = two_nodes[worker * PER_NODE], two_nodes[worker * PER_NODE + 1]
            assert torch.equal(first["local"][step], second["local"][step]), f"worker {worker}, step {step + 1}"
    # though they started from different initial weights and trained on different micro-batches
    assert not torch.equal(two_nodes[0]["init"], two_nodes[1]["init"])


def test_workers_differ_between_outer_steps_and_meet_at_them(two_nodes):
    for step in range(1, STEPS + 1):  # (the weights after step 12 are recorded before the last outer step)
        same = torch.equal(two_nodes[0]["local"][step - 1], two_nodes[PER_NODE]["local"][step - 1])
        assert same == (step % H == 0), f"step {step}"
    for record in two_nodes[1:]:
        assert_states_close(float_state(record), float_state(two_nodes[0]), atol=0)


def test_worker_groups_equal_data_parallel_workers_of_the_reference(two_nodes):
    """Each worker = DDP over its 2 processes (mean of the 2 micro-batch gradients), DiLoCo across the 2 workers."""
    sim = simulate_groups(_group_batches(two_nodes, PER_NODE), init_seed=1000, inner_steps=H)
    assert sim.syncs == [5, 10, 12]
    for rank, record in enumerate(two_nodes):
        for step, local in enumerate(record["local"]):
            torch.testing.assert_close(local, sim.local[rank // PER_NODE][step], rtol=0, atol=1e-6,
                                       msg=lambda m: f"rank {rank}, step {step + 1}: {m}")
        params = {k: v for k, v in sim.final[0].items() if "running" not in k}
        assert_states_close({k: v for k, v in float_state(record).items() if "running" not in k}, params, atol=1e-6)
    # and not the reference of plain workers (1 process each, on half the data): groups change the result
    alone = simulate_groups([[[micro[0]] for micro in worker] for worker in _group_batches(two_nodes, PER_NODE)],
                            init_seed=1000, inner_steps=H)
    assert not torch.allclose(two_nodes[0]["local"][-1], alone.local[0][-1], atol=1e-3)


def test_batchnorm_statistics_of_a_worker_are_its_first_process(two_nodes):
    """DDP keeps the first process's BatchNorm statistics in a worker (it broadcasts them before every forward); the
    outer step must average those, not take slice j of the buffers from process j
    (:meth:`~lightning_diloco.workers.ProcessGroupWorkers.average_buffers_` shares the first process's first).
    """
    sim = simulate_groups(_group_batches(two_nodes, PER_NODE), init_seed=1000, inner_steps=H)
    for record in two_nodes:
        buffers = {k: v for k, v in float_state(record).items() if "running" in k}
        assert_states_close(buffers, {k: v for k, v in sim.final[0].items() if "running" in k}, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# A separate outer process group (outer_backend="gloo"), two workers of one process
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("islands_fits")
    torchrun("islands_fits.py", "--out", str(out), "--fits", "default,outer_gloo", nproc=2)
    return load_ranks(out, 2)


def _plain_batches(ranks: list[dict[str, Any]]) -> Batches:
    """Workers of one process that computed every step."""
    return [[[idx] for idx in record["indices"]] for record in ranks]


def test_default_run_equals_the_reference(fits):
    ranks = [r["default"] for r in fits]
    sim = simulate_groups(_plain_batches(ranks), init_seed=1000, inner_steps=3)
    assert sim.syncs == [3, 6, 9, 10]
    for rank, record in enumerate(ranks):
        for step, local in enumerate(record["local"]):
            torch.testing.assert_close(local, sim.local[rank][step], rtol=0, atol=1e-6)
        assert_states_close(float_state(record), sim.final[rank], atol=1e-6)


def test_outer_backend_gloo_syncs_on_its_own_group_with_identical_results(fits):
    for rank, record in enumerate(fits):
        default, gloo = record["default"], record["outer_gloo"]
        topology = gloo["topology"]
        assert topology["outer_backend"] == "gloo" and topology["outer_group_backend"] == "gloo"
        assert not topology["outer_is_default_group"]
        assert topology["outer_name"] != topology["default_name"]
        assert topology["outer_ranks"] == [0, 1]
        outer_steps = len(gloo["outer_steps"])
        assert outer_steps == 4  # after steps 3, 6, 9 and the partial round closed at 10
        # each outer step ran on the outer group (pseudo-gradients, buffers) and the control group (weights); the
        # default group ran the same collectives in both runs (the set-up's), none per outer step
        assert topology["outer_collectives"] == 2 * outer_steps
        assert topology["control_collectives"] == outer_steps
        assert topology["default_collectives"] == default["topology"]["default_collectives"]
        # and the results are bitwise those of the default backend's groups
        assert gloo["indices"] == default["indices"]
        for step, (a, b) in enumerate(zip(gloo["local"], default["local"])):
            assert torch.equal(a, b), f"rank {rank}, step {step + 1}"
        for key, value in default["final"].items():
            assert torch.equal(gloo["final"][key], value), key


# ------------------------------------------------------------------------------------------------------------------
# Speed-weighted rounds: rank 1 sleeps 0.25 s per computed step, H=4, 14 steps
# ------------------------------------------------------------------------------------------------------------------

SPEED_H, SPEED_STEPS = 4, 14


@pytest.fixture(scope="module")
def speed(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("islands_speed")
    torchrun("islands_fits.py", "--out", str(out), "--fits", "speed", nproc=2)
    return [r["speed"] for r in load_ranks(out, 2)]


def _computed_per_round(computed: list[int]) -> list[int]:
    rounds = [0] * ((SPEED_STEPS + SPEED_H - 1) // SPEED_H)
    for step in computed:
        rounds[(step - 1) // SPEED_H] += 1
    return rounds


def _replay_batches(ranks: list[dict[str, Any]]) -> Batches:
    """Each worker's batch at the steps it computed, None at the steps it skipped."""
    batches: Batches = []
    for record in ranks:
        by_step = dict(zip(record["computed"], record["indices"]))
        batches.append([[by_step[s]] if s in by_step else None for s in range(1, SPEED_STEPS + 1)])
    return batches


def test_slow_worker_computes_fewer_steps_after_the_first_round(speed):
    fast, slow = (_computed_per_round(r["computed"]) for r in speed)
    assert fast == [4, 4, 4, 2]
    assert slow[0] == SPEED_H  # the first round has no measurement yet: everyone computes H
    assert all(1 <= n < SPEED_H for n in slow[1:3]), slow
    assert 1 <= slow[3] <= 2, slow
    # the budget it was given (logged at each outer step, for the next round) fell below H after the first round
    budgets = [m["diloco/round_budget"] for m in speed[1]["outer_steps"]]
    assert len(budgets) == 4 and all(b < SPEED_H for b in budgets), budgets
    assert all(m["diloco/round_budget"] == SPEED_H for m in speed[0]["outer_steps"])
    # every step still counts on every rank: the schedule of outer steps stays aligned
    for record in speed:
        assert record["steps"] == list(range(1, SPEED_STEPS + 1))


def test_skipped_batches_are_drawn_but_not_trained_on(speed):
    for rank, record in enumerate(speed):
        order = sampler_batches(2, rank, epochs=2)
        assert record["indices"] == [order[s - 1] for s in record["computed"]]


def test_speed_weighted_equals_the_replay_of_the_computed_steps(speed):
    batches = _replay_batches(speed)
    sim = simulate_groups(batches, init_seed=1000, inner_steps=SPEED_H, weight_by_computed=True)
    assert sim.syncs == [4, 8, 12, 14]
    assert sim.sync_weights == [[float(n) for n in per_round]
                                for per_round in zip(*(_computed_per_round(r["computed"]) for r in speed))]
    for rank, record in enumerate(speed):
        for step, local in enumerate(record["local"]):
            torch.testing.assert_close(local, sim.local[rank][step], rtol=0, atol=1e-6,
                                       msg=lambda m: f"rank {rank}, step {step + 1}: {m}")
        assert_states_close(float_state(record), sim.final[rank], atol=1e-6)
    # the weighting matters: the plain mean of the same pseudo-gradients gives other weights
    plain = simulate_groups(batches, init_seed=1000, inner_steps=SPEED_H, weight_by_computed=False)
    assert not torch.allclose(plain.local[0][-1], speed[0]["local"][-1], atol=1e-4)


def test_census_rows_of_a_worker_group_take_the_smallest_share_and_the_largest_of_the_rest():
    from lightning_diloco.workers import per_worker

    # two workers of two processes: rows of [share, seconds per step, checkpoint asked]
    rows = torch.tensor([[1.0, 0.2, 0.0], [0.0, 0.1, 0.0],   # worker 0: one shard not finite
                         [1.0, 0.3, 0.0], [1.0, 0.5, 1.0]], dtype=torch.float64)  # worker 1: its 2nd process asked
    assert per_worker(rows, 2).tolist() == [[0.0, 0.2, 0.0], [1.0, 0.5, 1.0]]
    assert torch.equal(per_worker(rows, 1), rows)
