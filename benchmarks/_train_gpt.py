"""Benchmark worker: train the GPT under one or more strategies and write what each rank measured as JSON.

Run as a module from the repository root, one process per rank (the benchmarks launch it with Lightning's
environment variables, so Lightning starts no processes of its own)::

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 WORLD_SIZE=2 NODE_RANK=0 LOCAL_RANK=0 \\
        python -m benchmarks._train_gpt --plan plan.json --out results/      # and LOCAL_RANK=1 for rank 1

or with no such variables for a single-process run. The plan is a JSON object::

    {"devices": 2, "num_nodes": 1, "runs": [{"name": "diloco", "strategy": "diloco", "inner_steps": 50, ...}, ...]}

Every run of the plan is trained in turn by every rank (the process group is created by the first run and reused),
with a fresh model, optimizer and Trainer, on random tokens (the step's compute does not depend on the data), so one
launch can interleave the repeats of several configurations. Each rank writes ``<out>/<name>.rank<r>.json``: the
time at the end of every optimizer step with the strategy's own cumulative time by then (``trainer.strategy.timings``),
the DiLoCo metrics of every outer step, the bytes DDP handed to its all-reduce, the collectives the training thread
issued, and the peak RSS of the process.

Keys of a run (defaults in ``RUN_DEFAULTS``): ``strategy`` (``"diloco"``, ``"ddp"`` or ``"auto"``), ``inner_steps``,
``compression``, ``fragments``, ``overlap``, ``mixing``, ``eager`` (``eager_rounds``), ``max_steps``, ``batch_size``,
``seq_len``, ``model`` (keyword arguments of :class:`~lightning_diloco.gpt.GPTLightningModule`), ``seed``, ``threads``,
``bucket_cap_mb`` (the strategy's ``outer_bucket_cap_mb``), ``accelerator`` (``"cpu"`` or ``"cuda"``), ``precision``
(the Trainer's), ``outer_device`` and ``backend`` (``process_group_backend``), ``sync_at`` (see :class:`StepClock`)
and ``save`` (single-process runs): also write the weights at the start and at the end of the fit to
``<out>/<name>.rank0.init.pt`` and ``<out>/<name>.rank0.pt``. On CUDA the result has the peak of allocated GPU memory
during the fit (``cuda_peak_bytes``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_diloco import DiLoCoStrategy
from lightning_diloco.gpt import GPTLightningModule
from lightning_diloco.strategy import Timings

RUN_DEFAULTS: dict[str, Any] = {
    "strategy": "diloco",
    "inner_steps": 50,
    "compression": "none",
    "fragments": 1,
    "overlap": 0,
    "mixing": 0.5,
    "eager": 0,
    "max_steps": 100,
    "batch_size": 16,
    "seq_len": 128,
    "model": {"preset": "tiny"},
    "seed": 0,
    "threads": 1,
    "bucket_cap_mb": 128.0,
    "accelerator": "cpu",
    "precision": "32-true",
    "outer_device": None,
    "backend": None,
    "save": False,
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
    """What a rank measured by the end of every training batch (after the optimizer step and any outer step it took).

    Every series has one cumulative value per batch: the time (``times``), the CPU time of the training thread
    (``thread_cpu``) and of the whole process, gloo and the sync thread included (``process_cpu``), the time the
    training thread was runnable but waited for a CPU (``run_delay``), the collectives it issued
    (``main_collectives``), the outer-step records the logger had (``outer_records``), and the strategy's own time
    from ``trainer.strategy.timings`` (zeros under other strategies): in outer steps (``outer_seconds``, and their CPU
    time ``outer_cpu``), in the census of blocking syncs (``exchange_seconds``), and in ``optimizer_step`` outside the
    inner step (``own_seconds``).

    Args:
        logger: the run's logger, whose outer-step records are counted.
        sync_at: steps (1-based) at whose end the clock first waits for the CUDA device, so that a window between
            two of them measures the device's work rather than how far ahead the host ran.

    """

    def __init__(self, logger: RecordingLogger, sync_at: Sequence[int] = ()) -> None:
        self.logger = logger
        self.sync_at = set(sync_at)
        self.series: defaultdict[str, list[float]] = defaultdict(list)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if len(self.series["times"]) + 1 in self.sync_at and torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        strategy = trainer.strategy
        timings = strategy.timings if isinstance(strategy, DiLoCoStrategy) else Timings()
        sample = {
            "times": now, "thread_cpu": time.thread_time(), "run_delay": run_delay(),
            "process_cpu": time.process_time(),
            "main_collectives": COUNTER.main, "outer_records": len(self.logger.outer),
            "outer_seconds": timings.outer_seconds, "outer_cpu": timings.outer_cpu_seconds,
            "exchange_seconds": timings.exchange_seconds, "own_seconds": timings.own_seconds,
        }
        for key, value in sample.items():
            self.series[key].append(value)


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
    """``num_samples`` sequences of ``seq_len + 1`` random token ids below ``vocab_size``, from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, vocab_size, (num_samples, seq_len + 1), generator=generator))


def collate(samples: list[tuple[torch.Tensor]]) -> torch.Tensor:
    """A batch of token sequences from the dataset's one-tensor samples."""
    return torch.stack([s[0] for s in samples])


def train(run: dict[str, Any], devices: int, num_nodes: int, out: Path) -> dict[str, Any]:
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
        strategy: Any = DiLoCoStrategy(
            inner_steps=run["inner_steps"], compression=run["compression"], num_fragments=run["fragments"],
            overlap_steps=run["overlap"], overlap_mixing=run["mixing"], eager_rounds=run["eager"],
            outer_bucket_cap_mb=run["bucket_cap_mb"], outer_device=run["outer_device"],
            process_group_backend=run["backend"],
        )
    elif run["strategy"] == "ddp" and run["backend"]:
        strategy = DDPStrategy(process_group_backend=run["backend"])
    else:
        strategy = run["strategy"]
    logger = RecordingLogger()
    clock, ddp_bytes = StepClock(logger, run.get("sync_at", ())), DDPBucketBytes()
    trainer = L.Trainer(
        accelerator=run["accelerator"], precision=run["precision"], devices=devices, num_nodes=num_nodes,
        strategy=strategy, max_steps=run["max_steps"],
        logger=logger, callbacks=[clock, ddp_bytes], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0,
        log_every_n_steps=10**6,
    )
    cuda = run["accelerator"] in ("cuda", "gpu")
    if cuda:  # the previous run's model and optimizer are garbage by now: out of this run's peak
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if run["save"]:
        torch.save({k: v.detach().clone() for k, v in module.state_dict().items()},
                   out / f"{run['name']}.rank0.init.pt")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.fit(module, train_dataloaders=loader)
    cuda_peak = torch.cuda.max_memory_allocated() if cuda else 0
    if run["save"]:
        weights = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        torch.save(weights, out / f"{run['name']}.rank0.pt")
    extra_state = 0
    outer = trainer.strategy.outer if isinstance(trainer.strategy, DiLoCoStrategy) else None
    if outer is not None:
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
        **clock.series,
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
        "cuda_peak_bytes": cuda_peak,
    }


def main() -> None:
    """Train every run of ``--plan`` and write this rank's measurements of each to ``--out``."""
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
        result = train(run, int(plan.get("devices", 1)), int(plan.get("num_nodes", 1)), out)
        COUNTER.main = COUNTER.background = 0
        COUNTER.names.clear()
        (out / f"{run['name']}.rank{result['rank']}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
