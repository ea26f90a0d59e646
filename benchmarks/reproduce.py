"""The DiLoCo paper in miniature: one command runs every comparison and writes the tables and plots.

    python -m benchmarks.reproduce --size {smoke,small,full} [--out DIR] [--report DIR]

On the ``tiny``-family GPT (``_repro_lib.MODEL``) and the offline standard-library corpus, with a fixed token budget per
worker and a held-out validation split:

1. a short synchronous pre-training (one worker) that every run starts from (the paper starts DiLoCo from a model
   pre-trained for 24k steps);
2. Table 2: one worker vs. synchronous DDP with k x batch vs. DiLoCo with k workers and H inner steps (k = 4);
3. Fig. 4: a sweep over H at k = 4;  Table 3: k = 1, 2, 4 (8) workers;  Fig. 6: outer optimizers;
   Fig. 5: i.i.d. vs. non-i.i.d. shards;  compressed pseudo-gradients and Streaming DiLoCo (fragments, overlap);
4. ``tables.md``, ``results.json``, ``results.csv``, ``curves.csv`` and one PNG per table (validation perplexity
   against steps and against bytes sent) in ``--report`` (default: ``--out``).

Runs that share a number of processes run in one launch (``_repro_train``), ``--parallel`` launches at a time. Each
finished run leaves ``<out>/runs/<name>.json``; a second invocation skips runs whose result matches their
configuration, so a crash or an interrupted run loses only the run in progress. Every process uses one thread; the
numbers measure quality, not speed. ``--size smoke`` takes a few steps per run with k = 2 (a test of the pipeline, not
a result). The results and what they mean: ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from . import _repro_lib as lib

#: The repository root: every launch runs ``python -m benchmarks._repro_train`` from there.
ROOT = Path(__file__).resolve().parent.parent


def is_done(spec: dict[str, Any]) -> bool:
    """Whether ``spec``'s result file exists and was written for this very configuration."""
    path = Path(spec["result"])
    if not path.is_file():
        return False
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if result.get("key") != lib.spec_key(spec):
        return False
    return not spec.get("save_checkpoint") or Path(spec["save_checkpoint"]).is_file()


