"""DiLoCoStrategy: Distributed Low-Communication training (Douillard et al. 2023) as a Lightning strategy."""

import logging
import math
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_diloco.outer import OuterOptimizerCallable, OuterState, default_outer_optimizer, float_buffers

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "diloco"
_CHECKPOINT_VERSION = 1
_DEFAULT_OUTER = {"outer_lr": 0.7, "outer_momentum": 0.9, "outer_nesterov": True}


class DiLoCoStrategy(DDPStrategy):
    """DiLoCo: every process is a worker that trains its own replica, and the replicas meet every ``inner_steps``.

    Between outer steps, each worker runs the LightningModule's own optimizer (the inner optimizer, AdamW in the paper)
    on its own data shard with no gradient communication at all. Every ``inner_steps`` optimizer steps the workers
    average their pseudo-gradients ``global - local``, the outer optimizer (SGD with Nesterov momentum by default)
    steps the global weights with that average as gradient, and every worker continues from the new global weights.

    Args:
        inner_steps: H, the number of optimizer steps (``trainer.global_step`` increments, so gradient accumulation
            counts once per step) each worker takes between two outer steps.
        outer_lr: learning rate of the default outer optimizer (SGD with Nesterov momentum).
        outer_momentum: momentum of the default outer optimizer, in ``[0, 1)``; 0 gives plain SGD.
        outer_nesterov: use Nesterov momentum in the default outer optimizer.
        outer_optimizer: a callable that takes the global parameters and returns any ``torch.optim.Optimizer``; it
            replaces the default outer optimizer (and then ``outer_lr``/``outer_momentum``/``outer_nesterov`` must
            keep their defaults).
        outer_device: where the global weights and the outer optimizer state live; ``"cpu"`` keeps them out of
            accelerator memory. Defaults to the device the model trains on.
        eval_weights: which weights validation sees during ``fit``: ``"global"`` (the last outer step's weights) or
            ``"local"`` (each worker's current replica). The local weights are restored afterwards.
        bucket_cap_mb: the size of the flat buckets the pseudo-gradients travel in (one collective per bucket).
        accelerator: see :class:`~lightning.pytorch.strategies.DDPStrategy`.
        parallel_devices: see :class:`~lightning.pytorch.strategies.DDPStrategy`.
        cluster_environment: see :class:`~lightning.pytorch.strategies.DDPStrategy`.
        checkpoint_io: see :class:`~lightning.pytorch.strategies.DDPStrategy`.
        precision_plugin: see :class:`~lightning.pytorch.strategies.DDPStrategy`.
        process_group_backend: the ``torch.distributed`` backend, ``"gloo"`` or ``"nccl"``; defaults to the
            device's usual one.
        timeout: timeout of the collectives.
        start_method: how Lightning starts the worker processes, as in DDP.

    """

    strategy_name = "diloco"

    def __init__(
        self,
        inner_steps: int = 500,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        outer_nesterov: bool = True,
        outer_optimizer: Optional[OuterOptimizerCallable] = None,
        outer_device: Optional[Union[str, torch.device]] = None,
        eval_weights: Literal["global", "local"] = "global",
        bucket_cap_mb: float = 128.0,
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        _check_arguments(inner_steps, outer_lr, outer_momentum, outer_nesterov, outer_optimizer, eval_weights)
        if not bucket_cap_mb > 0:
            raise ValueError(f"`bucket_cap_mb` must be positive, got {bucket_cap_mb}.")
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.inner_steps = inner_steps
        self.eval_weights = eval_weights
        self.bucket_cap_mb = bucket_cap_mb
        self._outer_optimizer = outer_optimizer or default_outer_optimizer(outer_lr, outer_momentum, outer_nesterov)
        self._outer_device = None if outer_device is None else _parse_device(outer_device)
        self.outer: Optional[OuterState] = None
        self.step = 0  # optimizer steps taken under DiLoCo, all rounds together
        self.last_sync_step = 0  # value of `step` at the last outer step
        self._stashed_local: Optional[dict[str, Tensor]] = None  # local weights while evaluation sees global ones
        self.last_metrics: dict[str, float] = {}  # the metrics of the latest outer step

    # ------------------------------------------------------------------------------------------------------------
    # Set-up: no DistributedDataParallel wrapper, identical start, one optimizer
    # ------------------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        if self._layer_sync is not None:
            raise ValueError(
                "`Trainer(sync_batchnorm=True)` would all-reduce BatchNorm statistics at every step, which DiLoCo"
                " exists to avoid. Set `sync_batchnorm=False`: DiLoCo averages BatchNorm buffers at every outer step."
            )
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if len(self.optimizers) > 1:
            raise ValueError(
                f"DiLoCoStrategy supports one inner optimizer, but `configure_optimizers` returned"
                f" {len(self.optimizers)}. Put all parameters into one optimizer (with several parameter groups if"
                " they need different settings)."
            )
        device = self._outer_device or self.root_device
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"`outer_device={device}` needs CUDA, which is not available. Use `outer_device='cpu'`.")
        assert self.model is not None
        self.outer = OuterState(self.model, self._outer_optimizer, device)
        self.step = self.last_sync_step = 0

    @override
    def configure_ddp(self) -> None:
        """Leave the model unwrapped (so no gradient is all-reduced) and start every worker from rank 0's weights."""
        assert self.model is not None
        _sync_module_states(self.model)

    # ------------------------------------------------------------------------------------------------------------
    # The inner loop and the outer step
    # ------------------------------------------------------------------------------------------------------------

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[Union["pl.LightningModule", Module]] = None,
        **kwargs: Any,
    ) -> Any:
        """One inner step on this worker's replica; every ``inner_steps`` of them, an outer step."""
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self.step += 1
        if self.step - self.last_sync_step >= self.inner_steps:
            self.outer_step()
        return output

    def _global_step(self) -> int:
        """``trainer.global_step`` counting the optimizer step in progress (Lightning increments it afterwards)."""
        assert self.lightning_module is not None
        trainer = self.lightning_module.trainer
        in_step = trainer.training and self.lightning_module._current_fx_name in ("optimizer_step", "training_step")
        return trainer.global_step + int(in_step)

    def outer_step(self) -> None:
        """Algorithm 1's outer step: average the pseudo-gradients, step the global weights, restart from them."""
        assert self.outer is not None and self.model is not None
        start = time.perf_counter()
        local = list(self.model.parameters())
        device = self._communication_device()

        deltas = self.outer.pseudo_gradients(local, device)  # global - local, this worker's pseudo-gradient
        stats = self.all_reduce_mean(deltas)  # the mean over workers
        self.outer.step(deltas)  # outer optimizer step on the global weights
        stats += self._average_buffers(device)
        self.outer.copy_to(self.model)  # every worker restarts from the global weights

        self.last_sync_step = self.step
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self._log_outer_step(
            {
                "diloco/outer_step": float(self.outer.outer_step),
                "diloco/pseudo_grad_norm": math.sqrt(sum(float(d.double().square().sum()) for d in deltas)),
                "diloco/sync_seconds": time.perf_counter() - start,
                "diloco/bytes_sent": float(stats.bytes_sent),
            }
        )

    def all_reduce_mean(self, tensors: list[Tensor]) -> "CommStats":
        """Average ``tensors`` over all workers in place, in flat buckets."""
        return average_(tensors, bucket_cap_mb=self.bucket_cap_mb)

    def _average_buffers(self, device: torch.device) -> "CommStats":
        assert self.outer is not None and self.model is not None
        buffers = {name: b.detach().to(device, self.outer.buffers[name].dtype) for name, b in float_buffers(self.model)}
        stats = self.all_reduce_mean(list(buffers.values()))
        self.outer.set_buffers(buffers)
        return stats

    def _communication_device(self) -> torch.device:
        """The outer device when the backend can reach it (gloo reaches CPU and CUDA), else the training device."""
        assert self.outer is not None
        if self.outer.device.type == "cpu" and dist.is_initialized() and dist.get_backend() == "nccl":
            return self.root_device
        return self.outer.device

    def _log_outer_step(self, metrics: dict[str, float]) -> None:
        """Send the outer step's metrics to every logger, at the step of this outer step.

        They go to the loggers directly, not through ``LightningModule.log``, so that ``log_every_n_steps`` does not
        drop outer steps that fall between two logging steps. ``last_metrics`` keeps them for callbacks.
        """
        self.last_metrics = metrics
        module = self.lightning_module
        assert module is not None
        for logger in module.trainer.loggers:
            logger.log_metrics(metrics, step=self._global_step())

    @override
    def on_train_end(self) -> None:
        """A final outer step when ``fit`` stops mid-round, so every rank ends holding the same global weights."""
        if self.outer is not None and self.step > self.last_sync_step:
            self.outer_step()
        super().on_train_end()

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation during fit sees the global weights
    # ------------------------------------------------------------------------------------------------------------

    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self.outer is not None and self.eval_weights == "global" and self._stashed_local is None:
            assert self.model is not None
            self._stashed_local = _clone_state(self.model, self.outer.device)
            self.outer.copy_to(self.model)

    @override
    def on_validation_end(self) -> None:
        if self._stashed_local is not None:
            assert self.model is not None
            self.model.load_state_dict(self._stashed_local, strict=False)
            self._stashed_local = None
        super().on_validation_end()

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints: the global model as `state_dict`, every worker's local state under "diloco"
    # ------------------------------------------------------------------------------------------------------------

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The global model's weights, so that ``load_from_checkpoint`` gives the global model."""
        if self.outer is None:
            return super().lightning_module_state_dict()
        assert self.lightning_module is not None
        return self.outer.module_state_dict(self.lightning_module)

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None
    ) -> None:
        """Gather every worker's local weights and inner optimizer state into rank 0's checkpoint, then write it.

        All ranks call this (as Lightning does), since gathering is a collective.
        """
        if self.outer is not None and "optimizer_states" in checkpoint:
            workers = self._gather_to_rank_zero(self._worker_state())
            if self.is_global_zero:
                checkpoint[CHECKPOINT_KEY] = {
                    "version": _CHECKPOINT_VERSION,
                    "inner_steps": self.inner_steps,
                    "world_size": self.world_size,
                    "step": self.step,
                    "last_sync_step": self.last_sync_step,
                    "outer": self.outer.state_dict(),
                    "workers": workers,
                }
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def _worker_state(self) -> dict[str, Any]:
        """This worker's own state: its local weights and buffers, and its inner optimizer's state, on the CPU."""
        assert self.model is not None
        module = self._stashed_local if self._stashed_local is not None else self.model.state_dict()
        return {
            "module": {name: t.detach().cpu().clone() for name, t in module.items()},
            "optimizer_states": [_to_cpu(self.optimizer_state(opt)) for opt in self.optimizers],
        }

    def _gather_to_rank_zero(self, obj: Any) -> Optional[list[Any]]:
        if not dist.is_initialized() or self.world_size == 1:
            return [obj]
        gathered: Optional[list[Any]] = [None] * self.world_size if self.is_global_zero else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    @override
    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        try:
            super().load_model_state_dict(checkpoint, strict=strict)
        except RuntimeError as err:
            raise ValueError(
                "The checkpoint's `state_dict` does not fit this LightningModule (it was written for a different"
                f" model): {err}\nPass the checkpoint of this model as `ckpt_path`, or build the model the checkpoint"
                " was written for."
            ) from err

    @override
    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Restore the outer state, the step counters and this worker's local weights and inner optimizer state."""
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None or self.outer is None:
            rank_zero_warn(
                "The checkpoint has no DiLoCo state (it was written by another strategy or with weights only):"
                " DiLoCo starts a new round from its weights, with a fresh outer optimizer, and every worker gets"
                " rank 0's inner optimizer state."
            )
            super().load_optimizer_state_dict(checkpoint)
            return
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"The checkpoint was written by {state['world_size']} DiLoCo workers but this run has"
                f" {self.world_size}. Resume with the same number of processes (devices x num_nodes)."
            )
        self.outer.load_state_dict(state["outer"])
        worker = state["workers"][self.global_rank]
        assert self.model is not None
        self.model.load_state_dict(worker["module"])
        for optimizer, opt_state in zip(self.optimizers, worker["optimizer_states"]):
            optimizer.load_state_dict(opt_state)
            _optimizer_to_device(optimizer, self.root_device)
        self.step = int(state["step"])
        self.last_sync_step = int(state["last_sync_step"])

    # ------------------------------------------------------------------------------------------------------------
    # Registry
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        entries = (("diloco", "popen"), ("diloco_spawn", "spawn"), ("diloco_fork", "fork"), ("diloco_notebook", "fork"))
        for name, start_method in entries:
            if name in strategy_registry:
                continue
            strategy_registry.register(
                name,
                cls,
                description=f"DiLoCo strategy with `start_method` '{start_method}'",
                start_method=start_method,
            )


