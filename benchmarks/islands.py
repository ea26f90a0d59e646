"""Islands mode under failure: failover time, heal time against model size, outer-step overhead, work lost.

Every island is a job of its own (``python -m benchmarks.island_job``: one process, ``DiLoCoStrategy(coordinator=...,
island=..., inner_steps=H, sync_timeout=5, quorum_timeout=60)``, a MASTER_PORT of its own) training a two-layer MLP
on random data; the coordinator (torchft's lighthouse, :func:`lightning_diloco.coordinator.start_coordinator`) runs in
this process with ``grace=3`` s and ``heartbeat_timeout=2`` s. Every job writes what it saw, with wall-clock times,
to a JSON-lines file (see :mod:`benchmarks.island_job`); all figures below are read from those records, that is from
the strategy itself (its counters, ``timings.outer_seconds``, ``last_metrics``, ``quorum.heals``). Nothing of the
package is patched.

1. **Failover** (``failover``): three islands of one process; island ``c`` SIGKILLs itself after inner step
   ``--kill-phase`` of a round (mid-round), once it has committed ``--kill-after-outer`` outer steps after its join
   (it writes the time first). *Failover seconds*: from the kill to the moment both survivors have committed their
   next outer step (their ``outer`` records). Part of it is the rest of the round, which the survivors would have
   trained anyway; the table also gives the survivors' time inside that outer step (waiting until the coordinator
   drops the dead island: its heartbeat timeout or the grace, whichever ends first) against a normal outer step.
   *Survivors' restarts*: the lives (process starts) of each survivor minus one; 0 means the survivors' processes ran
   throughout. ``--kills`` repeats the whole run (fresh islands, a fresh coordinator) for a median. Island ``c`` is
   then relaunched at once with ``ckpt_path`` of its last checkpoint
   (``ModelCheckpoint(every_n_train_steps=--ckpt-every)``); *bitwise equal* says whether, right after it joined (the
   start of its first batch), the SHA-256 of its global weights and outer momentum equals the survivors' at the same
   outer step.
2. **Heal time against model size** (``heal``): for each of ``--heal-params``, one resident island trains alone;
   after its second outer step a fresh island (no checkpoint, so behind) starts and joins. *Join seconds*: the growth
   of the joiner's ``timings.outer_seconds`` during ``on_train_start``, where the strategy joins (``Rounds.join``):
   from its quorum request until it has healed and committed the outer step with the resident. That includes waiting
   for the resident to reach the end of its round; *heal seconds* leaves it out: from the moment both were in the
   quorum (the later of the joiner's ``on_train_start`` and the start of the resident's last inner optimizer step of
   that round, so its optimizer step and pseudo-gradient are in it) until the strategy reported the heal (its log
   message, after the peer's state was received and loaded). The state moved is the global weights and the outer
   momentum: 8 bytes per parameter.
3. **Outer-step overhead** (``overhead``): the same two workers, (a) as two islands (coordinator with
   ``min_islands=2``, so both start together) and (b) as one DiLoCo world of two processes (Lightning's launcher,
   ``devices=2``, no coordinator). Per outer step: the growth of ``timings.outer_seconds`` on the training thread
   (the census or quorum, the sum, the outer step), median over the outer steps after the first: of the worker that
   arrived last at each outer step (the smaller of the two: it waits for no one, so this is the outer step's own
   cost), and of both workers (the first to arrive also waits for the other); beside it the median
   ``diloco/sync_seconds``. The ratio is islands over one world, of the last-arriver figures.
4. **Work lost per failure, in island-steps** (from the failover run): an island-step is one inner step of one
   worker. *Islands*: the inner steps that were computed and then thrown away: the killed island's steps of its open
   round (its pseudo-gradient never reached a sum: the DiLoCo step of the kill minus that of its last committed outer
   step, measured), plus the survivors' (0: their records show every outer step after the kill committed, their step
   counters never went back and their processes were never restarted). The relaunched island restores its checkpoint,
   but then takes the survivors' state, so nothing it computed before is redone either. *One world* (today's torchrun
   restart-and-roll-back, computed from the same schedule, not run): every worker goes back to the last checkpoint,
   ``workers x (steps since the last checkpoint at the kill)``, with checkpoints every ``--ckpt-every`` steps; the
   table also gives the larger figure in which the survivors train on to the end of the round before the outer step
   fails. Beside the measured kill, both are given for a kill at a uniformly random step: ``(H-1)/2`` for islands,
   ``workers x (C-1)/2`` for one world. The time the killed island was down (its steps not taken) is printed apart:
   it is not work thrown away; in one world every worker is down while the whole job restarts, in islands only the
   killed one.

    python -m benchmarks.islands            # about 1.5 minutes on 2 CPU cores (3 kills, 3 model sizes)
    python -m benchmarks.islands --quick    # about 45-60 s: one kill, models of 10k and 1M parameters, 8 outer steps
    python -m benchmarks.islands --smoke    # the failover run only (about 30 s)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ._common import ROOT, free_port, human_bytes, median, table

#: The job every island (and the one-world run) is, run as ``python -m`` from the repository root.
JOB = f"{__package__}.island_job"
#: What the coordinator is given: an island late by more than GRACE seconds does not hold the others; one without a
#: heartbeat for HEARTBEAT seconds is left out.
GRACE, HEARTBEAT = 3.0, 2.0
#: Seconds any one wait of the benchmark may take before it gives up (and kills what it started).
WAIT = 120.0
_FOREIGN = ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
            "MASTER_PORT")


# ------------------------------------------------------------------------------------------------------------------
# Jobs and their records
# ------------------------------------------------------------------------------------------------------------------


class Jobs:
    """The jobs this benchmark started (each in a session of its own, so that it and its ranks can be stopped)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, *args: str, coordinator: Optional[str] = None) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items()
               if k not in _FOREIGN and not k.startswith(("PL_", "TORCHELASTIC_", "SLURM_", "TORCHFT_"))}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
        command = [sys.executable, "-m", JOB, "--out", str(self.out), "--name", name, *args]
        if coordinator:
            command += ["--coordinator", coordinator]
        lives = sum(1 for n, _ in self.procs if n == name)
        log = open(self.out / f"{name}.life{lives}.log", "w")
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def wait(self, proc: subprocess.Popen, timeout: float = WAIT) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(map(str, proc.args))} did not end in {timeout:g} s") from None

    def check(self, proc: subprocess.Popen, returncode: int = 0) -> None:
        code = self.wait(proc)
        if code != returncode:
            name = next(n for n, p in self.procs if p is proc)
            logs = "\n".join(f"--- {p.name} ---\n{p.read_text()[-3000:]}"
                             for p in sorted(self.out.glob(f"{name}.life*.log")))
            raise RuntimeError(f"job {name} exited with {code} (expected {returncode}):\n{logs}")

    def stop_all(self) -> None:
        """SIGKILL the sessions of the jobs still running (after a failure of the benchmark)."""
        for _, proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=30)


