"""Eager updates (Kale et al. 2025, arXiv 2502.12996): outer steps that never wait for the link.

With ``eager_rounds = d`` a fragment's sync may take ``d`` whole rounds. At the end of each round of a fragment, a
worker

1. computes its fresh pseudo-gradient ``delta = global - local`` and sends it (on the sync thread, with the census and
   compression as in any sync);
2. steps its outer optimizer at once with ``delta`` itself, its estimate of the mean that is still on its way, plus,
   for every sync of that fragment started ``d`` rounds earlier, the correction of that estimate: ``mean - what it
   applied then``;
3. continues from the new global weights.

Every pseudo-gradient thus reaches every worker's global weights with its share of the mean: a worker's own one at
once (whole, then corrected to its share), the others' ``d`` rounds later. Kale et al. weight the fresh own term by
``1 / k``; on the miniature (``docs/results.md``, k = 4) that diverged with the paper's Nesterov outer optimizer, and
the whole own term, as an estimate of the mean, came closest to blocking DiLoCo. A worker dropped by the census (a pseudo-gradient that is not finite) applies
nothing of its own, and a worker that applied its own term but counted for nothing in the mean takes it back with the
others' part. The workers' global weights and outer momenta therefore differ by their latest own terms; the end of
``fit`` (:meth:`EagerRounds.flush`) applies every sync still out, closes the open rounds, and averages the workers'
global state, so that all of them end with the same weights. Checkpoints keep each worker's global state.

The schedule is fixed (a sync lands ``d`` rounds after it starts, never earlier), so runs and resumes are exact. The
loop waits only when a sync has not arrived after ``d`` rounds: raise ``eager_rounds`` or send fewer bytes then.
"""

import time
from typing import Any

import torch
from torch import Tensor

from lightning_diloco.census import all_finite
from lightning_diloco.fragments import Fragment
from lightning_diloco.outer import float_buffers
from lightning_diloco.rounds import Landed, Rounds, Sync


