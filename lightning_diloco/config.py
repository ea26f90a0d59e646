"""DiLoCo's options as one frozen object: every check and every default (the paper's among them) written once.

:class:`DiLoCoConfig` is what ``DiLoCoStrategy(...)`` is made of besides DDP's own arguments. Its field defaults are
the defaults of the strategy's signature too (the strategy reads them from here), so the paper's H=500, lr 0.7 and
momentum 0.9 exist in one place. Building a config checks it: a bad value raises an error that names the argument,
says what it got and what to do. It imports nothing from Lightning.
"""

import math
import warnings
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

from lightning_diloco.compression import COMPRESSOR_NAMES
from lightning_diloco.schedules import OuterMomentumSchedule
from lightning_diloco.outer import OuterOptimizerCallable, OuterSchedulerCallable, default_outer_optimizer


@dataclass(frozen=True)
class DiLoCoConfig:
    """DiLoCo's options; see :class:`~lightning_diloco.DiLoCoStrategy` for what each does."""

    inner_steps: int = 500
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_nesterov: bool = True
    outer_optimizer: Optional[OuterOptimizerCallable] = None
    outer_lr_scheduler: Optional[OuterSchedulerCallable] = None
    outer_momentum_schedule: Optional[OuterMomentumSchedule] = None
    outer_device: Optional[Union[str, torch.device]] = None
    sync_warmup_steps: int = 0
    eval_weights: Literal["global", "local"] = "global"
    compression: str = "none"
    error_feedback: bool = False
    num_fragments: int = 1
    overlap_steps: int = 0
    overlap_mixing: float = 0.5
    eager_rounds: int = 0
    processes_per_worker: int = 1
    sharding: Literal["none", "fsdp"] = "none"
    outer_backend: Optional[str] = None
    sync_timeout: Optional[float] = None
    nonfinite: Literal["skip", "raise"] = "skip"
    speed_weighted: bool = False
    outer_bucket_cap_mb: float = 128.0
    coordinator: Optional[str] = None
    island: Optional[str] = None
    island_address: Optional[str] = None
    quorum_timeout: float = 600.0

    def __post_init__(self) -> None:
        _check_steps(self)
        _check_outer_optimizer(self)
        _check_sync(self)
        _check_islands(self)
        _check_sharding(self)
        if self.outer_device is not None:
            try:
                object.__setattr__(self, "outer_device", torch.device(self.outer_device))
            except (RuntimeError, TypeError) as err:
                raise ValueError(
                    f"`outer_device={self.outer_device!r}` is not a device; use 'cpu', 'cuda' or 'cuda:N'."
                ) from err

    @property
    def islands(self) -> bool:
        """Whether this run is one island of several independent jobs (``coordinator`` is set)."""
        return self.coordinator is not None

    @property
    def overlapped(self) -> bool:
        """Whether syncs communicate in the background while inner steps go on (``overlap_steps > 0`` or eager
        updates)."""
        return self.overlap_steps > 0 or self.eager_rounds > 0

    def build_outer_optimizer(self) -> OuterOptimizerCallable:
        """The callable that builds the outer optimizer from the global parameters."""
        if self.outer_optimizer is not None:
            return self.outer_optimizer
        return default_outer_optimizer(self.outer_lr, self.outer_momentum, self.outer_nesterov)


def _is_int(value: object, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= low


def _check_steps(config: DiLoCoConfig) -> None:
    if not _is_int(config.sync_warmup_steps, 0):
        raise ValueError(
            "`sync_warmup_steps` must be an integer >= 0 (synchronous steps before DiLoCo starts), got"
            f" {config.sync_warmup_steps!r}."
        )
    if not _is_int(config.inner_steps, 1):
        raise ValueError(
            "`inner_steps` must be an integer >= 1 (the optimizer steps between outer steps), got"
            f" {config.inner_steps!r}."
        )
    lr, momentum = config.outer_lr, config.outer_momentum
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"`outer_lr` must be a positive number (the paper uses 0.7), got {lr!r}.")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ValueError(f"`outer_momentum` must be in [0, 1) (the paper uses 0.9; 0 gives plain SGD), got {momentum!r}.")


