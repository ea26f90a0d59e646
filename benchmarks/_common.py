"""Shared by the benchmarks: launching ``_train_gpt`` ranks, reading their results, the bytes formulas, tables."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_diloco.collectives import plan_buckets
from lightning_diloco.compression import get_compressor

#: The repository root: the working directory of every process the benchmarks start, so that ``python -m`` finds
#: this package there.
ROOT = Path(__file__).resolve().parent.parent
#: The benchmark worker, run as ``python -m`` (see :mod:`benchmarks._train_gpt`).
WORKER = f"{__package__}._train_gpt"
#: Wire bits per element without scales, the numbers the paper-style formula uses.
NOMINAL_BITS = {"none": 32, "fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4, "int2": 2, "e3m0": 4, "sparse": 64 * 14 / 4096}


def free_port() -> int:
    """A TCP port that is free on this machine now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, world: int, master_addr: str, port: int, per_node: bool, **extra: str) -> dict[str, str]:
    """Lightning's environment for ``rank``: one process per node (``per_node``) or all ranks on node 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("PL_GLOBAL_SEED", None)
    env.update(MASTER_ADDR=master_addr, MASTER_PORT=str(port), WORLD_SIZE=str(world),
               NODE_RANK=str(rank if per_node else 0), LOCAL_RANK=str(0 if per_node else rank))
    env.update(extra)
    return env


def run_plan(
    runs: list[dict[str, Any]],
    world: int,
    out: Path | None = None,
    prefixes: Sequence[Sequence[str]] | None = None,
    master_addr: str = "127.0.0.1",
    per_node: bool = False,
    extra_env: Sequence[dict[str, str]] | None = None,
    timeout: float = 3600,
) -> dict[str, list[dict[str, Any]]]:
    """Launch ``world`` ranks of the worker on ``runs`` and return ``{name: [rank 0 result, rank 1, ...]}``.

    ``prefixes[r]`` is put before rank ``r``'s command (e.g. ``["ip", "netns", "exec", "ns0"]``); ``per_node`` makes
    every rank a node of its own (``num_nodes=world, devices=1``), as on separate machines.
    """
    out = Path(out or tempfile.mkdtemp(prefix="diloco-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    plan = {"devices": 1 if per_node else world, "num_nodes": world if per_node else 1, "runs": runs}
    plan_file = out / "plan.json"
    plan_file.write_text(json.dumps(plan, indent=1))
    port = free_port()
    procs = []
    for rank in range(world):
        env = worker_env(rank, world, master_addr, port, per_node, **(extra_env[rank] if extra_env else {}))
        command = [sys.executable, "-m", WORKER, "--plan", str(plan_file), "--out", str(out)]
        if prefixes:  # `ip netns exec` does not pass the environment through `env` changes of ours otherwise
            command = [*prefixes[rank], "env", *(f"{k}={v}" for k, v in env.items() if k in _PASSED), *command]
        log = open(out / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log))
    failed = []
    for rank, (proc, log) in enumerate(procs):
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        log.close()
        if code != 0:
            failed.append(rank)
    if failed:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
        tails = "\n".join(f"--- rank {r} ---\n" + (out / f"rank{r}.log").read_text()[-4000:] for r in failed)
        raise RuntimeError(f"benchmark ranks {failed} failed:\n{tails}")
    return {
        run["name"]: [json.loads((out / f"{run['name']}.rank{r}.json").read_text()) for r in range(world)]
        for run in runs
    }


def launch_ranks(module: str, args: Sequence[Sequence[str]], out: Path, timeout: float = 300,
                 **extra_env: str) -> None:
    """Run ``python -m module *args[r]`` for every rank ``r`` at once, each a node of its own (Lightning's environment
    variables set), logging to ``out/rank<r>.log``; raise with the logs' tails unless every rank exits with 0."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank, rank_args in enumerate(args):
        env = worker_env(rank, len(args), "127.0.0.1", port, per_node=True, **extra_env)
        log = open(out / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", module, *rank_args], env=env, cwd=ROOT, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    codes: list[Any] = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append("timeout")
        log.close()
    if any(code != 0 for code in codes):
        tails = "\n".join(f"--- rank {r} ---\n{(out / f'rank{r}.log').read_text()[-3000:]}" for r in range(len(args)))
        raise RuntimeError(f"{module} ranks exited with {codes}:\n{tails}")


_PASSED = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK", "OMP_NUM_THREADS",
           "MKL_NUM_THREADS", "PYTHONWARNINGS", "GLOO_SOCKET_IFNAME", "PATH", "HOME", "VIRTUAL_ENV", "PYTHONPATH",
           "LIGHTNING_DILOCO_CACHE", "TP_SOCKET_IFNAME")


