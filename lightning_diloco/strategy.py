"""DiLoCoStrategy: Distributed Low-Communication training (Douillard et al. 2023) as a Lightning strategy."""

import inspect
import logging
import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.distributed import _init_dist_connection
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_diloco.checkpoint_io import AtomicCheckpointIO
from lightning_diloco.collectives import CommStats
from lightning_diloco.compression import COMPRESSOR_NAMES, ErrorFeedback
from lightning_diloco.elastic import attempt_store
from lightning_diloco.fragments import is_due, split_into_fragments, sync_offset
from lightning_diloco.outer import OuterOptimizerCallable, OuterState, default_outer_optimizer, float_buffers
from lightning_diloco.warmup import average_gradients
from lightning_diloco.topology import Topology, average_across_workers, build_topology, check_processes_per_worker

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "diloco"
_CHECKPOINT_VERSION = 1
_DEFAULT_OUTER = {"outer_lr": 0.7, "outer_momentum": 0.9, "outer_nesterov": True}
_SHORT_OVERLAP_SECONDS = 0.2
# DistributedDataParallel arguments that the strategy sets itself
_DDP_KWARGS_SET_BY_STRATEGY = {"self", "module", "device_ids", "process_group", "device_mesh"}  # a wait for an overlapped sync shorter than this is never warned about


class OuterSyncError(RuntimeError):
    """An outer step could not complete: a peer died or stalled, or every worker's pseudo-gradient was not finite."""


@dataclass
class _Sync:
    """One fragment's outer step between the moment its pseudo-gradients leave and the moment they are applied."""

    fragment: int
    step: int  # the optimizer step at which it started
    apply_at: int  # the optimizer step after which it is applied (step + overlap_steps)
    deltas: list[Tensor]  # this worker's pseudo-gradients; the workers' mean once `future` is done
    buffers: dict[str, Tensor]  # this worker's float buffers; their mean once done
    weights: list[float]  # every worker's weight in the mean (0 for a worker whose pseudo-gradient is not finite)
    future: Optional["Future[CommStats]"] = None
    stats: Optional[CommStats] = None  # set once the means are in `deltas` and `buffers`
    started: float = field(default_factory=time.perf_counter)
    exchange_seconds: float = 0.0  # time in the exchange of weights and speeds, where a worker waits for slower ones


