"""Islands mode: independent jobs that meet at outer steps through a coordinator (torchft's lighthouse).

Every island is a separate launch of ``tests/scripts/island_train.py`` (its own world, its own ``MASTER_PORT``), and
the coordinator is a real ``lightning-diloco coordinator`` process. The runs kill, stop and slow islands, and kill
the coordinator, and check what the islands' records say: survivors never restart, the islands' global states are
bitwise equal at every outer step they share, a healed island equals its peers at once, and the survivors' global
weights equal the one-process simulation of the workers that took part (``tests/helpers/reference_groups.py``).
"""

import json
import os
import pickle
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from helpers import launch
from helpers.reference_groups import simulate_groups
from lightning_diloco import DiLoCoStrategy
from lightning_diloco.coordinator import main as coordinator_main
from lightning_diloco.islands import fingerprint

pytest.importorskip("torchft")

H = 4
GRACE, HEARTBEAT = 3.0, 2.0


class Run:
    """A coordinator and its islands, in ``out``."""

    def __init__(self, out: Path, grace: float = GRACE, min_islands: int = 1) -> None:
        self.out = out
        self.port = launch.free_port()
        self.coordinator = self._start_coordinator(grace, min_islands)
        self.islands: dict[str, list[launch.Process]] = {}

    def _start_coordinator(self, grace: float, min_islands: int) -> launch.Process:
        cmd = [sys.executable, "-m", "lightning_diloco", "coordinator", "--port", str(self.port), "--grace",
               str(grace), "--heartbeat-timeout", str(HEARTBEAT), "--min-islands", str(min_islands)]
        process = launch.start(cmd, merge=True)
        deadline = time.monotonic() + 30
        while "listening" not in process.stdout():
            assert process.popen.poll() is None and time.monotonic() < deadline, process.stdout()
            time.sleep(0.05)
        return process

    def restart_coordinator(self) -> None:
        self.coordinator.kill_session()
        self.coordinator.popen.wait()
        self.coordinator = self._start_coordinator(GRACE, 1)

    def start(self, name: str, index: int, *args: str, devices: int = 1, num_islands: int = 3) -> launch.Process:
        cmd = [sys.executable, launch.SCRIPTS / "island_train.py", "--coordinator", f"http://127.0.0.1:{self.port}",
               "--island", name, "--index", str(index), "--num-islands", str(num_islands), "--devices", str(devices),
               "--out", str(self.out), "--inner-steps", str(H), *args]
        env = launch.clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(launch.free_port()))
        process = launch.start(cmd, env=env, merge=True)
        self.islands.setdefault(name, []).append(process)
        return process

    def wait_for(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.logs()}")
            time.sleep(0.05)

    def records(self, name: str) -> list[dict[str, Any]]:
        path = self.out / f"{name}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def finish(self, timeout: float = 150) -> dict[str, list[Any]]:
        done = {name: launch.finish(ps, timeout) for name, ps in self.islands.items()}
        launch.finish([self.coordinator], 1)
        self.done = done
        return done

    def logs(self) -> str:
        return "\n".join(f"--- {n}: {p.stdout()[-3000:]}" for n, ps in self.islands.items() for p in ps)

    def state(self, name: str, rank: int = 0) -> dict[str, Any]:
        return torch.load(self.out / f"{name}-rank{rank}.pt", weights_only=False)