# ------------------------------------------------------------------------------------------------------------------
# Bytes
# ------------------------------------------------------------------------------------------------------------------


def ring_bytes(numel: int, bits: float, k: int) -> float:
    """The ring all-reduce volume each of ``k`` workers sends for ``numel`` elements of ``bits`` bits."""
    return 2 * (k - 1) / k * numel * bits / 8


def exact_sync_bytes(numels: Sequence[int], compression: str, k: int, bucket_cap_mb: float = 128.0) -> int:
    """Bytes one worker sends in one outer sync of tensors of ``numels`` elements, as ``average_`` moves them.

    Follows the documented algorithms of :mod:`lightning_diloco.collectives` (``"auto"``, CPU gloo): fp32 all-reduce
    for ``"none"``, all-gather of the payloads for 2 workers (and always for ``"sparse"``), reduce-scatter +
    all-gather from 3 on; buckets of whole
    tensors aligned to the block size, padded to ``k`` blocks for reduce-scatter; block scales included.
    """
    if k <= 1:
        return 0
    codec = get_compressor(compression)
    algorithm = "all_reduce" if codec.lossless else ("all_gather" if k <= 2 or codec.gather_only else "reduce_scatter")
    total = 0
    for bucket in plan_buckets(list(numels), codec.block_size, bucket_cap_mb):
        length = bucket.numel
        if algorithm == "all_reduce":
            total += 2 * (k - 1) * length * 4 // k
        elif algorithm == "all_gather":
            total += (k - 1) * codec.payload_nbytes(length)
        else:
            length = -(-length // (k * codec.block_size)) * k * codec.block_size
            total += 2 * (k - 1) * codec.payload_nbytes(length // k)
    return total


# ------------------------------------------------------------------------------------------------------------------
# Throughput
# ------------------------------------------------------------------------------------------------------------------


def window(result: dict[str, Any], start: int, end: int) -> dict[str, float]:
    """Measurements between the end of optimizer step ``start`` and the end of step ``end`` (1-based) of one rank.

    ``outer`` holds the outer steps applied in the window (not the end-of-fit flush, which comes after it).
    """
    times = result["times"]
    seconds = times[end - 1] - times[start - 1]
    steps = end - start
    return {
        "seconds": seconds,
        "steps": steps,
        "tokens_per_second": steps * result["tokens_per_step"] / seconds,
        "step_seconds": seconds / steps,
        "main_collectives_per_step": (result["main_collectives"][end - 1] - result["main_collectives"][start - 1])
        / steps,
        "outer_seconds": result["outer_seconds"][end - 1] - result["outer_seconds"][start - 1],
        "outer_cpu": result["outer_cpu"][end - 1] - result["outer_cpu"][start - 1] if "outer_cpu" in result else 0.0,
        "exchange_seconds": result["exchange_seconds"][end - 1] - result["exchange_seconds"][start - 1],
        "own_seconds": result["own_seconds"][end - 1] - result["own_seconds"][start - 1] if "own_seconds" in result
        else 0.0,
        "thread_cpu": result["thread_cpu"][end - 1] - result["thread_cpu"][start - 1],
        "process_cpu": result["process_cpu"][end - 1] - result["process_cpu"][start - 1],
        "run_delay": result["run_delay"][end - 1] - result["run_delay"][start - 1],
        "outer": result["outer"][result["outer_records"][start - 1] : result["outer_records"][end - 1]],
    }


def median(values: Sequence[float]) -> float:
    """The median of ``values``."""
    return statistics.median(values)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells[1:]]
    return "\n".join(lines)


def human_bytes(value: float) -> str:
    """``value`` bytes in kB, MB or GB, three significant digits."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.3g} B"
