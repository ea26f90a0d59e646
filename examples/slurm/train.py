"""A DiLoCo fit that runs as it is under ``srun``, ``sbatch`` or ``torchrun`` (the recipes of docs/launching.md).

Two workers (two tasks or processes on one node), one CPU thread each, train a small regression network with
``DiLoCoStrategy(inner_steps=5)`` for ``--epochs`` epochs, with a checkpoint at every epoch end and
``fit(ckpt_path="last")``, so a requeued job resumes where the last complete checkpoint left it. Each rank writes its
final weights to ``OUT/rank<r>.pt``. Lightning finds ranks, world size and the rendezvous from SLURM's or torchrun's
environment; the script does nothing for it::

    srun -N1 --ntasks-per-node=2 python examples/slurm/train.py --out runs/slurm
    torchrun --nproc-per-node 2 examples/slurm/train.py --out runs/torchrun
"""

import argparse
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diloco import DiLoCoStrategy


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def data() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(640, 16, generator=generator)
    return DataLoader(TensorDataset(x, x[:, :4].sum(1, keepdim=True).sin()), batch_size=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--devices", type=int, default=2, help="tasks (processes) per node")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    checkpoints = ModelCheckpoint(dirpath=os.path.join(args.out, "checkpoints"), save_last=True, save_top_k=-1,
                                  every_n_epochs=1, save_on_train_epoch_end=True)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, num_nodes=args.nodes,
                        strategy=DiLoCoStrategy(inner_steps=5), max_epochs=args.epochs, callbacks=[checkpoints],
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    module = Regression()
    trainer.fit(module, data(), ckpt_path="last")
    torch.save([p.detach() for p in module.parameters()], os.path.join(args.out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
