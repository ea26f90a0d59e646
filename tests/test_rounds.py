"""The round loop (lightning_diloco/rounds.py) without a Trainer: one worker, its outer steps against the formulas."""

from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Optional

import pytest
import torch
from torch import Tensor, nn

from lightning_diloco.census import Census, OuterSyncError
from lightning_diloco.config import DiLoCoConfig
from lightning_diloco.outer import OuterState
from lightning_diloco.rounds import Landed, Rounds
from lightning_diloco.topology import Topology
from lightning_diloco.workers import ProcessGroupWorkers

LR, MU = 0.7, 0.9


class Loop:
    """One worker's round loop over a small model, with what it reported."""

    def __init__(self, executor: Optional[ThreadPoolExecutor] = None, **options: Any) -> None:
        torch.manual_seed(0)
        self.module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        self.config = DiLoCoConfig(**options)
        outer = OuterState(self.module, self.config.build_outer_optimizer(), "cpu")
        self.landed: list[Landed] = []
        self.warnings: list[str] = []
        self.restarts = 0
        workers = ProcessGroupWorkers(Topology(0, 1, 1, None, None, "gloo"))  # one process, no process group
        census = Census(self.config.inner_steps, self.config.speed_weighted, self.config.nonfinite,
                        self.warnings.append)
        self.rounds = Rounds(self.config, self.module, outer, workers, census, torch.device("cpu"), executor,
                             self.landed.append, self._restart, self.warnings.append, self.warnings.append)

    def _restart(self) -> None:
        self.restarts += 1

    @torch.no_grad()
    def inner_step(self, scale: float = 0.01) -> None:
        for p in self.module.parameters():
            p.add_(torch.randn_like(p) * scale)
        self.module[1].running_mean.add_(0.1)
        self.rounds.after_inner_step()

    def params(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.module.parameters()]


def nesterov(theta: list[Tensor], delta: list[Tensor], momentum: list[Optional[Tensor]]) -> tuple[list, list]:
    """Algorithm 1, line 11 with Nesterov SGD: ``m = mu m + delta``, ``theta = theta - lr (delta + mu m)``."""
    momentum = [d.clone() if m is None else MU * m + d for d, m in zip(delta, momentum)]
    theta = [t - LR * (d + MU * m) for t, d, m in zip(theta, delta, momentum)]
    return theta, momentum


def test_blocking_rounds_step_the_global_weights_and_restart_from_them():
    loop = Loop(inner_steps=3)
    theta, momentum = loop.params(), [None] * 4
    for round_ in range(3):
        for _ in range(3):
            loop.inner_step()
        landed = loop.landed[-1]
        assert len(loop.landed) == round_ + 1
        assert landed.sync.started == 3 * (round_ + 1) and landed.outer_step == round_ + 1 and landed.healthy == 1
        theta, momentum = nesterov(theta, landed.sync.deltas, momentum)  # one worker: the mean is its own delta
        for p, t in zip(loop.module.parameters(), theta):  # line 12: the worker continues from the global weights
            torch.testing.assert_close(p.detach(), t, rtol=0, atol=1e-6)
    torch.testing.assert_close(loop.module[1].running_mean, loop.rounds.outer.buffers["1.running_mean"])
    assert loop.restarts == 0 and loop.warnings == []


def test_pseudo_gradient_is_global_minus_local():
    loop = Loop(inner_steps=2)
    start = loop.params()
    loop.inner_step()
    loop.rounds.step += 1  # the second inner step, by hand, to look at the pseudo-gradient before it is sent
    with torch.no_grad():
        for p in loop.module.parameters():
            p.add_(0.05)
    local = loop.params()
    loop.rounds.start(loop.rounds.fragments[0])
    (landed,) = loop.landed
    for d, s, p in zip(landed.sync.deltas, start, local):
        torch.testing.assert_close(d, s - p, rtol=0, atol=0)


def test_an_overlapped_sync_lands_tau_steps_later_and_mixes():
    with ThreadPoolExecutor(max_workers=1) as executor:
        loop = Loop(executor, inner_steps=4, overlap_steps=2, overlap_mixing=0.5)
        theta = loop.params()
        for _ in range(4):
            loop.inner_step()
        assert loop.landed == [] and len(loop.rounds.pending) == 1  # started after step 4, in flight
        delta = [t - p for t, p in zip(theta, loop.params())]
        loop.inner_step()
        assert loop.landed == []
        with torch.no_grad():
            for p in loop.module.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        before = loop.params()
        loop.rounds.after_inner_step()  # step 6: it lands
        (landed,) = loop.landed
        assert (landed.sync.started, landed.sync.lands_at) == (4, 6)
        global_, _ = nesterov(theta, delta, [None] * 4)
        for p, b, g in zip(loop.module.parameters(), before, global_):
            torch.testing.assert_close(p.detach(), 0.5 * b + 0.5 * g, rtol=0, atol=1e-6)


