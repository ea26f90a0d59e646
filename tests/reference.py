"""An independent one-process simulation of k DiLoCo workers, written from the paper's Algorithm 1.

It shares nothing with the package: it keeps k replicas in one process, steps them on the batches each worker saw,
and applies the outer Nesterov update by its formula. Tests compare the strategy's real multi-process runs with it.
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from toy import ToyData, build_net, flat, make_optimizer


@dataclass
class Simulation:
    """What the simulated workers held: ``local[i][b]`` after batch b, ``global_at[s]`` after optimizer step s."""

    local: list[list[Tensor]] = field(default_factory=list)
    global_at: dict[int, Tensor] = field(default_factory=dict)
    final: dict[str, Tensor] = field(default_factory=dict)
    syncs: list[int] = field(default_factory=list)


def simulate(
    indices: list[list[list[int]]],
    init_seed: int,
    inner_steps: int,
    outer_lr: float,
    outer_momentum: float,
    nesterov: bool = True,
    optimizer: str = "adamw",
    lr: float = 0.05,
    accumulate: int = 1,
    final_sync: bool = True,
) -> Simulation:
    """Replay ``indices[worker][batch]`` through k replicas that start from ``build_net(init_seed)``.

    Args:
        indices: the sample indices of every batch every worker trained on, in order.
        init_seed: the seed of the network every worker starts from (rank 0's).
        inner_steps: H.
        outer_lr: outer learning rate.
        outer_momentum: outer momentum (Nesterov when ``nesterov``).
        nesterov: Nesterov or heavy-ball momentum.
        optimizer: the inner optimizer's kind (see ``toy.make_optimizer``).
        lr: the inner learning rate.
        accumulate: micro-batches per optimizer step; the loss is divided by it, as Lightning does.
        final_sync: whether an outer step closes a last, incomplete round.

    """
    data = ToyData()
    k = len(indices)
    nets = [build_net(init_seed) for _ in range(k)]
    opts = [make_optimizer(n.parameters(), optimizer, lr) for n in nets]
    global_params = [p.detach().clone() for p in nets[0].parameters()]
    global_buffers = [b.detach().clone() for b in nets[0].buffers() if b.is_floating_point()]
    momentum = [torch.zeros_like(p) for p in global_params]
    sim = Simulation(local=[[] for _ in range(k)])
    steps = since_sync = 0

    def outer_step() -> None:
        for j, g in enumerate(global_params):
            delta = sum(g - list(n.parameters())[j].detach() for n in nets) / k
            momentum[j] = outer_momentum * momentum[j] + delta
            update = delta + outer_momentum * momentum[j] if nesterov else momentum[j]
            g -= outer_lr * update
        for j, b in enumerate(global_buffers):
            b.copy_(sum([b_.detach() for b_ in n.buffers() if b_.is_floating_point()][j] for n in nets) / k)
        with torch.no_grad():
            for n in nets:
                for p, g in zip(n.parameters(), global_params):
                    p.copy_(g)
                for b, g in zip([b for b in n.buffers() if b.is_floating_point()], global_buffers):
                    b.copy_(g)
        sim.syncs.append(steps)

    n_batches = len(indices[0])
    sim.global_at[0] = torch.cat([g.reshape(-1) for g in global_params])
    for b in range(n_batches):
        for i in range(k):
            idx = torch.tensor(indices[i][b])
            x, y = data.x[idx], data.y[idx]
            loss = nn.functional.mse_loss(nets[i](x), y) / accumulate
            loss.backward()
        if (b + 1) % accumulate == 0:
            for opt in opts:
                opt.step()
                opt.zero_grad()
            steps += 1
            since_sync += 1
            if since_sync == inner_steps:
                outer_step()
                since_sync = 0
            sim.global_at[steps] = torch.cat([g.reshape(-1) for g in global_params])
        for i in range(k):
            sim.local[i].append(flat(nets[i]))
    if final_sync and since_sync:
        outer_step()
    sim.final = {f"net.{key}": v.detach().clone() for key, v in nets[0].state_dict().items()}
    return sim