def records(out: Path, name: str, rank: int = 0) -> list[dict[str, Any]]:
    """Every event the job ``name`` (rank ``rank``) wrote, over all its lives, in order; each has its ``life``."""
    path = out / f"{name}.rank{rank}.jsonl"
    if not path.exists():
        return []
    result, life = [], -1
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:  # a line being written
            continue
        if event["event"] == "life":
            life += 1
        event["life"] = life
        result.append(event)
    return result


def of(events: list[dict[str, Any]], kind: str, life: Optional[int] = None) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == kind and (life is None or e["life"] == life)]


def wait_until(what: str, ready: Callable[[], Any], procs: list[subprocess.Popen], timeout: float = WAIT) -> Any:
    """Poll ``ready`` until it returns something true; fail if a job of ``procs`` ended first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        ended = [p for p in procs if p.poll() is not None]
        if ended:
            raise RuntimeError(f"a job ended (exit {ended[0].returncode}) while waiting for {what}")
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def write_stop(path: Path, outer_step: int) -> None:
    """Tell every job to stop after outer step ``outer_step`` (written whole, then renamed into place)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"outer_step": outer_step}))
    os.replace(tmp, path)


class Coordinator:
    """A coordinator in this process, on a free port of 127.0.0.1."""

    def __init__(self, min_islands: int = 1) -> None:
        os.environ.setdefault("RUST_LOG", "warn")  # torchft's lighthouse logs every quorum at "info" to our stderr
        from lightning_diloco.coordinator import start_coordinator

        self.server = start_coordinator(port=0, min_islands=min_islands, grace=GRACE, heartbeat_timeout=HEARTBEAT,
                                        host="127.0.0.1")
        self.address = f"http://127.0.0.1:{self.server.address().rsplit(':', 1)[1]}"

    def __enter__(self) -> "Coordinator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()


