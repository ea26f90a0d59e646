"""What dropping a straggler's late rounds costs, in the miniature: the tiny GPT on three live islands.

Islands mode drops the pseudo-gradient of an island that arrives after the coordinator's grace window: the others
commit without it, and the late island heals from them at its next quorum (``docs/islands.md``). This benchmark runs
``configs/tiny.yaml`` through the command line as three islands (three launches of ``lightning-diloco fit``, one
process each, each on its own third of the data, ``--data.shard i --data.num_shards 3``) with a coordinator, and
compares the validation perplexity of the global model in three set-ups:

- ``on time``: three islands, none late;
- ``straggler``: island ``c`` sleeps past the grace window in every third round, so that round of its work is dropped;
- ``two islands``: ``c`` never takes part (its third of the data unseen), the bound that dropping every one of its
  rounds would reach.

The islands start from scratch (islands mode has no synchronous warm-up) and together: each waits for the others to
be up before its first quorum, so that all share one schedule. ``min_islands=1``, so that an island that finishes
last can end alone. The straggler, once healed, runs behind the others' schedule and ends one round later; the
perplexity is island ``a``'s, after the same number of outer steps in every set-up. Every island's global
weights are identical, so one island's validation (on all of the validation set) is the run's. The table also
gives how many outer steps ``c`` contributed to.

Run from the repository root: ``python -m benchmarks.islands_miniature [--quick]`` (``--quick``: 100 steps, about
3 minutes on 2 CPU cores; the default, 300 steps, about 8).
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

from benchmarks._common import free_port, table
from lightning_diloco.coordinator import start_coordinator

GRACE, HEARTBEAT = 6.0, 3.0
ROOT = Path(__file__).resolve().parents[1]


class LateRounds(Callback):
    """Sleep ``seconds`` after the first step of every ``every``-th round of ``inner_steps``: the island then arrives
    at that round's outer step after the coordinator's grace window."""

    def __init__(self, inner_steps: int = 25, every: int = 3, seconds: float = 15.0) -> None:
        self.inner_steps, self.every, self.seconds = inner_steps, every, seconds

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step % (self.inner_steps * self.every) == 1:
            time.sleep(self.seconds)


class StartTogether(Callback):
    """Wait until ``count`` islands have started (a file each in ``folder``) before the first quorum, so that the
    islands share one schedule from the first outer step (the strategy's join runs after the callbacks' hook)."""

    def __init__(self, folder: str, name: str, count: int) -> None:
        self.folder, self.name, self.count = Path(folder), name, count

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        (self.folder / f"{self.name}.ready").touch()
        deadline = time.monotonic() + 600
        while len(list(self.folder.glob("*.ready"))) < self.count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(list(self.folder.glob('*.ready')))} of {self.count} islands started")
            time.sleep(0.05)


class IslandLog(Callback):
    """Appends every committed outer step of this island to ``path`` (islands in it, heals so far)."""

    def __init__(self, path: str) -> None:
        self.path, self.seen = path, -1

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        strategy = trainer.strategy
        quorum, outer = getattr(strategy, "quorum", None), getattr(strategy, "outer", None)
        if quorum is None or outer is None or outer.outer_step == self.seen:
            return
        self.seen = outer.outer_step  # the first line: after the join (outer step 0 for islands that started together)
        with open(self.path, "a") as f:
            f.write(json.dumps({"outer_step": outer.outer_step, "islands": quorum.islands, "heals": quorum.heals,
                                "global_step": trainer.global_step}) + "\n")


def island_command(
    name: str, shard: int, coordinator: str, out: Path, steps: int, late: bool, count: int
) -> list[str]:
    s = "--trainer.strategy.init_args."
    cmd = [
        sys.executable, "-m", "lightning_diloco", "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--trainer.devices", "1", f"{s}sync_warmup_steps", "0", f"{s}coordinator", coordinator, f"{s}island", name,
        f"{s}island_address", "127.0.0.1", f"{s}sync_timeout", "30", f"{s}quorum_timeout", "300",
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
        "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", name,
        "--data.shard", str(shard), "--data.num_shards", "3", "--data.cache_dir", str(out / "cache"),
        "--trainer.callbacks+=benchmarks.islands_miniature.IslandLog",
        f"--trainer.callbacks.path={out / (name + '.jsonl')}",
        "--trainer.callbacks+=benchmarks.islands_miniature.StartTogether", f"--trainer.callbacks.folder={out}",
        f"--trainer.callbacks.name={name}", f"--trainer.callbacks.count={count}",
    ]
    if late:
        cmd += ["--trainer.callbacks+=benchmarks.islands_miniature.LateRounds"]
    return cmd


def final_val_ppl(out: Path, name: str) -> Optional[float]:
    files = sorted((out / name).glob("version_*/metrics.csv"))
    if not files:
        return None
    with open(files[-1]) as f:
        values = [float(row["val_ppl"]) for row in csv.DictReader(f) if row.get("val_ppl")]
    return values[-1] if values else None


def scenario(label: str, out: Path, steps: int, names: list[str], late: Optional[str]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    server = start_coordinator(port=0, min_islands=1, grace=GRACE, heartbeat_timeout=HEARTBEAT, host="127.0.0.1")
    address = "http://" + server.address().split("://")[-1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    procs = []
    started = time.perf_counter()
    try:
        for shard, name in enumerate(names):
            island_env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
            log = open(out / f"{name}.log", "w")
            cmd = island_command(name, shard, address, out, steps, late == name, len(names))
            procs.append((subprocess.Popen(cmd, env=island_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
        for proc, log in procs:
            proc.wait(timeout=1800)
            log.close()
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
        server.shutdown()
    codes = [proc.returncode for proc, _ in procs]
    if any(codes):
        raise RuntimeError(f"{label}: islands exited with {codes}; see the logs in {out}")
    outer_steps = max(json.loads(line)["outer_step"] for line in (out / "a.jsonl").read_text().splitlines())
    contributed = None
    if "c" in names:
        rows = [json.loads(line) for line in (out / "c.jsonl").read_text().splitlines()]
        # of a's outer steps, those c took part in without healing in them (a heal: nothing of c's was in it)
        contributed = sum(1 for before, r in zip(rows, rows[1:])
                          if r["heals"] == before["heals"] and r["outer_step"] <= outer_steps)
    return {"label": label, "val_ppl": final_val_ppl(out, "a"), "val_ppl_c": final_val_ppl(out, names[-1]),
            "outer_steps": outer_steps, "c_contributed": contributed, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 steps instead of 300")
    parser.add_argument("--out", default="/tmp/islands_miniature", help="where the runs write")
    args = parser.parse_args()
    os.environ.setdefault("RUST_LOG", "warn")  # the in-process lighthouse logs every quorum at "info" otherwise
    steps = 100 if args.quick else 300
    out = Path(args.out)
    results = [
        scenario("on time", out / "on_time", steps, ["a", "b", "c"], None),
        scenario("straggler (c late every 3rd round)", out / "straggler", steps, ["a", "b", "c"], "c"),
        scenario("two islands (no c)", out / "two", steps, ["a", "b"], None),
    ]
    print(f"## Dropping a straggler's late rounds: tiny GPT, 3 islands of 1 process, H=25, {steps} steps each,"
          f" grace {GRACE:g} s, min_islands=1\n")
    rows = [[r["label"], f"{r['val_ppl']:.2f}" if r["val_ppl"] else "-", r["outer_steps"],
             r["c_contributed"] if r["c_contributed"] is not None else "-", f"{r['seconds']:.0f}"] for r in results]
    print(table(["set-up", "val ppl (global model)", "outer steps", "outer steps with c's work", "wall s"], rows))


if __name__ == "__main__":
    main()