def test_flush_lands_a_sync_that_just_started_whole_and_closes_open_rounds():
    with ThreadPoolExecutor(max_workers=1) as executor:
        loop = Loop(executor, inner_steps=4, overlap_steps=2, num_fragments=2)
        for _ in range(4):
            loop.inner_step()  # fragment 0 starts after step 2 and lands after 4; fragment 1 starts after 4
        assert [(l.sync.fragment.index, l.sync.started) for l in loop.landed] == [(0, 2)]
        assert [s.fragment.index for s in loop.rounds.pending] == [1]
        loop.rounds.flush()
        # fragment 1 had no inner step since its sync started: it lands without mixing; fragment 0 has an open
        # round (steps 3 and 4) that flush closes with a blocking sync
        assert [(l.sync.fragment.index, l.sync.started) for l in loop.landed] == [(0, 2), (1, 4), (0, 4)]
        outer = loop.rounds.outer
        for p, g in zip(loop.module.parameters(), outer.params):
            torch.testing.assert_close(p.detach(), g.detach(), rtol=0, atol=0)
        assert all(not f.has_open_round(loop.rounds.step) for f in loop.rounds.fragments)


def test_a_lone_non_finite_worker_restarts_from_unchanged_global_weights():
    """With ``nonfinite="skip"`` a step where no worker is healthy leaves the global weights and buffers as they were,
    and the worker restarts from them (training goes on, so the user's callbacks see the NaN loss and decide)."""
    loop = Loop(inner_steps=2)
    loop.inner_step()
    global_before = [g.detach().clone() for g in loop.rounds.outer.params]
    buffers_before = {n: b.clone() for n, b in loop.rounds.outer.buffers.items()}
    with torch.no_grad():
        loop.module[0].weight[0, 0] = float("nan")
    loop.inner_step()
    (landed,) = loop.landed
    assert landed.healthy == 0 and loop.restarts == 1
    assert "No worker is healthy" in loop.warnings[-1]
    for p, g, before in zip(loop.module.parameters(), loop.rounds.outer.params, global_before):
        assert torch.equal(g.detach(), before) and torch.equal(p.detach(), before)
    for name, before in buffers_before.items():
        assert torch.equal(loop.rounds.outer.buffers[name], before)


def test_a_non_finite_worker_stops_the_run_with_nonfinite_raise():
    loop = Loop(inner_steps=2, nonfinite="raise")
    loop.inner_step()
    with torch.no_grad():
        loop.module[0].weight[0, 0] = float("nan")
    with pytest.raises(OuterSyncError, match=r"worker\(s\) \[0\] is not finite .* Nothing reached the global"):
        loop.inner_step()


def test_closing_a_saved_round_steps_with_the_mean_of_the_saved_workers():
    loop = Loop(inner_steps=5)
    for _ in range(2):
        loop.inner_step()
    theta = [g.detach().clone() for g in loop.rounds.outer.params]
    torch.manual_seed(1)
    saved = []
    for _ in range(3):  # three workers' local states, as a checkpoint of three workers holds them
        state = {k: v.clone() for k, v in loop.module.state_dict().items()}
        for name, _ in loop.module.named_parameters():
            state[name] = state[name] + torch.randn_like(state[name]) * 0.1
        saved.append(state)
    loop.rounds.close_round(saved)
    names = loop.rounds.outer.names
    mean = [torch.stack([t - w[n] for w in saved]).mean(dim=0) for t, n in zip(theta, names)]
    expected, _ = nesterov(theta, mean, [None] * 4)
    for p, e in zip(loop.module.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-6)
    buffers = torch.stack([w["1.running_mean"] for w in saved]).mean(dim=0)
    torch.testing.assert_close(loop.module[1].running_mean, buffers)


def test_another_outer_optimizer_steps_the_flat_global_weights_as_on_separate_tensors():
    """Adam as the outer optimizer: the round loop (flat global state, several buckets per sync) against torch's Adam
    on separate copies of the parameters, given the same pseudo-gradients; bit for bit."""
    loop = Loop(inner_steps=2, outer_optimizer=partial(torch.optim.Adam, lr=0.01), outer_bucket_cap_mb=1e-4)
    assert loop.rounds.outer.flat is not None and len(loop.rounds.outer.layout.buckets(0)) > 1
    copies = [nn.Parameter(p.clone()) for p in loop.params()]
    adam = torch.optim.Adam(copies, lr=0.01)
    for round_ in range(3):
        torch.manual_seed(100 + round_)
        for _ in range(2):
            loop.inner_step()
        torch.manual_seed(100 + round_)  # the same noise, on copies of the global weights
        local = [c.detach().clone() for c in copies]
        for _ in range(2):
            for tensor in local:
                tensor.add_(torch.randn_like(tensor) * 0.01)
        for copy, tensor in zip(copies, local):
            copy.grad = copy.detach() - tensor
        adam.step()
        for p, copy in zip(loop.module.parameters(), copies):
            assert torch.equal(p.detach(), copy.detach())


def test_a_sync_that_fails_after_moving_part_of_the_global_state_forbids_checkpoints():
    class FailsOnSecondBucket:
        def __init__(self, averager):
            self.averager, self.calls = averager, 0

        def __getattr__(self, name):
            return getattr(self.averager, name)

        def sum(self, *args, **kwargs):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("connection reset by peer")
            return self.averager.sum(*args, **kwargs)

    loop = Loop(inner_steps=1, outer_bucket_cap_mb=1e-4)
    workers = loop.rounds.workers
    original = workers.bucket_averager
    workers.bucket_averager = lambda *args: FailsOnSecondBucket(original(*args))
    with pytest.raises(OuterSyncError, match="connection reset by peer"):
        loop.inner_step()
    assert isinstance(loop.rounds.broken, RuntimeError)
