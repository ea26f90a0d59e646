"""Two-process run that records the training batches each rank receives from ``LMDataModule``.

Usage: ``python tests/scripts/lm_shards.py OUT_DIR CACHE_DIR SHARDING STRATEGY``. Lightning re-runs this file for the
second rank. Each rank writes ``OUT_DIR/rank<r>.pt`` with the batches it trained on.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from lightning_diloco.clean_exit import close_process_groups
import lightning_diloco  # noqa: F401  (registers strategy="diloco")
from lightning_diloco.data import LMDataModule

STEPS = 3


class BatchRecorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.seen: list[Tensor] = []

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        self.seen.append(batch.detach().cpu().clone())
        return (self.weight * batch.float().mean()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def main() -> None:
    out, cache_dir, sharding, strategy = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    datamodule = LMDataModule(
        max_chars=400_000,
        vocab_size=384,
        seq_len=32,
        batch_size=4,
        val_fraction=0.1,
        sharding=sharding,
        seed=3,
        cache_dir=cache_dir,
    )
    module = BatchRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=STEPS,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    out.mkdir(parents=True, exist_ok=True)
    loader = trainer.train_dataloader
    torch.save(
        {
            "rank": trainer.global_rank,
            "seen": module.seen,
            "sampler": type(loader.sampler).__name__,
            "sampler_rank": loader.sampler.rank,
            "sampler_replicas": loader.sampler.num_replicas,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
    close_process_groups()  # with main's Trainer gone: no gloo thread outlives the interpreter
