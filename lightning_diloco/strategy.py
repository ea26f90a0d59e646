"""DiLoCoStrategy: Distributed Low-Communication training (Douillard et al. 2023) as a Lightning strategy.

This module is the Lightning lifecycle only: each hook delegates in a few lines. DiLoCo's options and their checks are
:mod:`lightning_diloco.config`; the round loop of Algorithm 1 is :mod:`lightning_diloco.rounds`, over the workers of
:mod:`lightning_diloco.workers` (built from the process groups of :mod:`lightning_diloco.topology`) and the census of
:mod:`lightning_diloco.census`; the checkpoint entry is :mod:`lightning_diloco.checkpointing`; Lightning's signals
(SIGTERM, SLURM's requeue) are :mod:`lightning_diloco.signals`; warnings about
set-ups that run but not as expected are :mod:`lightning_diloco.advice`.
"""

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_diloco import advice, checkpoint_dir, checkpointing
from lightning_diloco.census import Census, OuterSyncError
from lightning_diloco.clean_exit import close_at_exit
from lightning_diloco.checkpoint_io import AtomicCheckpointIO
from lightning_diloco.elastic import attempt_store
from lightning_diloco.islands import IslandOptions, IslandWorkers, Quorum
from lightning_diloco.config import DEFAULTS, DiLoCoConfig
from lightning_diloco.ddp_arguments import SHARDED, check_ddp_arguments, ddp_keywords, unused_ddp_arguments
from lightning_diloco.outer import OuterOptimizerCallable, OuterSchedulerCallable, OuterState, float_buffers
from lightning_diloco.eager import EagerRounds
from lightning_diloco.rounds import Landed, Rounds, outer_step_metrics
from lightning_diloco.schedules import OuterMomentumSchedule
from lightning_diloco.signals import RequeueRequest, quiet_signals
from lightning_diloco.sharding import ShardedWorkers, is_sharded, shard_module, worker_mesh
from lightning_diloco.topology import Topology, build_topology, check_processes_per_worker
from lightning_diloco.workers import ProcessGroupWorkers, Workers

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["DiLoCoStrategy", "OuterSyncError"]



@dataclass
class Timings:
    """The strategy's own time on the training thread, since the start of ``fit`` (cumulative seconds).

    Attributes:
        steps: optimizer steps taken.
        own_seconds: time in ``optimizer_step`` outside the inner step: the strategy's own per-step work, outer steps
            included.
        outer_seconds: time in outer steps on the training thread (all of a blocking sync; starting and landing an
            overlapped one).
        outer_cpu_seconds: the training thread's CPU time in outer steps.
        exchange_seconds: time in the census of blocking syncs, where a worker waits for slower ones.

    """

    steps: int = 0
    own_seconds: float = 0.0
    outer_seconds: float = 0.0
    outer_cpu_seconds: float = 0.0
    exchange_seconds: float = 0.0