def _check_arguments(
    inner_steps: int,
    outer_lr: float,
    outer_momentum: float,
    outer_nesterov: bool,
    outer_optimizer: Optional[OuterOptimizerCallable],
    eval_weights: str,
) -> None:
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(
            f"`inner_steps` must be an integer >= 1 (the optimizer steps between outer steps), got {inner_steps!r}."
        )
    if not (isinstance(outer_lr, (int, float)) and math.isfinite(outer_lr) and outer_lr > 0):
        raise ValueError(f"`outer_lr` must be a positive number (the paper uses 0.7), got {outer_lr!r}.")
    if not (isinstance(outer_momentum, (int, float)) and 0 <= outer_momentum < 1):
        raise ValueError(
            f"`outer_momentum` must be in [0, 1) (the paper uses 0.9; 0 gives plain SGD), got {outer_momentum!r}."
        )
    if outer_optimizer is not None:
        if not callable(outer_optimizer):
            raise TypeError(
                "`outer_optimizer` must be a callable that takes the global parameters and returns a"
                f" `torch.optim.Optimizer`, got {type(outer_optimizer).__name__}."
            )
        changed = [
            name
            for name, value in zip(_DEFAULT_OUTER, (outer_lr, outer_momentum, outer_nesterov))
            if value != _DEFAULT_OUTER[name]
        ]
        if changed:
            raise ValueError(
                f"{', '.join(f'`{n}`' for n in changed)} configure the default outer optimizer, which `outer_optimizer`"
                " replaces. Set the learning rate and momentum inside `outer_optimizer` instead."
            )
    if eval_weights not in ("global", "local"):
        raise ValueError(f"`eval_weights` must be 'global' or 'local', got {eval_weights!r}.")


