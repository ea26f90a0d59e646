"""A one-process simulation of k DiLoCo workers with eager updates (Kale et al. 2025), written from the paper.

It shares no code with the strategy (only the codec, as :mod:`helpers.reference` does). Each of the k workers keeps
its own global weights and Nesterov momentum. The rules, with ``t`` counting optimizer steps from 1 and the fragment
schedule of :func:`helpers.reference.sync_offset`:

- At the end of a round of fragment ``p`` (step ``t``), every worker ``i`` takes its pseudo-gradient
  ``delta_i = global_i - local_i``. The sync's mean is ``sum_j decoded(w_j delta_j) / sum_j w_j`` with ``w_j = 1``,
  or 0 for a worker whose pseudo-gradient is not finite, as in plain DiLoCo.
- Worker ``i`` steps its own global weights with ``g_i = own_i + sum over its syncs of p started at t - d H of
  (mean - own_i then)``, where ``own_i = delta_i`` (its estimate of the mean; zeros if not finite), then takes them
  as its local weights.
  It keeps its local buffers unless a sync arrived, whose healthy workers' mean buffers it then takes (a worker
  whose pseudo-gradient is not finite takes the latest such mean too, and loses its inner optimizer state).
- At the end of ``fit``: for every fragment, a round still open is closed by a sync applied whole (``g_i = mean +
  the others' part of the syncs still out``); a fragment without an open round applies the others' part of its syncs
  still out. Then every worker's global weights and momentum become their mean over the workers.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from helpers.reference import _codec, _through_codec, outer_step, sync_offset
from helpers.toy import ToyData, build_net, flat, make_optimizer


@dataclass
class EagerSimulation:
    """``local[i][b]``: worker i's flat parameters after its batch b; ``final``: worker 0's ``state_dict`` at the
    end; ``applied``: ``(fragment, started, applied at)`` of every sync whose others' part was applied."""

    local: list[list[Tensor]] = field(default_factory=list)
    final: dict[str, Tensor] = field(default_factory=dict)
    applied: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class _Sync:
    fragment: int
    started: int
    mean: list[Tensor]
    own: list[list[Tensor]]  # per worker
    buffers: Optional[list[Tensor]]


@torch.no_grad()
def simulate_eager(
    indices: list[list[list[int]]], init_seed: int, inner_steps: int, eager_rounds: int, outer_lr: float = 0.7,
    outer_momentum: float = 0.9, lr: float = 0.05, fragments: Optional[list[list[int]]] = None,
    compression: str = "none", error_feedback: bool = False, poison: Optional[dict[int, int]] = None,
) -> EagerSimulation:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _simulate(indices, init_seed, inner_steps, eager_rounds, outer_lr, outer_momentum, lr, fragments,
                         compression, error_feedback, poison or {})
    finally:
        torch.set_num_threads(threads)


