"""The same DiLoCo run under ``DiLoCoStrategy`` and under torchft's ``DiLoCo``, for :mod:`benchmarks.outer_step`.

Two CPU workers (one process each, one thread, gloo on loopback) train a 1.08M-parameter MLP for ``ROUNDS`` rounds
of ``H`` steps from the same initial weights, on the batches ``DistributedSampler(shuffle=True, seed=0)`` gives each
rank (the sampler Lightning puts on a training loader), with AdamW inside and Nesterov SGD (lr 0.7, momentum 0.9)
outside. Each rank writes, per outer step, the seconds the outer step took there, and its final weights.

- ``ours``: a Lightning fit with ``DiLoCoStrategy(inner_steps=H)``; an outer step's time is
  ``trainer.strategy.timings.outer_seconds`` over that step.
- ``torchft``: a plain loop with ``torchft.local_sgd.DiLoCo(manager, [model], inner, outer, sync_every=H)`` around
  the inner optimizer, a ``Manager`` per worker (``init_sync=False``: both start from the same weights) and a
  lighthouse started by :func:`compare`; an outer step's time is the inner ``optimizer.step()`` that syncs, less the
  median of the steps that do not.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ._common import launch_ranks, median, table

H, ROUNDS, BATCH, LR = 10, 8, 16, 1e-3
STEPS = H * ROUNDS


def build_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 64))


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2 * BATCH * STEPS, 512, generator=generator)
    return TensorDataset(x, torch.randn(len(x), 64, generator=generator))


def run_ours(out: Path) -> None:
    import lightning as L

    from lightning_diloco import DiLoCoStrategy

    class Regression(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_net()

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=LR)

    class OuterClock(L.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.last = 0.0

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step % H == 0:
                total = trainer.strategy.timings.outer_seconds
                self.seconds.append(total - self.last)
                self.last = total

    module, clock = Regression(), OuterClock()
    trainer = L.Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy=DiLoCoStrategy(inner_steps=H),
                        max_steps=STEPS, logger=False, callbacks=[clock], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(dataset(), batch_size=BATCH))
    save(out, trainer.global_rank, clock.seconds, module.net)


def run_torchft(out: Path, rank: int, lighthouse: str) -> None:
    from torchft import Manager, ProcessGroupGloo
    from torchft.local_sgd import DiLoCo

    model = build_net()
    inner = torch.optim.AdamW(model.parameters(), lr=LR)
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timedelta(seconds=60)), load_state_dict=None, state_dict=None, min_replica_size=2,
        use_async_quorum=False, rank=0, world_size=1, store_addr="127.0.0.1", store_port=store.port,
        lighthouse_addr=lighthouse, replica_id=f"worker{rank}", hostname="127.0.0.1", init_sync=False,
    )
    data = dataset()
    loader = DataLoader(data, batch_size=BATCH, sampler=DistributedSampler(data, 2, rank, shuffle=True, seed=0))
    step_seconds = []
    with DiLoCo(manager, [model], inner, outer, sync_every=H):
        for x, y in loader:
            inner.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), y).backward()
            started = time.perf_counter()
            inner.step()
            step_seconds.append(time.perf_counter() - started)
    plain = median([s for i, s in enumerate(step_seconds) if (i + 1) % H])
    manager.shutdown(wait=False)
    save(out, rank, [s - plain for i, s in enumerate(step_seconds) if (i + 1) % H == 0], model)


def save(out: Path, rank: int, seconds: list[float], model: nn.Module) -> None:
    torch.save({"seconds": seconds, "weights": [p.detach().clone() for p in model.parameters()]},
               out / f"rank{rank}.pt")


def launch(side: str, out: Path, lighthouse: str = "", timeout: float = 300) -> list[dict[str, Any]]:
    """Run both ranks of one side and return what each wrote."""
    args = [[side, "--out", str(out), "--rank", str(r), "--lighthouse", lighthouse] for r in range(2)]
    launch_ranks(__spec__.name, args, out, timeout, RUST_LOG="error")
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def last_arrival(ranks: list[dict[str, Any]]) -> list[float]:
    """Per outer step, the time on the rank that waited least (the one that arrived last)."""
    return [min(times) for times in zip(*(r["seconds"] for r in ranks))]


def compare(pairs: int, out: Path | None = None) -> dict[str, Any]:
    """``pairs`` alternating runs of each side; medians of the outer steps' times, and whether the weights agree."""
    import tempfile

    from lightning_diloco.coordinator import start_coordinator

    out = out or Path(tempfile.mkdtemp(prefix="diloco-vs-torchft-"))
    os.environ.setdefault("RUST_LOG", "error")
    lighthouse = start_coordinator(port=0, min_islands=2, grace=1.0, host="127.0.0.1")
    times: dict[str, list[float]] = {"ours": [], "torchft": []}
    weights: dict[str, list[Tensor]] = {}
    try:
        for p in range(pairs):
            for side in ("ours", "torchft") if p % 2 == 0 else ("torchft", "ours"):
                ranks = launch(side, out / f"{side}-{p}", lighthouse.address())
                times[side] += last_arrival(ranks)[1:]  # the first outer step warms up
                weights[side] = ranks[0]["weights"]
    finally:
        lighthouse.shutdown()
    equal = all(torch.equal(a, b) for a, b in zip(weights["ours"], weights["torchft"]))
    gap = max(float((a - b).abs().max()) for a, b in zip(weights["ours"], weights["torchft"]))
    return {"ours": median(times["ours"]), "torchft": median(times["torchft"]), "equal": equal, "max_gap": gap,
            "pairs": pairs, "parameters": sum(p.numel() for p in build_net().parameters())}


def print_comparison(result: dict[str, Any]) -> None:
    ratio = result["ours"] / result["torchft"]
    print(f"Against torchft's DiLoCo: 2 CPU workers (gloo, loopback), {result['parameters']:,}-parameter MLP, H={H},"
          f" {ROUNDS} rounds, {result['pairs']} alternating runs of each; median outer step of the rank that arrived"
          " last\n")
    print(table(["implementation", "outer step ms", "ratio", "final weights"], [
        ["lightning-diloco", f"{1e3 * result['ours']:.2f}", f"**{ratio:.3f}**",
         "bitwise equal to torchft's" if result["equal"] else f"max gap {result['max_gap']:.2e}"],
        ["torchft DiLoCo", f"{1e3 * result['torchft']:.2f}", "1", "-"],
    ]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("side", choices=["ours", "torchft"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--lighthouse", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.side == "ours":
        run_ours(args.out)
    else:
        run_torchft(args.out, args.rank, args.lighthouse)
