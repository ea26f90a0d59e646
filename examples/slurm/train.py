"""A DiLoCo fit that runs as it is under ``srun``, ``sbatch`` or ``torchrun`` (the recipes of docs/launching.md).

Two workers (two tasks or processes on one node), one CPU thread each, train a small regression network with
``DiLoCoStrategy(inner_steps=5)`` for ``--epochs`` epochs, with a checkpoint at every epoch end. On SLURM's requeue
signal (``#SBATCH --signal=SIGUSR1@90``, ``scancel --signal=USR1``) the workers write ``OUT/hpc_ckpt_<n>.ckpt`` when
their current round ends and the job is requeued. A new run resumes from the newest of those and ``last.ckpt``; its
data loader resumes mid-epoch (``ResumableDataLoader``), so a resumed run ends bitwise equal to one never stopped.
Each rank writes its final weights to ``OUT/rank<r>.pt``. Lightning finds ranks, world size and the rendezvous from
SLURM's or torchrun's environment; the script does nothing for it::

    srun -N1 --ntasks-per-node=2 python examples/slurm/train.py --out runs/slurm
    torchrun --nproc-per-node 2 examples/slurm/train.py --out runs/torchrun

With ``--coordinator`` the job is one island of a live-islands run (examples/slurm/island.sbatch): its processes
train part ``--index`` of ``--islands`` parts of the data, and meet the other islands' jobs at outer steps.
"""

import argparse
import glob
import os
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diloco import DiLoCoStrategy
from lightning_diloco.data import ResumableDataLoader, ShardSampler


class Regression(L.LightningModule):
    def __init__(self, islands: int = 1, index: int = 0) -> None:
        super().__init__()
        self.islands, self.index = islands, index
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(640, 16, generator=generator)
        data = TensorDataset(x, x[:, :4].sum(1, keepdim=True).sin())
        # each island its part of the data, each process its shard of that, reshuffled every epoch; the loader's
        # position is saved in every checkpoint
        shard = ShardSampler(data, num_replicas=self.islands, rank=self.index, num_parts=self.trainer.world_size,
                             part=self.trainer.global_rank)
        return ResumableDataLoader(data, batch_size=8, sampler=shard)


def newest_checkpoint(out: str) -> Optional[str]:
    """The newest of the requeue checkpoints (``hpc_ckpt_<n>.ckpt``) and the epoch-end ``last.ckpt``."""
    found = glob.glob(os.path.join(out, "hpc_ckpt_*.ckpt")) + glob.glob(os.path.join(out, "checkpoints", "last.ckpt"))
    return max(found, key=os.path.getmtime, default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--devices", type=int, default=2, help="tasks (processes) per node")
    parser.add_argument("--coordinator", help="islands mode: the coordinator's address")
    parser.add_argument("--island", help="islands mode: this island's name")
    parser.add_argument("--islands", type=int, default=1, help="islands mode: parts of the data")
    parser.add_argument("--index", type=int, default=0, help="islands mode: this island's part")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    checkpoints = ModelCheckpoint(dirpath=os.path.join(args.out, "checkpoints"), save_last=True, save_top_k=-1,
                                  every_n_epochs=1, save_on_train_epoch_end=True)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, num_nodes=args.nodes,
                        strategy=DiLoCoStrategy(inner_steps=5, coordinator=args.coordinator, island=args.island),
                        max_epochs=args.epochs, callbacks=[checkpoints], default_root_dir=args.out,
                        logger=CSVLogger(args.out, name="", version=""), enable_progress_bar=False,
                        enable_model_summary=False)
    module = Regression(args.islands, args.index)
    trainer.fit(module, ckpt_path=newest_checkpoint(args.out))
    torch.save([p.detach() for p in module.parameters()], os.path.join(args.out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