def _by_step(states: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {s["outer_step"]: s for s in states}


def _assert_same(a: dict[str, Any], b: dict[str, Any], what: str) -> None:
    for x, y in zip(a["global"] + a["momentum"], b["global"] + b["momentum"]):
        assert torch.equal(x, y), what


def _check(done: dict[str, list[Any]], expect: dict[str, list[Optional[int]]]) -> None:
    for name, codes in expect.items():
        got = [d.returncode for d in done[name]]
        assert got == codes, f"island {name}: exit codes {got}, expected {codes}:\n" + "\n".join(
            launch.failure_summary(d.stdout) for d in done[name])


# ------------------------------------------------------------------------------------------------------------------
# Death mid-round, then the same island restarted: three islands (one of two processes)
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kill_and_rejoin(tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = Run(tmp_path_factory.mktemp("kill_and_rejoin"))
    pace = ["--max-steps", "48", "--step-seconds", "0.3", "--wait-for", "3"]
    run.start("a", 0, *pace)
    run.start("b", 1, *pace, "--fault", "kill:2")  # dies mid-round, before the first outer step
    run.start("c", 2, *pace, devices=2)
    first_b = run.islands["b"][0]
    run.wait_for(lambda: first_b.popen.poll() is not None, 120, "island b to die")
    run.killed_at = time.time()
    run.start("b", 1, *pace, "--resume")  # its own launcher restarts it; it resumes from its own checkpoint
    _check(run.finish(), {"a": [0], "b": [-signal.SIGKILL, 0], "c": [0]})
    return run


def test_survivors_never_restart_and_commit_without_the_dead_island(kill_and_rejoin: Run):
    run = kill_and_rejoin
    for name in "ac":
        records = run.records(name)
        assert len({r["pid"] for r in records}) == 1, f"island {name} restarted"
        assert records[-1]["global_step"] == 48
    a = run.records("a")
    # the first outer step after the kill is committed without b, about a heartbeat timeout later
    first = next(r for r in a if r["outer_step"] >= 1)
    assert first["islands"] == 2, a
    assert first["time"] - run.killed_at < 15


def test_survivors_equal_the_reference_of_the_workers_present(kill_and_rejoin: Run):
    run = kill_and_rejoin
    a, c0, c1 = run.state("a"), run.state("c", 0), run.state("c", 1)
    b = run.state("b")
    joined = min(s["outer_step"] for s in b["states"] if s["heals"] >= 1 and s["outer_step"] > 0)
    steps = H * joined  # b contributes nothing up to (and at) the outer step it heals in
    batches = [[[idx] for idx in a["indices"][:steps]],
                [[i0, i1] for i0, i1 in zip(c0["indices"][:steps], c1["indices"][:steps])]]
    sim = simulate_groups(batches, init_seed=1000, inner_steps=H, final_sync=False)
    states = _by_step(a["states"])
    for outer_step in range(1, joined + 1):
        got = torch.cat([p.reshape(-1) for p in states[outer_step]["global"]])
        assert torch.equal(got, sim.global_at[H * outer_step]), f"outer step {outer_step} differs"


def test_restarted_island_heals_bitwise_and_stays_in_lockstep(kill_and_rejoin: Run):
    run = kill_and_rejoin
    a, b, c = (_by_step(run.state(n)["states"]) for n in "abc")
    healed = [s for s in run.state("b")["states"] if s["heals"] >= 1 and s["outer_step"] > 0]
    assert healed, "island b never healed"
    joined = healed[0]["outer_step"]
    for step in range(joined, max(a) + 1):
        _assert_same(b[step], a[step], f"b differs from a at outer step {step}")
        _assert_same(c[step], a[step], f"c differs from a at outer step {step}")
    assert max(a) - joined >= 2, "b rejoined too late to train with the others"
    # three islands after the rejoin
    assert any(r["islands"] == 3 and r["outer_step"] > joined for r in run.records("a"))


# ------------------------------------------------------------------------------------------------------------------
# A kill inside the sum, a stopped island, a straggler, the coordinator restarted
# ------------------------------------------------------------------------------------------------------------------


def _lockstep(run: Run, names: str) -> None:
    states = {n: _by_step(run.state(n)["states"]) for n in names}
    common = set.intersection(*(set(s) for s in states.values())) - {0}
    assert common
    first = names[0]
    for other in names[1:]:
        for step in sorted(common):
            _assert_same(states[other][step], states[first][step], f"{other} differs from {first} at {step}")


def test_kill_inside_the_sum_lets_the_others_commit(tmp_path: Path):
    run = Run(tmp_path)
    pace = ["--max-steps", "24", "--step-seconds", "0.1", "--wait-for", "3"]
    run.start("a", 0, *pace)
    run.start("b", 1, *pace, "--fault", "kill_in_sync:8")
    run.start("c", 2, *pace)
    _check(run.finish(), {"a": [0], "b": [-signal.SIGKILL], "c": [0]})
    assert "inside the sum between islands" in run.done["b"][0].stdout
    _lockstep(run, "ac")
    a = run.records("a")
    # b died inside the sum of outer step 2: a and c retried and committed it without b
    assert [r["islands"] for r in a if r["outer_step"] in (1, 2)] == [3, 2]
    assert all(r["islands"] == 2 for r in a if r["outer_step"] >= 2)
    assert a[-1]["global_step"] == 24


def test_stopped_island_is_dropped_and_the_others_go_on(tmp_path: Path):
    run = Run(tmp_path)
    pace = ["--max-steps", "24", "--step-seconds", "0.1", "--wait-for", "3"]
    run.start("a", 0, *pace)
    stopped = run.start("b", 1, *pace, "--fault", "stop:6")
    run.start("c", 2, *pace)
    run.wait_for(lambda: "SIGSTOP" in stopped.stdout(), 120, "island b to stop")
    run.wait_for(lambda: any(r["global_step"] == 24 for r in run.records("a")), 120, "a to finish")
    stopped.kill_session()
    _check(run.finish(), {"a": [0], "b": [-signal.SIGKILL], "c": [0]})
    _lockstep(run, "ac")
    assert run.records("a")[-1]["islands"] == 2


def test_straggler_past_the_grace_window_is_dropped_and_heals(tmp_path: Path):
    run = Run(tmp_path, grace=1.0)
    pace = ["--max-steps", "32", "--step-seconds", "0.15", "--wait-for", "3"]
    run.start("a", 0, *pace)
    run.start("b", 1, *pace, "--fault", "slow:6", "--slow-seconds", "4")
    run.start("c", 2, *pace)
    _check(run.finish(), {"a": [0], "b": [0], "c": [0]})
    a, b = run.records("a"), run.records("b")
    # a and c (a majority of the live islands) waited one grace window, then committed outer step 2 without b
    second = next(r for r in a if r["outer_step"] == 2)
    assert second["islands"] == 2, a
    assert b[-1]["heals"] >= 2, b  # at the start (from the first island), and after its late round was dropped
    _lockstep(run, "abc")
    # b missed the outer steps it was late for, and took part again from the one it healed in
    missed = {r["outer_step"] for r in a} - {r["outer_step"] for r in b}
    assert 2 in missed and max(r["outer_step"] for r in a) not in missed


def test_coordinator_restart_never_splits_the_islands(tmp_path: Path):
    run = Run(tmp_path)
    pace = ["--max-steps", "40", "--step-seconds", "0.2", "--wait-for", "2", "--num-islands", "2",
            "--quorum-timeout", "40"]
    run.start("a", 0, *pace)
    run.start("b", 1, *pace)
    run.wait_for(lambda: any(r["outer_step"] >= 2 for r in run.records("a")), 120, "two outer steps")
    run.restart_coordinator()
    _check(run.finish(), {"a": [0], "b": [0]})  # neither stops: each reconnects until the coordinator is back
    _lockstep(run, "ab")
    a, b = run.state("a")["states"][-1], run.state("b")["states"][-1]
    _assert_same(a, b, "the islands ended on different global states")
    assert a["outer_step"] > 3


def test_every_island_dead_resumes_from_their_checkpoints_in_lockstep(tmp_path: Path):
    run = Run(tmp_path)
    pace = ["--max-steps", "20", "--step-seconds", "0.1", "--num-islands", "2"]
    run.start("a", 0, *pace, "--wait-for", "2", "--fault", "kill:6")
    run.start("b", 1, *pace, "--wait-for", "2", "--fault", "kill:10")
    first = [ps[0] for ps in run.islands.values()]
    run.wait_for(lambda: all(p.popen.poll() is not None for p in first), 120, "both islands to die")
    before = {n: run.records(n)[-1] for n in "ab"}
    assert before["b"]["outer_step"] > before["a"]["outer_step"]  # b went on alone after a died
    run.start("a", 0, *pace, "--resume")
    run.start("b", 1, *pace, "--resume")
    _check(run.finish(), {"a": [-signal.SIGKILL, 0], "b": [-signal.SIGKILL, 0]})
    a, b = run.state("a"), run.state("b")
    # the two checkpoints hold different global states; once both islands are back, one takes the other's (at a
    # join if it is behind, or through a fork if it committed a step alone first), and they train on together
    assert a["states"][-1]["heals"] + b["states"][-1]["heals"] >= 1
    _lockstep(run, "ab")
    assert any(r["islands"] == 2 for r in a["records"])  # after the restart, the two met at outer steps


def test_a_fork_is_detected_and_the_islands_meet_on_one_state(tmp_path: Path):
    """Both islands die; a resumes first, alone, and commits its join on its own older state: a fork at the same
    committed step as b's checkpoint. When b comes back inside a's round, the fingerprints differ, nothing is
    committed, a (the shorter round) steps back and heals from b, and they go on in lockstep."""
    run = Run(tmp_path)
    pace = ["--num-islands", "2", "--step-seconds", "0.1"]
    run.start("a", 0, *pace, "--max-steps", "20", "--wait-for", "2", "--fault", "kill:6")
    run.start("b", 1, *pace, "--max-steps", "20", "--wait-for", "2", "--fault", "kill:10")
    first = [ps[0] for ps in run.islands.values()]
    run.wait_for(lambda: all(p.popen.poll() is not None for p in first), 120, "both islands to die")
    second_a = run.start("a", 0, "--num-islands", "2", "--step-seconds", "3", "--max-steps", "12", "--resume")
    run.wait_for(lambda: len({r["pid"] for r in run.records("a")}) == 2 or second_a.popen.poll() is not None, 120,
                 "a's second life to commit its join alone")
    run.start("b", 1, *pace, "--max-steps", "12", "--resume")
    _check(run.finish(), {"a": [-signal.SIGKILL, 0], "b": [-signal.SIGKILL, 0]})
    a, b = run.state("a"), run.state("b")
    assert a["records"][0]["islands"] == 1  # a's join, alone
    assert a["records"][-1]["forks"] >= 1 and b["records"][-1]["forks"] >= 1
    assert a["states"][-1]["heals"] >= 1 and b["states"][-1]["heals"] == 0
    _lockstep(run, "ab")


# ------------------------------------------------------------------------------------------------------------------
# Units: arguments, the coordinator's command line, the fingerprint
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"island": "a"}, "only apply to islands mode"),
    ({"coordinator": "http://h:1", "compression": "int8"}, "does not support `compression`"),
    ({"coordinator": "http://h:1", "overlap_steps": 1, "inner_steps": 4}, "does not support `overlap_steps`"),
    ({"coordinator": "http://h:1", "processes_per_worker": 2}, "does not support `processes_per_worker`"),
    ({"coordinator": "http://h:1", "quorum_timeout": 0}, "`quorum_timeout` must be a positive"),
    ({"coordinator": ""}, "coordinator"),
])
def test_bad_islands_arguments_say_what_to_do(kwargs: dict[str, Any], match: str):
    with pytest.raises(ValueError, match=match):
        DiLoCoStrategy(**kwargs)


