"""Smoke tests of the benchmarks, run as modules of the ``benchmarks`` package from the repository root: bytes'
measured bytes against the formula, overhead's accounting, and the slow-link relay's delay."""

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from benchmarks._common import NOMINAL_BITS, exact_sync_bytes, ring_bytes, window
from benchmarks.bytes import meta_numels
from benchmarks.netlink_relay import DelayRelay
from helpers.launch import ROOT, run
from lightning_diloco.compression import COMPRESSOR_NAMES, get_compressor


def run_benchmark(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m benchmarks.<module> args`` from the repository root; fails the test unless it exits with 0.

    Args:
        module: the benchmark's module in the ``benchmarks`` package.
        *args: its command-line arguments.

    """
    return run([sys.executable, "-m", f"benchmarks.{module}", *args], timeout=600, cwd=ROOT)


@pytest.mark.parametrize("k", [2, 3, 8])
@pytest.mark.parametrize("name", COMPRESSOR_NAMES)
def test_exact_bytes_are_the_ring_formula_plus_scales(name, k):
    """What a sync moves is 2(k-1)/k * P * bits/8 (an all-gather's (k-1) * P * bits/8 for a sparse format, whose sums
    are not re-encoded), plus at most the block scales and the alignment padding."""
    numels = meta_numels("150m")
    ideal = ring_bytes(sum(numels), NOMINAL_BITS[name], k)
    if get_compressor(name).gather_only:
        ideal = (k - 1) * sum(numels) * NOMINAL_BITS[name] / 8
    exact = exact_sync_bytes(numels, name, k)
    overhead = get_compressor(name).bits_per_element / NOMINAL_BITS[name]  # scales: 32 bits per block
    assert ideal - 8 <= exact <= ideal * overhead * 1.001  # (an fp32 all-reduce's bytes are rounded down per bucket)


def test_bytes_benchmark_measures_the_formula(tmp_path):
    """benchmarks.bytes on 2 real processes: DiLoCo's bytes_sent and DDP's bucket bytes equal the formulas."""
    report_file = tmp_path / "bytes.json"
    proc = run_benchmark("bytes", "--measure-k", "2", "--compressions", "none", "int8", "--fragments", "1", "2",
                         "--inner-steps", "2", "--steps", "4", "--json", str(report_file))
    assert proc.returncode == 0
    assert "| tiny  | 2 | DiLoCo int8 |" in proc.stdout
    report = json.loads(report_file.read_text())
    assert report["measured_equals_exact"]
    params = report["models"]["tiny"]
    rows = {(r["model"], r["k"], r["method"]): r for r in report["rows"]}
    ddp = rows[("tiny", 2, "DDP")]
    assert ddp["measured_per_sync"] == pytest.approx(4 * params)  # k = 2: 2(k-1)/k = 1, fp32
    none = rows[("tiny", 2, "DiLoCo none")]
    assert none["measured_per_sync"] == 4 * params
    assert none["measured_per_step_H500"] == pytest.approx(4 * params / 500)
    int8 = rows[("tiny", 2, "DiLoCo int8")]
    assert 1.0 < int8["measured_over_formula"] < 1.02  # one fp32 scale per 256 int8 values, and padding
    peaks = {f["F"]: f["measured_peak"] for f in report["fragments"] if f["model"] == "tiny" and f["k"] == 2}
    assert peaks[1] == 4 * params
    assert peaks[2] < 0.6 * peaks[1]


def test_relay_delays_each_direction_in_order():
    """The slow link's relay holds every datagram for the delay and keeps their order (no TUN needed)."""
    a_outer, a_inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b_outer, b_inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (a_inner, b_inner):
        s.setblocking(False)
    relay = DelayRelay(a_inner.fileno(), b_inner.fileno(), delay=0.05)
    thread = threading.Thread(target=relay.run, kwargs={"until": time.monotonic() + 1.0})
    thread.start()
    sent = time.monotonic()
    for i in range(5):
        a_outer.send(b"a%d" % i)
    b_outer.send(b"b0")
    b_outer.settimeout(2)
    a_outer.settimeout(2)
    received = [b_outer.recv(100) for _ in range(5)]
    arrived = time.monotonic()
    assert a_outer.recv(100) == b"b0"
    thread.join()
    assert received == [b"a%d" % i for i in range(5)]
    assert arrived - sent >= 0.05
    assert relay.packets == [1, 5] and relay.dropped == 0
    for s in (a_outer, a_inner, b_outer, b_inner):
        s.close()


def test_window_counts_whole_rounds():
    result = {
        "times": [1.0, 2.0, 3.0, 5.0], "tokens_per_step": 10, "main_collectives": [0, 0, 2, 2],
        "outer_seconds": [0, 0, 0.5, 0.5], "exchange_seconds": [0, 0, 0.1, 0.1], "thread_cpu": [0, 1, 2, 3],
        "process_cpu": [0, 1, 2, 3], "run_delay": [0, 0, 0, 0], "outer_records": [0, 0, 1, 1], "outer": [{"step": 3}, {"step": 4}],
    }
    w = window(result, 2, 4)
    assert w["steps"] == 2 and w["seconds"] == 3.0
    assert w["tokens_per_second"] == pytest.approx(20 / 3)
    assert w["main_collectives_per_step"] == 1 and w["outer_seconds"] == 0.5
    assert w["outer"] == [{"step": 3}]  # the second record came after the last batch: the end-of-fit flush


def test_overhead_benchmark_accounts_for_the_strategy_and_its_state(tmp_path):
    """benchmarks.overhead on a short run: the outer state is the formula's 8 bytes per parameter (fp32 global weights and
    Nesterov momentum), every measured round holds its outer step, and the strategy's own time is a small, positive
    share of the step that its in-run ratio turns into a step-time ratio."""
    report_file = tmp_path / "overhead.json"
    proc = run_benchmark("overhead", "--inner-steps", "3", "--pairs", "1", "--rounds", "2", "--json", str(report_file))
    assert proc.returncode == 0
    assert "DiLoCoStrategy(inner_steps=3), world size 1" in proc.stdout
    report = json.loads(report_file.read_text())
    pair = report["pairs"][0]
    params = pair["lightning"]["params"]
    assert report["state_bytes"] == 8 * params
    assert pair["diloco"]["outer_steps"] == 2 and pair["lightning"]["outer_steps"] == 0
    assert pair["lightning"]["own_step"] == 0.0
    assert 0.0 < report["own_share"] < 0.5
    assert report["own_ratio"] == pytest.approx(1 / (1 - report["own_share"]))
    assert 0.5 < report["ratio"] < 2.0


def test_speed_weighted_benchmark_reads_each_outer_step_from_the_strategy(tmp_path):
    """benchmarks.speed_weighted under torchrun (which re-runs it with ``-m``): every round's outer step is recorded
    from the strategy's own timings and metrics; in plain rounds the fast worker waits in the outer step for the one
    twice as slow (about H times the difference of their sleeps), the census being part of that wait."""
    h, rounds, sleep = 4, 2, 0.02
    report_file = tmp_path / "speed_weighted.json"
    proc = run_benchmark("speed_weighted", "--inner-steps", str(h), "--rounds", str(rounds), "--step-seconds",
                         str(sleep), "--json", str(report_file))
    assert proc.returncode == 0
    assert "| speed_weighted |" in proc.stdout
    fast, slow = json.loads(report_file.read_text())["ranks"]
    for rank in (fast, slow):
        for mode in ("plain", "speed_weighted"):
            outer = rank[mode]["rounds"]
            assert len(outer) == rounds
            assert all(0.0 <= o["exchange_seconds"] <= o["outer_step_seconds"] <= o["round_seconds"] for o in outer)
    assert all(o["outer_step_seconds"] > 0.5 * h * sleep for o in fast["plain"]["rounds"])
    assert [o["computed"] for o in slow["plain"]["rounds"]] == [h] * rounds


def test_islands_benchmark_fails_over_heals_and_counts_lost_work(tmp_path):
    """benchmarks.islands --quick: an island SIGKILLed mid-round is dropped within seconds while the survivors run on
    without a restart, the relaunched island heals bitwise equal to its peers (at every model size), and the work
    lost is the killed island's open round against the one-world roll-back of every worker."""
    pytest.importorskip("torchft")
    report_file = tmp_path / "islands.json"
    proc = run_benchmark("islands", "--quick", "--heal-params", "10000", "--overhead-rounds", "4", "--out",
                         str(tmp_path / "jobs"), "--json", str(report_file))
    assert proc.returncode == 0
    summary = dict(line.split(": ", 1) for line in proc.stdout.split("\nsummary\n", 1)[1].splitlines() if ": " in line)
    assert 0.0 < float(summary["failover_seconds"]) < 30.0
    assert summary["survivors_restarts"] == "0"
    assert summary["healed_bitwise_equal"] == "True"
    report = json.loads(report_file.read_text())
    (f,) = report["failover"]  # --quick: one kill
    assert f["survivors_islands_after_kill"] == [2, 2]  # the survivors committed without the dead island
    assert f["killed_restarts"] == 1 and f["heals"] >= 1 and f["final_equal"]
    h = f["inner_steps"]
    assert f["islands_lost"] == f["kill_step"] % h and f["survivors_lost"] == 0
    assert f["one_world_lost"] == f["workers"] * (f["kill_step"] % f["ckpt_every"]) > f["islands_lost"]
    for row in report["heal"]:
        assert row["heals"] == 1 and row["bitwise_equal"]
        assert 0.0 <= row["heal_seconds"] <= row["join_seconds"] < 30.0
    o = report["overhead"]
    assert o["islands"]["workers_seen"] == [2] and o["one_world"]["workers_seen"] == [2]
    assert all(o[mode]["outer_steps"] == 2 * (o["rounds"] - 1) for mode in ("islands", "one_world"))
    assert o["ratio"] == pytest.approx(o["islands"]["last_arriver_seconds"] / o["one_world"]["last_arriver_seconds"])
    assert float(summary["outer_step_overhead_ratio"]) == pytest.approx(o["ratio"], abs=0.01)


def test_sharding_benchmark_shards_what_a_process_holds(tmp_path):
    """benchmarks.sharding --quick: FSDP2 inside a worker of 2 holds half of what DDP inside holds, kind by kind (its
    chunks of 0.7M parameters), and rank 0's memory while saving does not grow by a worker's state from k=1 to k=2."""
    report_file = tmp_path / "sharding.json"
    proc = run_benchmark("sharding", "--quick", "--out", str(tmp_path / "jobs"), "--json", str(report_file))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_file.read_text())
    ddp, fsdp = report["inside"]
    assert (ddp["sharding"], fsdp["sharding"]) == ("none", "fsdp")
    params = ddp["parameters"]
    assert ddp["weights"] == ddp["gradients"] == 4 * params and ddp["inner_optimizer"] == ddp["diloco"] == 8 * params
    for kind in ("weights", "gradients", "inner_optimizer", "diloco"):
        assert fsdp[kind] == pytest.approx(ddp[kind] / 2, rel=0.05), kind  # rank 0's chunks: about half
    rows = report["rank0_vs_k"]
    assert [r["k"] for r in rows] == [1, 2]
    assert rows[1]["rank0_save_growth"] - rows[0]["rank0_save_growth"] < rows[0]["worker_state"] / 2


