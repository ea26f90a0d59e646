"""Command line interface: ``lightning-diloco fit|validate|test --config configs/tiny.yaml``.

A :class:`~lightning.pytorch.cli.LightningCLI` with the model fixed to
:class:`~lightning_diloco.gpt.GPTLightningModule` and the data to :class:`~lightning_diloco.data.LMDataModule`
(their arguments are ``--model.*`` and ``--data.*``). ``--trainer.strategy=diloco`` or
``--trainer.strategy.class_path=lightning_diloco.DiLoCoStrategy`` selects DiLoCo: importing this module imports the
``lightning_diloco`` package, which registers the strategy. ``--trainer.strategy.help diloco`` (a registered
strategy name, or a class name such as ``DiLoCoStrategy``) lists the strategy's options.

``data.vocab_size`` is copied to ``model.vocab_size`` and ``data.seq_len`` to ``model.block_size``, so the two never
disagree.

What the CLI adds to Lightning's:

- **Progress and a closing line.** Every run gets :class:`~lightning_diloco.progress.DiLoCoProgressBar` (a training
  bar in optimizer steps out of ``max_steps``, with DiLoCo's outer step), unless the config has a progress bar of its
  own or ``enable_progress_bar: false``, and :class:`~lightning_diloco.progress.FitSummary`, which ends ``fit`` with
  the run folder, the final ``val_ppl`` and the bytes sent per worker beside DDP's.
- **Evaluation beside its run.** ``validate`` and ``test`` with a ``--ckpt_path`` inside a run folder
  (``<save_dir>/<name>/version_<n>/checkpoints/<file>.ckpt``, as ``ModelCheckpoint`` writes it under a logger) log
  into that run's folder: a configured :class:`~lightning.pytorch.loggers.CSVLogger` without a fixed ``version``
  writes to ``<run>/validate/version_<m>/`` (or ``test/``), so the evaluation's ``metrics.csv`` and ``config.yaml``
  sit with the training curves of the checkpoint's run, ``runs/<name>/`` gets no new ``version_<n>`` without training
  metrics, and nothing of the run is overwritten (a ``CSVLogger`` given an existing version would delete its
  ``metrics.csv``). With another logger, a fixed ``version``, or a checkpoint elsewhere, Lightning's behaviour is
  unchanged. Evaluation never writes checkpoints, so Lightning's warning that ``ModelCheckpoint``'s ``dirpath`` changed
  (its state is not restored) says nothing useful there and is not shown for ``validate`` and ``test``.
- **Argument errors in one line.** A ``ValueError`` or ``TypeError`` that this package raises while the CLI builds the
  model, the data, the strategy or the Trainer (a bad ``inner_steps``, ``lr``, ``val_fraction``, ...) is printed as
  ``lightning-diloco <subcommand>: error: <message>`` on stderr, with exit code 2, instead of a traceback. Errors
  during training keep their tracebacks.

Multi-process runs: Lightning starts the other processes by re-running the same command line, so launch with the
``lightning-diloco`` console script or ``python -m lightning_diloco`` (never ``python -c``).
"""

import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from jsonargparse import ArgumentParser, Namespace, lazy_instance
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

import lightning_diloco  # noqa: F401  (registers `strategy="diloco"`)
from lightning_diloco.data import LMDataModule
from lightning_diloco.gpt import GPTLightningModule
from lightning_diloco.progress import DiLoCoProgressBar, FitSummary
from lightning_diloco.strategy import DiLoCoStrategy

_PACKAGE_DIR = Path(lightning_diloco.__file__).resolve().parent
_STRATEGY_HELP = "--trainer.strategy.help"
_EVALUATION = ("validate", "test")
#: Lightning's warning when a checkpoint's ModelCheckpoint state was written under another directory
_DIRPATH_CHANGED = r"The dirpath has changed from "
_STRATEGY_HINT = (
    "DiLoCo's options (inner_steps, outer_lr, compression, ...): `lightning-diloco fit --trainer.strategy.help diloco`"
    " lists them (any registered strategy name or class works, e.g. `ddp` or `DiLoCoStrategy`). Set one with"
    " `--trainer.strategy.init_args.NAME=VALUE` or in a config's `trainer.strategy.init_args`; `--config FILE"
    " --print_config` shows every value a run would use."
)


