"""A one-process simulation of DiLoCo workers made of several processes, and of speed-weighted rounds.

Written from the definitions, sharing nothing with the package (``tests/helpers/reference.py`` is the simulation of
plain workers, whose :func:`~helpers.reference.outer_step` this one takes; it adds what worker groups and
speed-weighted rounds change):

- A worker of G processes is one replica trained with data parallelism: at each of its inner steps every process
  computes the gradient of its own micro-batch, the worker steps its optimizer with their mean (what
  DistributedDataParallel does). The replica's BatchNorm statistics are those of its first process (DDP broadcasts
  the first process's buffers before every forward).
- A worker may skip a step (speed-weighted rounds): no forward, no gradient, and its optimizer does not move (AdamW
  leaves a parameter whose gradient is ``None`` untouched, weight decay included, and does not count the step).
- At an outer step worker w's pseudo-gradient ``global - local_w`` is weighted by ``weights[w]`` (1 for plain DiLoCo,
  the steps w computed since the last outer step for speed-weighted rounds), the outer optimizer is SGD with Nesterov
  momentum applied by its formula, floating-point buffers take the plain mean over the workers, and every worker
  restarts from the global weights.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from helpers.reference import outer_step
from helpers.toy import ToyData, build_net, flat, make_optimizer

# batches[w][s]: what worker w trained on at optimizer step s + 1: one list of sample indices per process of the
# worker, or None if the worker skipped that step
Batches = list[list[Optional[list[list[int]]]]]


@dataclass
class GroupSimulation:
    """``local[w][s]``: worker w's parameters after step s + 1 (after any outer step that falls there);
    ``global_at[s]``: the global parameters after step s; ``final[w]``: worker w's floating-point state at the end;
    ``syncs``: the steps of the outer steps; ``sync_weights``: every worker's weight at each of them."""

    local: list[list[Tensor]] = field(default_factory=list)
    global_at: dict[int, Tensor] = field(default_factory=dict)
    final: list[dict[str, Tensor]] = field(default_factory=list)
    syncs: list[int] = field(default_factory=list)
    sync_weights: list[list[float]] = field(default_factory=list)


def _float_buffers(net: nn.Module) -> list[Tensor]:
    return [b for b in net.buffers() if b.is_floating_point()]


def simulate_groups(
    batches: Batches,
    init_seed: int,
    inner_steps: int,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    optimizer: str = "adamw",
    lr: float = 0.05,
    weight_by_computed: bool = False,
    final_sync: bool = True,
) -> GroupSimulation:
    """Replay ``batches`` through one replica per worker, all starting from ``build_net(init_seed)``.

    Args:
        batches: see :data:`Batches`; every worker has the same number of steps.
        init_seed: the seed of the network every worker starts from.
        inner_steps: H.
        outer_lr: outer learning rate (Nesterov SGD).
        outer_momentum: outer momentum.
        optimizer: the inner optimizer's kind (``helpers.toy.make_optimizer``).
        lr: the inner learning rate.
        weight_by_computed: weight pseudo-gradients by the steps each worker computed since the last outer step.
        final_sync: whether an outer step closes a last, incomplete round.

    """
    data = ToyData()
    k = len(batches)
    n_steps = len(batches[0])
    nets = [build_net(init_seed) for _ in range(k)]
    opts = [make_optimizer(n.parameters(), optimizer, lr) for n in nets]
    global_params = [p.detach().clone() for p in nets[0].parameters()]
    global_buffers = [b.detach().clone() for b in _float_buffers(nets[0])]
    momentum: list[Optional[Tensor]] = [None] * len(global_params)
    computed = [0] * k
    sim = GroupSimulation(local=[[] for _ in range(k)])

    def outer_sync(step: int) -> None:
        weights = [float(c) if weight_by_computed else 1.0 for c in computed]
        total = sum(weights)
        with torch.no_grad():
            for j, g in enumerate(global_params):
                delta = sum(w * (g - list(n.parameters())[j]) for w, n in zip(weights, nets)) / total
                global_params[j], momentum[j] = outer_step(g, delta, momentum[j], outer_lr, outer_momentum)
            for j, b in enumerate(global_buffers):
                b.copy_(sum(_float_buffers(n)[j] for n in nets) / k)
            for n in nets:
                for p, g in zip(n.parameters(), global_params):
                    p.copy_(g)
                for b, g in zip(_float_buffers(n), global_buffers):
                    b.copy_(g)
        sim.syncs.append(step)
        sim.sync_weights.append(weights)
        computed[:] = [0] * k

    sim.global_at[0] = torch.cat([g.reshape(-1) for g in global_params])
    since_sync = 0
    for s in range(n_steps):
        for w in range(k):
            micro = batches[w][s]
            if micro is None:
                opts[w].step()  # no gradient anywhere: AdamW must leave everything as it is
                continue
            _data_parallel_backward(nets[w], [torch.tensor(idx) for idx in micro], data)
            opts[w].step()
            opts[w].zero_grad()
            computed[w] += 1
        since_sync += 1
        if since_sync == inner_steps:
            outer_sync(s + 1)
            since_sync = 0
        sim.global_at[s + 1] = torch.cat([g.reshape(-1) for g in global_params])
        for w in range(k):
            sim.local[w].append(flat(nets[w]))
    if final_sync and since_sync:
        outer_sync(n_steps)
    for n in nets:
        state = {f"net.{name}": v.detach().clone() for name, v in n.state_dict().items() if v.is_floating_point()}
        sim.final.append(state)
    return sim


def _data_parallel_backward(net: nn.Module, micro_batches: list[Tensor], data: ToyData) -> None:
    """Leave the mean of the micro-batches' gradients in ``.grad``; the buffers end as the first micro-batch left
    them (the later ones run from a snapshot that is restored afterwards)."""
    before = [b.detach().clone() for b in net.buffers()]
    after_first: list[Tensor] = []
    for p, idx in enumerate(micro_batches):
        if p > 0:
            with torch.no_grad():
                for b, saved in zip(net.buffers(), before):
                    b.copy_(saved)
        loss = nn.functional.mse_loss(net(data.x[idx]), data.y[idx]) / len(micro_batches)
        loss.backward()
        if p == 0:
            after_first = [b.detach().clone() for b in net.buffers()]
    with torch.no_grad():
        for b, saved in zip(net.buffers(), after_first):
            b.copy_(saved)
