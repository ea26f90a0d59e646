"""Two DiLoCo workers on different kinds of device, one process each, syncing over gloo; and an independent reference.

Run by :mod:`benchmarks.gpu_check` (check 2). :func:`launch` starts two processes of this module, each a node of
its own (``num_nodes=2, devices=1``), rank ``r`` training on ``devices[r]`` (for example ``cuda`` and ``cpu``), with
``process_group_backend="gloo"`` for Lightning's world, ``outer_backend="gloo"`` for the outer syncs and
``outer_device="cpu"`` for the global weights. Each rank writes its final weights.

:func:`reference` computes what those weights must be without the strategy: it keeps the two replicas in this
process, each on its own device, steps each with its own AdamW on the batches Lightning gives that rank (Lightning
puts ``DistributedSampler(shuffle=True, seed=0)`` on every training loader), and every ``H`` steps moves the global
weights (fp32, on the CPU) with
``torch.optim.SGD(lr=0.7, momentum=0.9, nesterov=True)`` using the mean of ``global - local`` as their gradient, then
copies them into both replicas.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ._common import launch_ranks

H, ROUNDS, BATCH, LR = 5, 3, 8, 1e-2
STEPS = H * ROUNDS


def dataset() -> TensorDataset:
    """Regression data, ``BATCH`` samples for every step of both workers."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2 * BATCH * STEPS, 16, generator=generator)
    y = x[:, :4].sum(dim=1, keepdim=True).sin() + 0.1 * torch.randn(len(x), 1, generator=generator)
    return TensorDataset(x, y)


def build_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = build_net()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LR)


def fit(device: str, out: Path) -> None:
    """This rank's fit on ``device``; writes ``out/rank<r>.pt`` with its final weights."""
    from lightning_diloco import DiLoCoStrategy

    torch.set_num_threads(1)
    module = Regression()
    strategy = DiLoCoStrategy(inner_steps=H, process_group_backend="gloo", outer_backend="gloo", outer_device="cpu")
    trainer = L.Trainer(
        accelerator=device, devices=1, num_nodes=2, strategy=strategy, max_steps=STEPS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(dataset(), batch_size=BATCH, shuffle=False))
    weights = [p.detach().cpu() for p in module.parameters()]
    torch.save({"device": str(next(module.parameters()).device), "weights": weights},
               out / f"rank{trainer.global_rank}.pt")


def launch(devices: list[str], out: Path, timeout: float = 300) -> list[dict]:
    """Run the two ranks (rank ``r`` on ``devices[r]``) and return what each wrote."""
    launch_ranks(__spec__.name, [["--device", d, "--out", str(out)] for d in devices], out, timeout)
    return [torch.load(out / f"rank{r}.pt") for r in range(len(devices))]


def reference(devices: list[str]) -> list[Tensor]:
    """The global weights after ``STEPS`` steps of the two workers on ``devices``, simulated in this process."""
    torch.set_num_threads(1)
    data = dataset()
    k = len(devices)
    replicas = [build_net().to(device) for device in devices]
    inner = [torch.optim.AdamW(r.parameters(), lr=LR) for r in replicas]
    global_ = [nn.Parameter(p.detach().cpu().clone()) for p in build_net().parameters()]
    outer = torch.optim.SGD(global_, lr=0.7, momentum=0.9, nesterov=True)
    batches = []
    for rank in range(k):
        indices = list(DistributedSampler(data, num_replicas=k, rank=rank, shuffle=True, seed=0))
        batches.append([indices[i : i + BATCH] for i in range(0, len(indices), BATCH)])
    for step in range(STEPS):
        for rank, (replica, optimizer) in enumerate(zip(replicas, inner)):
            x, y = (t.to(devices[rank]) for t in data[batches[rank][step]])
            optimizer.zero_grad(set_to_none=True)
            nn.functional.mse_loss(replica(x), y).backward()
            optimizer.step()
        if (step + 1) % H == 0:
            with torch.no_grad():
                for i, g in enumerate(global_):
                    deltas = [g - list(r.parameters())[i].detach().cpu() for r in replicas]
                    g.grad = sum(deltas) / k
                outer.step()
                outer.zero_grad(set_to_none=True)
                for replica in replicas:
                    for p, g in zip(replica.parameters(), global_):
                        p.copy_(g)
    return [g.detach().clone() for g in global_]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    fit(args.device, args.out)