def _check_outer_optimizer(config: DiLoCoConfig) -> None:
    if config.outer_lr_scheduler is not None and not callable(config.outer_lr_scheduler):
        raise TypeError(
            f"`outer_lr_scheduler` must be a callable that takes the outer optimizer and returns a learning-rate"
            f" scheduler, got {type(config.outer_lr_scheduler).__name__}. Pass for example"
            " `functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=100)`."
        )
    if config.outer_momentum_schedule is not None and not callable(config.outer_momentum_schedule):
        raise TypeError(
            f"`outer_momentum_schedule` must be a callable that takes the number of outer steps taken and returns the"
            f" outer momentum, got {type(config.outer_momentum_schedule).__name__}. Pass for example"
            " `lightning_diloco.schedules.MomentumWarmupDecay(warmup_steps=10)`."
        )
    if config.outer_optimizer is None:
        return
    if not callable(config.outer_optimizer):
        raise TypeError(
            "`outer_optimizer` must be a callable that takes the global parameters and returns a"
            f" `torch.optim.Optimizer`, got {type(config.outer_optimizer).__name__}."
        )
    changed = [name for name in ("outer_lr", "outer_momentum", "outer_nesterov")
               if getattr(config, name) != getattr(DEFAULTS, name)]
    if changed:
        raise ValueError(
            f"{', '.join(f'`{n}`' for n in changed)} configure the default outer optimizer, which `outer_optimizer`"
            " replaces. Set the learning rate and momentum inside `outer_optimizer` instead."
        )


def _check_sync(config: DiLoCoConfig) -> None:  # noqa: C901 (one check per option, in the order of the signature)
    if config.eval_weights not in ("global", "local"):
        raise ValueError(f"`eval_weights` must be 'global' or 'local', got {config.eval_weights!r}.")
    if config.compression not in COMPRESSOR_NAMES:
        raise ValueError(f"`compression` must be one of {', '.join(COMPRESSOR_NAMES)}; got {config.compression!r}.")
    if config.error_feedback and config.compression == "none":
        raise ValueError("`error_feedback=True` needs a lossy `compression` (for example 'int8'); 'none' loses nothing.")
    for name in ("num_fragments", "processes_per_worker"):
        if not _is_int(getattr(config, name), 1):
            raise ValueError(f"`{name}` must be an integer >= 1, got {getattr(config, name)!r}.")
    inner, overlap = config.inner_steps, config.overlap_steps
    if not _is_int(overlap, 0) or overlap >= inner:
        raise ValueError(
            f"`overlap_steps` must be an integer in [0, inner_steps) = [0, {inner}), got {overlap!r}: a sync"
            " must land before the same fragment syncs again."
        )
    _check_eager(config)
    if config.num_fragments > inner:
        raise ValueError(
            f"`num_fragments={config.num_fragments}` is more than `inner_steps={inner}`: fragments would share"
            " sync steps. Use at most `inner_steps` fragments."
        )
    if not 0 <= config.overlap_mixing < 1:
        raise ValueError(f"`overlap_mixing` must be in [0, 1), got {config.overlap_mixing!r}.")
    if config.sync_timeout is not None and not config.sync_timeout > 0:
        raise ValueError(f"`sync_timeout` must be a positive number of seconds, got {config.sync_timeout!r}.")
    if config.compression == "sparse" and not config.error_feedback:
        warnings.warn(
            "`compression='sparse'` sends the top 1.56% of every pseudo-gradient; without `error_feedback=True` the"
            " rest is lost at every outer step. Set `error_feedback=True` (SparseLoCo carries it into later steps).",
            UserWarning, stacklevel=4,
        )
    if config.nonfinite not in ("skip", "raise"):
        raise ValueError(f"`nonfinite` must be 'skip' or 'raise', got {config.nonfinite!r}.")
    if config.outer_backend not in (None, "gloo", "nccl", "mpi"):
        raise ValueError(f"`outer_backend` must be 'gloo', 'nccl' or None, got {config.outer_backend!r}.")
    if config.speed_weighted and (config.num_fragments > 1 or config.overlapped):
        raise ValueError(
            "`speed_weighted=True` works with whole-model, blocking outer steps. Use `num_fragments=1`,"
            " `overlap_steps=0` and `eager_rounds=0` with it."
        )
    if not config.outer_bucket_cap_mb > 0:
        raise ValueError(f"`outer_bucket_cap_mb` must be positive, got {config.outer_bucket_cap_mb}.")