def test_gpu_check_runs_every_check_and_passes_them_on_cpu(tmp_path):
    """The accelerator check's CPU mode: every check has rows, and every correctness row passes (the mixed-device run
    against its reference simulation, the codecs' round trips, bf16-mixed against fp32, outer_device)."""
    rows_file = tmp_path / "rows.json"
    run_benchmark("gpu_check", "--device", "cpu", "--out", str(tmp_path / "runs"), "--json", str(rows_file))
    rows = json.loads(rows_file.read_text())
    assert {row["check"] for row in rows} == {"1", "2", "3", "4", "5", "6"}
    correctness = [row for row in rows if row["correctness"]]
    assert correctness and all(row["ok"] for row in correctness), [r for r in correctness if not r["ok"]]
    assert sum("round trip" in row["what"] for row in rows) == len(COMPRESSOR_NAMES)
    assert any("against the reference simulation" in row["what"] and row["measured"] == "bitwise equal" for row in rows)
    outer_rows = [row for row in rows if row["check"] == "4" and "outer step" in row["what"]]
    assert len(outer_rows) == 2 and all("x the bound" in row["measured"] for row in outer_rows)


def test_gpu_check_fails_a_codec_that_leaves_its_bound(monkeypatch):
    """A round trip beyond the format's error bound is a failed check, not a number in a table."""
    from benchmarks import gpu_check

    class Noisy:
        def __init__(self, codec):
            self.codec = codec

        def __getattr__(self, name):
            return getattr(self.codec, name)

        def decode(self, payload, numel):
            out = self.codec.decode(payload, numel)
            return out + 10 * self.codec.error_bound(out.cpu()).to(out.device) + 1e-3

    monkeypatch.setattr(gpu_check, "get_compressor", lambda name: Noisy(get_compressor(name)))
    rows = gpu_check.check_codecs("cpu")
    assert len(rows) == len(COMPRESSOR_NAMES) and not any(row.ok for row in rows)