def test_islands_strategy_pickles_for_spawn():
    """`diloco_spawn` pickles the strategy into every process; the link to the coordinator is made there."""
    strategy = DiLoCoStrategy(coordinator="host:29510", island="a", quorum_timeout=30, find_unused_parameters=True)
    copy = pickle.loads(pickle.dumps(strategy))
    assert copy.config == strategy.config and copy.quorum is None
    assert copy._ddp_kwargs == {"find_unused_parameters": True}


def test_coordinator_address_without_scheme_gets_http():
    assert DiLoCoStrategy(coordinator="host:29510").config.coordinator == "http://host:29510"


def test_coordinator_command_line_rejects_bad_values(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        coordinator_main(["--min-islands", "0"])
    assert exit_info.value.code == 2
    assert "min_islands" in capsys.readouterr().err


def test_fingerprint_sees_one_bit_and_ignores_the_device_copy():
    t = [torch.randn(5, 3), torch.randn(4, dtype=torch.float64), torch.randn(3).to(torch.bfloat16)]
    same = [x.clone() for x in t]
    assert fingerprint(t) == fingerprint(same)
    flipped = [x.clone() for x in t]
    flipped[0].view(torch.int32)[2, 1] ^= 1
    assert fingerprint(flipped) != fingerprint(t)
    assert fingerprint(t) != fingerprint(t[:2])
    assert 0 <= fingerprint(t) < 2**52
