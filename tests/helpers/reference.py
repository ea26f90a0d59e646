"""An independent one-process simulation of k DiLoCo workers, written from the papers.

DiLoCo (Douillard et al. 2023, Algorithm 1): every worker takes H inner steps from the global weights, the mean of
the pseudo-gradients ``global - local`` steps the global weights with Nesterov momentum, and every worker continues
from them. Streaming DiLoCo (Douillard et al. 2025) adds fragments that sync at staggered steps, syncs whose outer
update lands ``tau`` steps after they start and is mixed into the local weights, and compressed pseudo-gradients.

It shares no code with the strategy: it keeps k replicas in one process, steps them on the batches each worker saw,
and applies every outer update by its formula. Only the codec of a compressed sync comes from
``lightning_diloco.compression`` (the wire format is what is compressed, and that module has its own tests). Tests
compare the strategy's real multi-process runs with it.

The rules it follows, with ``t`` counting optimizer steps from 1:

- Fragment ``p`` of ``F`` (a given list of parameter indices) starts a sync after step ``t`` when
  ``(t - offset_p) mod H == 0`` with ``offset_p = ((p + 1) * H // F) mod H``; the floating-point buffers travel with
  the last fragment.
- A sync takes each worker's pseudo-gradient ``global_p - local_p`` at its start. A worker whose pseudo-gradient is
  not finite gets weight 0; the others weight 1, or the steps they computed since the last sync (speed-weighted).
  Each worker's contribution ``weight * pseudo-gradient`` (plus its residual with error feedback) goes through the
  codec; the decoded contributions are summed in fp32 in worker order and divided by the total weight.
- The sync lands after step ``t + tau``: the outer Nesterov step moves ``global_p`` with that mean, the buffers become
  the healthy workers' mean, and each worker mixes ``local_p = alpha * local_p + (1 - alpha) * global_p`` (with
  ``tau = 0``, or for a worker that was dropped, ``alpha = 0``: it takes the global weights, and a dropped worker
  also loses its inner optimizer state). Syncs landing at a step are applied before the syncs due at that step start.
- Updates that scale and add (the outer step, mixing) use ``torch.add(..., alpha=...)``, which rounds as torch's own
  SGD does, and the simulation runs on one thread like every worker of the tests: on CPU it then matches the runs
  bit for bit, which compressed syncs need (a rounding difference can flip a quantization level).
- At the end (``final_sync``) the syncs in flight land, a sync that started at the very last step without mixing
  (no inner step happened since it started, so its pseudo-gradient holds all the local progress), and then every
  fragment with steps since the start of its last sync has a blocking sync, so every worker ends on the global
  weights.
"""

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from helpers.toy import ToyData, build_net, flat, make_optimizer


@dataclass
class StartState:
    """Where a resumed simulation starts: every worker on the global weights, after optimizer step ``step``.

    Attributes:
        step: the optimizer steps already taken.
        params: the global parameters, in ``module.parameters()`` order.
        buffers: the global floating-point buffers, in ``module.buffers()`` order.
        momentum: the outer momentum buffer of every parameter (``None`` where the outer optimizer has none yet).
        optimizer_states: every worker's inner optimizer ``state_dict``.
        last_sync: the step at which every fragment's last sync started; ``step`` for all by default.

    """

    step: int
    params: list[Tensor]
    buffers: list[Tensor]
    momentum: list[Optional[Tensor]]
    optimizer_states: list[dict[str, Any]]
    last_sync: Optional[list[int]] = None


@dataclass
class Simulation:
    """What the simulated workers held.

    Attributes:
        local: ``local[i][b]``, worker i's flat parameters after its batch b.
        global_at: the flat global parameters after optimizer step s.
        final: worker 0's ``state_dict`` at the end, keys as in ``ToyModule`` (``net.`` prefix).
        syncs: the step at which every sync started, in order.
        landed: ``(fragment, started, landed)`` of every sync whose outer update was applied, in order.
        dropped: ``(started, workers)`` of every sync that dropped workers with a non-finite pseudo-gradient.
        global_buffers: the global floating-point buffers at the end.
        residuals: with error feedback, every worker's residual per parameter index at the end.

    """

    local: list[list[Tensor]] = field(default_factory=list)
    global_at: dict[int, Tensor] = field(default_factory=dict)
    final: dict[str, Tensor] = field(default_factory=dict)
    syncs: list[int] = field(default_factory=list)
    landed: list[tuple[int, int, int]] = field(default_factory=list)
    dropped: list[tuple[int, list[int]]] = field(default_factory=list)
    global_buffers: list[Tensor] = field(default_factory=list)
    residuals: list[dict[int, Tensor]] = field(default_factory=list)