def test_gpu_check_distance_is_relative_to_the_training_movement():
    from benchmarks.gpu_check import relative_distance

    start = {"w": torch.zeros(4), "step": torch.tensor(3)}
    trained = {"w": torch.ones(4), "step": torch.tensor(3)}
    assert relative_distance(trained, trained, start) == 0
    assert relative_distance(start, trained, start) == 1  # did not train at all
    assert relative_distance({"w": torch.full((4,), 1.1), "step": torch.tensor(3)}, trained, start) == pytest.approx(0.1)


def test_outer_step_benchmark_holds_one_bucket_and_matches_torchft_bitwise(tmp_path):
    """The outer step of the tiny GPT with 256 KiB buckets: no temporaries beyond the one sync buffer it keeps (at
    most one bucket); and one side-by-side run with torchft's DiLoCo ending on bitwise equal weights."""
    report = tmp_path / "outer.json"
    run_benchmark("outer_step", "--sizes", "tiny", "--repeats", "2", "--bucket-cap-mb", "0.25", "--pairs", "1",
                  "--json", str(report))
    result = json.loads(report.read_text())
    (tiny,) = result["bound"]
    bucket = 0.25 * 2**20
    assert tiny["parameters"] == 869_248 and tiny["median"] > 0 and tiny["bound"] > 0
    assert tiny["temporary_bytes"] <= 0.5 * bucket  # the page-granular peak of the last step
    largest = max(p * 4 for p in (2048 * 128, 128 * 128 * 4))  # the embedding, the MLP's matrices: buckets of their own
    assert bucket <= tiny["kept_bytes"] <= largest
    assert result["torchft"]["equal"], result["torchft"]
