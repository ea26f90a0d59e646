"""Several DiLoCo fits of the toy model in one torchrun world of two processes; records what every rank saw and held.

- ``default``: the outer syncs on groups of the training backend (H=3, 10 steps).
- ``outer_gloo``: the same run with ``outer_backend="gloo"``.
- ``speed``: ``speed_weighted=True`` with rank 1 slowed down (``TOY_SLOW``), H=4, 14 steps.

Run with ``python -m torch.distributed.run --nproc-per-node 2 islands_fits.py --out DIR --fits default,outer_gloo``
(torchrun starts the processes, so the fits can follow one another in the same processes). Each rank writes
``DIR/rank<r>.pt``, a dict from fit name to record.
"""

import argparse
import os
import sys
from typing import Any, Optional

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lightning_diloco.clean_exit import close_process_groups  # noqa: E402
from helpers.toy import ToyModule, loaders  # noqa: E402
from lightning_diloco import DiLoCoStrategy  # noqa: E402

SLOW_SECONDS = 0.25  # per computed step of rank 1 in the speed-weighted fit


class OuterStepLog(Callback):
    """Keeps ``strategy.last_metrics`` of every outer step (they change only at outer steps)."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.topology: dict[str, Any] = {}
        self.groups: dict[str, Any] = {}  # held past `fit`: the strategy releases its groups at its teardown

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        topology = trainer.strategy.topology
        self.groups = {"outer": topology.outer, "control": topology.control}
        self.topology = {
            "outer_backend": topology.outer_backend,
            "outer_group_backend": str(dist.get_backend(topology.outer)),
            "default_backend": str(dist.get_backend()),
            "outer_is_default_group": topology.outer is dist.group.WORLD,
            "outer_ranks": dist.get_process_group_ranks(topology.outer),
            "outer_name": topology.outer.group_name,
            "default_name": dist.group.WORLD.group_name,
        }

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._take(trainer)

    def on_fit_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._take(trainer)  # the outer step that closes a partial last round runs after `on_train_end`

    def _take(self, trainer: L.Trainer) -> None:
        metrics = dict(trainer.strategy.last_metrics)
        if metrics and (not self.metrics or metrics["diloco/outer_step"] != self.metrics[-1]["diloco/outer_step"]):
            self.metrics.append(metrics)


def sequence_number(group: Optional[dist.ProcessGroup]) -> Optional[int]:
    """How many collectives the process group has run (gloo counts them)."""
    if group is None:
        return None
    return int(group._get_sequence_number_for_group())


def fit(inner_steps: int, max_steps: int, **strategy_kwargs: Any) -> dict[str, Any]:
    world_before = sequence_number(dist.group.WORLD) if dist.is_initialized() else 0
    strategy = DiLoCoStrategy(inner_steps=inner_steps, **strategy_kwargs)
    log = OuterStepLog()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=max_steps, callbacks=[log], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    model = ToyModule()
    train, _ = loaders()
    trainer.fit(model, train)
    assert strategy.topology is not None and strategy.topology.outer is None, "the strategy kept its groups"
    record = dict(model.record)
    record["final"] = {k: v.clone() for k, v in model.state_dict().items()}
    record["outer_steps"] = log.metrics
    record["topology"] = {
        **log.topology,
        "outer_collectives": sequence_number(log.groups["outer"]),
        "control_collectives": sequence_number(log.groups["control"]),
        "default_collectives": sequence_number(dist.group.WORLD) - world_before,
    }
    log.groups.clear()
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--fits", default="default,outer_gloo", help="comma-separated: default, outer_gloo, speed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    records = {}
    for name in args.fits.split(","):
        if name == "default":
            records[name] = fit(3, 10)
        elif name == "outer_gloo":
            records[name] = fit(3, 10, outer_backend="gloo")
        elif name == "speed":
            os.environ["TOY_SLOW"] = f"1:{SLOW_SECONDS}"
            records[name] = fit(4, 14, speed_weighted=True)
            del os.environ["TOY_SLOW"]
        else:
            raise ValueError(f"unknown fit {name!r}")
    os.makedirs(args.out, exist_ok=True)
    torch.save(records, os.path.join(args.out, f"rank{dist.get_rank()}.pt"))


if __name__ == "__main__":
    main()
    close_process_groups()  # with main's Trainer gone: no gloo thread outlives the interpreter
