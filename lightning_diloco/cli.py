"""Command line interface: ``lightning-diloco fit|validate|test --config configs/tiny.yaml``.

A :class:`~lightning.pytorch.cli.LightningCLI` with the model fixed to
:class:`~lightning_diloco.gpt.GPTLightningModule` and the data to :class:`~lightning_diloco.data.LMDataModule`
(their arguments are ``--model.*`` and ``--data.*``). ``--trainer.strategy=diloco`` or
``--trainer.strategy.class_path=lightning_diloco.DiLoCoStrategy`` selects DiLoCo: importing this module imports the
``lightning_diloco`` package, which registers the strategy.

``data.vocab_size`` is copied to ``model.vocab_size`` and ``data.seq_len`` to ``model.block_size``, so the two never
disagree.

Multi-process runs: Lightning starts the other processes by re-running the same command line, so launch with the
``lightning-diloco`` console script or ``python -m lightning_diloco`` (never ``python -c``).
"""

from typing import Any, Optional

from jsonargparse import lazy_instance
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

import lightning_diloco  # noqa: F401  (registers `strategy="diloco"`)
from lightning_diloco.data import LMDataModule
from lightning_diloco.gpt import GPTLightningModule


class DiLoCoCLI(LightningCLI):
    """LightningCLI for GPT language-model training with DiLoCo or DDP."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test`` (the model has no ``predict_step``)."""
        return {name: args for name, args in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size")
        parser.link_arguments("data.seq_len", "model.block_size")


def build_cli(args: Optional[list[str]] = None, run: bool = True, **kwargs: Any) -> DiLoCoCLI:
    """Parse arguments, instantiate model, data and trainer, and (with ``run=True``) run the subcommand.

    Args:
        args: Command-line arguments; ``sys.argv[1:]`` when ``None``.
        run: Run the subcommand. With ``False``, only parse and instantiate (no subcommand in ``args`` then).
        **kwargs: Further keyword arguments of :class:`~lightning.pytorch.cli.LightningCLI`.
    """
    defaults: dict[str, Any] = {
        "model_class": GPTLightningModule,
        "datamodule_class": LMDataModule,
        "subclass_mode_model": False,
        "subclass_mode_data": False,
        # in multi-process runs every rank sets up the callback; rewriting the file keeps reruns from failing
        "save_config_kwargs": {"overwrite": True},
        # metrics.csv, config.yaml and checkpoints of a run land in runs/<name>/version_<n>/
        "trainer_defaults": {"logger": lazy_instance(CSVLogger, save_dir="runs", name="default")},
        "auto_configure_optimizers": False,
        "args": args,
        "run": run,
    }
    defaults.update(kwargs)
    return DiLoCoCLI(**defaults)


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of ``lightning-diloco`` and ``python -m lightning_diloco``.

    Args:
        args: Command-line arguments; ``sys.argv[1:]`` when ``None``.
    """
    build_cli(args)
