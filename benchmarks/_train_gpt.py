"""Benchmark worker: train the GPT under one or more strategies and write what each rank measured as JSON.

Run as a file, one process per rank (the benchmarks launch it with Lightning's environment variables, so Lightning
starts no processes of its own)::

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 WORLD_SIZE=2 NODE_RANK=0 LOCAL_RANK=0 \\
        python benchmarks/_train_gpt.py --plan plan.json --out results/      # and LOCAL_RANK=1 for rank 1

or with no such variables for a single-process run. The plan is a JSON object::

    {"devices": 2, "num_nodes": 1, "runs": [{"name": "diloco", "strategy": "diloco", "inner_steps": 50, ...}, ...]}

Every run of the plan is trained in turn by every rank (the process group is created by the first run and reused),
with a fresh model, optimizer and Trainer, on random tokens (the step's compute does not depend on the data), so one
launch can interleave the repeats of several configurations. Each rank writes ``<out>/<name>.rank<r>.json``: the
time at the end of every optimizer step, the DiLoCo metrics of every outer step, the bytes DDP handed to its
all-reduce, the collectives the training thread issued, and the peak RSS of the process.

Keys of a run (defaults in ``RUN_DEFAULTS``): ``strategy`` (``"diloco"``, ``"ddp"`` or ``"auto"``), ``inner_steps``,
``compression``, ``fragments``, ``overlap``, ``mixing``, ``max_steps``, ``batch_size``, ``seq_len``, ``model`` (keyword
arguments of :class:`~lightning_diloco.gpt.GPTLightningModule`), ``seed``, ``threads``, and ``strategy_file`` (a
modified copy of ``lightning_diloco/strategy.py`` whose ``DiLoCoStrategy`` is used instead, to measure a change
beside the original in the same launch).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.loggers.logger import Logger  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import lightning_diloco  # noqa: E402, F401
from lightning_diloco import DiLoCoStrategy  # noqa: E402
from lightning_diloco.gpt import GPTLightningModule  # noqa: E402

RUN_DEFAULTS: dict[str, Any] = {
    "strategy": "diloco",
    "inner_steps": 50,
    "compression": "none",
    "fragments": 1,
    "overlap": 0,
    "mixing": 0.5,
    "max_steps": 100,
    "batch_size": 16,
    "seq_len": 128,
    "model": {"preset": "tiny"},
    "seed": 0,
    "threads": 1,
    "bucket_cap_mb": 128.0,
}

_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all_single", "broadcast",
    "broadcast_object_list", "barrier", "gather", "gather_object", "reduce", "reduce_scatter_tensor", "scatter",
)


class CollectiveCounter:
    """Counts the Python-level ``torch.distributed`` collectives issued by each thread.

    DDP's gradient all-reduce is issued by its C++ reducer and is not seen here; it is counted by the comm hook.
    Only the outermost call is counted (``broadcast_object_list`` calls ``broadcast`` inside).
    """

    def __init__(self) -> None:
        self.main = 0
        self.background = 0
        self.names: dict[str, int] = {}
        self._depth = threading.local()

    def install(self) -> None:
        import torch.distributed.distributed_c10d as c10d

        for name in _COLLECTIVES:
            for module in (dist, c10d):
                original = getattr(module, name, None)
                if original is None or getattr(original, "_counted", False):
                    continue
                setattr(module, name, self._wrap(name, original))

    def _wrap(self, name: str, original: Any) -> Any:
        counter = self

        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(counter._depth, "value", 0)
            if depth == 0:
                if threading.current_thread() is threading.main_thread():
                    counter.main += 1
                    counter.names[name] = counter.names.get(name, 0) + 1
                else:
                    counter.background += 1
            counter._depth.value = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                counter._depth.value = depth

        counted._counted = True  # type: ignore[attr-defined]
        return counted


COUNTER = CollectiveCounter()


class RecordingLogger(Logger):
    """Keeps every ``diloco/*`` metric dictionary the strategy sends, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.outer: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "record"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if any(key.startswith("diloco/") for key in metrics):
            self.outer.append({**{k: float(v) for k, v in metrics.items()}, "step": step})

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass


def run_delay() -> float:
    """Seconds the calling thread has spent runnable but waiting for a CPU (Linux schedstat; 0 elsewhere)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class StepClock(L.Callback):
    """Time at the end of every training batch (after the optimizer step and any outer step it triggered), the
    collectives the training thread had issued by then, and the time the training thread spent inside outer steps."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.thread_cpu: list[float] = []  # CPU seconds of the training thread
        self.process_cpu: list[float] = []  # CPU seconds of the whole process (gloo and the sync thread included)
        self.run_delay: list[float] = []  # seconds the training thread was runnable but waited for a CPU
        self.collectives: list[int] = []
        self.outer_seconds: list[float] = []  # cumulative, at the end of every batch
        self.outer_cpu: list[float] = []  # cumulative: CPU seconds of the training thread in outer steps
        self.exchange_seconds: list[float] = []  # cumulative: the part spent in the health/speed all-gather
        self.outer_records: list[int] = []  # outer-step records logged by the end of every batch
        # cumulative: time in DiLoCoStrategy.optimizer_step outside the parent strategy's optimizer step (the inner
        # step), i.e. the strategy's own per-step work, outer steps included
        self.own_seconds: list[float] = []
        self._restore: tuple[type, Any] | None = None
        self.logger: RecordingLogger | None = None
        self._totals = {"outer": 0.0, "_exchange_weights": 0.0, "outer_cpu": 0.0, "_exchange_weights_cpu": 0.0,
                        "optimizer_step": 0.0, "inner_step": 0.0}
        self._depth = {"outer": 0, "_exchange_weights": 0}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        if hasattr(strategy, "outer_step"):  # DiLoCoStrategy, or a copy from `strategy_file`
            clock = self
            # everything the training thread does for the outer syncs (outer_step calls _apply when it does not
            # overlap: the outermost call is timed), and separately the health all-gather within it
            for method in ("outer_step", "_apply", "_exchange_weights"):
                original = getattr(strategy, method)

                def timed(*args: Any, _original: Any = original, _method: str = method, **kwargs: Any) -> Any:
                    if threading.current_thread() is not threading.main_thread():
                        return _original(*args, **kwargs)
                    key = "_exchange_weights" if _method == "_exchange_weights" else "outer"
                    clock._depth[key] += 1
                    start, start_cpu = time.perf_counter(), time.thread_time()
                    try:
                        return _original(*args, **kwargs)
                    finally:
                        clock._depth[key] -= 1
                        if clock._depth[key] == 0:
                            clock._totals[key] += time.perf_counter() - start
                            clock._totals[key + "_cpu"] += time.thread_time() - start_cpu

                setattr(strategy, method, timed)
            self._time_own_work(strategy)

    def _time_own_work(self, strategy: Any) -> None:
        """Time the strategy's ``optimizer_step`` and, within it, its parent's (the inner step) on the main thread."""
        clock = self
        parent = type(strategy).__mro__[1]
        parent_step = parent.optimizer_step  # the plain function: the class attribute
        own_step = strategy.optimizer_step

        def timed(function: Any, key: str) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    clock._totals[key] += time.perf_counter() - start

            return wrapper

        self._restore = (parent, parent_step)
        parent.optimizer_step = timed(parent_step, "inner_step")
        strategy.optimizer_step = timed(own_step, "optimizer_step")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restore is not None:
            parent, parent_step = self._restore
            parent.optimizer_step = parent_step
            self._restore = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.times.append(time.perf_counter())
        self.thread_cpu.append(time.thread_time())
        self.run_delay.append(run_delay())
        self.process_cpu.append(time.process_time())
        self.collectives.append(COUNTER.main)
        self.outer_seconds.append(self._totals["outer"])
        self.outer_cpu.append(self._totals["outer_cpu"])
        self.exchange_seconds.append(self._totals["_exchange_weights"])
        self.own_seconds.append(self._totals["optimizer_step"] - self._totals["inner_step"])
        self.outer_records.append(len(self.logger.outer) if self.logger else 0)


class DDPBucketBytes(L.Callback):
    """Registers a DDP comm hook that adds up the bytes of every gradient bucket, then all-reduces it as usual."""

    def __init__(self) -> None:
        self.bucket_bytes = 0
        self.buckets = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model = trainer.strategy.model
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return

        def hook(state, bucket):  # no annotations: DDP checks them, and this file's are strings
            buffer = bucket.buffer()
            self.bucket_bytes += buffer.numel() * buffer.element_size()
            self.buckets += 1
            return default_hooks.allreduce_hook(None, bucket)

        model.register_comm_hook(None, hook)


def random_tokens(num_samples: int, seq_len: int, vocab_size: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, vocab_size, (num_samples, seq_len + 1), generator=generator))


def collate(samples: list[tuple[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([s[0] for s in samples])


def _strategy_class(path: str | None) -> type:
    """``DiLoCoStrategy``, or the one defined in another copy of ``strategy.py`` (to compare a change side by side)."""
    if not path:
        return DiLoCoStrategy
    import importlib.util

    name = "_benchmarked_strategy_" + str(abs(hash(path)))
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name].DiLoCoStrategy


def train(run: dict[str, Any], devices: int, num_nodes: int) -> dict[str, Any]:
    """Train one run of the plan; returns this rank's measurements."""
    run = {**RUN_DEFAULTS, **run}
    torch.set_num_threads(int(run["threads"]))
    L.seed_everything(run["seed"], verbose=False)
    model_args = {"warmup_steps": 10, "lr": 1e-3, **run["model"]}
    module = GPTLightningModule(**model_args)
    world = devices * num_nodes
    vocab = module.config.vocab_size
    seq_len = min(run["seq_len"], module.config.block_size)
    samples = run["batch_size"] * (run["max_steps"] + 2) * world
    loader = DataLoader(random_tokens(samples, seq_len, vocab, run["seed"]), batch_size=run["batch_size"],
                        collate_fn=collate, drop_last=True)
    if run["strategy"] == "diloco":
        strategy_class = _strategy_class(run.get("strategy_file"))
        strategy: Any = strategy_class(
            inner_steps=run["inner_steps"], compression=run["compression"], num_fragments=run["fragments"],
            overlap_steps=run["overlap"], overlap_mixing=run["mixing"], outer_bucket_cap_mb=run["bucket_cap_mb"],
        )
    else:
        strategy = run["strategy"]
    clock, ddp_bytes, logger = StepClock(), DDPBucketBytes(), RecordingLogger()
    clock.logger = logger
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy=strategy, max_steps=run["max_steps"],
        logger=logger, callbacks=[clock, ddp_bytes], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0,
        log_every_n_steps=10**6,
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.fit(module, train_dataloaders=loader)
    strategy_obj = trainer.strategy
    extra_state = 0
    if getattr(strategy_obj, "outer", None) is not None:
        outer = strategy_obj.outer
        tensors = list(outer.params) + list(outer.buffers.values())
        for state in outer.optimizer.state.values():
            tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
        extra_state = sum(t.numel() * t.element_size() for t in tensors)
    return {
        "run": run,
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "num_parameters": sum(p.numel() for p in module.parameters()),
        "parameter_numels": [p.numel() for p in module.parameters()],
        "tokens_per_step": run["batch_size"] * seq_len,
        "times": clock.times,
        "thread_cpu": clock.thread_cpu,
        "process_cpu": clock.process_cpu,
        "run_delay": clock.run_delay,
        "main_collectives": clock.collectives,
        "outer_seconds": clock.outer_seconds,
        "outer_cpu": clock.outer_cpu,
        "exchange_seconds": clock.exchange_seconds,
        "own_seconds": clock.own_seconds,
        "outer_records": clock.outer_records,
        "loadavg": os.getloadavg(),
        "background_collectives": COUNTER.background,
        "collective_names": dict(COUNTER.names),
        "outer": logger.outer,
        "ddp_bucket_bytes": ddp_bytes.bucket_bytes,
        "ddp_buckets": ddp_bytes.buckets,
        "diloco_state_bytes": extra_state,
        "maxrss_kib_before_fit": rss_before,
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "global_step": trainer.global_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", required=True, help="JSON file: {devices, num_nodes, runs: [...]}")
    parser.add_argument("--out", required=True, help="folder for <name>.rank<r>.json")
    args = parser.parse_args()
    plan = json.loads(Path(args.plan).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|num_workers|LeafSpec|tensorboardX).*")
    COUNTER.install()
    for run in plan["runs"]:
        result = train(run, int(plan.get("devices", 1)), int(plan.get("num_nodes", 1)))
        COUNTER.main = COUNTER.background = 0
        COUNTER.names.clear()
        (out / f"{run['name']}.rank{result['rank']}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