@dataclass
class _InFlight:
    fragment: int
    started: int
    lands: int
    mean: list[Tensor]
    buffers: Optional[list[Tensor]]
    healthy: list[bool]


def sync_offset(fragment: int, num_fragments: int, inner_steps: int) -> int:
    """The step, modulo H, after which ``fragment`` starts its syncs (Streaming DiLoCo's staggered schedule)."""
    return ((fragment + 1) * inner_steps // num_fragments) % inner_steps


def simulate(
    indices: list[list[list[int]]],
    init_seed: int,
    inner_steps: int,
    outer_lr: Union[float, Callable[[int], float]],
    outer_momentum: Union[float, Callable[[int], float]],
    nesterov: bool = True,
    optimizer: str = "adamw",
    lr: float = 0.05,
    accumulate: int = 1,
    final_sync: bool = True,
    *,
    fragments: Optional[list[list[int]]] = None,
    overlap: int = 0,
    mixing: float = 0.5,
    compression: str = "none",
    error_feedback: bool = False,
    poison: Optional[dict[int, int]] = None,
    computed: Optional[list[list[int]]] = None,
    num_steps: Optional[int] = None,
    start: Optional[StartState] = None,
    warmup: int = 0,
) -> Simulation:
    """Replay ``indices[worker][batch]`` through k replicas that start from ``build_net(init_seed)``.

    Args:
        indices: the sample indices of every batch every worker trained on, in order.
        init_seed: the seed of the network every worker starts from (rank 0's).
        inner_steps: H.
        outer_lr: outer learning rate, or a function of the number of outer steps already taken (a schedule).
        outer_momentum: outer momentum (Nesterov when ``nesterov``), or a function of the number of outer steps
            already taken.
        nesterov: Nesterov or heavy-ball momentum.
        optimizer: the inner optimizer's kind (see ``toy.make_optimizer``).
        lr: the inner learning rate.
        accumulate: micro-batches per optimizer step; the loss is divided by it, as Lightning does.
        final_sync: whether the end of training lands the syncs in flight and closes every open round.
        fragments: a partition of the parameter indices into F fragments; one fragment of all parameters by default.
        overlap: tau, the optimizer steps between a sync's start and its outer update.
        mixing: alpha, the share of its local weights a worker keeps when an overlapped sync lands.
        compression: the codec every worker's contribution goes through (a name of
            ``lightning_diloco.compression``).
        error_feedback: carry each worker's compression residual into its next contribution to the same tensor.
        poison: ``{worker: step}``: set one weight of that worker to NaN after that step (as ``TOY_NAN`` does).
        computed: per worker, the steps it computed; at the other steps it takes an optimizer step without a
            gradient. Pseudo-gradients are then weighted by the steps computed since the last sync. ``indices``
            then lists only the batches of computed steps.
        num_steps: the optimizer steps to run; ``len(indices[0]) // accumulate`` by default.
        start: resume from this state instead of ``build_net(init_seed)`` with a fresh outer optimizer.
        warmup: W, synchronous steps first, as in DDP: every replica's gradient is replaced by the replicas' mean
            (summed in worker order, divided by k) before the inner optimizers step. After step W every replica takes
            replica 0's weights and buffers, the global weights are those, with no outer momentum, and DiLoCo's
            steps (the sync schedule above) count from there.

    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every worker of the tests: the same reduction order, so the same roundings
    try:
        return _simulate(indices, init_seed, inner_steps, outer_lr, outer_momentum, nesterov, optimizer, lr,
                         accumulate, final_sync, fragments, overlap, mixing, compression, error_feedback, poison,
                         computed, num_steps, start, warmup)
    finally:
        torch.set_num_threads(threads)


def _simulate(
    indices: list[list[list[int]]],
    init_seed: int,
    inner_steps: int,
    outer_lr: float,
    outer_momentum: float,
    nesterov: bool,
    optimizer: str,
    lr: float,
    accumulate: int,
    final_sync: bool,
    fragments: Optional[list[list[int]]],
    overlap: int,
    mixing: float,
    compression: str,
    error_feedback: bool,
    poison: Optional[dict[int, int]],
    computed: Optional[list[list[int]]],
    num_steps: Optional[int],
    start: Optional[StartState],
    warmup: int,
) -> Simulation:
    data = ToyData()
    k = len(indices)
    nets = [build_net(init_seed) for _ in range(k)]
    opts = [make_optimizer(n.parameters(), optimizer, lr) for n in nets]
    params = [list(n.parameters()) for n in nets]
    buffers = [[b for b in n.buffers() if b.is_floating_point()] for n in nets]
    n_params = len(params[0])
    fragments = fragments if fragments is not None else [list(range(n_params))]
    num_fragments = len(fragments)
    assert sorted(i for f in fragments for i in f) == list(range(n_params)), "fragments must partition the params"
    offsets = [sync_offset(p, num_fragments, inner_steps) for p in range(num_fragments)]
    codec = _codec(compression)

    step = 0
    global_params = [p.detach().clone() for p in params[0]]
    global_buffers = [b.detach().clone() for b in buffers[0]]
    momentum: list[Optional[Tensor]] = [None] * n_params
    last_sync = [0] * num_fragments
    landed: list[int] = []  # the outer steps taken (a scheduled outer_lr takes its value by their count)
    if start is not None:
        step = start.step
        global_params = [t.detach().clone().float() for t in start.params]
        global_buffers = [t.detach().clone().float() for t in start.buffers]
        momentum = [None if m is None else m.detach().clone() for m in start.momentum]
        last_sync = list(start.last_sync) if start.last_sync is not None else [step] * num_fragments
        for i in range(k):  # a copy each: loading keeps the given tensors, which the steps then change in place
            opts[i].load_state_dict(copy.deepcopy(start.optimizer_states[i]))
    with torch.no_grad():
        for i in range(k):
            for p, g in zip(params[i], global_params):
                p.copy_(g)
            for b, g in zip(buffers[i], global_buffers):
                b.copy_(g)

    sim = Simulation(local=[[] for _ in range(k)], residuals=[{} for _ in range(k)])
    computed_sets = [set(c) for c in computed] if computed is not None else None
    computed_since = [0] * k
    in_flight: list[_InFlight] = []
    cursor = [0] * k
    total_steps = num_steps if num_steps is not None else len(indices[0]) // accumulate
    poison = poison or {}

    @torch.no_grad()
    def begin(p: int, started: int) -> _InFlight:
        """A sync of fragment ``p``: every worker's pseudo-gradient, weighted, through the codec, averaged."""
        deltas = [[global_params[j] - params[i][j].detach() for j in fragments[p]] for i in range(k)]
        healthy = [all(bool(torch.isfinite(d).all()) for d in deltas[i]) for i in range(k)]
        weights = [0.0 if not healthy[i] else float(computed_since[i]) if computed is not None else 1.0
                   for i in range(k)]
        dropped = [i for i in range(k) if not healthy[i]]
        if dropped:
            sim.dropped.append((started, dropped))
        mean = []
        for pos, j in enumerate(fragments[p]):
            total: Optional[Tensor] = None
            for i in range(k):
                decoded = _through_codec(codec, deltas[i][pos], weights[i], sim.residuals[i], j, error_feedback)
                total = decoded if total is None else total + decoded
            assert total is not None
            mean.append(total / max(sum(weights), 1e-12))
        mean_buffers = None
        if p == num_fragments - 1 and global_buffers:
            n_healthy = sum(healthy)
            mean_buffers = []
            for j in range(len(global_buffers)):
                total = None
                for i in range(k):
                    value = buffers[i][j].detach().float() if healthy[i] else torch.zeros_like(global_buffers[j])
                    total = value.clone() if total is None else total + value
                mean_buffers.append(total / max(n_healthy, 1))
        sim.syncs.append(started)
        return _InFlight(p, started, started + overlap, mean, mean_buffers, healthy)

    @torch.no_grad()
    def land(sync: _InFlight, now: int, alpha: float) -> None:
        """The fragment's :func:`outer_step`, then every worker moves (or mixes) to the global weights."""
        if any(sync.healthy):
            lr = outer_lr(len(landed)) if callable(outer_lr) else outer_lr  # a schedule: lr of the n-th outer step
            mu = outer_momentum(len(landed)) if callable(outer_momentum) else outer_momentum
            landed.append(sync.started)
            for pos, j in enumerate(fragments[sync.fragment]):
                global_params[j], momentum[j] = outer_step(global_params[j], sync.mean[pos], momentum[j], lr,
                                                           mu, nesterov)
        if sync.buffers is not None:
            for j, value in enumerate(sync.buffers):
                global_buffers[j] = value.clone()
        for i in range(k):
            a = alpha if sync.healthy[i] else 0.0
            for j in fragments[sync.fragment]:
                params[i][j].copy_(_mixed(params[i][j], global_params[j], a))
            if sync.buffers is not None:
                for b, g in zip(buffers[i], global_buffers):
                    b.copy_(_mixed(b, g, a))
            if not sync.healthy[i]:
                opts[i].state.clear()
        last_sync[sync.fragment] = sync.started
        if sync.fragment == num_fragments - 1:
            for i in range(k):
                computed_since[i] = 0
        sim.landed.append((sync.fragment, sync.started, now))

    def after_step(t: int) -> None:
        while in_flight and in_flight[0].lands <= t:
            land(in_flight.pop(0), t, mixing if overlap else 0.0)
        for p in range(num_fragments):
            if (t - offsets[p]) % inner_steps == 0:
                sync = begin(p, t)
                if overlap:
                    in_flight.append(sync)
                else:
                    land(sync, t, 0.0)
        if t in poison.values():
            with torch.no_grad():
                for i, at in poison.items():
                    if at == t:
                        params[i][0][0, 0] = float("nan")  # net[0].weight[0, 0], as tests/helpers/toy.py does

    sim.global_at[step] = _cat(global_params)
    for t in range(step + 1, step + total_steps + 1):
        active = [computed_sets is None or t in computed_sets[i] for i in range(k)]
        for micro in range(accumulate):
            for i in range(k):
                if not active[i]:
                    continue
                idx = torch.tensor(indices[i][cursor[i]])
                cursor[i] += 1
                x, y = data.x[idx], data.y[idx]
                loss = nn.functional.mse_loss(nets[i](x), y) / accumulate
                loss.backward()
            if micro == accumulate - 1:
                if t <= warmup:
                    average_gradients(params)
                for i in range(k):
                    opts[i].step()  # without a gradient (a step that was not computed) nothing moves
                    opts[i].zero_grad()
                    computed_since[i] += int(active[i])
                if t == warmup:
                    global_params, global_buffers = start_from_replica_zero(params, buffers)
                if t > warmup:
                    after_step(t - warmup)
                sim.global_at[t] = _cat(global_params)
            for i in range(k):
                sim.local[i].append(flat(nets[i]))
    end = step + total_steps - warmup
    if final_sync and end > 0:
        while in_flight:
            sync = in_flight.pop(0)
            land(sync, end, mixing if overlap and sync.started < end else 0.0)
        for p in range(num_fragments):
            if end > last_sync[p]:
                land(begin(p, end), end, 0.0)
    sim.final = {f"net.{key}": v.detach().clone() for key, v in nets[0].state_dict().items()}
    sim.global_buffers = [b.clone() for b in global_buffers]
    return sim


@torch.no_grad()
def average_gradients(params: list[list[Tensor]]) -> None:
    """DDP's step: every replica's gradient becomes the sum over replicas, in replica order, divided by their number."""
    k = len(params)
    for j in range(len(params[0])):
        total = params[0][j].grad.clone()
        for i in range(1, k):
            total = total + params[i][j].grad
        for i in range(k):
            params[i][j].grad.copy_(total / k)


@torch.no_grad()
def start_from_replica_zero(params: list[list[Tensor]], buffers: list[list[Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
    """Every replica takes replica 0's weights and buffers; they become the global ones."""
    for i in range(1, len(params)):
        for p, p0 in zip(params[i], params[0]):
            p.copy_(p0)
        for b, b0 in zip(buffers[i], buffers[0]):
            b.copy_(b0)
    return [p.detach().clone() for p in params[0]], [b.detach().clone() for b in buffers[0]]


def outer_step(
    param: Tensor, grad: Tensor, momentum: Optional[Tensor], lr: float, mu: float, nesterov: bool = True
) -> tuple[Tensor, Tensor]:
    """One outer SGD step of one tensor by its formula; the new parameter and momentum.

    ``m = mu m + g``, then ``p = p - lr (g + mu m)`` with Nesterov momentum or ``p = p - lr m`` with heavy-ball
    momentum, the scaled additions as ``torch.add(..., alpha=...)``, which rounds as torch's SGD does.

    Args:
        param: the global parameter.
        grad: its gradient (the mean pseudo-gradient).
        momentum: its momentum buffer; ``None`` where there is none yet, which starts it at ``g``.
        lr: the outer learning rate.
        mu: the outer momentum.
        nesterov: Nesterov or heavy-ball momentum.

    """
    momentum = grad.clone() if momentum is None else mu * momentum + grad
    update = torch.add(grad, momentum, alpha=mu) if nesterov else momentum
    return torch.add(param, update, alpha=-lr), momentum


def closed_round(
    state: dict[str, Any],
    num_workers: int,
    fragments: Optional[list[list[int]]] = None,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
) -> tuple[StartState, dict[str, Tensor]]:
    """What resuming a checkpoint's DiLoCo ``state`` on ``num_workers`` workers starts from, from its contents alone.

    The saved workers' open rounds are closed as if they had all synced: every fragment with steps since its last
    sync takes one outer Nesterov step (with the saved momentum) with the mean over the saved workers of
    ``global - local``; the other fragments keep their global weights; the floating-point buffers become the saved
    workers' mean. Every worker starts from the result, and worker ``w`` with the inner optimizer state of saved
    worker ``w mod k``.

    Args:
        state: the checkpoint's ``"diloco"`` entry (without syncs in flight).
        num_workers: the workers of the resumed run.
        fragments: the parameter indices of every fragment; one fragment of all parameters by default.
        outer_lr: the outer learning rate.
        outer_momentum: the outer (Nesterov) momentum.

    Returns:
        The reference's start state, and the expected ``state_dict`` entries (parameters and float buffers).

    """
    assert not state["pending"], "closing a round with syncs in flight is not modelled here"
    outer, workers = state["outer"], state["workers"]
    names, params = outer["names"], [p.detach().clone() for p in outer["params"]]
    momentum = [outer["optimizer"]["state"].get(j, {}).get("momentum_buffer") for j in range(len(names))]
    fragments = fragments if fragments is not None else [list(range(len(names)))]
    for p, indices in enumerate(fragments):
        if state["step"] <= state["last_sync"][p]:
            continue
        mean = [torch.stack([params[j] - w["module"][names[j]].float() for w in workers]).mean(dim=0) for j in indices]
        for j, grad in zip(indices, mean):
            params[j], momentum[j] = outer_step(params[j], grad, momentum[j], outer_lr, outer_momentum)
    buffers = {n: torch.stack([w["module"][n].float() for w in workers]).mean(dim=0) for n in outer["buffers"]}
    expected = {**dict(zip(names, params)), **buffers}
    optimizer_states = [workers[w % len(workers)]["optimizer_states"][0] for w in range(num_workers)]
    start = StartState(state["step"], params, list(buffers.values()), momentum, optimizer_states)
    return start, expected


def _codec(name: str) -> Any:
    if name == "none":
        return None
    from lightning_diloco.compression import get_compressor

    return get_compressor(name)


def _through_codec(
    codec: Any, delta: Tensor, weight: float, residuals: dict[int, Tensor], key: int, error_feedback: bool
) -> Tensor:
    """One worker's contribution ``weight * delta`` as the receivers decode it (exact zeros for weight 0)."""
    if weight == 0:
        return torch.zeros_like(delta, dtype=torch.float32)
    contribution = (delta.float() * weight if weight != 1 else delta.float().clone()).reshape(-1)
    if codec is None:
        return contribution.view_as(delta)
    if error_feedback and key in residuals:
        contribution = contribution + residuals[key]
    decoded = codec.decode(codec.encode(contribution), contribution.numel())
    if error_feedback:
        residuals[key] = contribution - decoded
    return decoded.view_as(delta)


def _mixed(local: Tensor, global_: Tensor, alpha: float) -> Tensor:
    if alpha == 0.0:
        return global_.to(local.dtype).clone()
    return torch.add(alpha * local.detach(), global_.to(local.dtype), alpha=1.0 - alpha)


def _cat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])
