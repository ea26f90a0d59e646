"""The round loop of DiLoCo (Douillard et al. 2023, Algorithm 1) for one worker, with no Lightning inside.

After every inner step (:meth:`Rounds.after_inner_step`) the loop lands the syncs that are due, then starts the syncs
of the fragments whose round ends at this step. A sync of a fragment is Algorithm 1's outer step:

- :meth:`Rounds.start`: the pseudo-gradient ``delta = global - local`` (line 9), the census of the workers present
  (:mod:`lightning_diloco.census`), and the mean of their pseudo-gradients (line 10), at once or on a background
  thread (``overlap_steps``) while inner steps go on;
- :meth:`Rounds.land`: the outer optimizer steps the global weights with that mean as gradient (line 11), and the
  worker continues from the global weights (line 12; mixed with its local ones if the sync overlapped).

:meth:`Rounds.land` is the one path by which a sync reaches the weights: for syncs that were due, for syncs still in
flight at the end of ``fit`` (:meth:`Rounds.flush`), and for the round that a checkpoint written by another number
of workers leaves open (:meth:`Rounds.close_round`). Who the workers are and how tensors travel between them is
:mod:`lightning_diloco.workers`' business; the global weights and the outer optimizer are
:class:`~lightning_diloco.outer.OuterState`'s.
"""

import copy
import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.nn import Module

from lightning_diloco.census import Census, OuterSyncError, all_finite
from lightning_diloco.collectives import BucketAverager, CommStats
from lightning_diloco.config import DiLoCoConfig
from lightning_diloco.compression import get_compressor
from lightning_diloco.flat import FlatBucket, FlatLayout
from lightning_diloco.fragments import Fragment, make_fragments
from lightning_diloco.islands import Fork, IslandsError, Quorum, fingerprint
from lightning_diloco.outer import OuterState, float_buffers
from lightning_diloco.workers import Workers

_SHORT_OVERLAP_SECONDS = 0.2  # a wait for an overlapped sync shorter than this is never warned about


class SyncState(Enum):
    IN_FLIGHT = "in flight"  # the census and the mean are being computed (on the sync thread, if it overlaps)
    AVERAGED = "averaged"  # the workers' means are in `deltas` and `buffers`, ready to land


@dataclass
class Sync:
    """One fragment's outer step, from the moment its pseudo-gradient leaves to the moment it lands.

    Attributes:
        fragment: whose sync it is.
        started: the DiLoCo step after which it started.
        lands_at: the step after which it lands (``started + overlap_steps``; ``started`` for a blocking sync).
        deltas: this worker's pseudo-gradients, then the workers' mean.
        buffers: this worker's floating-point buffers (with the fragment that carries them), then their mean.
        state: where it is.
        shares: every worker's share in the mean, from the census.
        stats: what the mean cost; ``None`` for a sync whose mean an earlier run computed (restored from a checkpoint).

    """

    fragment: Fragment
    started: int
    lands_at: int
    deltas: list[Tensor]
    buffers: dict[str, Tensor]
    state: SyncState = SyncState.IN_FLIGHT
    shares: list[float] = field(default_factory=list)
    stats: Optional[CommStats] = None
    future: Optional["Future[None]"] = field(default=None, repr=False)
    started_at: float = field(default_factory=time.perf_counter)
    exchange_seconds: float = 0.0
    healthy: Optional[int] = None  # workers whose pseudo-gradients made the mean (from the shares if None)
    healed: bool = False  # this worker took a peer's state in this outer step, and contributed nothing
    own: Optional[list[Tensor]] = None  # eager updates: the part of `deltas` this worker applied already
    blocked_seconds: float = 0.0  # how long the training loop waited for it
    norm_squared: Optional[float] = None  # of the mean, where `deltas` no longer holds it (eager updates)
    checkpoint: bool = False  # a worker asked the census for a checkpoint when this outer step lands

    @property
    def overlapped(self) -> bool:
        return self.lands_at > self.started

    def wait(self) -> None:
        """Wait until the mean is in (the sync thread's errors come back here, as :class:`OuterSyncError`)."""
        if self.future is not None:
            self.future.result()
            self.future = None


@dataclass
class Landed:
    """What landing a sync did, for the metrics."""

    sync: Sync
    outer_step: int
    blocked_seconds: float
    healthy: int


