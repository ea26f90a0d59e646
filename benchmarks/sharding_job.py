"""One job of :mod:`benchmarks.sharding`: a GPT trained by DiLoCo workers of ``--processes-per-worker`` processes,
sharded (FSDP2) or not, then checkpointed and restored; every rank writes ``<out>/rank<R>.json``.

Lightning's launcher starts the other ranks by re-running this module. Each rank measures:

- ``state_bytes``: the bytes of what it holds of the model, by kind: weights, gradients, inner optimizer state, and
  DiLoCo's global weights and outer optimizer state (counted from the tensors it holds: its chunks when sharded);
- ``peak_rss_bytes``: its peak resident memory during training (``VmHWM``);
- ``save_seconds`` (median of ``--saves``) and ``save_peak_growth_bytes``: the time of ``trainer.save_checkpoint`` and
  how far its resident memory rose above where it was (``/proc/self/clear_refs`` resets the peak first);
- ``load_seconds``: the time of a resume's restore (the strategy's ``load_checkpoint``, ``load_model_state_dict`` and
  ``load_optimizer_state_dict``), in a second ``fit`` from the last checkpoint.

    python -m benchmarks.sharding_job --out DIR --devices 4 --processes-per-worker 2 --sharding fsdp --n-embd 256
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from lightning_diloco import DiLoCoStrategy
from lightning_diloco.gpt import GPTLightningModule


class TimedStrategy(DiLoCoStrategy):
    """DiLoCo that adds up the time of its restore."""

    load_seconds = 0.0

    def _timed(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            TimedStrategy.load_seconds += time.perf_counter() - started

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(super().load_checkpoint, *args, **kwargs)

    def load_model_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(super().load_model_state_dict, *args, **kwargs)

    def load_optimizer_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(super().load_optimizer_state_dict, *args, **kwargs)


def tokens(vocab: int, seq: int, batches: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(list(torch.randint(0, vocab, (batches, seq + 1), generator=g)), batch_size=1)


def nbytes(tensors: Any) -> int:
    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--processes-per-worker", type=int, default=2)
    parser.add_argument("--sharding", default="fsdp")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--saves", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)

    def trainer(steps: int) -> L.Trainer:
        strategy = TimedStrategy(inner_steps=2, processes_per_worker=args.processes_per_worker, sharding=args.sharding)
        return L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)

    def model() -> GPTLightningModule:
        torch.manual_seed(0)
        return GPTLightningModule(preset=None, vocab_size=args.vocab, block_size=args.seq, n_layer=args.n_layer,
                                  n_head=4, n_embd=args.n_embd, warmup_steps=1)

    data = tokens(args.vocab, args.seq, 64, seed=1)
    fit = trainer(args.steps)
    module = model()
    fit.fit(module, data)
    strategy = fit.strategy
    optimizer = fit.optimizers[0]
    outer = strategy.outer
    params = list(module.parameters())
    result: dict[str, Any] = {
        "rank": fit.global_rank,
        "parameters": sum(p.numel() for p in params),
        "sharded": strategy.sharded,
        "peak_rss_bytes": status("VmHWM"),
        "state_bytes": {
            "weights": nbytes(params),
            "gradients": nbytes(p.grad for p in params if p.grad is not None),
            "inner_optimizer": nbytes(v for s in optimizer.state.values() for v in s.values()
                                      if isinstance(v, torch.Tensor) and v.dim() > 0),
            "diloco": nbytes([*outer.params, *(v for s in outer.optimizer.state.values() for v in s.values()
                                               if isinstance(v, torch.Tensor) and v.dim() > 0)]),
        },
    }
    seconds, growth = [], []
    path = out / "ckpt" / "last.ckpt"
    for _ in range(args.saves):
        reset_peak()
        before = status("VmRSS")
        started = time.perf_counter()
        fit.save_checkpoint(path)
        seconds.append(time.perf_counter() - started)
        growth.append(status("VmHWM") - before)
    result["save_seconds"] = statistics.median(seconds)
    result["save_peak_growth_bytes"] = max(growth)
    result["checkpoint_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else (
        path.stat().st_size)
    TimedStrategy.load_seconds = 0.0
    resumed = trainer(args.steps)  # nothing left to train: the restore alone
    resumed.fit(model(), data, ckpt_path=str(path))
    result["load_seconds"] = TimedStrategy.load_seconds
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{fit.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