class DiLoCoStrategy(DDPStrategy):
    """DiLoCo: every worker trains its own replica, and the replicas meet every ``inner_steps`` optimizer steps.

    Between outer steps each worker runs the LightningModule's own optimizer (the inner optimizer, AdamW in the paper)
    on its own data shard with no gradient communication between workers. Every ``inner_steps`` optimizer steps the
    workers average their pseudo-gradients ``global - local``, the outer optimizer (SGD with Nesterov momentum by
    default) steps the global weights with that average as gradient, and every worker continues from the new global
    weights (:mod:`lightning_diloco.rounds`).

    Args:
        inner_steps: H, the optimizer steps (``trainer.global_step`` increments, so gradient accumulation counts once
            per step) each worker takes between two outer steps.
        outer_lr: learning rate of the default outer optimizer (SGD with Nesterov momentum).
        outer_momentum: momentum of the default outer optimizer, in ``[0, 1)``; 0 gives plain SGD.
        outer_nesterov: use Nesterov momentum in the default outer optimizer.
        outer_optimizer: a callable that takes the global parameters and returns any ``torch.optim.Optimizer``; it
            replaces the default outer optimizer (``outer_lr``/``outer_momentum``/``outer_nesterov`` must then keep
            their defaults).
        outer_lr_scheduler: a callable that takes the outer optimizer and returns a
            ``torch.optim.lr_scheduler.LRScheduler`` of it (an outer learning-rate schedule), stepped after every outer
            step (every fragment's sync counts as one); checkpointed and resumed with the outer optimizer.
        outer_device: where the global weights and the outer optimizer state live; ``"cpu"`` keeps them out of
            accelerator memory. Defaults to the device the model trains on.
        sync_warmup_steps: W; the first W optimizer steps are synchronous, as in DDP (gradients averaged over all
            processes at every step); DiLoCo then starts from the shared weights and inner optimizer state. The paper
            starts DiLoCo from a model trained synchronously; 0 (the default) starts DiLoCo at once.
        eval_weights: which weights validation sees during ``fit``: ``"global"`` (the global weights) or ``"local"``
            (each worker's replica). The local weights are restored afterwards.
        compression: how pseudo-gradients travel: ``"none"`` (fp32), ``"bf16"``, ``"fp16"``, ``"int8"``, ``"int4"``,
            ``"e3m0"`` (4-bit), ``"int2"`` (ternary codes in 2 bits) or ``"sparse"`` (SparseLoCo's top-k); the sum is
            always accumulated in fp32.
        error_feedback: carry what compression dropped into the next outer step.
        num_fragments: F; the parameters are cut into F bands of layers that sync at staggered steps (Streaming
            DiLoCo), each every ``inner_steps``, so that one sync moves about 1/F of the model.
        overlap_steps: tau; a sync's communication runs in the background during this many inner steps, then its
            outer update is applied. 0 waits for it at once.
        overlap_mixing: alpha; with ``overlap_steps > 0`` a worker keeps this share of its local weights when the
            outer update lands: ``local = alpha * local + (1 - alpha) * global``.
        eager_rounds: d; eager updates (Kale et al. 2025): a sync's communication may take d whole rounds of its
            fragment. At each outer step a worker applies its own fresh pseudo-gradient at once, as its estimate of the
            mean, and the mean's correction of that estimate d rounds later, so the training loop does not wait for a
            sync that takes up to d rounds (see :mod:`lightning_diloco.eager`). Each worker then holds its own global weights and outer momentum
            (they differ by the latest own contributions); the end of ``fit`` averages them. 0 (the default) is off.
        processes_per_worker: G; each DiLoCo worker is G processes that train one replica together (DDP inside the
            worker, every step); only the workers' outer syncs cross between them. Must divide the world size.
        sharding: how a worker of several processes holds its replica: ``"none"`` (every process holds all of it, with
            DistributedDataParallel inside the worker) or ``"fsdp"`` (FSDP2's ``fully_shard`` over the worker's
            processes, each of which then keeps the global weights and outer optimizer state of its own shards only;
            see ``docs/sharding.md``). A LightningModule that shards itself in ``configure_model`` on
            ``self.device_mesh`` (the worker's mesh) is sharded whatever this says.
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
        coordinator: islands mode: the address ``http://HOST:PORT`` of the coordinator (``lightning-diloco
            coordinator``). This run is then one island, a job of its own whose processes train one replica (one
            DiLoCo worker); islands join, leave and heal from each other at outer steps (see ``docs/islands.md``).
            Needs ``pip install lightning-diloco[islands]``.
        island: islands mode: this island's name in logs and on the coordinator (default: the host name).
        island_address: islands mode: the host name or address at which the other islands reach this island
            (default: the host name).
        quorum_timeout: islands mode: seconds to wait for a quorum (the coordinator, or its ``--min-islands``) before
            stopping with :class:`~lightning_diloco.islands.IslandsError`.
        find_unused_parameters: as in DDP, for the ``DistributedDataParallel`` inside a worker of several processes.
            A worker of one process has no ``DistributedDataParallel`` (nothing is reduced between steps), so this
            and the other DDP keywords below have no effect there. ``None`` leaves DDP's default, as when
            ``DDPStrategy`` is not given the keyword.
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
        inner_steps: int = DEFAULTS.inner_steps,
        outer_lr: float = DEFAULTS.outer_lr,
        outer_momentum: float = DEFAULTS.outer_momentum,
        outer_nesterov: bool = DEFAULTS.outer_nesterov,
        outer_optimizer: Optional[OuterOptimizerCallable] = None,
        outer_lr_scheduler: Optional[OuterSchedulerCallable] = None,
        outer_momentum_schedule: Optional[OuterMomentumSchedule] = None,
        outer_device: Optional[Union[str, torch.device]] = None,
        sync_warmup_steps: int = DEFAULTS.sync_warmup_steps,
        eval_weights: Literal["global", "local"] = DEFAULTS.eval_weights,
        compression: str = DEFAULTS.compression,
        error_feedback: bool = DEFAULTS.error_feedback,
        num_fragments: int = DEFAULTS.num_fragments,
        overlap_steps: int = DEFAULTS.overlap_steps,
        overlap_mixing: float = DEFAULTS.overlap_mixing,
        eager_rounds: int = DEFAULTS.eager_rounds,
        processes_per_worker: int = DEFAULTS.processes_per_worker,
        sharding: Literal["none", "fsdp"] = DEFAULTS.sharding,
        outer_backend: Optional[str] = None,
        sync_timeout: Optional[float] = None,
        nonfinite: Literal["skip", "raise"] = DEFAULTS.nonfinite,
        speed_weighted: bool = DEFAULTS.speed_weighted,
        outer_bucket_cap_mb: float = DEFAULTS.outer_bucket_cap_mb,
        coordinator: Optional[str] = None,
        island: Optional[str] = None,
        island_address: Optional[str] = None,
        quorum_timeout: float = DEFAULTS.quorum_timeout,
        find_unused_parameters: Optional[bool] = None,
        static_graph: Optional[bool] = None,
        gradient_as_bucket_view: Optional[bool] = None,
        broadcast_buffers: Optional[bool] = None,
        bucket_cap_mb: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        check_ddp_arguments(accelerator, model_averaging_period, ddp_comm_state)
        self.config = DiLoCoConfig(
            inner_steps=inner_steps, outer_lr=outer_lr, outer_momentum=outer_momentum, outer_nesterov=outer_nesterov,
            outer_optimizer=outer_optimizer, outer_lr_scheduler=outer_lr_scheduler,
            outer_momentum_schedule=outer_momentum_schedule, outer_device=outer_device,
            sync_warmup_steps=sync_warmup_steps, eval_weights=eval_weights, compression=compression, error_feedback=error_feedback,
            num_fragments=num_fragments, overlap_steps=overlap_steps, overlap_mixing=overlap_mixing,
            eager_rounds=eager_rounds,
            processes_per_worker=processes_per_worker, sharding=sharding, outer_backend=outer_backend,
            sync_timeout=sync_timeout,
            nonfinite=nonfinite, speed_weighted=speed_weighted, outer_bucket_cap_mb=outer_bucket_cap_mb,
            coordinator=coordinator, island=island, island_address=island_address, quorum_timeout=quorum_timeout,
        )
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
        self._ddp_kwargs = ddp_keywords(
            find_unused_parameters=find_unused_parameters, static_graph=static_graph,
            gradient_as_bucket_view=gradient_as_bucket_view, broadcast_buffers=broadcast_buffers,
            bucket_cap_mb=bucket_cap_mb, **kwargs,
        )
        self.topology: Optional[Topology] = None
        self.workers: Optional[Workers] = None
        self.rounds: Optional[Rounds] = None  # None outside `fit` and during the synchronous warm-up
        self.census: Optional[Census] = None
        self.warmup_taken = 0  # synchronous warm-up steps taken
        self.last_metrics: dict[str, float] = {}  # the metrics of the latest outer step
        # bytes this process sent since the start of training: in outer syncs, and in the synchronous warm-up
        self.bytes_sent = {"outer": 0.0, "warmup": 0.0}
        self.timings = Timings()
        self._fitting = False
        self._executor: Optional[ThreadPoolExecutor] = None
        self._stashed_local: Optional[dict[str, Tensor]] = None  # local weights while evaluation sees global ones
        self._device_mesh: Optional[DeviceMesh] = None  # the mesh of this process's worker (G > 1)
        self._sharded = False  # whether the replica is sharded (FSDP2 or the module's own `configure_model`)
        self._requeue = RequeueRequest()  # SLURM's requeue signal (see lightning_diloco.signals)

    @property
    def outer(self) -> Optional[OuterState]:
        """The global weights and the outer optimizer (``None`` outside ``fit`` and during the warm-up)."""
        return self.rounds.outer if self.rounds is not None else None

    @property
    def fragments(self) -> list[list[int]]:
        """Every fragment's parameter indices (in the outer state's order)."""
        return [f.params for f in self.rounds.fragments] if self.rounds is not None else []

    @property
    def num_workers(self) -> int:
        """The number of DiLoCo workers (processes divided by ``processes_per_worker``; 1 for an island)."""
        return self.world_size // self._processes_per_worker

    @property
    def _processes_per_worker(self) -> int:
        """G: the processes of one worker (all of an island's in islands mode)."""
        return self.world_size if self.config.islands else self.config.processes_per_worker

    @property
    def device_mesh(self) -> Optional[DeviceMesh]:
        """The device mesh of this process's worker (its G processes; ``None`` for a worker of one process). A
        LightningModule reads it as ``self.device_mesh`` in ``configure_model`` to shard itself."""
        return self._device_mesh

    @property
    def sharded(self) -> bool:
        """Whether each worker's replica is sharded over its processes."""
        module = self.lightning_module
        return self._sharded or self.config.sharding != "none" or (module is not None and is_sharded(module))

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        """A sharded replica loads its checkpoint once it is sharded (as under Lightning's ``ModelParallelStrategy``)."""
        return self.sharded

    @property
    def quorum(self) -> Optional[Quorum]:
        """The link to the other islands (islands mode only)."""
        return self.workers.quorum if self.workers is not None else None

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
    def _configure_launcher(self) -> None:
        """Check the worker layout against the number of processes before any process is started."""
        check_processes_per_worker(self.config.processes_per_worker, self.num_nodes * self.num_processes)
        super()._configure_launcher()

    @override
    def setup_distributed(self) -> None:
        """Join the process group (in a store namespace of this torchrun attempt, see :mod:`lightning_diloco.elastic`)
        and build the groups of the outer sync."""
        self._join_process_group()
        c = self.config
        timeout = timedelta(seconds=c.sync_timeout) if c.sync_timeout is not None else self._timeout
        if c.islands:  # the island's processes wait for their leader while it waits for a quorum
            timeout = timedelta(seconds=3 * c.quorum_timeout + 60)
        self.topology = build_topology(self._processes_per_worker, c.outer_backend, timeout or default_pg_timeout)
        self.workers = ProcessGroupWorkers(self.topology)
        if c.islands:
            self.workers = IslandWorkers(self.workers, self._connect_island())
        else:
            self._device_mesh = worker_mesh(self.topology, self.root_device.type)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.lightning_module is not None:  # for the module's `configure_model`, as Lightning's model parallelism
            self.lightning_module._device_mesh = self._device_mesh

    def _connect_island(self) -> Quorum:
        """This island's link to the coordinator and the other islands (see :mod:`lightning_diloco.islands`)."""
        assert self.topology is not None
        c = self.config
        assert c.coordinator is not None
        host = socket.gethostname()
        options = IslandOptions(
            coordinator=c.coordinator, island=c.island or host, address=c.island_address or host,
            quorum_timeout=c.quorum_timeout, sync_timeout=c.sync_timeout or 60.0,
        )
        group = self.topology.control if self.topology.world_size > 1 else None

        def load(state: Any) -> None:
            assert self.rounds is not None
            self.rounds.load_heal_state(state)

        def save() -> Any:
            assert self.rounds is not None
            return self.rounds.heal_state()

        return Quorum(options, group, save, load, rank_zero_info)

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
    def setup(self, trainer: "pl.Trainer") -> None:
        if self._layer_sync is not None:
            raise ValueError(
                "`Trainer(sync_batchnorm=True)` would all-reduce BatchNorm statistics at every step, which DiLoCo"
                " exists to avoid. Set `sync_batchnorm=False`: DiLoCo averages BatchNorm buffers at every outer step."
            )
        check_processes_per_worker(self._processes_per_worker, self.world_size)
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
        if self.config.speed_weighted and not module.automatic_optimization:
            raise ValueError(
                "`speed_weighted=True` skips the computation of some steps, which needs automatic optimization."
                " Use `automatic_optimization = True` or `speed_weighted=False`."
            )
        device = self._outer_device()
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"`outer_device={device}` needs CUDA, which is not available. Use `outer_device='cpu'`.")
        self.warmup_taken, self.rounds, self.census = 0, None, None
        self.bytes_sent, self.timings = {"outer": 0.0, "warmup": 0.0}, Timings()
        if self.config.overlapped and self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diloco-outer-sync")
        if self.config.sync_warmup_steps == 0:
            self._start_diloco()
        self._requeue.clear()
        quiet_signals(trainer, self._requeue, lambda: self.rounds.step if self.rounds is not None else 0)

    def _outer_device(self) -> torch.device:
        return torch.device(self.config.outer_device) if self.config.outer_device is not None else self.root_device

    def _start_diloco(self) -> None:
        """Take the module's current weights as the global weights, with a fresh outer optimizer and round."""
        module = self.lightning_module
        assert module is not None and self.workers is not None
        c = self.config
        outer = OuterState(module, c.build_outer_optimizer(), self._outer_device(), c.outer_lr_scheduler,
                           c.outer_momentum_schedule)
        self.census = Census(c.inner_steps, c.speed_weighted, c.nonfinite, rank_zero_warn,
                             checkpoint_asked=lambda: self._requeue.asked)
        self.rounds = (EagerRounds if c.eager_rounds else Rounds)(
            c, module, outer, self.workers, self.census, self._communication_device(outer), self._executor,
            self._report, self._restart_inner, rank_zero_warn, rank_zero_info,
        )

    def _communication_device(self, outer: OuterState) -> torch.device:
        """Where pseudo-gradients are built and sent: on the accelerator for nccl, on the CPU for gloo."""
        assert self.topology is not None
        if self.topology.outer_backend == "nccl" and not self.config.islands:
            return self.root_device
        return torch.device("cpu") if self.root_device.type != "cpu" else outer.device

    @override
    def configure_ddp(self) -> None:
        """Start every process from rank 0's weights; wrap in DDP only inside a worker of several processes."""
        assert self.model is not None and self.topology is not None
        if self.sharded:
            self._shard()
            return
        _sync_module_states(self.model)
        if self._processes_per_worker > 1:
            self._ddp_kwargs["process_group"] = self.topology.intra
            super().configure_ddp()
            return
        message = unused_ddp_arguments(self._ddp_kwargs, self._ddp_comm_hook)
        if message:
            rank_zero_info(message)

    def _shard(self) -> None:
        """Shard every worker's replica with FSDP2 over its processes (unless ``configure_model`` did), starting every
        worker from the same weights, and average pseudo-gradients chunk by chunk."""
        assert self.model is not None and self.topology is not None
        if self._device_mesh is None:
            raise ValueError(
                "The LightningModule is sharded (its parameters are DTensors), which DiLoCo supports inside a worker of"
                " several processes: set `processes_per_worker` to the processes that share one replica."
            )
        if not is_sharded(self.model):
            _sync_module_states(self.model)
            shard_module(self.model, self._device_mesh)
        self._sharded = True
        self.workers = ShardedWorkers(self.topology)
        self.workers.broadcast_([*self.model.parameters(), *self.model.buffers()])
        message = unused_ddp_arguments(self._ddp_kwargs, self._ddp_comm_hook, SHARDED)
        if message:
            rank_zero_info(message)

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        assert self.lightning_module is not None
        trainer = self.lightning_module.trainer
        done = self.warmup_taken + (self.rounds.step if self.rounds else 0)
        outer_steps = self.outer.outer_step if self.outer is not None else 0
        if self.rounds is not None and self.rounds.quorum is not None:
            self._timed_outer(self.rounds.join)  # heal from a live island if this one is behind
        for message in (advice.no_outer_step_in_time(trainer, self.config, done, outer_steps),
                        advice.per_step_collectives(trainer)):
            if message:
                rank_zero_warn(message)

    # ------------------------------------------------------------------------------------------------------------
    # The inner loop, and the outer step after it
    # ------------------------------------------------------------------------------------------------------------

    def _skips_step(self) -> bool:
        """Whether this worker has used up this round's budget of computed steps (``speed_weighted``)."""
        return self.census is not None and self.census.skips_step()

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
        """One inner step on this worker's replica, then the outer steps that fall after it.

        During the synchronous warm-up (``sync_warmup_steps``) the step is DDP's instead: the gradients are averaged
        over all processes before the optimizer steps.
        """
        entered = time.perf_counter()
        if self._fitting and self.rounds is None:
            inner, output = self._warmup_step(optimizer, closure, model, **kwargs)
        else:
            if self._skips_step():
                inner, output = 0.0, closure()  # Lightning's closure must run (it zeroes the gradients); no step
            else:
                output = super().optimizer_step(optimizer, closure, model, **kwargs)
                inner = time.perf_counter() - entered
                if self.census is not None:
                    self.census.record_step(inner)
            if self.rounds is not None:
                self._timed_outer(self.rounds.after_inner_step)
        self.timings.steps += 1
        self.timings.own_seconds += time.perf_counter() - entered - inner
        return output

    def _timed_outer(self, work: Callable[[], None]) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        work()
        self.timings.outer_seconds += time.perf_counter() - wall
        self.timings.outer_cpu_seconds += time.thread_time() - cpu

    def _warmup_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: Optional[Union["pl.LightningModule", Module]],
        **kwargs: Any,
    ) -> tuple[float, Any]:
        """A synchronous step: the closure's gradients are averaged over all processes, then the optimizer steps."""
        module = self.lightning_module
        assert module is not None and self.workers is not None
        workers = self.workers

        def closure_then_average() -> Any:
            result = closure()
            self.bytes_sent["warmup"] += workers.mean_gradients_(module, self.config.outer_bucket_cap_mb)
            return result

        started = time.perf_counter()
        output = super().optimizer_step(optimizer, closure_then_average, model, **kwargs)
        inner = time.perf_counter() - started
        self.warmup_taken += 1
        if self.warmup_taken >= self.config.sync_warmup_steps:
            _sync_module_states(module)  # the weights agree already; this also gives every worker rank 0's buffers
            self._start_diloco()
        return inner, output

    def _report(self, landed: Landed) -> None:
        """Send a landed outer step's metrics to every logger, at the step of this outer step.

        They go to the loggers directly, not through ``LightningModule.log``, so that ``log_every_n_steps`` does not
        drop outer steps that fall between two logging steps. ``last_metrics`` keeps them for callbacks.
        """
        assert self.rounds is not None and self.workers is not None
        sync = landed.sync
        if sync.checkpoint:
            self._requeue.agree(self.rounds.step)
        if sync.stats is not None:
            self.bytes_sent["outer"] += sync.stats.bytes_sent
        if not sync.overlapped:
            self.timings.exchange_seconds += sync.exchange_seconds
        metrics = outer_step_metrics(landed, self.workers.sum_in_worker)
        metrics["diloco/bytes_sent_total"] = self.bytes_sent["outer"] + self.bytes_sent["warmup"]
        metrics["diloco/own_seconds_per_step"] = self.timings.own_seconds / max(self.timings.steps, 1)
        group = self.rounds.outer.optimizer.param_groups[0]
        metrics["diloco/outer_lr"] = float(group["lr"])
        if "momentum" in group:
            metrics["diloco/outer_momentum"] = float(group["momentum"])
        if self.config.speed_weighted and self.census is not None:
            metrics["diloco/round_budget"] = float(self.census.budget)
        if self.quorum is not None:
            metrics.update({"diloco/islands": float(self.quorum.islands), "diloco/heals": float(self.quorum.heals),
                            "diloco/forks": float(self.quorum.forks)})
        self.last_metrics = metrics
        module = self.lightning_module
        assert module is not None
        for logger in module.trainer.loggers:
            logger.log_metrics(metrics, step=self._global_step())

    def _global_step(self) -> int:
        """``trainer.global_step`` counting the optimizer step in progress (Lightning increments it afterwards)."""
        assert self.lightning_module is not None
        trainer = self.lightning_module.trainer
        in_step = trainer.training and self.lightning_module._current_fx_name in ("optimizer_step", "training_step")
        return trainer.global_step + int(in_step)

    def _restart_inner(self) -> None:
        """A worker dropped from an outer step restarts with a fresh inner optimizer state."""
        for optimizer in self.optimizers:
            optimizer.state.clear()

    def flush(self) -> None:
        """Land every sync in flight and close every open round, so that all workers hold the global weights.

        Islands end with the global weights of their last committed outer step: they do not meet outside the
        schedule, so the local progress of a round that ``fit`` stops in is not kept.
        """
        if self.rounds is not None and self.rounds.quorum is not None:
            self.rounds.outer.copy_to(self.rounds.module)
        elif self.rounds is not None:
            self._timed_outer(self.rounds.flush)

    @override
    def on_train_end(self) -> None:
        """A final outer step when ``fit`` stops mid-round, so every rank ends holding the same global weights."""
        self.flush()
        super().on_train_end()

    @override
    def teardown(self) -> None:
        if self.quorum is not None:
            self.quorum.close()
        if self._executor is not None:
            # syncs still in flight here belong to a failed run; do not wait for them (they time out by themselves)
            in_flight = self.rounds is not None and self.rounds.in_flight
            self._executor.shutdown(wait=not in_flight, cancel_futures=True)
            self._executor = None
        if self.topology is not None and not (self.rounds is not None and self.rounds.in_flight):
            self.topology.release(keep_intra=self._sharded)
            close_at_exit()  # nothing in flight: at exit, every group goes before the interpreter does (exit code 0)
        super().teardown()

    # ------------------------------------------------------------------------------------------------------------
    # Evaluation during fit sees the global weights
    # ------------------------------------------------------------------------------------------------------------

    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self._fitting and self.rounds is not None and self.config.eval_weights == "global":
            if self._stashed_local is None:
                self.rounds.follow_module()
                module = self.rounds.module
                self._stashed_local = _clone_state(module, self.rounds.outer.device)
                self.rounds.outer.copy_to(module)

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
        if self.rounds is None:
            return super().lightning_module_state_dict()
        self.rounds.follow_module()
        return self.rounds.outer.module_state_dict(self.rounds.module)

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None
    ) -> None:
        """Write a checkpoint; all ranks call this (as Lightning does).

        During DiLoCo the checkpoint is a directory that every rank writes its own part of, in parallel (see
        :mod:`lightning_diloco.checkpointing`): nothing is gathered. Syncs in flight are waited for (not applied):
        their means are saved and applied at their step after a resume. Checkpoints of the synchronous warm-up and
        of weights only are single files, as Lightning writes them.
        """
        if self._fitting and "optimizer_states" in checkpoint and self.rounds is not None:
            if self.rounds.broken is not None:
                raise RuntimeError(
                    f"Not writing {filepath}: an outer step failed after it had updated part of the global weights"
                    f" ({self.rounds.broken}), so the state in memory is no checkpoint of any step. The last complete"
                    " checkpoint is untouched: restart from it."
                )
            self._save_directory(checkpoint, filepath)
            return
        if self._fitting and "optimizer_states" in checkpoint:  # the synchronous warm-up: every worker holds the same
            checkpoint[checkpointing.CHECKPOINT_KEY] = checkpointing.warmup_entry(self.warmup_taken, self.bytes_sent)
        if self._sharded:  # a sharded replica's weights, whole (every rank takes part in gathering each tensor)
            checkpoint["state_dict"] = {
                k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in checkpoint["state_dict"].items()
            }
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def _save_directory(self, checkpoint: dict[str, Any], filepath: Any) -> None:
        assert self.rounds is not None and self.census is not None and self.workers is not None
        assert self.topology is not None
        rounds = self.rounds
        state = rounds.module.state_dict()
        if self._stashed_local is not None:
            state.update(self._stashed_local)
        rounds_state = rounds.state_dict()  # waits for the syncs in flight, on every rank
        entry = checkpointing.diloco_entry(
            self.config, rounds_state, rounds.outer, rounds.module, self._layout(), self.warmup_taken, self.bytes_sent
        )
        if self.quorum is not None:
            entry["islands"] = self.quorum.state_dict()
        tensors = checkpointing.rank_tensors(
            rounds.outer, rounds_state, state, self.optimizers, [f.params for f in rounds.fragments],
            [f.feedback.state_dict() if f.feedback is not None else None for f in rounds.fragments], self.census,
            self.workers.index, self.topology.index_in_worker, checkpointing.own_entries(state, entry),
            checkpointing.global_prefix(self.config.eager_rounds, self.workers.index),
        )
        meta = None
        if self.is_global_zero:
            meta = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
            meta[checkpointing.CHECKPOINT_KEY] = entry
        io = self.checkpoint_io
        if isinstance(io, _WrappingCheckpointIO) and io.checkpoint_io is not None:
            io = io.checkpoint_io  # `meta.pt` must be complete before the directory moves into place
        checkpoint_dir.save(filepath, tensors, meta, io.save_checkpoint, self.broadcast,
                            lambda: self.barrier("DiLoCoStrategy.save_checkpoint"))

    def _layout(self) -> dict[str, Any]:
        return checkpointing.layout(self.num_workers, self._processes_per_worker, self._sharded)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Read a checkpoint: a single file, or the ``meta.pt`` of a checkpoint directory (its tensors are read into
        the module and the optimizers where they go, each rank its own part)."""
        if not checkpoint_dir.is_checkpoint_dir(checkpoint_path):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        meta = checkpoint_dir.read_meta(checkpoint_path, self.checkpoint_io.load_checkpoint)
        entry = meta.get(checkpointing.CHECKPOINT_KEY)
        if entry is not None:
            checkpointing.check_resumable(entry, self.config)
            entry["directory"] = str(checkpoint_path)
        return {**meta, "state_dict": {}, "optimizer_states": []}

    @override
    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        assert module is not None
        entry = checkpoint.get(checkpointing.CHECKPOINT_KEY) or {}
        try:
            if "directory" in entry:
                checkpointing.load_global_model(entry["directory"], entry, module)
            elif self.sharded:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                set_model_state_dict(module, checkpoint["state_dict"],
                                     options=StateDictOptions(full_state_dict=True, strict=strict))
            else:
                super().load_model_state_dict(checkpoint, strict=strict)
        except RuntimeError as err:
            raise ValueError(
                "The checkpoint's `state_dict` does not fit this LightningModule (it was written for a different"
                f" model): {err}\nPass the checkpoint of this model as `ckpt_path`, or build the model the checkpoint"
                " was written for."
            ) from err

    @override
    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Restore the outer state, the counters, syncs in flight, and this worker's local state (see
        :mod:`lightning_diloco.checkpointing`)."""
        state = checkpoint.get(checkpointing.CHECKPOINT_KEY)
        if state is None or not self._fitting:
            rank_zero_warn(
                "The checkpoint has no DiLoCo state (it was written by another strategy or with weights only):"
                " DiLoCo starts a new round from its weights, with a fresh outer optimizer, and every worker gets"
                " rank 0's inner optimizer state."
                + (" A sharded worker's inner optimizer starts afresh." if self.sharded else "")
            )
            if self.sharded:
                if self.rounds is not None:
                    self._start_diloco()  # the module was sharded and loaded after `setup`
                return
            super().load_optimizer_state_dict(checkpoint)
            return
        checkpointing.check_resumable(state, self.config)
        # a checkpoint of the DiLoCo phase written by a run that had a warm-up has taken all of it
        self.warmup_taken = int(state.get("warmup_taken", self.config.sync_warmup_steps if "outer" in state else 0))
        self.bytes_sent.update(state.get("bytes_sent", {}))
        if "outer" not in state:  # written during the synchronous warm-up: every worker held Lightning's state
            super().load_optimizer_state_dict(checkpoint)
            if self.rounds is None and self.warmup_taken >= self.config.sync_warmup_steps:
                self._start_diloco()
            return
        if self.rounds is None:
            self._start_diloco()  # the module holds the checkpoint's global weights
        assert self.rounds is not None and self.census is not None and self.topology is not None
        checkpointing.restore(
            state["directory"], state, self.rounds, self.census, self.optimizers, self.rounds.module,
            self._layout(), self.topology.index_in_worker,
            lambda optimizer: _optimizer_to_device(optimizer, self.root_device), rank_zero_warn,
        )
        if self.quorum is not None and "islands" in state:
            self.quorum.load_state_dict(state["islands"])

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


def _clone_state(module: Module, device: torch.device) -> dict[str, Tensor]:
    """A copy of the parameters and floating-point buffers of ``module``."""
    state = {name: p.detach().to(device, copy=True) for name, p in module.named_parameters()}
    state.update({name: b.detach().to(device, copy=True) for name, b in float_buffers(module)})
    return state