def _simulate(
    indices: list[list[list[int]]], init_seed: int, inner_steps: int, eager_rounds: int, outer_lr: float,
    outer_momentum: float, lr: float, fragments: Optional[list[list[int]]], compression: str, error_feedback: bool,
    poison: dict[int, int],
) -> EagerSimulation:
    data, k = ToyData(), len(indices)
    nets = [build_net(init_seed) for _ in range(k)]
    opts = [make_optimizer(n.parameters(), "adamw", lr) for n in nets]
    params = [list(n.parameters()) for n in nets]
    buffers = [[b for b in n.buffers() if b.is_floating_point()] for n in nets]
    fragments = fragments if fragments is not None else [list(range(len(params[0])))]
    offsets = [sync_offset(p, len(fragments), inner_steps) for p in range(len(fragments))]
    codec = _codec(compression)
    global_ = [[p.detach().clone() for p in params[i]] for i in range(k)]  # every worker's own
    momentum: list[list[Optional[Tensor]]] = [[None] * len(params[0]) for _ in range(k)]
    residuals: list[dict[int, Tensor]] = [{} for _ in range(k)]
    global_buffers = [b.detach().clone() for b in buffers[0]]  # the latest mean that arrived
    last_sync = [0] * len(fragments)
    out: list[_Sync] = []
    sim = EagerSimulation(local=[[] for _ in range(k)])

    def begin(p: int, t: int) -> _Sync:
        deltas = [[global_[i][j] - params[i][j].detach() for j in fragments[p]] for i in range(k)]
        healthy = [all(bool(torch.isfinite(d).all()) for d in deltas[i]) for i in range(k)]
        weights = [1.0 if h else 0.0 for h in healthy]
        mean = []
        for pos, j in enumerate(fragments[p]):
            total = None
            for i in range(k):
                decoded = _through_codec(codec, deltas[i][pos], weights[i], residuals[i], j, error_feedback)
                total = decoded if total is None else total + decoded
            mean.append(total / max(sum(weights), 1e-12))
        own = [[d.clone() if healthy[i] else torch.zeros_like(d) for d in deltas[i]] for i in range(k)]
        mean_buffers = None
        if p == len(fragments) - 1 and buffers[0] and any(healthy):
            mean_buffers = []
            for j in range(len(buffers[0])):
                values = [buffers[i][j].float() if healthy[i] else torch.zeros_like(buffers[i][j]) for i in range(k)]
                total = values[0].clone()
                for v in values[1:]:
                    total = total + v
                mean_buffers.append(total / sum(healthy))
        return _Sync(p, t, mean, own, mean_buffers), healthy

    def step_worker(i: int, p: int, gradient: list[Tensor], arrived: list[_Sync], dropped: bool = False) -> None:
        for pos, j in enumerate(fragments[p]):
            global_[i][j], momentum[i][j] = outer_step(global_[i][j], gradient[pos], momentum[i][j], outer_lr,
                                                       outer_momentum)
            params[i][j].copy_(global_[i][j])
        with_buffers = [s for s in arrived if s.buffers is not None]
        if with_buffers:
            global_buffers[:] = [b.clone() for b in with_buffers[-1].buffers]
        if with_buffers or dropped:  # a dropped worker also takes the global buffers
            for b, value in zip(buffers[i], global_buffers):
                b.copy_(value)

    def due(p: int, t: int, every: bool) -> list[_Sync]:
        ready = [s for s in out if s.fragment == p and (every or s.started + eager_rounds * inner_steps <= t)]
        for s in ready:
            out.remove(s)
            sim.applied.append((p, s.started, t))
        return ready

    def others(i: int, s: _Sync) -> list[Tensor]:
        return [m - o for m, o in zip(s.mean, s.own[i])]

    total_steps = len(indices[0])
    for t in range(1, total_steps + 1):
        for i in range(k):
            idx = torch.tensor(indices[i][t - 1])
            with torch.enable_grad():
                loss = nn.functional.mse_loss(nets[i](data.x[idx]), data.y[idx])
                loss.backward()
            opts[i].step()
            opts[i].zero_grad()
        for p in range(len(fragments)):
            if (t - offsets[p]) % inner_steps:
                continue
            arrived = due(p, t, every=False)
            sync, healthy = begin(p, t)
            for i in range(k):
                gradient = [o.clone() for o in sync.own[i]]
                for s in arrived:
                    for g, o in zip(gradient, others(i, s)):
                        g.add_(o)
                step_worker(i, p, gradient, arrived, dropped=not healthy[i])
                if not healthy[i]:
                    opts[i].state.clear()
            out.append(sync)
            last_sync[p] = t
        for i, at in poison.items():
            if at == t:
                params[i][0][0, 0] = float("nan")
        for i in range(k):
            sim.local[i].append(flat(nets[i]))

    end = total_steps
    for p in range(len(fragments)):
        arrived = due(p, end, every=True)
        if end > last_sync[p]:
            sync, _ = begin(p, end)
            for i in range(k):
                gradient = [m.clone() for m in sync.mean]
                for s in arrived:
                    for g, o in zip(gradient, others(i, s)):
                        g.add_(o)
                step_worker(i, p, gradient, arrived + [sync])
        elif arrived:
            for i in range(k):
                gradient = [torch.zeros_like(m) for m in arrived[0].mean]
                for s in arrived:
                    for g, o in zip(gradient, others(i, s)):
                        g.add_(o)
                step_worker(i, p, gradient, arrived)
    for j in range(len(params[0])):  # the workers agree: the mean of their global weights and momenta
        for state in (global_, momentum):
            total = state[0][j].clone()
            for i in range(1, k):
                total = total + state[i][j]
            for i in range(k):
                state[i][j] = total / k
        for i in range(k):
            params[i][j].copy_(global_[i][j])
    sim.final = {f"net.{key}": v.detach().clone() for key, v in nets[0].state_dict().items()}
    return sim