class DiLoCoCLI(LightningCLI):
    """LightningCLI for GPT language-model training with DiLoCo or DDP (see the module's documentation)."""

    #: the run folder that ``validate``/``test`` log into, when they do (see the module's documentation)
    _beside_run: Optional[Path] = None

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test`` (the model has no ``predict_step``)."""
        return {name: args for name, args in LightningCLI.subcommands().items() if name != "predict"}

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size")
        parser.link_arguments("data.seq_len", "model.block_size")

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Lightning's parsing, where ``--trainer.strategy.help`` also takes a registered strategy name (``diloco``)."""
        if args is None or isinstance(args, (list, tuple)):
            given = list(sys.argv[1:] if args is None else args)
            by_class = _strategy_help_by_class(given)
            if by_class != given:
                self.config = parser.parse_args(by_class)  # prints the strategy's help and exits
                return
        super().parse_arguments(parser, args)

    @override
    def before_instantiate_classes(self) -> None:
        """For ``validate``/``test``: log beside the checkpoint's run, without the ``dirpath`` warning."""
        if self.subcommand not in _EVALUATION:
            return
        warnings.filterwarnings("ignore", message=_DIRPATH_CHANGED, category=UserWarning)
        config = self.config[self.subcommand]
        run = checkpoint_run_folder(config.get("ckpt_path"))
        logger = config.get("trainer.logger")
        if run is None or not isinstance(logger, Namespace) or not _is_subclass(logger.get("class_path"), CSVLogger):
            return
        init_args = logger.get("init_args")
        if init_args is None or init_args.get("version") is not None:
            return
        init_args.save_dir = str(run)
        init_args.name = self.subcommand
        self._beside_run = run

    @override
    def instantiate_classes(self) -> None:
        """Lightning's instantiation; this package's argument errors end the program with their message alone."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            error = _package_error(err) or self._strategy_error()
            if error is None:
                raise
            prog = " ".join(filter(None, [self.parser.prog, self.subcommand]))
            sys.stderr.write(f"{prog}: error: {error}\n")
            raise SystemExit(2) from None

    def _strategy_error(self) -> Optional[BaseException]:
        """The error a DiLoCo strategy's constructor raises for the configured arguments, if it raises one.

        The Trainer's ``strategy`` is a ``str`` or a ``Strategy``; jsonargparse tries both and reports the two failures
        in one message of its own, without the constructor's exception. Building the strategy alone brings it back.
        """
        section = self.config[self.subcommand] if self.subcommand else self.config
        strategy = section.get("trainer.strategy")
        if not isinstance(strategy, Namespace) or not _is_subclass(strategy.get("class_path"), DiLoCoStrategy):
            return None
        cls = _import(strategy.class_path)
        parser = ArgumentParser(exit_on_error=False)
        parser.add_argument("--strategy", type=cls)
        try:
            config = parser.parse_object({"strategy": strategy.as_dict()})
            instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
            instantiate(config)
        except (ValueError, TypeError) as err:
            return _package_error(err)
        except Exception:
            return None
        return None

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's Trainer, with :class:`DiLoCoProgressBar` and :class:`FitSummary` among its callbacks.

        The progress bar is left out when the configured callbacks have a progress bar or the progress bar is
        disabled (``enable_progress_bar: false``); the closing line when they have a ``FitSummary``.
        """
        section = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = section.get("trainer") or {}
        configured = trainer.get("callbacks")
        callbacks: list[Callback] = (
            [] if configured is None else list(configured) if isinstance(configured, (list, tuple)) else [configured]
        )
        added: list[Callback] = []
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            added.append(DiLoCoProgressBar())
        if not any(isinstance(c, FitSummary) for c in callbacks):
            added.append(FitSummary())
        if added and "callbacks" not in kwargs:
            kwargs["callbacks"] = [*callbacks, *added]
        return super().instantiate_trainer(**kwargs)

    def before_validate(self) -> None:
        """Say where the evaluation's metrics go."""
        self._say_where_metrics_go()

    def before_test(self) -> None:
        """Say where the evaluation's metrics go."""
        self._say_where_metrics_go()

    def _say_where_metrics_go(self) -> None:
        logger = self.trainer.logger
        if self._beside_run is not None and isinstance(logger, CSVLogger):
            rank_zero_info(
                f"`{self.subcommand}` logs to {logger.log_dir}, in the folder of the checkpoint's run"
                f" {self._beside_run}"
            )


def checkpoint_run_folder(ckpt_path: Any) -> Optional[Path]:
    """The run folder of a checkpoint that ``ModelCheckpoint`` wrote under a logger, or ``None``.

    That is ``<run>`` for ``<run>/checkpoints/<file>``, when ``<run>`` holds a logger's ``metrics.csv``,
    ``hparams.yaml`` or ``config.yaml``. Names such as ``"last"`` or ``"best"`` and remote paths give ``None``.

    Args:
        ckpt_path: The ``ckpt_path`` of a ``validate`` or ``test`` command.
    """
    if not isinstance(ckpt_path, (str, os.PathLike)) or "://" in str(ckpt_path):
        return None
    path = Path(ckpt_path)
    if not path.exists() or path.parent.name != "checkpoints":  # a file, or a DiLoCo checkpoint directory
        return None
    run = path.parent.parent
    if not any((run / name).is_file() for name in ("metrics.csv", "hparams.yaml", "config.yaml")):
        return None
    return run


