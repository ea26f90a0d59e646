"""The smallest DiLoCo run: two CPU workers fit a noisy sine with `Trainer(strategy="diloco")`.

Run it as a file (Lightning starts the second worker by re-running this script):

    python examples/minimal.py
"""

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diloco import DiLoCoStrategy


class Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.1)  # the inner optimizer


def sine(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 6 - 3
    return TensorDataset(x, torch.sin(2 * x) + 0.05 * torch.randn(n, 1, generator=g))


if __name__ == "__main__":
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,  # two DiLoCo workers
        # H=50 AdamW steps per worker between outer steps; `strategy="diloco"` gives the paper's defaults (H=500)
        strategy=DiLoCoStrategy(inner_steps=50, outer_lr=0.7, outer_momentum=0.9),
        max_epochs=20,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(Regressor(), DataLoader(sine(4096, 0), batch_size=64), DataLoader(sine(512, 1), batch_size=256))
    if trainer.is_global_zero:
        print(f"final validation loss: {trainer.callback_metrics['val_loss']:.4f}")