def _check_eager(config: DiLoCoConfig) -> None:
    eager = config.eager_rounds
    if not _is_int(eager, 0):
        raise ValueError(
            f"`eager_rounds` must be an integer >= 0 (the rounds a sync may take, hidden behind training), got"
            f" {eager!r}. 0 turns eager updates off; 1 is the paper's one-round delay."
        )
    if eager and config.overlap_steps:
        raise ValueError(
            f"`eager_rounds={eager}` and `overlap_steps={config.overlap_steps}` are two ways of overlapping a sync:"
            " eager updates hide whole rounds (own pseudo-gradient at once, the others' later), `overlap_steps`"
            " part of one (mixing). Set one of them to 0."
        )


def _check_islands(config: DiLoCoConfig) -> None:
    if config.coordinator is None:
        given = [name for name in ("island", "island_address") if getattr(config, name) is not None]
        if given:
            raise ValueError(
                f"{', '.join(f'`{n}`' for n in given)} only apply to islands mode. Set `coordinator='http://HOST:PORT'`"
                " (the address `lightning-diloco coordinator` prints) or leave them out."
            )
        return
    if not isinstance(config.coordinator, str) or not config.coordinator.strip():
        raise ValueError(
            f"`coordinator` must be the coordinator's address 'http://HOST:PORT', got {config.coordinator!r}."
        )
    if "://" not in config.coordinator:
        object.__setattr__(config, "coordinator", f"http://{config.coordinator}")
    if not (isinstance(config.quorum_timeout, (int, float)) and config.quorum_timeout > 0):
        raise ValueError(f"`quorum_timeout` must be a positive number of seconds, got {config.quorum_timeout!r}.")
    unsupported = {
        "compression": config.compression != "none", "overlap_steps": config.overlap_steps > 0,
        "eager_rounds": config.eager_rounds > 0,
        "speed_weighted": config.speed_weighted, "sync_warmup_steps": config.sync_warmup_steps > 0,
        "processes_per_worker": config.processes_per_worker != 1, "outer_backend": config.outer_backend == "nccl",
        "sharding": config.sharding != "none",
    }
    bad = [name for name, given in unsupported.items() if given]
    if bad:
        raise ValueError(
            f"Islands mode (`coordinator=...`) does not support {', '.join(f'`{n}`' for n in bad)} yet: each island is"
            " one DiLoCo worker (all its processes train one replica), and its outer steps are blocking and"
            " uncompressed over gloo. Leave these arguments at their defaults, or train in one world without"
            " `coordinator`."
        )


def _check_sharding(config: DiLoCoConfig) -> None:
    if config.sharding not in ("none", "fsdp"):
        raise ValueError(
            f"`sharding` must be 'none' (DistributedDataParallel inside a worker) or 'fsdp' (FSDP2 inside a worker),"
            f" got {config.sharding!r}."
        )
    if config.sharding == "none":
        return
    if config.processes_per_worker < 2:
        raise ValueError(
            f"`sharding='fsdp'` shards each worker's replica over the worker's processes, but"
            f" `processes_per_worker={config.processes_per_worker}`. Set `processes_per_worker` to the processes that"
            " share one replica (for example the devices of one node), or leave `sharding='none'`."
        )
    if config.sync_warmup_steps > 0:
        raise ValueError(
            "`sharding='fsdp'` does not support a synchronous warm-up (`sync_warmup_steps > 0`) yet. Warm up with"
            " `sharding='none'` (or Lightning's FSDP strategies) and resume from that checkpoint, or set"
            " `sync_warmup_steps=0`."
        )


#: the defaults, read by the strategy's signature
DEFAULTS = DiLoCoConfig()