def per_outer_step(events: list[dict[str, Any]], skip: int = 1) -> tuple[list[float], list[float]]:
    """The growth of ``timings.outer_seconds`` in each outer step after the first ``skip`` (from the first batch on),
    and their ``diloco/sync_seconds``."""
    base = of(events, "first_batch")[0]["outer_seconds"]
    seconds, sync = [], []
    for e in of(events, "outer"):
        seconds.append(e["outer_seconds"] - base)
        sync.append(e["sync_seconds"])
        base = e["outer_seconds"]
    return seconds[skip:], sync[skip:]


# ------------------------------------------------------------------------------------------------------------------
# The scenarios
# ------------------------------------------------------------------------------------------------------------------


def failover(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Three islands, one killed mid-round and relaunched from its last checkpoint (figures 1 and 4)."""
    out.mkdir(parents=True)
    h = args.inner_steps
    jobs = Jobs(out)
    stop = out / "stop.json"
    common = ["--params", str(args.failover_params), "--inner-steps", str(h), "--step-seconds", str(args.step_seconds),
              "--ckpt-every", str(args.ckpt_every), "--digest", "--stop-file", str(stop), "--max-steps", "100000"]
    names = ("a", "b", "c")
    try:
        with Coordinator() as coordinator:
            kill = ["--kill-after-outer", str(args.kill_after_outer), "--kill-phase", str(args.kill_phase)]
            procs = {n: jobs.start(n, *common, "--seed", str(i), *(kill if n == "c" else []),
                                   coordinator=coordinator.address) for i, n in enumerate(names)}
            survivors = [procs["a"], procs["b"]]
            jobs.check(procs["c"], returncode=-signal.SIGKILL)
            kill = of(records(out, "c"), "kill")[0]
            last = out / "c-ckpt" / "last.ckpt"
            if not last.exists():
                raise RuntimeError(f"island c wrote no checkpoint before it was killed (raise --kill-after-outer"
                                   f" above --ckpt-every / H = {args.ckpt_every / h:g})")
            relaunched = jobs.start("c", *common, "--seed", "2", "--resume", str(last), coordinator=coordinator.address)
            joined = wait_until("the relaunched island's first batch",
                                lambda: of(records(out, "c"), "first_batch", life=1), [*survivors, relaunched])[0]
            write_stop(stop, joined["outer_step"] + args.after_heal)
            for proc in (*survivors, relaunched):
                jobs.check(proc)
    finally:
        jobs.stop_all()

    ev = {n: records(out, n) for n in names}
    lives = {n: len(of(ev[n], "life")) for n in names}
    pids = {n: sorted({e["pid"] for e in of(ev[n], "life")}) for n in names}
    survivor_names = ("a", "b")
    after = {n: [e for e in of(ev[n], "outer") if e["time"] > kill["time"]] for n in survivor_names}
    first_after = {n: after[n][0] for n in survivor_names}
    commit_time = max(e["time"] for e in first_after.values())
    failover_seconds = commit_time - kill["time"]
    # the survivors' time in that outer step, against their other outer steps (after their join)
    in_step, normal = [], []
    for n in survivor_names:
        outer = of(ev[n], "outer")
        seconds, _ = per_outer_step(ev[n], skip=0)
        i = outer.index(first_after[n])
        in_step.append(seconds[i])
        normal += seconds[:i] + seconds[i + 1:]
    # the heal: the relaunched island against the survivors at the same outer step
    joined = of(ev["c"], "first_batch", life=1)[0]
    relaunch_start = of(ev["c"], "train_start", life=1)[0]["time"]
    arrived = [e["time"] for n in survivor_names for e in of(ev[n], "round_end")
               if e["rounds_step"] == joined["rounds_step"]]
    healed = of(ev["c"], "healed", life=1)
    peers_then = {n: next((e for e in of(ev[n], "outer") if e["outer_step"] == joined["outer_step"]), None)
                  for n in survivor_names}
    bitwise = all(p is not None and p["digest"] == joined["digest"] for p in peers_then.values())
    final = {n: of(ev[n], "outer")[-1] for n in names}
    final_equal = len({(e["outer_step"], e["digest"]) for e in final.values()}) == 1
    # work lost: the killed island's open round; the survivors' counters never went back
    kill_step = kill["rounds_step"]
    committed_step = kill_step - kill_step % h
    last_commit = [e for e in of(ev["c"], "outer", life=0)][-1]
    islands_lost = kill_step - last_commit["rounds_step"]
    monotone = all(
        all(x["rounds_step"] < y["rounds_step"] and y["outer_step"] == x["outer_step"] + 1
            for x, y in zip(of(ev[n], "outer"), of(ev[n], "outer")[1:]))
        for n in survivor_names
    )
    survivors_lost = 0 if monotone and all(lives[n] == 1 for n in survivor_names) else None
    since_ckpt = kill_step % args.ckpt_every
    round_end = committed_step + h
    workers = len(names)
    return {
        "params": of(ev["a"], "model")[0]["params"],
        "kill": kill, "failover_seconds": failover_seconds,
        "rest_of_round_steps": h - kill_step % h,
        "survivor_outer_step_seconds": max(in_step), "normal_outer_step_seconds": median(normal) if normal else None,
        "survivors_islands_after_kill": [first_after[n]["islands"] for n in survivor_names],
        "survivors_restarts": {n: lives[n] - 1 for n in survivor_names}, "pids": pids,
        "killed_restarts": lives["c"] - 1,
        "downtime_seconds": joined["time"] - kill["time"],
        "join_seconds": joined["join_seconds"], "heals": joined["heals"], "joined_outer_step": joined["outer_step"],
        "heal_seconds": healed[0]["time"] - max([relaunch_start, *arrived]) if healed else None,
        "healed_bitwise_equal": bitwise, "final_equal": final_equal,
        "resumed_from_step": of(ev["c"], "train_start", life=1)[0]["global_step"],
        "kill_step": kill_step, "last_commit_step": last_commit["rounds_step"],
        "islands_lost": islands_lost, "survivors_lost": survivors_lost,
        "one_world_lost": workers * since_ckpt,
        "one_world_lost_to_round_end": since_ckpt + (workers - 1) * (round_end - (kill_step - since_ckpt)),
        "steps_since_checkpoint": since_ckpt, "ckpt_every": args.ckpt_every, "workers": workers, "inner_steps": h,
    }


def heal(out: Path, args: argparse.Namespace, params: int) -> dict[str, Any]:
    """A fresh island joins a resident one of ``params`` parameters (figure 2)."""
    out = out / f"heal-{params}"
    out.mkdir()
    jobs = Jobs(out)
    stop = out / "stop.json"
    common = ["--params", str(params), "--inner-steps", str(args.inner_steps), "--step-seconds",
              str(args.step_seconds), "--digest", "--stop-file", str(stop), "--max-steps", "100000"]
    try:
        with Coordinator() as coordinator:
            resident = jobs.start("resident", *common, "--seed", "0", coordinator=coordinator.address)
            wait_until("the resident's second outer step", lambda: len(of(records(out, "resident"), "outer")) >= 2,
                       [resident])
            joiner = jobs.start("joiner", *common, "--seed", "1", coordinator=coordinator.address)
            joined = wait_until("the joiner's first batch", lambda: of(records(out, "joiner"), "first_batch"),
                                [resident, joiner])[0]
            write_stop(stop, joined["outer_step"] + 1)
            for proc in (resident, joiner):
                jobs.check(proc)
    finally:
        jobs.stop_all()
    r, j = records(out, "resident"), records(out, "joiner")
    start = of(j, "train_start")[0]["time"]
    healed = of(j, "healed")
    arrived = [e["time"] for e in of(r, "round_end") if e["rounds_step"] == joined["rounds_step"]]
    in_quorum = max([start, *arrived[-1:]])
    peer = next((e for e in of(r, "outer") if e["outer_step"] == joined["outer_step"]), None)
    n = of(j, "model")[0]["params"]
    return {
        "params": n, "state_bytes": 8 * n, "join_seconds": joined["join_seconds"],
        "heal_seconds": healed[0]["time"] - in_quorum if healed else None, "heals": joined["heals"],
        "waited_for_peer_seconds": in_quorum - start,
        "bitwise_equal": peer is not None and peer["digest"] == joined["digest"],
    }


def overhead(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The same two workers as two islands and as one world of two processes (figure 3)."""
    out = out / "overhead"
    out.mkdir()
    h, rounds = args.overhead_inner_steps, args.overhead_rounds
    common = ["--params", str(args.overhead_params), "--inner-steps", str(h), "--step-seconds",
              str(args.overhead_step_seconds)]
    jobs = Jobs(out)
    try:
        with Coordinator(min_islands=2) as coordinator:
            stop = out / "stop.json"
            write_stop(stop, rounds)
            islands = [jobs.start(n, *common, "--seed", str(i), "--stop-file", str(stop), "--max-steps", "100000",
                                  coordinator=coordinator.address) for i, n in enumerate(("island0", "island1"))]
            for proc in islands:
                jobs.check(proc)
        world = jobs.start("world", *common, "--devices", "2", "--max-steps", str(h * rounds))
        jobs.check(world)
    finally:
        jobs.stop_all()
    result: dict[str, Any] = {"params": of(records(out, "world"), "model")[0]["params"], "inner_steps": h,
                              "rounds": rounds}
    for mode, runs in (("islands", [("island0", 0), ("island1", 0)]), ("one_world", [("world", 0), ("world", 1)])):
        seconds, sync, islands_seen = [], [], set()
        by_step: dict[int, list[float]] = {}
        for name, rank in runs:
            ev = records(out, name, rank)
            s, y = per_outer_step(ev)
            seconds += s
            sync += y
            for e, t in zip(of(ev, "outer")[1:], s):
                by_step.setdefault(e["outer_step"], []).append(t)
            islands_seen |= {e["islands"] for e in of(ev, "outer")}
        last_arriver = [min(ts) for ts in by_step.values() if len(ts) == len(runs)]
        result[mode] = {"outer_step_seconds": median(seconds), "last_arriver_seconds": median(last_arriver),
                        "sync_seconds": median(sync), "outer_steps": len(seconds), "workers_seen": sorted(islands_seen)}
    result["ratio"] = result["islands"]["last_arriver_seconds"] / result["one_world"]["last_arriver_seconds"]
    result["ratio_all"] = result["islands"]["outer_step_seconds"] / result["one_world"]["outer_step_seconds"]
    return result


# ------------------------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------------------------


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    kills = results["failover"]
    f = kills[0]
    h, c, workers = f["inner_steps"], f["ckpt_every"], f["workers"]
    print(f"## 1. Failover: 3 islands of 1 process, MLP of {f['params']:,} parameters, H={h},"
          f" {args.step_seconds * 1000:g} ms per step (paced); coordinator grace {GRACE:g} s, heartbeat timeout"
          f" {HEARTBEAT:g} s; {len(kills)} kill(s), each in a fresh set of islands\n")
    rows = [
        ("killed after DiLoCo step", lambda k: f"{k['kill_step']} ({k['kill_step'] % h} of {h},"
                                               f" {k['rest_of_round_steps']} to go)"),
        ("failover s: kill -> survivors' next committed outer step", lambda k: f"{k['failover_seconds']:.2f}"),
        ("  survivors' time in that outer step s (a normal one)",
         lambda k: f"{k['survivor_outer_step_seconds']:.2f}" + (
             f" ({k['normal_outer_step_seconds']:.3f})" if k["normal_outer_step_seconds"] is not None else "")),
        ("  islands in that outer step (a, b)", lambda k: ", ".join(map(str, k["survivors_islands_after_kill"]))),
        ("survivors' restarts (a, b)", lambda k: ", ".join(str(v) for v in k["survivors_restarts"].values())),
        ("relaunched island: ckpt_path of global step", lambda k: k["resumed_from_step"]),
        ("  down s: kill -> its first batch", lambda k: f"{k['downtime_seconds']:.1f}"),
        ("  join s (timings.outer_seconds in on_train_start)", lambda k: f"{k['join_seconds']:.2f}"),
        ("  heal s (in quorum -> healed)", lambda k: "-" if k["heal_seconds"] is None else f"{k['heal_seconds']:.2f}"),
        ("  heals", lambda k: k["heals"]),
        ("  bitwise equal to its peers after the heal", lambda k: f"{k['healed_bitwise_equal']}"
                                                                  f" (outer step {k['joined_outer_step']})"),
        ("all three equal at the last outer step", lambda k: k["final_equal"]),
    ]
    print(table(["figure", *(f"kill {i + 1}" for i in range(len(kills)))],
                [[label, *(value(k) for k in kills)] for label, value in rows]))
    print("\nsurvivors' restarts: process starts of islands a and b minus one (pids "
          + "; ".join(f"{k['pids']['a']}, {k['pids']['b']}" for k in kills) + "); down: from the kill to the relaunched"
          " island's first batch, its start-up included; bitwise: SHA-256 of global weights + outer momentum against"
          " both survivors' at the same outer step")

    print("\n## 4. Work lost per failure (island-steps: inner steps computed, then thrown away), first kill\n")
    print(table(["mode", "killed worker", "survivors", "total", "how"], [
        ["islands (measured)", f["islands_lost"], f["survivors_lost"], f["islands_lost"] + (f["survivors_lost"] or 0),
         f"its open round: step {f['kill_step']} - last commit at {f['last_commit_step']}"],
        ["one world, torchrun roll-back (schedule)", f["steps_since_checkpoint"],
         (workers - 1) * f["steps_since_checkpoint"], f["one_world_lost"],
         f"{workers} workers x {f['steps_since_checkpoint']} steps since the checkpoint (every {c})"],
        ["  ... survivors training on to the round's end", f["steps_since_checkpoint"],
         f["one_world_lost_to_round_end"] - f["steps_since_checkpoint"], f["one_world_lost_to_round_end"],
         "they fail only at their outer step"],
        ["islands, kill at a uniformly random step", f"{(h - 1) / 2:g}", 0, f"{(h - 1) / 2:g}",
         "mean of its open round, (H-1)/2"],
        ["one world, kill at a uniformly random step", f"{(c - 1) / 2:g}", f"{(workers - 1) * (c - 1) / 2:g}",
         f"{workers * (c - 1) / 2:g}", f"{workers} workers x mean steps since the checkpoint, (C-1)/2"],
    ]))

    if results.get("heal"):
        print(f"\n## 2. Heal time against model size (a fresh island joins a resident one; H={args.inner_steps})\n")
        print(table(["parameters", "state moved", "join seconds", "of which waiting for the peer's outer step",
                     "heal seconds (in quorum -> healed)", "heals", "bitwise equal"], [
            [f"{r['params']:,}", human_bytes(r["state_bytes"]), f"{r['join_seconds']:.2f}",
             f"{r['waited_for_peer_seconds']:.2f}", "-" if r["heal_seconds"] is None else f"{r['heal_seconds']:.2f}",
             r["heals"], r["bitwise_equal"]] for r in results["heal"]
        ]))

    o = results.get("overhead")
    if o:
        print(f"\n## 3. Outer-step overhead: 2 workers, MLP of {o['params']:,} parameters, H={o['inner_steps']},"
              f" {o['rounds']} outer steps, {args.overhead_step_seconds * 1000:g} ms pacing per step (medians over"
              " the outer steps after the first)\n")
        print(table(["mode", "s per outer step, last worker to arrive", "s per outer step, both workers",
                     "diloco/sync_seconds", "outer steps", "workers"], [
            [label, f"{o[k]['last_arriver_seconds']:.4f}", f"{o[k]['outer_step_seconds']:.4f}",
             f"{o[k]['sync_seconds']:.4f}", o[k]["outer_steps"], ",".join(map(str, o[k]["workers_seen"]))]
            for k, label in (("islands", "2 islands (coordinator)"), ("one_world", "one world of 2 (devices=2)"))
        ]))
        print("\nseconds per outer step: the growth of strategy.timings.outer_seconds on the training thread in that"
              " outer step. The last worker to arrive (the smaller of the two in each outer step) waits for no one:"
              " its time is the cost of the outer step itself; both workers' includes the first one's wait for the"
              " other.")
        print(f"islands / one world: {o['ratio']:.2f}x (last worker to arrive), {o['ratio_all']:.2f}x (both workers)")

    print("\nsummary")
    print(f"failover_seconds: {median([k['failover_seconds'] for k in kills]):.2f}"
          + (f" (median of {len(kills)}: " + ", ".join(f"{k['failover_seconds']:.2f}" for k in kills) + ")"
             if len(kills) > 1 else ""))
    print(f"survivors_restarts: {sum(sum(k['survivors_restarts'].values()) for k in kills)}")
    print(f"healed_bitwise_equal: {all(k['healed_bitwise_equal'] for k in kills)}")
    lost = f["islands_lost"] + (f["survivors_lost"] or 0)
    print(f"island_steps_lost: islands {lost}, one world {f['one_world_lost']} (first kill)")
    if results.get("heal"):
        print("heal_seconds: " + ", ".join(f"{r['params']}={r['heal_seconds']:.2f}" for r in results["heal"]
                                           if r["heal_seconds"] is not None))
    if o:
        print(f"outer_step_overhead_ratio: {o['ratio']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer outer steps (under 3 minutes)")
    parser.add_argument("--smoke", action="store_true", help="the failover run only")
    parser.add_argument("--inner-steps", type=int, default=4, help="H of the failover and heal runs")
    parser.add_argument("--step-seconds", type=float, default=0.1, help="pacing of the failover and heal runs")
    parser.add_argument("--failover-params", type=int, default=10_000)
    parser.add_argument("--kills", type=int, default=None, help="failover runs (default 3; --quick, --smoke: 1)")
    parser.add_argument("--kill-after-outer", type=int, default=3)
    parser.add_argument("--kill-phase", type=int, default=2, help="the killed island's inner step in its round")
    parser.add_argument("--ckpt-every", type=int, default=8, help="checkpoint interval in steps (both modes)")
    parser.add_argument("--after-heal", type=int, default=2, help="outer steps the islands train after the heal")
    parser.add_argument("--heal-params", type=int, nargs="+", default=None,
                        help="model sizes of the heal runs (default 10k 1M 10M; --quick: 10k 1M)")
    parser.add_argument("--overhead-params", type=int, default=1_000_000)
    parser.add_argument("--overhead-inner-steps", type=int, default=8)
    parser.add_argument("--overhead-rounds", type=int, default=None, help="outer steps (default 20; --quick: 8)")
    parser.add_argument("--overhead-step-seconds", type=float, default=0.02, help="pacing of the overhead runs")
    parser.add_argument("--out", type=Path, default=None, help="where the jobs write (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    if args.heal_params is None:
        args.heal_params = [10_000, 1_000_000] if args.quick else [10_000, 1_000_000, 10_000_000]
    if args.kills is None:
        args.kills = 1 if args.quick or args.smoke else 3
    if args.overhead_rounds is None:
        args.overhead_rounds = 8 if args.quick else 20
    if not 0 < args.kill_phase < args.inner_steps:
        parser.error("--kill-phase must be an inner step inside a round: 1 .. H-1")

    out = args.out or Path(tempfile.mkdtemp(prefix="diloco-islands-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {"failover": [failover(out / f"kill{i + 1}", args) for i in range(args.kills)]}
    if not args.smoke:
        results["heal"] = [heal(out, args, p) for p in args.heal_params]
        results["overhead"] = overhead(out, args)
    results["wall_seconds"] = time.perf_counter() - started
    report(results, args)
    print(f"\nwall time {results['wall_seconds']:.0f} s; the jobs' records are in {out}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