def _strategy_help_by_class(args: list[str]) -> list[str]:
    """``args`` with a registered strategy name after ``--trainer.strategy.help`` replaced by its class path."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == _STRATEGY_HELP and i + 1 < len(out):
            out[i + 1] = _strategy_class_path(out[i + 1])
        elif arg.startswith(f"{_STRATEGY_HELP}="):
            out[i] = f"{_STRATEGY_HELP}={_strategy_class_path(arg.split('=', 1)[1])}"
    return out


def _strategy_class_path(name: str) -> str:
    if name not in StrategyRegistry:
        return name
    cls = StrategyRegistry[name]["strategy"]
    return f"{cls.__module__}.{cls.__qualname__}"


def _import(class_path: Any) -> Any:
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _is_subclass(class_path: Any, base: type) -> bool:
    cls = _import(class_path)
    return isinstance(cls, type) and issubclass(cls, base)


def _package_error(err: Optional[BaseException]) -> Optional[BaseException]:
    """The first ``ValueError``/``TypeError`` in ``err``'s chain that a ``raise`` in this package's code raised."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ValueError, TypeError)) and _raised_in_package(err):
            return err
        err = err.__cause__ or err.__context__
    return None


def _raised_in_package(err: BaseException) -> bool:
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return _PACKAGE_DIR in Path(tb.tb_frame.f_code.co_filename).resolve().parents


def build_cli(args: ArgsType = None, run: bool = True, **kwargs: Any) -> DiLoCoCLI:
    """Parse arguments, instantiate model, data and trainer, and (with ``run=True``) run the subcommand.

    Args:
        args: Command-line arguments; ``sys.argv[1:]`` when ``None``.
        run: Run the subcommand. With ``False``, only parse and instantiate (no subcommand in ``args`` then).
        **kwargs: Further keyword arguments of :class:`~lightning.pytorch.cli.LightningCLI`; the ``parser_kwargs`` of
            a subcommand are merged into the CLI's own (a description and an epilog that point to the strategy's
            options).
    """
    parser_kwargs: dict[str, Any] = {
        name: {
            "description": f"{_short_description(name)} DiLoCo's options: `lightning-diloco {name}"
            " --trainer.strategy.help diloco` (more at the end of this help).",
            "epilog": _STRATEGY_HINT,
        }
        for name in DiLoCoCLI.subcommands()
    }
    for key, value in (kwargs.pop("parser_kwargs", None) or {}).items():
        parser_kwargs[key] = {**parser_kwargs[key], **value} if key in parser_kwargs else value
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
        "parser_kwargs": parser_kwargs,
        "args": args,
        "run": run,
    }
    defaults.update(kwargs)
    return DiLoCoCLI(**defaults)


def _short_description(subcommand: str) -> str:
    """The first line of ``Trainer.<subcommand>``'s docstring, as Lightning describes the subcommand."""
    doc = getattr(Trainer, subcommand).__doc__ or ""
    return next((line.strip() for line in doc.splitlines() if line.strip()), "")


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of ``lightning-diloco`` and ``python -m lightning_diloco``.

    Args:
        args: Command-line arguments; ``sys.argv[1:]`` when ``None``.
    """
    given = list(sys.argv[1:] if args is None else args)
    if given[:1] == ["coordinator"]:  # the coordinator of islands mode is not a Lightning run
        from lightning_diloco.coordinator import main as coordinator

        coordinator(given[1:])
        return
    if given[:1] == ["consolidate"]:  # a checkpoint directory as one file: no Lightning run either
        consolidate_main(given[1:])
        return
    build_cli(args)


def consolidate_main(args: list[str]) -> None:
    """``lightning-diloco consolidate CHECKPOINT OUT``: a checkpoint directory as one Lightning checkpoint file."""
    import argparse

    from lightning_diloco.checkpointing import consolidate

    parser = argparse.ArgumentParser(
        prog="lightning-diloco consolidate",
        description="Write a DiLoCo checkpoint directory as one Lightning checkpoint file: the global model as"
        " `state_dict` (for `Model.load_from_checkpoint`), worker 0's inner optimizer state and Lightning's entries.",
    )
    parser.add_argument("checkpoint", help="the checkpoint directory (for example runs/x/version_0/checkpoints/last.ckpt)")
    parser.add_argument("out", help="the file to write")
    parsed = parser.parse_args(args)
    consolidate(parsed.checkpoint, parsed.out)
    print(f"wrote {parsed.out}")
