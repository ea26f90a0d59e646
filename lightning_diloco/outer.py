"""The outer state of DiLoCo: the global weights and the optimizer that moves them.

Every worker keeps an identical copy of this state. At an outer step (Algorithm 1 of Douillard et al. 2023):

1. each worker computes its pseudo-gradient ``global - local`` (:meth:`OuterState.pseudo_gradients`),
2. the pseudo-gradients are averaged over the workers (by the caller, see :mod:`lightning_diloco.collectives`),
3. the outer optimizer steps the global weights with that average as their gradient (:meth:`OuterState.step`),
4. every worker continues from the new global weights (:meth:`OuterState.copy_to`).

Floating-point buffers (for example BatchNorm statistics) have no gradient; they are averaged over the workers and
kept here so that evaluation and checkpoints see the global model.
"""

from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from torch.nn import Module, Parameter
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_diloco.census import all_finite
from lightning_diloco.flat import FlatBucket, FlatLayout, fast_sgd, nesterov_
from lightning_diloco.sharding import local, to_global

OuterOptimizerCallable = Callable[[Iterable[Tensor]], Optimizer]
OuterSchedulerCallable = Callable[[Optimizer], LRScheduler]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def default_outer_optimizer(lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True) -> OuterOptimizerCallable:
    """The paper's outer optimizer: SGD with Nesterov momentum (lr 0.7, momentum 0.9).

    Nesterov momentum with ``momentum=0`` is plain SGD, so ``nesterov`` only takes effect when ``momentum > 0``. The
    result is a :func:`functools.partial` of :class:`torch.optim.SGD`, so a strategy holding it can be pickled (for
    ``start_method="spawn"``).
    """
    return partial(SGD, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the global copy of a tensor is kept in: fp32 for fp16/bf16 weights, else the weight's own."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def float_buffers(module: Module) -> Iterator[tuple[str, Tensor]]:
    """The module's floating-point buffers, the ones DiLoCo averages at each outer step."""
    for name, buffer in module.named_buffers():
        if buffer.is_floating_point():
            yield name, buffer


def _mix_(local: Tensor, global_: Tensor, mixing: float) -> None:
    if mixing == 0.0:
        local.copy_(global_)
    else:
        local.mul_(mixing).add_(global_.to(local.device, local.dtype), alpha=1.0 - mixing)


class OuterState:
    """Global weights, global buffers and the outer optimizer, all on ``device``.

    The state follows the module's parameters by identity: :attr:`locals` are the module's parameter tensors it was
    built from (or last followed), and global tensor ``i`` belongs to ``locals[i]``. When something re-registers the
    module's parameters during training (``torch.nn.utils.prune`` turns ``weight`` into ``weight_orig`` and a
    ``weight_mask`` buffer, ``torch.nn.utils.parametrize`` moves it under ``parametrizations``), :meth:`changed` says
    so and :meth:`follow` maps the state onto the new parameters.

    Args:
        module: the model whose current weights become the global weights.
        optimizer: builds the outer optimizer from the global parameters.
        device: where the global copy and the outer optimizer state live (for example ``cpu`` to keep them out of
            accelerator memory).
        scheduler: builds a learning-rate scheduler of the outer optimizer, stepped after every outer step.
        momentum: the outer momentum of each outer step, from the number of outer steps taken
            (:mod:`lightning_diloco.schedules`).

    """

    def __init__(
        self, module: Module, optimizer: OuterOptimizerCallable, device: Union[str, torch.device],
        scheduler: Optional[OuterSchedulerCallable] = None, momentum: Optional[Callable[[int], float]] = None,
    ) -> None:
        self.device = torch.device(device)
        self.momentum = momentum
        self._build_optimizer = optimizer
        self._build_scheduler = scheduler
        self.scheduler: Optional[LRScheduler] = None
        self._scheduled: Optional[float] = None  # this outer step's momentum, from `momentum`
        self.locals: list[Tensor] = []
        self.names: list[str] = []
        self.params: list[Parameter] = []
        self.buffers: dict[str, Tensor] = {}
        self._local_buffers: dict[str, Tensor] = {}  # the module's buffers that `buffers` are the global values of
        self.layout: Optional[FlatLayout] = None
        self.flat: Optional[Tensor] = None  # the global weights, when they share one dtype (see `arrange`)
        self.flat_momentum: Optional[Tensor] = None  # the momentum of the default outer optimizer, likewise
        self._staged: dict[torch.device, Tensor] = {}  # see `_staging`
        self.follow(module)
        self.outer_step = 0

    def changed(self, module: Module) -> bool:
        """Whether ``module``'s parameters or floating-point buffers are no longer the ones this state follows."""
        current = list(module.parameters())
        if len(current) != len(self.locals) or any(
            p is not q or local(p).shape != g.shape for p, q, g in zip(current, self.locals, self.params)
        ):
            return True
        # a buffer registered anew (a pruning mask recomputed) is another tensor under the same name
        return {name: id(b) for name, b in float_buffers(module)} != {n: id(b) for n, b in self._local_buffers.items()}

    def untracked(self, module: Module) -> list[Tensor]:
        """``module``'s parameters and floating-point buffers that this state holds no global value for."""
        known = {id(p): g.shape for p, g in zip(self.locals, self.params)}
        fresh: list[Tensor] = [p for p in module.parameters() if known.get(id(p)) != local(p).shape]
        fresh += [b for name, b in float_buffers(module) if self._local_buffers.get(name) is not b]
        return fresh

    @torch.no_grad()
    def follow(self, module: Module) -> None:
        """Follow ``module``'s current parameters and floating-point buffers.

        A parameter this state already follows (the same tensor, with the same shape, under any name) keeps its global
        value and its outer optimizer state; any other parameter or buffer starts from its current value, with a fresh
        outer optimizer state. Callers make those current values equal on every worker first.
        """
        old = {id(p): g for p, g in zip(self.locals, self.params) if local(p).shape == g.shape}
        old_optimizer: Optional[Optimizer] = getattr(self, "optimizer", None)
        self.locals = list(module.parameters())
        self.names = _parameter_names(module, self.locals)
        self.params = [
            kept if (kept := old.get(id(p))) is not None
            else Parameter(local(p).detach().to(self.device, master_dtype(p.dtype), copy=True))
            for p in self.locals
        ]
        self.buffers = {
            name: self.buffers[name] if self._local_buffers.get(name) is b
            else b.detach().to(self.device, master_dtype(b.dtype), copy=True)
            for name, b in float_buffers(module)
        }
        self._local_buffers = dict(float_buffers(module))
        self.optimizer = self._build_optimizer(self.params)
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(
                f"`outer_optimizer` must return a `torch.optim.Optimizer`, got {type(self.optimizer).__name__}."
                " Pass a callable such as `functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)`."
            )
        if old_optimizer is not None:
            _carry_optimizer_state(old_optimizer, self.optimizer)
        self._follow_scheduler()

    def _follow_scheduler(self) -> None:
        """A scheduler of the (new) outer optimizer, carrying the previous one's progress."""
        if self._build_scheduler is None:
            return
        previous = self.scheduler.state_dict() if self.scheduler is not None else None
        self.scheduler = self._build_scheduler(self.optimizer)
        if not isinstance(self.scheduler, LRScheduler):
            raise TypeError(
                f"`outer_lr_scheduler` must return a `torch.optim.lr_scheduler.LRScheduler`, got"
                f" {type(self.scheduler).__name__}. Pass a callable such as"
                " `functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=100)`."
            )
        if previous is not None:
            self.scheduler.load_state_dict(previous)

    @torch.no_grad()
    def arrange(self, layout: FlatLayout) -> None:
        """Move the global weights into one flat buffer laid out as ``layout`` (each global parameter becomes a view
        of its slot: the same ``Parameter`` objects, so the outer optimizer and its state follow), and the momentum of
        the default outer optimizer likewise. Global weights of several dtypes stay where they are."""
        self.layout = layout
        if len({p.dtype for p in self.params}) != 1:
            self.flat = self.flat_momentum = None
            return
        self.flat = self._into_flat(list(self.params), layout)
        for p, view in zip(self.params, self._views(self.flat)):
            p.data = view
        self.flat_momentum = None
        if fast_sgd(self.optimizer) is not None and any(self._momentum(p) is not None for p in self.params):
            self._adopt_momentum()

    def _into_flat(self, tensors: list[Tensor], layout: FlatLayout) -> Tensor:
        # global weights on the CPU of a CUDA model are pinned: the copies to and from the model are then DMA transfers
        pin = self.device.type == "cpu" and torch.cuda.is_available() and any(local(p).is_cuda for p in self.locals)
        flat = torch.zeros(layout.numel, dtype=self.params[0].dtype, device=self.device, pin_memory=pin)
        for i, tensor in enumerate(tensors):
            start = layout.offsets[i]
            flat[start : start + tensor.numel()].copy_(tensor.reshape(-1))
        return flat

    def _views(self, flat: Tensor) -> list[Tensor]:
        assert self.layout is not None
        offsets = self.layout.offsets
        return [flat[offsets[i] : offsets[i] + p.numel()].view(p.shape) for i, p in enumerate(self.params)]

    def _momentum(self, param: Tensor) -> Optional[Tensor]:
        return self.optimizer.state.get(param, {}).get("momentum_buffer")

    def _adopt_momentum(self) -> None:
        """Put every momentum buffer into the flat momentum (zeros where a parameter has none yet) and point the
        optimizer's state at the views."""
        assert self.layout is not None
        if self.flat_momentum is None:
            self.flat_momentum = torch.zeros_like(self.flat)
        for p, view in zip(self.params, self._views(self.flat_momentum)):
            buffer = self._momentum(p)
            if buffer is not None and buffer.data_ptr() != view.data_ptr():
                view.copy_(buffer)
                self.optimizer.state[p]["momentum_buffer"] = view

    @torch.no_grad()
    def pseudo_gradient_into(self, flat: Tensor, bucket: FlatBucket) -> None:
        """Write this worker's pseudo-gradient ``global - local`` of ``bucket``'s parameters into ``flat`` (a buffer of
        the sync, at the bucket's offsets; its padding is left as it is)."""
        segments = bucket.bucket.segments
        locals_ = [local(self.locals[i]).detach().reshape(-1) for i in bucket.params]
        if locals_ and locals_[0].device != flat.device:  # a CUDA model, a sync on the CPU: one staged transfer
            staging = self._staging(bucket.numel, flat.device)
            for segment, tensor in zip(segments, locals_):
                staging[segment.offset : segment.offset + segment.numel].copy_(tensor, non_blocking=True)
            torch.cuda.current_stream(locals_[0].device).synchronize()
            locals_ = [staging[s.offset : s.offset + s.numel] for s in segments]
        for segment, i, tensor in zip(segments, bucket.params, locals_):
            out = flat[segment.offset : segment.offset + segment.numel]
            torch.sub(self.params[i].reshape(-1).to(flat.device, non_blocking=True), tensor, out=out)

    def _staging(self, numel: int, device: torch.device) -> Tensor:
        """A reused fp32 buffer of at least ``numel`` elements on ``device`` (pinned on the CPU, for transfers from and
        to a CUDA model): one bucket, whatever the model's size."""
        buffer = self._staged.get(device)
        if buffer is None or buffer.numel() < numel:
            pin = device.type == "cpu" and torch.cuda.is_available()
            buffer = self._staged[device] = torch.empty(numel, dtype=torch.float32, device=device, pin_memory=pin)
        return buffer[:numel]

    def locals_finite(self, indices: Sequence[int]) -> bool:
        """Whether the local weights of ``indices`` are all finite (the global ones are: so is then ``global -
        local``). A sum of finite values is finite unless it overflows, and a NaN or infinity makes it non-finite:
        one fast reduction per tensor decides, and the element-wise test runs only when a sum is not finite."""
        tensors = [local(self.locals[i]).detach() for i in indices]
        if not tensors or bool(torch.stack([torch.sum(t, dtype=torch.float32) for t in tensors]).isfinite().all()):
            return True
        return all_finite(tensors)

    @torch.no_grad()
    def begin_step(self) -> None:
        """Before the buckets of one outer step: the momentum of this outer step, from the schedule."""
        self._scheduled = None if self.momentum is None else self._set_momentum(float(self.momentum(self.outer_step)))

    @torch.no_grad()
    def step_bucket(self, bucket: FlatBucket, total: Tensor, divisor: float) -> float:
        """The outer step of ``bucket``'s parameters with the workers' mean pseudo-gradient ``total / divisor``
        (``total`` is the bucket's buffer, overwritten), then the copy of the new global weights into the module;
        returns the mean's squared norm."""
        mean = total[: bucket.numel]
        if mean.device != self.device:  # the sync and the global state on different devices
            source = mean
            mean = self._staging(bucket.numel, self.device).copy_(source, non_blocking=True)
            if source.is_cuda:
                torch.cuda.current_stream(source.device).synchronize()
        group = fast_sgd(self.optimizer)
        if group is None or self.flat is None:
            mean.div_(divisor)
            views = [mean[s.offset : s.offset + s.numel] for s in bucket.bucket.segments]
            squared = float(sum(torch.dot(v, v) for v in views)) if views else 0.0
            self._optimizer_step(views, bucket.params)
            self.copy_bucket_to(bucket)
            return squared
        lr, mu, nesterov = float(group["lr"]), float(group["momentum"]), bool(group["nesterov"])
        keep = mu != 0 or self._scheduled is not None
        params = [self.params[i] for i in bucket.params]
        started = [self._momentum(p) is not None for p in params]
        if keep:
            self._adopt_momentum()
        momentum = self.flat_momentum if keep else None
        squared = 0.0
        if any(started) and not all(started):  # parameters that joined later: their first step, one by one
            for segment, first in zip(bucket.bucket.segments, started):
                piece = slice(bucket.start + segment.offset, bucket.start + segment.offset + segment.numel)
                squared += nesterov_(self.flat[piece], None if momentum is None else momentum[piece],
                                     mean[segment.offset : segment.offset + segment.numel], lr, mu, nesterov,
                                     not first, divisor)
            self.copy_bucket_to(bucket)
        else:
            whole = slice(bucket.start, bucket.start + bucket.numel)
            copy = self._piece_copier(bucket)
            squared = nesterov_(self.flat[whole], None if momentum is None else momentum[whole], mean, lr, mu,
                                nesterov, not any(started), divisor, copy)
            if copy is None:
                self.copy_bucket_to(bucket)
        if keep:
            assert self.flat_momentum is not None
            views = self._views(self.flat_momentum)
            for i in bucket.params:
                self.optimizer.state[self.params[i]]["momentum_buffer"] = views[i]
        return squared

    def _piece_copier(self, bucket: FlatBucket) -> Optional[Callable[[int, int], None]]:
        """Copies a piece of ``bucket``'s new global weights into the module's parameters while it is in cache; ``None``
        where the module is on another device (its copy then goes in one transfer per parameter)."""
        assert self.flat is not None
        targets = [local(self.locals[i]).detach() for i in bucket.params]
        if any(t.device != self.device or not t.is_contiguous() for t in targets):
            return None
        segments = [(s.offset, s.offset + s.numel, t.view(-1)) for s, t in zip(bucket.bucket.segments, targets)]
        flat = self.flat[bucket.start : bucket.start + bucket.numel]

        def copy(begin: int, end: int) -> None:
            for lo, hi, target in segments:
                if lo < end and hi > begin:
                    a, b = max(lo, begin), min(hi, end)
                    target[a - lo : b - lo].copy_(flat[a:b])

        return copy

    def finish_step(self) -> None:
        """After the buckets of one outer step: the learning-rate schedule, and the count."""
        if self.scheduler is not None:
            self.scheduler.step()
        self.outer_step += 1

    @torch.no_grad()
    def copy_bucket_to(self, bucket: FlatBucket) -> None:
        """Move the local weights of ``bucket``'s parameters to the global ones (one ``foreach`` copy)."""
        targets = [local(self.locals[i]) for i in bucket.params]
        sources = [self.params[i].detach() for i in bucket.params]
        if all(t.device == self.device for t in targets):
            torch._foreach_copy_(targets, sources)
        else:  # from the (pinned) global weights on the CPU to a CUDA model, without waiting
            for target, source in zip(targets, sources):
                target.copy_(source, non_blocking=True)

    @torch.no_grad()
    def pseudo_gradients(self, device: torch.device, indices: Optional[Sequence[int]] = None) -> list[Tensor]:
        """This worker's pseudo-gradient ``global - local`` (fp32 or wider, on ``device``).

        Args:
            device: where the pseudo-gradients are built (the device the collective runs on).
            indices: the parameters to take (a fragment); all of them by default.

        """
        indices = range(len(self.params)) if indices is None else indices
        return [
            self.params[i].to(device) - local(self.locals[i]).detach().to(device, self.params[i].dtype) for i in indices
        ]

    @torch.no_grad()
    def step(self, mean_pseudo_gradients: list[Tensor], indices: Optional[Sequence[int]] = None) -> None:
        """Step the outer optimizer with the workers' mean pseudo-gradient as the gradient of the global weights.

        Args:
            mean_pseudo_gradients: one tensor per parameter in ``indices``.
            indices: the parameters being updated (a fragment); the others get no gradient, so the optimizer leaves
                them and their state alone. All parameters by default.

        """
        indices = range(len(self.params)) if indices is None else indices
        self.begin_step()
        self._optimizer_step(mean_pseudo_gradients, indices)
        self.finish_step()

    def _optimizer_step(self, gradients: Sequence[Tensor], indices: Sequence[int]) -> None:
        for i, delta in zip(indices, gradients):
            self.params[i].grad = delta.to(self.device, self.params[i].dtype).view(self.params[i].shape)
        self.optimizer.step()
        if self._scheduled == 0.0:  # SGD skips its buffer at momentum 0; by its formula the buffer is then the gradient
            for i in indices:
                self.optimizer.state[self.params[i]]["momentum_buffer"] = self.params[i].grad.clone()
        self.optimizer.zero_grad(set_to_none=True)

    def _set_momentum(self, momentum: float) -> float:
        if not 0 <= momentum < 1:
            raise ValueError(
                f"`outer_momentum_schedule` gave momentum {momentum!r} for outer step {self.outer_step}; a momentum"
                " must be in [0, 1)."
            )
        for group in self.optimizer.param_groups:
            if "momentum" not in group:
                raise ValueError(
                    f"`outer_momentum_schedule` sets the outer optimizer's `momentum`, which"
                    f" {type(self.optimizer).__name__} does not have. Use SGD (the default outer optimizer) with it,"
                    " or leave `outer_momentum_schedule=None`."
                )
            group["momentum"] = momentum
        return momentum

    @torch.no_grad()
    def set_buffers(self, mean_buffers: dict[str, Tensor]) -> None:
        """Store the workers' mean floating-point buffers as the global ones."""
        for name, value in mean_buffers.items():
            self.buffers[name].copy_(value)

    @torch.no_grad()
    def copy_to(
        self, module: Module, indices: Optional[Sequence[int]] = None, mixing: float = 0.0, buffers: bool = True
    ) -> None:
        """Move ``module``'s parameters (and floating-point buffers) to the global ones.

        Args:
            module: the worker's replica.
            indices: the parameters to move (a fragment); all of them by default.
            mixing: keep this share of the local value: ``local = mixing * local + (1 - mixing) * global``. 0 (the
                default) replaces the local weights by the global ones.
            buffers: also move the floating-point buffers.

        """
        for i in range(len(self.params)) if indices is None else indices:
            _mix_(local(self.locals[i]), self.params[i], mixing)
        if buffers:
            for name, buffer in float_buffers(module):
                _mix_(buffer, self.buffers[name], mixing)

    def module_state_dict(self, module: Module) -> dict[str, Any]:
        """``module.state_dict()`` with the global parameters and buffers in place of the local ones."""
        state = module.state_dict()
        # every name of every parameter: a tied parameter (an output layer sharing the embedding matrix) appears in
        # `state_dict` under each of its names but only once in `parameters()`; all its names get the global value
        index = {id(p): to_global(g, p) for p, g in zip(self.locals, self.params)}
        named = {name: index[id(p)] for name, p in module.named_parameters(remove_duplicate=False) if id(p) in index}
        for key in state:
            source: Optional[Tensor] = named.get(key, self.buffers.get(key))
            if source is not None:
                state[key] = source.detach().to(state[key].dtype)
        return state

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "params": [p.detach() for p in self.params],
            "buffers": dict(self.buffers),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "outer_step": self.outer_step,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        shapes = [tuple(p.shape) for p in self.params]
        saved = [tuple(p.shape) for p in state["params"]]
        if state["names"] != self.names or saved != shapes or set(state["buffers"]) != set(self.buffers):
            raise ValueError(
                "The checkpoint's DiLoCo state was written for a different model (parameter names or shapes differ)."
                " Resume with the model that wrote it, or start from its weights alone by loading the `state_dict`"
                " into your model and calling `trainer.fit` without `ckpt_path`."
            )
        for param, value in zip(self.params, state["params"]):
            param.copy_(value)
        for name, value in state["buffers"].items():
            self.buffers[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.outer_step = int(state["outer_step"])


def _parameter_names(module: Module, params: list[Tensor]) -> list[str]:
    names = {id(p): name for name, p in module.named_parameters()}
    return [names[id(p)] for p in params]


def _carry_optimizer_state(old: Optimizer, new: Optimizer) -> None:
    """Give ``new`` the per-parameter state of the parameters it shares with ``old``, and ``old``'s hyperparameters
    (a scheduler may have changed the learning rate)."""
    for param, state in old.state.items():
        if any(param is p for group in new.param_groups for p in group["params"]):
            new.state[param] = state
    for old_group, new_group in zip(old.param_groups, new.param_groups):
        new_group.update({k: v for k, v in old_group.items() if k != "params"})
