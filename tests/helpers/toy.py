"""A tiny deterministic model and dataset shared by the strategy tests, their worker script and the reference."""

import copy
import os
import time
from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

N_SAMPLES = 64
N_FEATURES = 8


class ToyData(Dataset):
    """``N_SAMPLES`` fixed (index, x, y) triples; the index lets a test replay exactly what a worker saw."""

    def __init__(self, n: int = N_SAMPLES, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, N_FEATURES, generator=g)
        self.y = (self.x.sum(dim=1, keepdim=True).sin() + 0.1 * torch.randn(n, 1, generator=g))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[int, Tensor, Tensor]:
        return i, self.x[i], self.y[i]


def build_net(seed: int) -> nn.Module:
    """The network, initialised from ``seed`` (tests give every rank a different one)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_FEATURES, 16, bias=False), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))


def make_optimizer(params: Any, kind: str, lr: float) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    return torch.optim.SGD(params, lr=lr)


def flat(module: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


class ToyModule(L.LightningModule):
    """Records what it trains on and the weights it holds after every batch and at every validation."""

    def __init__(self, seed: int = 1000, optimizer: str = "adamw", lr: float = 0.05, manual: bool = False,
                 accumulate: int = 1) -> None:
        super().__init__()
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
        self.net = build_net(seed + rank)
        self.init_flat = flat(self.net)
        self.optimizer_kind, self.lr, self.manual, self.accumulate = optimizer, lr, manual, accumulate
        self.automatic_optimization = not manual
        self.record: dict[str, list[Any]] = {"indices": [], "local": [], "steps": [], "val": []}

    def loss(self, batch: Any) -> Tensor:
        _, x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.record["indices"].append(batch[0].tolist())
        self.record.setdefault("computed", []).append(self.trainer.global_step + 1)
        _inject_faults(self, "slow")
        loss = self.loss(batch)
        if self.manual:
            opt = self.optimizers()
            self.manual_backward(loss / self.accumulate)
            if (batch_idx + 1) % self.accumulate == 0:
                opt.step()
                opt.zero_grad()
        return loss

    def on_train_start(self) -> None:
        # what every worker starts from, after any checkpoint was restored
        self.record["start"] = {k: v.detach().clone() for k, v in self.state_dict().items()}
        self.record["start_optimizer"] = copy.deepcopy(self.trainer.optimizers[0].state_dict())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        _inject_faults(self, "batch_end")
        self.record["local"].append(flat(self.net))
        self.record["steps"].append(self.trainer.global_step)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.record["val"].append((self.trainer.global_step, flat(self.net)))
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(), self.optimizer_kind, self.lr)


def _fault(name: str) -> Optional[list[float]]:
    """A fault from the environment, e.g. ``TOY_NAN=1:4`` (rank 1, after step 4); ``None`` if not set for this rank."""
    value = os.environ.get(name)
    if not value:
        return None
    parts = [float(v) for v in value.split(":")]
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    return parts[1:] if int(parts[0]) == rank else None


def _inject_faults(module: "ToyModule", where: str) -> None:
    step = module.trainer.global_step
    if where == "slow" and (slow := _fault("TOY_SLOW")) is not None:
        time.sleep(slow[0])  # TOY_SLOW=rank:seconds per computed step
    if where == "batch_end":
        if (nan := _fault("TOY_NAN")) is not None and step == int(nan[0]):
            with torch.no_grad():
                module.net[0].weight[0, 0] = float("nan")  # TOY_NAN=rank:step poisons the replica
        if (stall := _fault("TOY_STALL")) is not None and step == int(stall[0]):
            time.sleep(stall[1])  # TOY_STALL=rank:step:seconds stalls before the next sync


def loaders(batch_size: int = 4) -> tuple[DataLoader, DataLoader]:
    return DataLoader(ToyData(), batch_size=batch_size), DataLoader(ToyData(seed=1), batch_size=16)