class Launch:
    """One group of runs sharing ``workers`` processes, started as ``workers`` processes at once.

    The processes get ``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_PORT`` (as torchrun would set them), so they start in
    parallel and Lightning does not start them one after the other. Rank 0's output goes to ``logs/<name>.log``.
    """

    def __init__(self, workers: int, specs: list[dict[str, Any]], out: Path, log: Any) -> None:
        self.workers, self.specs, self.log = workers, specs, log
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for folder in ("plans", "logs"):
            (out / folder).mkdir(parents=True, exist_ok=True)
        plan = out / "plans" / f"k{workers}-{stamp}.json"
        plan.write_text(json.dumps({"workers": workers, "runs": specs}, indent=1))
        self.logfile = out / "logs" / f"k{workers}-{stamp}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        for name in ("PL_GLOBAL_SEED", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                     "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"):
            env.pop(name, None)
        port = free_port()
        self.started = time.time()
        self.procs: list[subprocess.Popen] = []
        self.files = []
        log(f"launch k={workers}: {', '.join(s['name'] for s in specs)} (log: {self.logfile})")
        for rank in range(workers):
            rank_env = dict(env)
            if workers > 1:
                rank_env.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(workers),
                                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            path = self.logfile if rank == 0 else self.logfile.with_suffix(f".rank{rank}.log")
            f = open(path, "w")
            self.files.append(f)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "benchmarks._repro_train", str(plan)], stdout=f, stderr=subprocess.STDOUT,
                env=rank_env, cwd=ROOT,
            ))

    def poll(self) -> Optional[int]:
        """``None`` while running; else the exit code (the first failure's, after stopping the other ranks)."""
        codes = [p.poll() for p in self.procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            self.stop()
        elif any(c is None for c in codes):
            return None
        for f in self.files:
            f.close()
        code = failed[0] if failed else 0
        for line in self.logfile.read_text(errors="replace").splitlines():
            if line.startswith("[reproduce]"):
                self.log("  " + line[len("[reproduce] "):])
        took = f"{time.time() - self.started:.0f}s"
        if code:
            tail = "\n".join(self.logfile.read_text(errors="replace").splitlines()[-15:])
            self.log(f"launch k={self.workers} failed after {took} (exit code {code}); end of {self.logfile}:\n{tail}")
        else:
            self.log(f"launch k={self.workers} done in {took}")
        return code

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(pretrain: dict[str, Any], runs: list[dict[str, Any]], k: int, out: Path, log: Any, parallel: int,
            retries: int, wanted: Optional[set[str]]) -> None:
    """Run every unfinished run, ``parallel`` groups at a time; the one-worker group carries the pre-training.

    Groups that start from the pre-trained checkpoint wait for it (``_repro_train.py`` polls for the file), so the
    main group's processes start while the pre-training runs.
    """
    if not is_done(pretrain):  # never let a group start from a checkpoint of another configuration
        Path(pretrain["save_checkpoint"]).unlink(missing_ok=True)
    queue = sorted({r["workers"] for r in runs} | {1}, key=lambda w: (w == 8, w != 1, w != k, w))
    attempts = {w: 0 for w in queue}
    running: list[Launch] = []

    def todo(workers: int) -> list[dict[str, Any]]:
        specs = [r for r in runs if r["workers"] == workers and not is_done(r)
                 and (wanted is None or r["name"] in wanted)]
        if workers == 1 and not is_done(pretrain):
            specs.insert(0, pretrain)
        return specs

    try:
        while queue or running:
            while queue and len(running) < parallel:
                workers = queue.pop(0)
                specs = todo(workers)
                if specs:
                    attempts[workers] += 1
                    running.append(Launch(workers, specs, out, log))
            time.sleep(1)
            for launch in list(running):
                code = launch.poll()
                if code is None:
                    continue
                running.remove(launch)
                if launch.workers == 1 and not is_done(pretrain):
                    if attempts[1] <= retries:
                        queue.insert(0, 1)
                        continue
                    log("the pre-training failed; stopping every launch")
                    for other in running:
                        other.stop()
                    return
                if todo(launch.workers) and attempts[launch.workers] <= retries:
                    queue.insert(0, launch.workers)
    finally:
        for launch in running:
            launch.stop()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(lib.SIZES), default="small", help="budget of the runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="work directory: pre-trained checkpoint, run results, logs (default runs/reproduce/SIZE)")
    parser.add_argument("--report", type=Path, default=None, help="where tables, plots and raw numbers go (--out)")
    parser.add_argument("--only", default=None, help="comma-separated run names to run (the others are reported"
                        " if they are already done)")
    parser.add_argument("--report-only", action="store_true", help="write the report from the finished runs only")
    parser.add_argument("--retries", type=int, default=1, help="relaunches of a launch that failed")
    parser.add_argument("--parallel", type=int, default=2, help="groups of runs (launches) that run at once")
    parser.add_argument("--no-report", action="store_true", help="run only; write no report")
    args = parser.parse_args(argv)
    out = (args.out or Path("runs") / "reproduce" / args.size).resolve()
    report_dir = (args.report or out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    logfile = open(out / "reproduce.log", "a")

    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{time.time() - started:6.0f}s] {message}"
        print(line, flush=True)
        logfile.write(line + "\n")
        logfile.flush()

    pretrain, runs = lib.build_plan(args.size, out)
    wanted = None if args.only is None else set(args.only.split(","))
    if wanted is not None and not wanted <= {r["name"] for r in runs}:
        parser.error(f"unknown run names: {sorted(wanted - {r['name'] for r in runs})}")
    failed: list[str] = []
    if not args.report_only:
        log(f"size {args.size}: {len(runs)} runs, work directory {out}")
        run_all(pretrain, runs, lib.SIZES[args.size]["k"], out, log, args.parallel, args.retries, wanted)
        failed = [r["name"] for r in runs if not is_done(r) and (wanted is None or r["name"] in wanted)]
        missing = f"; not finished: {', '.join(failed)}" if failed else ""
        log(f"runs finished in {time.time() - started:.0f}s{missing}")
    if args.no_report:
        return 1 if failed else 0
    from . import _repro_report as report  # matplotlib is only needed now

    written = report.write_report(args.size, pretrain, runs, report_dir, time.time() - started)
    log(f"report: {', '.join(str(p.relative_to(report_dir)) for p in written)} in {report_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