class Rounds:
    """The outer steps of one worker.

    Args:
        config: DiLoCo's options.
        module: the worker's replica.
        outer: the global weights and the outer optimizer, following ``module``'s parameters.
        workers: the workers present, and the collectives between them.
        census: this worker's side of the census.
        device: where pseudo-gradients are built and sent.
        executor: the sync thread of overlapped syncs (``None`` without overlap).
        report: called with every landed sync.
        restart_inner: clears this worker's inner optimizer state (when it was dropped from an outer step).
        warn: rank zero's warning.
        inform: rank zero's information.

    """

    def __init__(
        self, config: DiLoCoConfig, module: Module, outer: OuterState, workers: Workers, census: Census,
        device: torch.device, executor: Optional[ThreadPoolExecutor], report: Callable[[Landed], None],
        restart_inner: Callable[[], None], warn: Callable[[str], None], inform: Callable[[str], None],
    ) -> None:
        self.config, self.module, self.outer, self.workers, self.census = config, module, outer, workers, census
        self.device, self._executor = device, executor
        self._report, self._restart_inner, self._warn, self._inform = report, restart_inner, warn, inform
        self.fragments = self._make_fragments()
        self.step = 0  # inner steps taken under DiLoCo
        self.broken: Optional[BaseException] = None  # a sync that failed after it had moved part of the global state
        self._buffer: Optional[Tensor] = None  # see `_sync_buffer`
        self.pending: deque[Sync] = deque()
        self.warned_short_overlap = False
        self.quorum: Optional[Quorum] = workers.quorum  # islands mode

    def _make_fragments(self, last_sync: Optional[Sequence[int]] = None) -> list[Fragment]:
        """The fragments, and the flat layout of the global state that follows their buckets."""
        numels = [p.numel() for p in self.outer.locals]
        c = self.config
        fragments = make_fragments(numels, c.num_fragments, c.inner_steps, c.error_feedback, last_sync)
        alignment = get_compressor(c.compression).block_size
        self.outer.arrange(FlatLayout([f.params for f in fragments], [p.numel() for p in self.outer.params],
                                      alignment, c.outer_bucket_cap_mb))
        return fragments

    # -- the loop --------------------------------------------------------------------------------------------------

    def after_inner_step(self) -> None:
        """Land the syncs that are due, then start the syncs of the fragments whose round ends now."""
        self.step += 1
        while self.pending and self.pending[0].lands_at <= self.step:
            self.land(self.pending.popleft())
        for fragment in self.fragments:
            if fragment.is_due(self.step, self.config.inner_steps):
                self.start(fragment)

    def start(self, fragment: Fragment, blocking: bool = False) -> None:
        """Algorithm 1, lines 9-10: this worker's pseudo-gradient, then its mean over the workers present."""
        self.follow_module()
        overlap = 0 if blocking else self.config.overlap_steps
        averager = None if overlap or self.quorum is not None or self.outer.flat is None else (
            self.workers.bucket_averager(self.config.compression, self.device))
        if averager is not None:
            self._stream(fragment, averager)
            return
        deltas = self.outer.pseudo_gradients(self.device, fragment.params)  # line 9
        buffers = {}
        if fragment.carries_buffers:
            buffers = {n: b.detach().to(self.device, torch.float32, copy=True) for n, b in float_buffers(self.module)}
        row = self.census.row(all_finite(deltas))  # read now: the step counters move on while a sync is in flight
        sync = Sync(fragment, self.step, self.step + overlap, deltas, buffers)
        if overlap:  # line 10 on the sync thread, the census included: nothing waits for it here
            assert self._executor is not None
            sync.future = self._executor.submit(self._average, sync, row)
            self.pending.append(sync)
        elif self.quorum is not None:
            landing = self._average_in_quorum(sync, row)  # line 10, among the islands present
            if landing is not None:
                self.land(landing)
        else:
            self._average(sync, row)  # line 10
            self.land(sync)

    def _take_census(self, sync: Sync, row: Tensor) -> None:
        """Every worker's row of the census, and from them every worker's share in ``sync``'s mean."""
        started = time.perf_counter()
        try:
            table = self.workers.gather_rows(row)
        except RuntimeError as err:
            raise self._failed(sync, err, in_census=True) from err
        sync.shares = self.census.shares(table, sync.started)
        sync.checkpoint = Census.checkpoint_agreed(table)
        sync.exchange_seconds = time.perf_counter() - started

    def _average(self, sync: Sync, row: Tensor) -> None:
        """The census, then the shared mean of ``sync``'s pseudo-gradients and buffers, in place."""
        self._take_census(sync, row)
        try:
            share, total = sync.shares[self.workers.index], sum(sync.shares)
            if share == 0:
                for d in sync.deltas:
                    d.zero_()  # a dropped worker sends exact zeros
            c = self.config
            stats = self.workers.average_(
                sync.deltas, c.compression, c.outer_bucket_cap_mb, share, max(total, 1e-12),
                sync.fragment.feedback if share else None,
            )
            if sync.buffers:
                healthy = float(sum(1 for s in sync.shares if s > 0))
                stats = stats + self.workers.average_buffers_(
                    list(sync.buffers.values()), c.outer_bucket_cap_mb, float(share > 0), max(healthy, 1.0)
                )
        except OuterSyncError:
            raise
        except RuntimeError as err:
            raise self._failed(sync, err) from err
        sync.stats, sync.state = stats, SyncState.AVERAGED

    @torch.no_grad()
    def _stream(self, fragment: Fragment, averager: BucketAverager) -> None:
        """Algorithm 1, lines 9-12, for a blocking sync, one bucket at a time: this worker's pseudo-gradient written
        into the bucket, its mean, the outer step of the bucket's range of the flat global state, and the copy back.

        The census comes first, from the finiteness of the local weights (the global ones are finite, so then is
        ``global - local``), so that a bucket leaves as soon as it is written: the sync holds one bucket at a time
        beyond the global state. A failure after the first bucket moved the global state leaves :attr:`broken` set:
        no checkpoint is written from that state.
        """
        c, outer = self.config, self.outer
        assert outer.layout is not None
        row = self.census.row(outer.locals_finite(fragment.params))
        buffers = {}
        if fragment.carries_buffers:
            buffers = {n: b.detach().to(self.device, torch.float32, copy=True) for n, b in float_buffers(self.module)}
        sync = Sync(fragment, self.step, self.step, [], buffers)
        self._take_census(sync, row)
        share, total = sync.shares[self.workers.index], sum(sync.shares)
        healthy = sum(1 for s in sync.shares if s > 0)
        if healthy:
            outer.begin_step()
        squared = 0.0
        moved = False
        try:
            for bucket in outer.layout.buckets(fragment.index):
                flat = self._sync_buffer(averager.length(bucket.bucket))
                _zero_padding(flat, bucket)
                if share:
                    outer.pseudo_gradient_into(flat, bucket)  # line 9
                    if share != 1:
                        flat.mul_(share)
                else:
                    flat.zero_()  # a dropped worker sends exact zeros
                summed = averager.sum(flat, bucket.bucket, fragment.feedback if share else None)  # line 10
                moved = True
                if healthy:
                    squared += outer.step_bucket(bucket, summed, max(total, 1e-12))  # lines 11 and 12
                else:
                    outer.copy_bucket_to(bucket)  # line 12
                del summed
            stats = averager.stats
            if buffers:
                stats = stats + self.workers.average_buffers_(
                    list(buffers.values()), c.outer_bucket_cap_mb, float(share > 0), max(float(healthy), 1.0)
                )
        except RuntimeError as err:
            if moved:
                self.broken = err
            raise self._failed(sync, err) from err
        if healthy:
            outer.finish_step()
            if buffers:
                outer.set_buffers(buffers)
        if buffers:
            outer.copy_to(self.module, [], buffers=True)
        sync.stats, sync.state, sync.norm_squared = stats, SyncState.AVERAGED, squared
        self._landed(sync, 0.0, healthy)

    def _sync_buffer(self, numel: int) -> Tensor:
        """The buffer a blocking sync writes each bucket into: one, as long as the longest bucket, kept from sync to
        sync (a new one per bucket would have its pages faulted in anew at every outer step on the CPU)."""
        if self._buffer is None or self._buffer.numel() < numel:
            self._buffer = None
            self._buffer = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self._buffer[:numel]

    def land(self, sync: Sync) -> None:
        """Algorithm 1, lines 11-12: the outer step of the global weights, and this worker restarts from them."""
        waited = time.perf_counter()
        sync.wait()
        blocked = time.perf_counter() - waited
        if sync.overlapped and self.step >= sync.lands_at and sync.stats is not None:
            self._warn_if_overlap_too_short(sync, blocked, waited - sync.started_at)
        healthy = sync.healthy if sync.healthy is not None else sum(1 for s in sync.shares if s > 0)
        mine = sync.shares[self.workers.index] > 0
        fragment = sync.fragment
        if healthy:
            self.outer.step(sync.deltas, fragment.params)  # line 11
        if sync.buffers and healthy:  # with no healthy worker the global buffers stay as they were
            self.outer.set_buffers(sync.buffers)
        # an overlapped sync mixes; one with no inner step since it started holds all local progress, so lands whole
        mixing = self.config.overlap_mixing if sync.overlapped and self.step > sync.started and mine else 0.0
        self.outer.copy_to(self.module, fragment.params, mixing, buffers=bool(sync.buffers))  # line 12
        self._landed(sync, blocked, healthy)

    def _landed(self, sync: Sync, blocked: float, healthy: int) -> None:
        """After a sync reached the weights: a dropped worker's restart, the round's bookkeeping and the metrics."""
        if sync.shares[self.workers.index] == 0 and not sync.healed:
            self._restart_inner()
        sync.fragment.last_sync = sync.started
        if sync.fragment.carries_buffers:
            self.census.next_round(self.workers.index)
        self._report(Landed(sync, self.outer.outer_step, blocked, healthy))

    # -- islands ----------------------------------------------------------------------------------------------------

    def join(self) -> None:
        """Islands mode, before training: take part in the islands' next outer step, healing from a peer if behind."""
        assert self.quorum is not None
        landing = self._average_in_quorum(None, Census.blank_row())
        if landing is not None:
            self.land(landing)

    def _average_in_quorum(self, sync: Optional[Sync], row: Tensor) -> Optional[Sync]:
        """Line 10 among islands (:mod:`lightning_diloco.islands`): attempts until the islands commit one outer step.

        An attempt that fails (a peer died inside it, the islands' states differ) starts again from this island's
        unchanged pseudo-gradient, with a new quorum. An island that heals in an attempt takes part in the sync the
        others are in, with nothing of its own; ``None`` means there is no sync to land (at a start-up quorum).
        """
        quorum = self.quorum
        assert quorum is not None
        kept = None
        if sync is not None:
            kept = ([d.clone() for d in sync.deltas], {n: b.clone() for n, b in sync.buffers.items()})
        started = time.monotonic()
        while True:
            if quorum.begin():
                sync, kept, row = self._sync_in_progress(), None, Census.blank_row()
            failed: Optional[BaseException] = None
            try:
                quorum.agree(self._digest(), self.step)
                if sync is not None:
                    self._average(sync, row)
            except (RuntimeError, Fork) as err:
                failed = err
            if quorum.commit(failed):
                if sync is not None:
                    sync.healthy = self.workers.healthy
                return sync
            if time.monotonic() - started > quorum.options.quorum_timeout:
                raise IslandsError(
                    f"The islands committed no outer step in {quorum.options.quorum_timeout} s (`quorum_timeout`) of"
                    f" retries; the last attempt failed with: {failed}. Resume every island from its last checkpoint."
                ) from failed
            if kept is not None and sync is not None:
                for d, k in zip(sync.deltas, kept[0]):
                    d.copy_(k)
                for name, b in kept[1].items():
                    sync.buffers[name].copy_(b)

    def _sync_in_progress(self) -> Optional[Sync]:
        """After a heal: the sync of the fragment whose round ends at the (peers') current step, with zeros."""
        due = [f for f in self.fragments if f.is_due(self.step, self.config.inner_steps) and f.last_sync < self.step]
        if not due:
            return None
        fragment = due[0]
        deltas = [torch.zeros(self.outer.params[i].shape, device=self.device) for i in fragment.params]
        buffers = {}
        if fragment.carries_buffers:
            buffers = {n: torch.zeros(b.shape, device=self.device) for n, b in float_buffers(self.module)}
        return Sync(fragment, self.step, self.step, deltas, buffers, shares=[0.0], healed=True)

    def _digest(self) -> int:
        """The fingerprint of the global state: weights, outer optimizer state and round counters."""
        outer = self.outer
        state = outer.optimizer.state_dict()["state"]
        tensors = list(outer.params) + [v for k in sorted(state) for v in state[k].values() if isinstance(v, Tensor)]
        counters = [self.step, outer.outer_step, *(f.last_sync for f in self.fragments)]
        return fingerprint(tensors + [torch.tensor(counters, dtype=torch.int64)])

    def heal_state(self) -> dict[str, Any]:
        """What a healing island receives from this one: the global state and the round counters (copies: this island
        goes on with its outer step while the peer reads them)."""
        return copy.deepcopy({"rounds": self.state_dict(), "outer": self.outer.state_dict()})

    def load_heal_state(self, state: dict[str, Any]) -> None:
        self.outer.load_state_dict(state["outer"])
        self.load_state_dict(state["rounds"])

    @property
    def in_flight(self) -> bool:
        """Whether a sync's mean may still be in the making on the sync thread (not waited for yet)."""
        return any(sync.future is not None for sync in self.pending)

    def land_pending(self) -> None:
        """Land every sync in flight now."""
        while self.pending:
            self.land(self.pending.popleft())

    def flush(self) -> None:
        """Land every sync in flight and close every open round, so that every worker holds the global weights."""
        self.land_pending()
        for fragment in self.fragments:
            if fragment.has_open_round(self.step):
                self.start(fragment, blocking=True)

    @torch.no_grad()
    def close_round(self, saved: Iterable[dict[str, Tensor]]) -> None:
        """Close every open round with the mean pseudo-gradient and buffers of the ``saved`` workers' local states
        (``state_dict``s of this process's chunks, read one at a time), as if they had sent them: how a checkpoint of
        another number of workers resumes."""
        self.land_pending()
        device = self.outer.device
        sums = [torch.zeros_like(g) for g in self.outer.params]
        buffer_sums = {n: torch.zeros(b.shape, device=device) for n, b in self.outer.buffers.items()}
        count = 0
        for worker in saved:
            count += 1
            for total, n, g in zip(sums, self.outer.names, self.outer.params):
                total.add_(g.detach() - worker[n].to(device, g.dtype))
            for n, total in buffer_sums.items():
                total.add_(worker[n].to(device, torch.float32))
        means = [total.div_(count) for total in sums]
        buffers = {n: total.div_(count) for n, total in buffer_sums.items()}
        open_fragments = [f for f in self.fragments if f.has_open_round(self.step)]
        carrier = next((f for f in reversed(open_fragments) if f.carries_buffers), None)
        for fragment in open_fragments:
            sync = Sync(fragment, self.step, self.step, [means[i] for i in fragment.params],
                        dict(buffers) if fragment is carrier else {}, SyncState.AVERAGED, [1.0] * self.workers.count)
            self.land(sync)
        if carrier is None and buffers:
            self.outer.set_buffers(buffers)
            self.outer.copy_to(self.module, [], buffers=True)

    # -- the module's parameters ------------------------------------------------------------------------------------

    def follow_module(self) -> None:
        """Follow the module's parameters when something re-registered them since the outer state last looked.

        ``torch.nn.utils.prune`` (Lightning's ``ModelPruning``) renames a pruned ``weight`` to ``weight_orig`` and adds
        a ``weight_mask`` buffer; ``torch.nn.utils.parametrize`` moves a weight under ``parametrizations``. A tensor
        the outer state already follows keeps its global value and outer optimizer state under its new name; anything
        new takes the first process's value on every worker, as at the start of ``fit`` (so every worker prunes with
        the same mask). Syncs in flight land first, and error-feedback residuals start afresh.
        """
        if not self.outer.changed(self.module):
            return
        self.land_pending()
        mine = [(name, tuple(t.shape)) for name, t in (*self.module.named_parameters(), *float_buffers(self.module))]
        everyone = self.workers.gather_objects(mine)
        differ = [rank for rank, theirs in enumerate(everyone) if theirs != everyone[0]]
        if differ:
            raise RuntimeError(
                f"The module's parameters changed differently on rank(s) {differ} than on rank 0 (names or shapes"
                " differ), so DiLoCo's workers could no longer average them. Change parameters (pruning,"
                " parametrizations) the same way on every process, for example from a callback hook that runs on all"
                " ranks."
            )
        fresh = self.outer.untracked(self.module)
        self.workers.broadcast_(fresh)
        self.outer.follow(self.module)
        self.fragments = self._make_fragments([f.last_sync for f in self.fragments])
        self._inform(
            f"DiLoCoStrategy: the module's parameters changed at DiLoCo step {self.step} (pruning or a parametrization); the outer"
            f" state follows them, and {len(fresh)} new tensor(s) take rank 0's values."
        )

    # -- errors and warnings ----------------------------------------------------------------------------------------

    def _failed(self, sync: Sync, err: BaseException, in_census: bool = False) -> OuterSyncError:
        timeout = self.config.sync_timeout
        waited = f"sync_timeout={timeout}s" if timeout is not None else "no sync_timeout set"
        what = f"step {sync.started}" if in_census else (
            f"fragment {sync.fragment.index} started at optimizer step {sync.started}"
        )
        return OuterSyncError(
            f"Outer step {self.outer.outer_step + 1} ({what}) failed while waiting for other workers: a peer is dead,"
            f" stalled or unreachable ({waited}). Restart from the last checkpoint (torchrun --max-restarts does it by"
            f" itself). Cause: {err}"
        )

    def _warn_if_overlap_too_short(self, sync: Sync, blocked: float, window: float) -> None:
        """Warn once when the loop waited for an overlapped sync for a good part of its overlap window."""
        if self.warned_short_overlap or blocked < max(_SHORT_OVERLAP_SECONDS, 0.25 * window):
            return
        self.warned_short_overlap = True
        c = self.config
        knob = f"eager_rounds={c.eager_rounds}" if c.eager_rounds else f"overlap_steps={c.overlap_steps}"
        steps = c.eager_rounds * c.inner_steps if c.eager_rounds else c.overlap_steps
        self._warn(
            f"The outer sync of fragment {sync.fragment.index} started at step {sync.started} was not done after"
            f" `{knob}` ({steps} inner steps, {window:.3g} s): the training loop waited {blocked:.2f} s for it. Raise"
            f" `{knob.split('=')[0]}` until a sync's communication fits in it, or send fewer bytes (`compression`,"
            " `num_fragments`). `diloco/blocked_seconds` logs the wait at every outer step."
        )

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The step, every fragment's last sync, and the syncs in flight (waited for, not landed: they land at their
        step after a resume)."""
        pending = []
        for sync in self.pending:
            sync.wait()
            pending.append({
                "fragment": sync.fragment.index, "step": sync.started, "apply_at": sync.lands_at,
                "shares": list(sync.shares), "deltas": [d.detach().cpu().clone() for d in sync.deltas],
                "buffers": {n: b.detach().cpu().clone() for n, b in sync.buffers.items()},
            })
        return {"step": self.step, "last_sync": [f.last_sync for f in self.fragments], "pending": pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        for fragment, last in zip(self.fragments, state["last_sync"]):
            fragment.last_sync = int(last)
        self.pending = deque(
            Sync(self.fragments[p["fragment"]], p["step"], p["apply_at"], [d.to(self.device) for d in p["deltas"]],
                 {n: b.to(self.device) for n, b in p["buffers"].items()}, SyncState.AVERAGED,
                 list(p.get("shares", p.get("weights", []))))
            for p in state["pending"]
        )


def _zero_padding(flat: Tensor, bucket: FlatBucket) -> None:
    """Zero the elements of a sync's bucket buffer that no parameter writes (alignment and chunk padding)."""
    end = 0
    for segment in bucket.bucket.segments:
        flat[end : segment.offset].zero_()
        end = segment.offset + segment.numel
    flat[end:].zero_()


def outer_step_metrics(landed: Landed, sum_in_worker: Callable[[float], float] = float) -> dict[str, float]:
    """The metrics of one landed sync (see the README's list); ``sum_in_worker`` adds up a sharded worker's parts."""
    sync, stats = landed.sync, landed.sync.stats
    squared = sync.norm_squared
    if squared is None:
        squared = sum_in_worker(sum(float(d.double().square().sum()) for d in sync.deltas))
    return {
        "diloco/outer_step": float(landed.outer_step),
        "diloco/fragment": float(sync.fragment.index),
        "diloco/pseudo_grad_norm": math.sqrt(squared),
        "diloco/sync_seconds": time.perf_counter() - sync.started_at,
        "diloco/blocked_seconds": landed.blocked_seconds,
        "diloco/exchange_seconds": sync.exchange_seconds,
        "diloco/comm_seconds": stats.seconds if stats is not None else 0.0,
        "diloco/bytes_sent": float(stats.bytes_sent) if stats is not None else 0.0,
        "diloco/healthy_workers": float(landed.healthy),
    }