def _parse_device(device: Union[str, torch.device]) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`outer_device={device!r}` is not a device; use 'cpu', 'cuda' or 'cuda:N'.") from err


def _clone_state(module: Module, device: torch.device) -> dict[str, Tensor]:
    """A copy of the parameters and floating-point buffers of ``module``."""
    state = {name: p.detach().to(device, copy=True) for name, p in module.named_parameters()}
    state.update({name: b.detach().to(device, copy=True) for name, b in float_buffers(module)})
    return state


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class CommStats:
    """What one collective call cost this worker."""

    def __init__(self, bytes_sent: int = 0, seconds: float = 0.0) -> None:
        self.bytes_sent = bytes_sent
        self.seconds = seconds

    def __iadd__(self, other: "CommStats") -> "CommStats":
        self.bytes_sent += other.bytes_sent
        self.seconds += other.seconds
        return self


@torch.no_grad()
def average_(tensors: list[Tensor], bucket_cap_mb: float = 128.0) -> CommStats:
    """Average ``tensors`` over the world in place, one all-reduce per flat bucket."""
    stats = CommStats()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1 or not tensors:
        return stats
    cap = int(bucket_cap_mb * 2**20)
    bucket: list[Tensor] = []
    size = 0
    for i, t in enumerate(tensors):
        bucket.append(t)
        size += t.numel() * t.element_size()
        if size >= cap or i == len(tensors) - 1:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            start = time.perf_counter()
            dist.all_reduce(flat)
            stats.seconds += time.perf_counter() - start
            flat /= world
            stats.bytes_sent += 2 * (world - 1) * flat.numel() * flat.element_size() // world
            offset = 0
            for b in bucket:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0
    return stats