class DiLoCoStrategy(DDPStrategy):
    """DiLoCo: every worker trains its own replica, and the replicas meet every ``inner_steps`` optimizer steps.

    Between outer steps each worker runs the LightningModule's own optimizer (the inner optimizer, AdamW in the paper)
    on its own data shard with no gradient communication between workers. Every ``inner_steps`` optimizer steps the
    workers average their pseudo-gradients ``global - local``, the outer optimizer (SGD with Nesterov momentum by
    default) steps the global weights with that average as gradient, and every worker continues from the new global
    weights (:meth:`outer_step`).

    Args:
        inner_steps: H, the optimizer steps (``trainer.global_step`` increments, so gradient accumulation counts once
            per step) each worker takes between two outer steps.
        outer_lr: learning rate of the default outer optimizer (SGD with Nesterov momentum).
        outer_momentum: momentum of the default outer optimizer, in ``[0, 1)``; 0 gives plain SGD.
        outer_nesterov: use Nesterov momentum in the default outer optimizer.
        outer_optimizer: a callable that takes the global parameters and returns any ``torch.optim.Optimizer``; it
            replaces the default outer optimizer (``outer_lr``/``outer_momentum``/``outer_nesterov`` must then keep
            their defaults).
        outer_device: where the global weights and the outer optimizer state live; ``"cpu"`` keeps them out of
            accelerator memory. Defaults to the device the model trains on.
        sync_warmup_steps: W; the first W optimizer steps are synchronous, as in DDP (gradients averaged over all
            processes at every step); DiLoCo then starts from the shared weights and inner optimizer state. The paper
            starts DiLoCo from a model trained synchronously; 0 (the default) starts DiLoCo at once.
        eval_weights: which weights validation sees during ``fit``: ``"global"`` (the global weights) or ``"local"``
            (each worker's replica). The local weights are restored afterwards.
        compression: how pseudo-gradients travel: ``"none"`` (fp32), ``"bf16"``, ``"fp16"``, ``"int8"``, ``"int4"`` or
            ``"e3m0"`` (4-bit); the sum is always accumulated in fp32.
        error_feedback: carry what compression dropped into the next outer step.
        num_fragments: F; the parameters are cut into F bands of layers that sync at staggered steps (Streaming
            DiLoCo), each every ``inner_steps``, so that one sync moves about 1/F of the model.
        overlap_steps: tau; a sync's communication runs in the background during this many inner steps, then its
            outer update is applied. 0 waits for it at once.
        overlap_mixing: alpha; with ``overlap_steps > 0`` a worker keeps this share of its local weights when the
            outer update lands: ``local = alpha * local + (1 - alpha) * global``.
        processes_per_worker: G; each DiLoCo worker is G processes that train one replica together (DDP inside the
            worker, every step); only the workers' outer syncs cross between them. Must divide the world size.
        outer_backend: backend of the outer syncs' process groups, e.g. ``"gloo"`` (over CPU tensors, so workers on
            different kinds of accelerators can sync). Defaults to the training backend.
        sync_timeout: seconds an outer sync may wait for a peer before it fails with :class:`OuterSyncError`
            (instead of hanging); defaults to ``timeout``.
        nonfinite: what a worker whose pseudo-gradient is not finite (NaN/inf) does: ``"skip"`` drops its
            contribution (the mean is over the healthy workers), warns, and restarts it from the global weights with
            a fresh inner optimizer state; ``"raise"`` stops training with :class:`OuterSyncError`.
        speed_weighted: let slower workers compute fewer of the H steps of a round (in proportion to their measured
            speed) and weight pseudo-gradients by the steps each computed, so fast workers do not wait at syncs.
        outer_bucket_cap_mb: the size of the flat buckets the pseudo-gradients travel in (one collective per bucket).
        find_unused_parameters: as in DDP, for the ``DistributedDataParallel`` inside a worker of several processes.
            A worker of one process has no ``DistributedDataParallel`` (nothing is reduced between steps), so this
            and the other DDP keywords below have no effect there.
        static_graph: as in DDP, for the ``DistributedDataParallel`` inside a worker of several processes.
        gradient_as_bucket_view: as in DDP, for the ``DistributedDataParallel`` inside a worker of several processes.
        broadcast_buffers: as in DDP, for the ``DistributedDataParallel`` inside a worker of several processes.
        bucket_cap_mb: DDP's gradient bucket size, for the ``DistributedDataParallel`` inside a worker of several
            processes (the outer syncs' buckets are ``outer_bucket_cap_mb``).
        **kwargs: any other keyword argument of ``torch.nn.parallel.DistributedDataParallel``, as ``DDPStrategy``
            takes them, for the ``DistributedDataParallel`` inside a worker of several processes.
        accelerator: see :class:`~lightning.pytorch.strategies.DDPStrategy`.
        parallel_devices: see :class:`~lightning.pytorch.strategies.DDPStrategy`.
        cluster_environment: see :class:`~lightning.pytorch.strategies.DDPStrategy`.
        checkpoint_io: how checkpoints are written and read; defaults to
            :class:`~lightning_diloco.checkpoint_io.AtomicCheckpointIO` (complete files or none, whenever a writer
            is killed).
        precision_plugin: see :class:`~lightning.pytorch.strategies.DDPStrategy`.
        ddp_comm_state: as in DDP, the state of ``ddp_comm_hook``.
        ddp_comm_hook: as in DDP, a communication hook of the ``DistributedDataParallel`` inside a worker of several
            processes (registered on CUDA, as DDP does). A worker of one process communicates no gradients, so there
            is nothing for a hook to do there.
        ddp_comm_wrapper: as in DDP, a wrapper of ``ddp_comm_hook``.
        model_averaging_period: DDP's post-local SGD averaging period. DiLoCo is itself periodic averaging (with an
            outer optimizer), so this must stay ``None``: use ``inner_steps``.
        process_group_backend: the training backend, ``"gloo"`` or ``"nccl"``; defaults to the device's usual one.
        timeout: timeout of the training process group's collectives.
        start_method: how Lightning starts the worker processes, as in DDP.

    The first twelve arguments are ``DDPStrategy``'s, in its order, so code written for ``DDPStrategy`` works
    unchanged; DiLoCo's own arguments are keyword-only.

    """

    strategy_name = "diloco"

    def __init__(
        self,
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        ddp_comm_state: Optional[object] = None,
        ddp_comm_hook: Optional[Callable] = None,
        ddp_comm_wrapper: Optional[Callable] = None,
        model_averaging_period: Optional[int] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        *,
        inner_steps: int = 500,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        outer_nesterov: bool = True,
        outer_optimizer: Optional[OuterOptimizerCallable] = None,
        outer_device: Optional[Union[str, torch.device]] = None,
        sync_warmup_steps: int = 0,
        eval_weights: Literal["global", "local"] = "global",
        compression: str = "none",
        error_feedback: bool = False,
        num_fragments: int = 1,
        overlap_steps: int = 0,
        overlap_mixing: float = 0.5,
        processes_per_worker: int = 1,
        outer_backend: Optional[str] = None,
        sync_timeout: Optional[float] = None,
        nonfinite: Literal["skip", "raise"] = "skip",
        speed_weighted: bool = False,
        outer_bucket_cap_mb: float = 128.0,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        gradient_as_bucket_view: bool = False,
        broadcast_buffers: bool = True,
        bucket_cap_mb: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        _check_arguments(locals())
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            ddp_comm_state=ddp_comm_state,
            ddp_comm_hook=ddp_comm_hook,
            ddp_comm_wrapper=ddp_comm_wrapper,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        # the DistributedDataParallel inside a worker of several processes gets DDP's own keywords
        self._ddp_kwargs = {
            "find_unused_parameters": find_unused_parameters,
            "static_graph": static_graph,
            "gradient_as_bucket_view": gradient_as_bucket_view,
            "broadcast_buffers": broadcast_buffers,
            **({} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}),
        }
        self._ddp_kwargs.update(_ddp_only_kwargs(kwargs))
        self.inner_steps = inner_steps
        self.sync_warmup_steps = sync_warmup_steps
        self.eval_weights = eval_weights
        self.compression = compression
        self.error_feedback = error_feedback
        self.num_fragments = num_fragments
        self.overlap_steps = overlap_steps
        self.overlap_mixing = overlap_mixing
        self.processes_per_worker = processes_per_worker
        self.outer_backend = outer_backend
        self.sync_timeout = sync_timeout
        self.nonfinite = nonfinite
        self.speed_weighted = speed_weighted
        self.outer_bucket_cap_mb = outer_bucket_cap_mb
        self._outer_optimizer = outer_optimizer or default_outer_optimizer(outer_lr, outer_momentum, outer_nesterov)
        self._outer_device = None if outer_device is None else _parse_device(outer_device)

        self.topology: Optional[Topology] = None
        self.outer: Optional[OuterState] = None  # None outside `fit` and during the synchronous warm-up
        self.fragments: list[list[int]] = []
        self.warmup_taken = 0  # synchronous warm-up steps taken
        self.step = 0  # optimizer steps taken under DiLoCo, after the warm-up
        self.last_sync: list[int] = []  # per fragment, the value of `step` at its last outer step
        self.last_metrics: dict[str, float] = {}  # the metrics of the latest outer step
        # bytes this process sent since the start of training: in outer syncs, and in the synchronous warm-up
        self.bytes_sent = {"outer": 0.0, "warmup": 0.0}
        self._fitting = False
        self._pending: deque[_Sync] = deque()
        self._executor: Optional[ThreadPoolExecutor] = None
        self._feedback: list[Optional[ErrorFeedback]] = []
        self._stashed_local: Optional[dict[str, Tensor]] = None  # local weights while evaluation sees global ones
        self._warned_short_overlap = False
        # speed-weighted rounds: steps this worker computes in the current round, and its measured compute time
        self._budget = inner_steps
        self._computed = 0
        self._compute_seconds = 0.0

    # ------------------------------------------------------------------------------------------------------------
    # Set-up: process groups, no DistributedDataParallel across workers, identical start, one optimizer
    # ------------------------------------------------------------------------------------------------------------

    @property
    @override
    def checkpoint_io(self) -> CheckpointIO:
        """The checkpoint plugin: the user's, or :class:`AtomicCheckpointIO` (also beneath a wrapping plugin such as
        ``AsyncCheckpointIO`` that was given none)."""
        if self._checkpoint_io is None:
            self._checkpoint_io = AtomicCheckpointIO()
        elif isinstance(self._checkpoint_io, _WrappingCheckpointIO):
            self._checkpoint_io.checkpoint_io = AtomicCheckpointIO()  # kept only if the wrapper has no plugin yet
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: Optional[CheckpointIO]) -> None:
        self._checkpoint_io = io

    @override
    def setup_distributed(self) -> None:
        """Join the process group (in a store namespace of this torchrun attempt, see :mod:`lightning_diloco.elastic`)
        and build the groups of the outer sync."""
        self._join_process_group()
        timeout = timedelta(seconds=self.sync_timeout) if self.sync_timeout is not None else self._timeout
        self.topology = build_topology(self.processes_per_worker, self.outer_backend, timeout or default_pg_timeout)

    def _join_process_group(self) -> None:
        """``DDPStrategy.setup_distributed``, but restarted torchrun workers never read the keys of killed ones.

        Under torchrun the process group is first joined through :func:`attempt_store`; Lightning's set-up then finds it
        initialized and does the rest.
        """
        if not dist.is_initialized():
            self.set_world_ranks()
            store = attempt_store(self.global_rank, self.world_size, self._timeout or default_pg_timeout)
            if store is not None:
                assert self.cluster_environment is not None
                device_id = self.root_device if self.root_device.type != "cpu" else None
                _init_dist_connection(
                    self.cluster_environment, self._get_process_group_backend(), timeout=self._timeout,
                    device_id=device_id, store=store,
                )
        super().setup_distributed()

    @override
    def _configure_launcher(self) -> None:
        """Check the worker layout against the number of processes before any process is started."""
        check_processes_per_worker(self.processes_per_worker, self.num_nodes * self.num_processes)
        super()._configure_launcher()

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        if self._layer_sync is not None:
            raise ValueError(
                "`Trainer(sync_batchnorm=True)` would all-reduce BatchNorm statistics at every step, which DiLoCo"
                " exists to avoid. Set `sync_batchnorm=False`: DiLoCo averages BatchNorm buffers at every outer step."
            )
        check_processes_per_worker(self.processes_per_worker, self.world_size)
        self._fitting = trainer.state.fn == TrainerFn.FITTING
        super().setup(trainer)
        if not self._fitting:
            return
        if len(self.optimizers) > 1:
            raise ValueError(
                f"DiLoCoStrategy supports one inner optimizer, but `configure_optimizers` returned"
                f" {len(self.optimizers)}. Put all parameters into one optimizer (with several parameter groups if"
                " they need different settings)."
            )
        module = self.lightning_module
        assert module is not None
        if self.speed_weighted and not module.automatic_optimization:
            raise ValueError(
                "`speed_weighted=True` skips the computation of some steps, which needs automatic optimization."
                " Use `automatic_optimization = True` or `speed_weighted=False`."
            )
        device = self._outer_device or self.root_device
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"`outer_device={device}` needs CUDA, which is not available. Use `outer_device='cpu'`.")
        self.warmup_taken = 0
        self.outer = None
        self.bytes_sent = {"outer": 0.0, "warmup": 0.0}
        self._warned_short_overlap = False
        if self.sync_warmup_steps == 0:
            self._start_diloco()
        if self.overlap_steps > 0 and self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diloco-outer-sync")
        _no_collective_per_step(trainer)

    def _start_diloco(self) -> None:
        """Take the module's current weights as the global weights, with a fresh outer optimizer and round."""
        module = self.lightning_module
        assert module is not None
        self.outer = OuterState(module, self._outer_optimizer, self._outer_device or self.root_device)
        self.fragments = split_into_fragments([p.numel() for p in module.parameters()], self.num_fragments)
        self.step = 0
        self.last_sync = [0] * self.num_fragments
        self._pending.clear()
        self._feedback = [ErrorFeedback() if self.error_feedback else None for _ in self.fragments]
        self._budget, self._computed, self._compute_seconds = self.inner_steps, 0, 0.0

    @override
    def configure_ddp(self) -> None:
        """Start every process from rank 0's weights; wrap in DDP only inside a worker of several processes."""
        assert self.model is not None and self.topology is not None
        _sync_module_states(self.model)
        if self.processes_per_worker > 1:
            self._ddp_kwargs["process_group"] = self.topology.intra
            super().configure_ddp()
        elif self._ddp_comm_hook is not None or self._non_default_ddp_kwargs():
            given = ", ".join(["ddp_comm_hook"] * (self._ddp_comm_hook is not None) + self._non_default_ddp_kwargs())
            rank_zero_info(
                f"DiLoCoStrategy: {given} configure the DistributedDataParallel inside a worker of several processes."
                " Each worker here is one process, with no DistributedDataParallel and no gradient communication"
                " between outer steps, so they have no effect."
            )

    def _non_default_ddp_kwargs(self) -> list[str]:
        defaults = {"find_unused_parameters": False, "static_graph": False, "gradient_as_bucket_view": False,
                    "broadcast_buffers": True}
        return sorted(k for k, v in self._ddp_kwargs.items() if k != "process_group" and defaults.get(k, object()) != v)

    @property
    def num_workers(self) -> int:
        """The number of DiLoCo workers (processes divided by ``processes_per_worker``)."""
        return self.world_size // self.processes_per_worker

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        self._warn_if_no_outer_step_in_time()
        self._warn_about_per_step_collectives()

    def _warn_about_per_step_collectives(self) -> None:
        """Warn about Lightning callbacks that make every worker wait for rank 0 at every training step."""
        module = self.lightning_module
        assert module is not None
        if self.world_size == 1:
            return
        per_step = []
        for callback in module.trainer.callbacks:
            if isinstance(callback, Timer) and callback._duration is not None and callback._interval == "step":
                per_step.append("`Trainer(max_time=...)` / `Timer(interval='step')`")
            if isinstance(callback, ModelCheckpoint) and callback._train_time_interval is not None:
                per_step.append("`ModelCheckpoint(train_time_interval=...)`")
        if per_step:
            rank_zero_warn(
                f"{' and '.join(per_step)} broadcast rank 0's decision at every training step: a collective per step"
                " between all workers, which DiLoCo otherwise avoids (every worker then waits for the slowest at every"
                " step). It works; to communicate only at outer steps use `Timer(interval='epoch')` or `max_steps`,"
                " and `ModelCheckpoint(every_n_train_steps=...)`."
            )

    def _warn_if_no_outer_step_in_time(self) -> None:
        """Warn when the first outer step comes after the end of training, or after a validation that then sees the
        untrained global weights."""
        module = self.lightning_module
        assert module is not None
        trainer = module.trainer
        first_outer = self.sync_warmup_steps + min(
            sync_offset(f, self.num_fragments, self.inner_steps) or self.inner_steps for f in range(self.num_fragments)
        )
        first_outer -= self.warmup_taken + self.step  # a resumed run is part-way
        total = trainer.estimated_stepping_batches - trainer.global_step
        what = (
            f"The first outer step comes after {first_outer} more optimizer steps (`sync_warmup_steps="
            f"{self.sync_warmup_steps}` + `inner_steps={self.inner_steps}`)"
        )
        if math.isfinite(total) and first_outer > total:
            rank_zero_warn(
                f"{what}, but training ends after {int(total)}: the workers never meet before the final outer step at"
                " the end of `fit`, and validation during `fit` sees the initial global weights. Lower `inner_steps`"
                " (or `sync_warmup_steps`), or train longer."
            )
            return
        if self.eval_weights != "global" or self.outer is None or self.outer.outer_step > 0 or not trainer.enable_validation:
            return
        batches = trainer.num_training_batches
        if not isinstance(trainer.val_check_batch, int) or not math.isfinite(batches):
            return
        first_val_batch = trainer.val_check_batch
        if trainer.check_val_every_n_epoch is not None:
            first_val_batch += (trainer.check_val_every_n_epoch - 1) * int(batches)
        first_val = first_val_batch // max(trainer.accumulate_grad_batches, 1)
        if first_val < first_outer:
            rank_zero_warn(
                f"{what}, but validation first runs after {first_val}: until the first outer step it sees the"
                " untrained global weights. Lower `inner_steps`, start with `sync_warmup_steps`, validate later, or"
                " use `eval_weights='local'`."
            )

    # ------------------------------------------------------------------------------------------------------------
    # The inner loop
    # ------------------------------------------------------------------------------------------------------------

    def _skips_step(self) -> bool:
        """Whether this worker has used up this round's budget of computed steps (``speed_weighted``)."""
        return self.speed_weighted and self.outer is not None and self._computed >= self._budget

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """The module's training step, unless a slow worker has used up this round's budget (``speed_weighted``)."""
        if self._skips_step():
            # Lightning refuses `None` from a training step in distributed runs: a constant stands in for the loss;
            # its backward and the optimizer step are skipped, so no gradient is made and nothing moves
            return torch.zeros((), device=self.root_device)
        return super().training_step(*args, **kwargs)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        if self._skips_step():
            return closure_loss
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[Union["pl.LightningModule", Module]] = None,
        **kwargs: Any,
    ) -> Any:
        """One inner step on this worker's replica, then any outer step that falls after it.

        During the synchronous warm-up (``sync_warmup_steps``) the step is DDP's instead: the gradients are averaged
        over all processes before the optimizer steps.
        """
        if self._fitting and self.outer is None:
            return self._warmup_step(optimizer, closure, model, **kwargs)
        skipped = self._skips_step()
        start = time.perf_counter()
        if skipped:
            output = closure()  # Lightning's closure must run (it zeroes the gradients); the optimizer does not step
        else:
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if not skipped:
            self._computed += 1
            self._compute_seconds += time.perf_counter() - start
        self.step += 1
        if self.outer is not None:
            while self._pending and self._pending[0].apply_at <= self.step:
                self._apply(self._pending.popleft())
            for fragment in range(self.num_fragments):
                if is_due(self.step, fragment, self.num_fragments, self.inner_steps):
                    self.outer_step(fragment)
        return output

    def _warmup_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: Optional[Union["pl.LightningModule", Module]],
        **kwargs: Any,
    ) -> Any:
        """A synchronous step: the closure's gradients are averaged over all processes, then the optimizer steps."""
        module = self.lightning_module
        assert module is not None

        def closure_then_average() -> Any:
            result = closure()
            self.bytes_sent["warmup"] += average_gradients(module, self.outer_bucket_cap_mb)
            return result

        output = super().optimizer_step(optimizer, closure_then_average, model, **kwargs)
        self.warmup_taken += 1
        if self.warmup_taken >= self.sync_warmup_steps:
            _sync_module_states(module)  # the weights agree already; this also gives every worker rank 0's buffers
            self._start_diloco()
        return output

    # ------------------------------------------------------------------------------------------------------------
    # The outer step (Algorithm 1, lines 8-12)
    # ------------------------------------------------------------------------------------------------------------

    def outer_step(self, fragment: int = 0, overlap: Optional[bool] = None) -> None:
        """The outer step of one fragment (the whole model unless ``num_fragments > 1``).

        1. This worker's pseudo-gradient: ``global - local``.
        2. Its mean over the workers (in the background when ``overlap_steps > 0``).
        3. The outer optimizer steps the global weights with that mean as gradient.
        4. The worker continues from the global weights.
        """
        assert self.outer is not None
        module = self.lightning_module
        assert module is not None
        self._follow_module()
        device = self._communication_device()
        deltas = self.outer.pseudo_gradients(device, self.fragments[fragment])  # 1.
        buffers = {}
        if fragment == self.num_fragments - 1:  # the last fragment also carries the float buffers
            buffers = {n: b.detach().to(device, torch.float32, copy=True) for n, b in float_buffers(module)}
        mine = self._health_row(deltas)  # read here: the step counters move on while a sync is in flight
        sync = _Sync(fragment, self.step, self.step, deltas, buffers, [])
        overlap = self.overlap_steps > 0 if overlap is None else overlap
        if overlap:  # 2., in the background, the exchange of weights included: nothing waits on this thread
            assert self._executor is not None
            sync.apply_at = self.step + self.overlap_steps
            sync.future = self._executor.submit(self._exchange_and_average, sync, mine)
            self._pending.append(sync)
        else:
            self._exchange(sync, mine)
            self._apply(sync)

    def _exchange(self, sync: _Sync, mine: Tensor) -> None:
        started = time.perf_counter()
        sync.weights = self._exchange_weights(mine, sync.step)
        sync.exchange_seconds = time.perf_counter() - started

    def _exchange_and_average(self, sync: _Sync, mine: Tensor) -> CommStats:
        """The background part of an overlapped sync: the exchange of weights, then the mean."""
        self._exchange(sync, mine)
        return self._average(sync)

    def _average(self, sync: _Sync) -> CommStats:
        """Replace ``sync.deltas`` and ``sync.buffers`` by their weighted means over the workers."""
        assert self.topology is not None
        me = self.topology.worker
        weight, total = sync.weights[me], sum(sync.weights)
        if weight == 0:
            for d in sync.deltas:
                d.zero_()  # a poisoned worker sends exact zeros
        stats = average_across_workers(
            sync.deltas, self.topology, self.compression, self.outer_bucket_cap_mb, weight, max(total, 1e-12),
            self._feedback[sync.fragment] if weight else None,
        )
        if sync.buffers:
            values = list(sync.buffers.values())
            if self.topology.intra_sync is not None:
                _share_first_process_buffers(values, self.topology)
            if weight == 0:
                for b in values:
                    b.zero_()
            healthy = float(sum(1 for w in sync.weights if w > 0))
            stats = stats + average_across_workers(
                values, self.topology, "none", self.outer_bucket_cap_mb, float(weight > 0), healthy, None
            )
        sync.stats = stats
        return stats

    def _apply(self, sync: _Sync) -> None:
        """Wait for ``sync``'s mean (2.), step the global weights (3.) and move this worker to them (4.)."""
        assert self.outer is not None
        module = self.lightning_module
        assert module is not None
        waited = time.perf_counter()
        try:
            if sync.future is not None:
                sync.future.result()
            elif sync.stats is None:
                self._average(sync)
        except OuterSyncError:
            raise
        except RuntimeError as err:
            raise self._sync_failed(sync, err) from err
        stats = sync.stats
        assert stats is not None
        blocked = time.perf_counter() - waited
        if sync.future is not None and self.step >= sync.apply_at:  # an overlapped sync that landed when due
            self._warn_if_overlap_too_short(sync, blocked, waited - sync.started)
        healthy = sum(1 for w in sync.weights if w > 0)
        mine_ok = sync.weights[self.topology.worker] > 0 if self.topology else True
        if healthy:
            self.outer.step(sync.deltas, self.fragments[sync.fragment])  # 3.
        if sync.buffers:
            self.outer.set_buffers(sync.buffers)
        mixing = self.overlap_mixing if sync.apply_at > sync.step and mine_ok else 0.0
        self.outer.copy_to(module, self.fragments[sync.fragment], mixing, buffers=bool(sync.buffers))  # 4.
        if not mine_ok:
            self._reset_inner_optimizer()
        self.last_sync[sync.fragment] = sync.step
        if sync.fragment == self.num_fragments - 1:
            self._next_round_budget(sync)
        self._log_outer_step(sync, stats, blocked, healthy)

    def _warn_if_overlap_too_short(self, sync: _Sync, blocked: float, window: float) -> None:
        """Warn once per ``fit`` when the loop waited for an overlapped sync for a good part of its overlap window."""
        if self._warned_short_overlap or blocked < max(_SHORT_OVERLAP_SECONDS, 0.25 * window):
            return
        self._warned_short_overlap = True
        rank_zero_warn(
            f"The outer sync of fragment {sync.fragment} started at step {sync.step} was not done after"
            f" `overlap_steps={self.overlap_steps}` inner steps ({window:.3g} s): the training loop waited"
            f" {blocked:.2f} s for it. Raise `overlap_steps` until a sync's communication fits in it, or send fewer"
            " bytes (`compression`, `num_fragments`). `diloco/blocked_seconds` logs the wait at every outer step."
        )

    def _health_row(self, deltas: list[Tensor]) -> Tensor:
        """This worker's row of the exchange: its weight (0 if its pseudo-gradient is not finite, else 1, or with
        ``speed_weighted`` the steps it computed this round) and its measured seconds per step."""
        finite = all(bool(torch.isfinite(d).all()) for d in deltas)
        work = float(self._computed) if self.speed_weighted else 1.0
        seconds_per_step = self._compute_seconds / max(self._computed, 1)
        return torch.tensor([work if finite else 0.0, seconds_per_step], dtype=torch.float64)

    def _exchange_weights(self, mine: Tensor, step: int) -> list[float]:
        """Every worker's weight in the mean of the outer step started at optimizer ``step`` (rows of
        :meth:`_health_row`). Also shares the measured speeds. Runs on the sync thread for overlapped syncs."""
        topology = self.topology
        if topology is None or topology.control is None or topology.world_size == 1:
            table = mine[None]
        else:
            gathered = [torch.empty_like(mine) for _ in range(topology.world_size)]
            try:
                dist.all_gather(gathered, mine, group=topology.control)
            except RuntimeError as err:
                raise self._sync_failed(None, err) from err
            table = torch.stack(gathered[:: topology.processes_per_worker])  # one row per worker
            slowest = torch.stack(gathered)[:, 1].view(-1, topology.processes_per_worker).max(dim=1).values
            table[:, 1] = slowest
        self._seconds_per_step = table[:, 1].tolist()
        weights = table[:, 0].tolist()
        unhealthy = [w for w, value in enumerate(weights) if value == 0]
        if unhealthy:
            message = (
                f"The pseudo-gradient of worker(s) {unhealthy} is not finite (NaN or inf) at optimizer step {step}."
            )
            if self.nonfinite == "raise" or len(unhealthy) == len(weights):
                raise OuterSyncError(
                    message + " Nothing reached the global weights. Lower the learning rate, clip gradients, or use"
                    " `nonfinite='skip'` to drop such workers from the outer step."
                )
            rank_zero_warn(message + " Their contribution is dropped from this outer step and they restart from the"
                           " global weights with a fresh inner optimizer state.")
        return weights

    def _next_round_budget(self, sync: _Sync) -> None:
        """With ``speed_weighted``, give this worker about ``H * its speed / the fastest speed`` steps next round."""
        if self.speed_weighted and self.topology is not None:
            fastest = min(s for s in self._seconds_per_step if s > 0) if any(self._seconds_per_step) else 0.0
            mine = self._seconds_per_step[self.topology.worker]
            self._budget = self.inner_steps if not fastest or not mine else max(
                1, min(self.inner_steps, round(self.inner_steps * fastest / mine))
            )
        self._computed, self._compute_seconds = 0, 0.0

    def _reset_inner_optimizer(self) -> None:
        for optimizer in self.optimizers:
            optimizer.state.clear()

    def _sync_failed(self, sync: Optional[_Sync], err: BaseException) -> OuterSyncError:
        what = f"fragment {sync.fragment} started at optimizer step {sync.step}" if sync else f"step {self.step}"
        outer = self.outer.outer_step + 1 if self.outer else 0
        timeout = f"sync_timeout={self.sync_timeout}s" if self.sync_timeout is not None else "no sync_timeout set"
        return OuterSyncError(
            f"Outer step {outer} ({what}) failed while waiting for other workers: a peer is dead, stalled or"
            f" unreachable ({timeout}). Restart from the last checkpoint (torchrun"
            f" --max-restarts does it by itself). Cause: {err}"
        )

    def _communication_device(self) -> torch.device:
        """Where pseudo-gradients are built and sent: on the accelerator for nccl, on the CPU for gloo."""
        assert self.outer is not None and self.topology is not None
        if self.topology.outer_backend == "nccl":
            return self.root_device
        return torch.device("cpu") if self.root_device.type != "cpu" else self.outer.device

    def _log_outer_step(self, sync: _Sync, stats: CommStats, blocked: float, healthy: int) -> None:
        """Send the outer step's metrics to every logger, at the step of this outer step.

        They go to the loggers directly, not through ``LightningModule.log``, so that ``log_every_n_steps`` does not
        drop outer steps that fall between two logging steps. ``last_metrics`` keeps them for callbacks.
        """
        assert self.outer is not None
        self.bytes_sent["outer"] += stats.bytes_sent
        self.last_metrics = {
            "diloco/outer_step": float(self.outer.outer_step),
            "diloco/fragment": float(sync.fragment),
            "diloco/pseudo_grad_norm": math.sqrt(sum(float(d.double().square().sum()) for d in sync.deltas)),
            "diloco/sync_seconds": time.perf_counter() - sync.started,
            "diloco/blocked_seconds": blocked,
            "diloco/exchange_seconds": sync.exchange_seconds,
            "diloco/comm_seconds": stats.seconds,
            "diloco/bytes_sent": float(stats.bytes_sent),
            "diloco/bytes_sent_total": self.bytes_sent["outer"] + self.bytes_sent["warmup"],
            "diloco/healthy_workers": float(healthy),
        }
        if self.speed_weighted:
            self.last_metrics["diloco/round_budget"] = float(self._budget)
        module = self.lightning_module
        assert module is not None
        for logger in module.trainer.loggers:
            logger.log_metrics(self.last_metrics, step=self._global_step())

    def _global_step(self) -> int:
        """``trainer.global_step`` counting the optimizer step in progress (Lightning increments it afterwards)."""
        assert self.lightning_module is not None
        trainer = self.lightning_module.trainer
        in_step = trainer.training and self.lightning_module._current_fx_name in ("optimizer_step", "training_step")
        return trainer.global_step + int(in_step)

    def flush(self) -> None:
        """Apply every sync in flight and close every fragment's open round, so all workers hold the global weights."""
        self._land_pending()
        for fragment in range(self.num_fragments):
            if self.step > self.last_sync[fragment]:
                self.outer_step(fragment, overlap=False)

    def _land_pending(self) -> None:
        """Apply every sync in flight now."""
        while self._pending:
            sync = self._pending.popleft()
            if sync.step == self.step:
                # no inner step since it started: its pseudo-gradient holds all the local progress, so it lands
                # whole (without mixing), as no later sync of this fragment will carry what mixing would keep
                sync.apply_at = sync.step
            self._apply(sync)

    def _follow_module(self) -> None:
        """Follow the module's parameters when something re-registered them since the outer state last looked.

        ``torch.nn.utils.prune`` (Lightning's ``ModelPruning``) renames a pruned ``weight`` to ``weight_orig`` and adds
        a ``weight_mask`` buffer; ``torch.nn.utils.parametrize`` moves a weight under ``parametrizations``. A tensor
        the outer state already follows keeps its global value and outer optimizer state under its new name; anything
        new takes rank 0's value on every worker, as at the start of ``fit`` (so every worker prunes with the same
        mask). Syncs in flight land first, and error-feedback residuals start afresh.
        """
        module = self.lightning_module
        if self.outer is None or module is None or not self.outer.changed(module):
            return
        self._land_pending()
        self._check_same_parameters_on_every_worker(module)
        fresh = self.outer.untracked(module)
        if dist.is_initialized() and self.world_size > 1:
            with torch.no_grad():
                for tensor in fresh:
                    dist.broadcast(tensor.data, src=0)
        self.outer.follow(module)
        self.fragments = split_into_fragments([p.numel() for p in self.outer.locals], self.num_fragments)
        self._feedback = [ErrorFeedback() if self.error_feedback else None for _ in self.fragments]
        rank_zero_info(
            f"DiLoCoStrategy: the module's parameters changed at optimizer step {self._global_step()} (pruning or a"
            f" parametrization); the outer state follows them, and {len(fresh)} new tensor(s) take rank 0's values."
        )

    def _check_same_parameters_on_every_worker(self, module: Module) -> None:
        if not dist.is_initialized() or self.world_size == 1:
            return
        mine = [(name, tuple(t.shape)) for name, t in (*module.named_parameters(), *float_buffers(module))]
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        differ = [rank for rank, theirs in enumerate(everyone) if theirs != everyone[0]]
        if differ:
            raise RuntimeError(
                f"The module's parameters changed differently on rank(s) {differ} than on rank 0 (names or shapes"
                " differ), so DiLoCo's workers could no longer average them. Change parameters (pruning,"
                " parametrizations) the same way on every process, for example from a callback hook that runs on all"
                " ranks."
            )

    @override
    def on_train_end(self) -> None:
        """A final outer step when ``fit`` stops mid-round, so every rank ends holding the same global weights."""
        if self.outer is not None:
            self.flush()
        super().on_train_end()

    @override
    def teardown(self) -> None:
        if self._executor is not None:
            # syncs still in flight here belong to a failed run; do not wait for them (they time out by themselves)
            self._executor.shutdown(wait=not self._pending, cancel_futures=True)
            self._executor = None
        super().teardown()

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation during fit sees the global weights
    # ------------------------------------------------------------------------------------------------------------

    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self._fitting and self.outer is not None and self.eval_weights == "global" and self._stashed_local is None:
            module = self.lightning_module
            assert module is not None
            self._follow_module()
            self._stashed_local = _clone_state(module, self.outer.device)
            self.outer.copy_to(module)

    @override
    def on_validation_end(self) -> None:
        if self._stashed_local is not None:
            assert self.lightning_module is not None
            self.lightning_module.load_state_dict(self._stashed_local, strict=False)
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
        self._follow_module()
        return self.outer.module_state_dict(self.lightning_module)

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None
    ) -> None:
        """Gather every worker's local weights and inner optimizer state into rank 0's checkpoint, then write it.

        All ranks call this (as Lightning does), since gathering is a collective. Syncs in flight are waited for
        (not applied): their means are saved and applied at their step after a resume.
        """
        if self._fitting and self.outer is None and "optimizer_states" in checkpoint:
            # during the synchronous warm-up every worker holds the same state: Lightning's checkpoint has it all
            checkpoint[CHECKPOINT_KEY] = {
                "version": _CHECKPOINT_VERSION, "warmup_taken": self.warmup_taken, "bytes_sent": dict(self.bytes_sent)
            }
        elif self.outer is not None and "optimizer_states" in checkpoint:
            pending = [self._finished(sync) for sync in self._pending]
            workers = self._gather_to_rank_zero(self._worker_state())
            if self.is_global_zero:
                assert workers is not None
                workers = workers[:: self.processes_per_worker]
                workers[0]["optimizer_states"] = None  # rank 0's: Lightning's own `optimizer_states`
                checkpoint[CHECKPOINT_KEY] = {
                    "version": _CHECKPOINT_VERSION,
                    "warmup_taken": self.warmup_taken,
                    "bytes_sent": dict(self.bytes_sent),
                    "inner_steps": self.inner_steps,
                    "num_fragments": self.num_fragments,
                    "num_workers": self.num_workers,
                    "processes_per_worker": self.processes_per_worker,
                    "step": self.step,
                    "last_sync": list(self.last_sync),
                    "outer": self.outer.state_dict(),
                    "pending": pending,
                    "workers": workers,
                }
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def _finished(self, sync: _Sync) -> dict[str, Any]:
        if sync.future is not None:
            try:
                sync.future.result()
            except OuterSyncError:
                raise
            except RuntimeError as err:
                raise self._sync_failed(sync, err) from err
            sync.future = None
        return {
            "fragment": sync.fragment, "step": sync.step, "apply_at": sync.apply_at, "weights": sync.weights,
            "deltas": [d.detach().cpu().clone() for d in sync.deltas],
            "buffers": {n: b.detach().cpu().clone() for n, b in sync.buffers.items()},
        }

    def _worker_state(self) -> dict[str, Any]:
        """This worker's own state on the CPU: local weights and buffers, inner optimizer, compression residuals."""
        module = self.lightning_module
        assert module is not None
        weights = self._stashed_local if self._stashed_local is not None else module.state_dict()
        full = module.state_dict()
        full.update(weights)
        return {
            "module": {name: t.detach().cpu().clone() for name, t in full.items()},
            "optimizer_states": [_to_cpu(self.optimizer_state(opt)) for opt in self.optimizers],
            "error_feedback": [_to_cpu(f.state_dict()) if f else None for f in self._feedback],
            "speed": {"budget": self._budget, "computed": self._computed, "compute_seconds": self._compute_seconds},
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
        """Restore the outer state, the counters, syncs in flight, and this worker's local state.

        A checkpoint written by a different number of workers first closes its open round: the outer step takes the
        mean pseudo-gradient of all the workers that wrote it, so no inner step is lost. Then every worker starts
        from the new global weights, and worker ``w`` takes the inner optimizer state of the saved worker
        ``w mod k_saved``.
        """
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None or not self._fitting:
            rank_zero_warn(
                "The checkpoint has no DiLoCo state (it was written by another strategy or with weights only):"
                " DiLoCo starts a new round from its weights, with a fresh outer optimizer, and every worker gets"
                " rank 0's inner optimizer state."
            )
            super().load_optimizer_state_dict(checkpoint)
            return
        _check_resumable(state, self)
        # a checkpoint of the DiLoCo phase written by a run that had a warm-up has taken all of it
        self.warmup_taken = int(state.get("warmup_taken", self.sync_warmup_steps if "outer" in state else 0))
        self.bytes_sent.update(state.get("bytes_sent", {}))
        if "outer" not in state:  # written during the synchronous warm-up: every worker held Lightning's state
            super().load_optimizer_state_dict(checkpoint)
            if self.outer is None and self.warmup_taken >= self.sync_warmup_steps:
                self._start_diloco()
            return
        if self.outer is None:
            self._start_diloco()  # the module holds the checkpoint's global weights
        assert self.outer is not None
        module = self.lightning_module
        assert module is not None and self.topology is not None
        self.outer.load_state_dict(state["outer"])
        self.step = int(state["step"])
        self.last_sync = [int(s) for s in state["last_sync"]]
        saved_workers = state["workers"]
        same_workers = len(saved_workers) == self.num_workers
        worker = saved_workers[self.topology.worker % len(saved_workers)]
        optimizer_states = worker["optimizer_states"]
        if optimizer_states is None:  # worker 0's is Lightning's own
            optimizer_states = checkpoint["optimizer_states"]
        for optimizer, opt_state in zip(self.optimizers, optimizer_states):
            optimizer.load_state_dict(opt_state)
            _optimizer_to_device(optimizer, self.root_device)
        self._pending = deque(_restored_sync(p, self._communication_device()) for p in state["pending"])
        if same_workers:
            module.load_state_dict(worker["module"])
            for feedback, saved in zip(self._feedback, worker.get("error_feedback", [])):
                if feedback is not None and saved is not None:
                    feedback.load_state_dict(saved)
            speed = worker.get("speed", {})
            self._budget = int(speed.get("budget", self.inner_steps))
            self._computed = int(speed.get("computed", 0))
            self._compute_seconds = float(speed.get("compute_seconds", 0.0))
        else:
            self._close_saved_round(saved_workers, module)
            rank_zero_warn(
                f"Resuming {len(saved_workers)} DiLoCo workers' checkpoint on {self.num_workers} workers: their open"
                " round was closed with an outer step over all saved workers, every worker starts from the new global"
                f" weights, and worker w takes saved worker (w mod {len(saved_workers)})'s inner optimizer state."
            )

    def _close_saved_round(self, saved_workers: list[dict[str, Any]], module: Module) -> None:
        """Apply syncs in flight, then one outer step with the mean pseudo-gradient of the saved workers."""
        assert self.outer is not None
        while self._pending:
            sync = self._pending.popleft()
            self.outer.step(sync.deltas, self.fragments[sync.fragment])
            if sync.buffers:
                self.outer.set_buffers(sync.buffers)
            self.last_sync[sync.fragment] = sync.step
        names = self.outer.names
        device = self.outer.device
        means = [
            torch.stack([g.detach() - w["module"][n].to(device, g.dtype) for w in saved_workers]).mean(dim=0)
            for n, g in zip(names, self.outer.params)
        ]
        for fragment, indices in enumerate(self.fragments):
            if self.step > self.last_sync[fragment]:  # a fragment without a step since its last sync has no open round
                self.outer.step([means[i] for i in indices], indices)
        for name in self.outer.buffers:
            self.outer.buffers[name].copy_(
                torch.stack([w["module"][name].to(device, torch.float32) for w in saved_workers]).mean(dim=0)
            )
        self.outer.copy_to(module)
        self.last_sync = [self.step] * self.num_fragments

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


def _share_first_process_buffers(buffers: list[Tensor], topology: Topology) -> None:
    """Give every process of a worker the buffers of the worker's first process, in place.

    The processes of a worker hold identical parameters but not identical buffers: each updated its BatchNorm
    statistics with its own micro-batches, and DistributedDataParallel keeps the first process's (it broadcasts them
    before every forward). The sliced outer sync takes slice ``j`` from process ``j``, so it needs them identical.
    """
    flat = torch.cat([b.reshape(-1) for b in buffers])
    dist.broadcast(flat, src=topology.worker * topology.processes_per_worker, group=topology.intra_sync)
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()


def _no_collective_per_step(trainer: "pl.Trainer") -> None:
    """Replace Lightning's per-batch broadcast of rank 0's SIGTERM flag by a check of this process's own flag.

    Lightning 2.6 broadcasts that flag from rank 0 before every training batch, a collective on every step that would
    make every worker wait for the slowest one at every step, over the slow link. A DiLoCo worker that received
    SIGTERM stops on its own; the others stop at their next outer step (which then fails, or times out after
    ``sync_timeout``).
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    if hasattr(epoch_loop, "_broadcast_sigterm_tensor"):

        def check_own_sigterm() -> None:
            if getattr(trainer, "received_sigterm", False):
                raise SIGTERMException()

        epoch_loop._broadcast_sigterm_tensor = check_own_sigterm


def _check_arguments(args: dict[str, Any]) -> None:
    """Refuse bad arguments with an error that names the argument and says what to do."""
    accelerator = args["accelerator"]
    if isinstance(accelerator, (bool, int, float, str)):
        raise TypeError(
            f"DiLoCoStrategy's first positional argument is DDPStrategy's `accelerator`, got {accelerator!r}. Pass"
            f" DiLoCo's options by keyword, e.g. `DiLoCoStrategy(inner_steps={accelerator!r})`, and the accelerator as"
            " `Trainer(accelerator=...)`."
        )
    if args["model_averaging_period"] is not None or _is_post_local_sgd(args["ddp_comm_state"]):
        raise ValueError(
            "`model_averaging_period` and a post-local SGD `ddp_comm_state` configure DDP's post-local SGD, another"
            " periodic averaging of the workers' weights. DiLoCo is the periodic averaging here: remove them and set"
            " the period with `inner_steps`."
        )
    warmup = args["sync_warmup_steps"]
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(
            f"`sync_warmup_steps` must be an integer >= 0 (synchronous steps before DiLoCo starts), got {warmup!r}."
        )
    inner_steps = args["inner_steps"]
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(
            f"`inner_steps` must be an integer >= 1 (the optimizer steps between outer steps), got {inner_steps!r}."
        )
    outer_lr, outer_momentum = args["outer_lr"], args["outer_momentum"]
    if not (isinstance(outer_lr, (int, float)) and math.isfinite(outer_lr) and outer_lr > 0):
        raise ValueError(f"`outer_lr` must be a positive number (the paper uses 0.7), got {outer_lr!r}.")
    if not (isinstance(outer_momentum, (int, float)) and 0 <= outer_momentum < 1):
        raise ValueError(
            f"`outer_momentum` must be in [0, 1) (the paper uses 0.9; 0 gives plain SGD), got {outer_momentum!r}."
        )
    outer_optimizer = args["outer_optimizer"]
    if outer_optimizer is not None:
        if not callable(outer_optimizer):
            raise TypeError(
                "`outer_optimizer` must be a callable that takes the global parameters and returns a"
                f" `torch.optim.Optimizer`, got {type(outer_optimizer).__name__}."
            )
        changed = [name for name, default in _DEFAULT_OUTER.items() if args[name] != default]
        if changed:
            raise ValueError(
                f"{', '.join(f'`{n}`' for n in changed)} configure the default outer optimizer, which `outer_optimizer`"
                " replaces. Set the learning rate and momentum inside `outer_optimizer` instead."
            )
    if args["eval_weights"] not in ("global", "local"):
        raise ValueError(f"`eval_weights` must be 'global' or 'local', got {args['eval_weights']!r}.")
    if args["compression"] not in COMPRESSOR_NAMES:
        raise ValueError(f"`compression` must be one of {', '.join(COMPRESSOR_NAMES)}; got {args['compression']!r}.")
    if args["error_feedback"] and args["compression"] == "none":
        raise ValueError(
            "`error_feedback=True` needs a lossy `compression` (for example 'int8'); 'none' loses nothing."
        )
    for name in ("num_fragments", "processes_per_worker"):
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    overlap = args["overlap_steps"]
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < inner_steps:
        raise ValueError(
            f"`overlap_steps` must be an integer in [0, inner_steps) = [0, {inner_steps}), got {overlap!r}: a sync"
            " must land before the same fragment syncs again."
        )
    if args["num_fragments"] > inner_steps:
        raise ValueError(
            f"`num_fragments={args['num_fragments']}` is more than `inner_steps={inner_steps}`: fragments would share"
            " sync steps. Use at most `inner_steps` fragments."
        )
    if not 0 <= args["overlap_mixing"] < 1:
        raise ValueError(f"`overlap_mixing` must be in [0, 1), got {args['overlap_mixing']!r}.")
    if args["sync_timeout"] is not None and not args["sync_timeout"] > 0:
        raise ValueError(f"`sync_timeout` must be a positive number of seconds, got {args['sync_timeout']!r}.")
    if args["nonfinite"] not in ("skip", "raise"):
        raise ValueError(f"`nonfinite` must be 'skip' or 'raise', got {args['nonfinite']!r}.")
    if args["outer_backend"] not in (None, "gloo", "nccl", "mpi"):
        raise ValueError(f"`outer_backend` must be 'gloo', 'nccl' or None, got {args['outer_backend']!r}.")
    if args["speed_weighted"] and (args["num_fragments"] > 1 or overlap > 0):
        raise ValueError(
            "`speed_weighted=True` works with whole-model, blocking outer steps. Use `num_fragments=1` and"
            " `overlap_steps=0` with it."
        )
    if not args["outer_bucket_cap_mb"] > 0:
        raise ValueError(f"`outer_bucket_cap_mb` must be positive, got {args['outer_bucket_cap_mb']}.")


def _is_post_local_sgd(state: Optional[object]) -> bool:
    if state is None:
        return False
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState

    return isinstance(state, PostLocalSGDState)


def _ddp_only_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``DistributedDataParallel``, as ``DDPStrategy(**kwargs)`` takes them; anything else is
    refused with the list of what is accepted."""
    accepted = set(inspect.signature(DistributedDataParallel.__init__).parameters) - _DDP_KWARGS_SET_BY_STRATEGY
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(
            f"DiLoCoStrategy got unexpected keyword argument(s) {', '.join(f'`{k}`' for k in unknown)}. Besides its own"
            f" options it takes DDPStrategy's and those of `DistributedDataParallel`: {', '.join(sorted(accepted))}."
        )
    return kwargs


def _check_resumable(state: dict[str, Any], strategy: DiLoCoStrategy) -> None:
    if state.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(
            f"The checkpoint's DiLoCo state has version {state.get('version')!r}; this version of lightning-diloco"
            f" reads version {_CHECKPOINT_VERSION}. Resume with the version that wrote it."
        )
    if "num_fragments" in state and state["num_fragments"] != strategy.num_fragments:
        raise ValueError(
            f"The checkpoint was written with `num_fragments={state['num_fragments']}` but this run has"
            f" `num_fragments={strategy.num_fragments}`. Resume with the same number of fragments."
        )


def _restored_sync(saved: dict[str, Any], device: torch.device) -> _Sync:
    """A sync that was in flight when its checkpoint was written, with its means already in."""
    return _Sync(
        saved["fragment"], saved["step"], saved["apply_at"], [d.to(device) for d in saved["deltas"]],
        {n: b.to(device) for n, b in saved["buffers"].items()}, list(saved["weights"]),
        stats=CommStats("restored", "none", 1),
    )


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