class EagerRounds(Rounds):
    """The round loop of one worker with eager updates (see the module's documentation)."""

    def after_inner_step(self) -> None:
        """At the end of a fragment's round: its outer step, with its own fresh term and the others' delayed ones."""
        self.step += 1
        for fragment in self.fragments:
            if fragment.is_due(self.step, self.config.inner_steps):
                self.start(fragment)

    @torch.no_grad()
    def start(self, fragment: Fragment, blocking: bool = False) -> None:
        """Send this worker's pseudo-gradient of ``fragment`` and take its outer step; ``blocking`` (at the end of
        ``fit``) waits for the mean and applies it whole, with every sync of the fragment still out."""
        self.follow_module()
        deltas = self.outer.pseudo_gradients(self.device, fragment.params)
        buffers = {}
        if fragment.carries_buffers:
            buffers = {n: b.detach().to(self.device, torch.float32, copy=True) for n, b in float_buffers(self.module)}
        row = self.census.row(all_finite(deltas))
        healthy = bool(row[0] > 0)
        arrived = self._arrivals(fragment, every=blocking)
        lands_at = self.step + (0 if blocking else self.config.eager_rounds * self.config.inner_steps)
        sync = Sync(fragment, self.step, lands_at, deltas, buffers)
        if blocking:
            self._average(sync, row)
            gradient = [d.clone() for d in sync.deltas]
        else:
            sync.own = [d.clone() if healthy else torch.zeros_like(d) for d in deltas]
            gradient = [own.clone() for own in sync.own]
            assert self._executor is not None
            sync.future = self._executor.submit(self._average, sync, row)
            self.pending.append(sync)
        _add_others(gradient, arrived)
        self._outer_step(fragment, gradient, arrived + [sync] if blocking else arrived, restart=not healthy)
        fragment.last_sync = self.step
        if fragment.carries_buffers:
            self.census.next_round(self.workers.index)

    def _arrivals(self, fragment: Fragment, every: bool = False) -> list[Sync]:
        """The syncs of ``fragment`` due now (all of them if ``every``), waited for, each holding the others' part of
        its mean (``mean - own``)."""
        due = [s for s in self.pending if s.fragment is fragment and (every or s.lands_at <= self.step)]
        for sync in due:
            self.pending.remove(sync)
            self._take_others(sync)
            if sync.stats is not None:
                self._warn_if_overlap_too_short(sync, sync.blocked_seconds, time.perf_counter() - sync.started_at)
        return due

    def _take_others(self, sync: Sync) -> None:
        """Wait for ``sync``'s mean, and keep only the others' part of it."""
        waited = time.perf_counter()
        sync.wait()
        sync.blocked_seconds += time.perf_counter() - waited
        if sync.own is not None:
            squared = sum(float(d.double().square().sum()) for d in sync.deltas)
            sync.norm_squared = self.workers.sum_in_worker(squared)
            for mean, own in zip(sync.deltas, sync.own):
                mean.sub_(own)
            sync.own = None

    def _outer_step(self, fragment: Fragment, gradient: list[Tensor], arrived: list[Sync], restart: bool,
                    move: bool = True) -> None:
        """One outer step of ``fragment`` with ``gradient``, the arrived syncs' buffers, and their metrics."""
        self.outer.step(gradient, fragment.params)
        with_buffers = [s for s in arrived if s.buffers and any(share > 0 for share in s.shares)]
        if with_buffers:
            self.outer.set_buffers(with_buffers[-1].buffers)
        if move:  # a worker dropped from its own outer step also leaves its buffers for the global ones
            self.outer.copy_to(self.module, fragment.params, buffers=bool(with_buffers) or restart)
        if restart:
            self._restart_inner()
        for sync in arrived:
            healthy = sum(1 for share in sync.shares if share > 0)
            self._report(Landed(sync, self.outer.outer_step, sync.blocked_seconds, healthy))

    def _apply_others(self, fragment: Fragment, move: bool) -> None:
        """One outer step of ``fragment`` with the others' part of every sync of it still out (if any)."""
        arrived = self._arrivals(fragment, every=True)
        if arrived:
            gradient = [torch.zeros_like(d) for d in arrived[0].deltas]
            _add_others(gradient, arrived)
            self._outer_step(fragment, gradient, arrived, restart=False, move=move)

    def land_pending(self) -> None:
        """Apply the others' part of every sync still out, in one outer step per fragment (the worker keeps its local
        progress: its next pseudo-gradient is taken from the moved global weights)."""
        for fragment in self.fragments:
            self._apply_others(fragment, move=False)

    def flush(self) -> None:
        """Apply every sync still out, close every open round, then average the workers' global states, so that every
        worker holds the same global weights."""
        for sync in self.pending:
            self._take_others(sync)  # before any collective on this thread: the sync thread's come first
        for fragment in self.fragments:
            if fragment.has_open_round(self.step):
                self.start(fragment, blocking=True)
            else:
                self._apply_others(fragment, move=True)
        self.agree()

    @torch.no_grad()
    def agree(self) -> None:
        """Replace every worker's global weights and outer optimizer state by their mean over the workers."""
        state = self.outer.optimizer.state
        tensors = list(self.outer.params)
        for param in self.outer.params:
            tensors += [v for v in state.get(param, {}).values() if isinstance(v, Tensor) and v.is_floating_point()
                        and v.dim() > 0]
        moved = [t.detach().to(self.device, copy=True) for t in tensors]
        c = self.config
        self.workers.average_(moved, "none", c.outer_bucket_cap_mb, 1.0, float(self.workers.count), None)
        for t, mean in zip(tensors, moved):
            t.copy_(mean)
        self.outer.copy_to(self.module)

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`Rounds.state_dict`; a sync in flight is saved with the others' part of its mean (this worker's)."""
        for sync in self.pending:
            self._take_others(sync)
        return super().state_dict()


def _add_others(gradient: list[Tensor], arrived: list[Sync]) -> None:
    """Add the others' part of every arrived sync to ``gradient``, in the order they started."""
    for sync in arrived:
        for g, others in zip(gradient, sync.deltas):
            g.add_(others)
