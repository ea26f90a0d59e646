"""Islands: independent jobs that train one model together through a coordinator, joining and leaving at will.

In one-world mode every DiLoCo worker is a rank of one ``torch.distributed`` world, so one failure stops them all.
In islands mode (``DiLoCoStrategy(coordinator=...)``) every island is a job of its own: its own launcher, its own
world of processes (which train one replica together, as one DiLoCo worker: DDP inside the island), its own
accelerator. Lightning's collectives stay inside the island. The islands meet only at outer steps, through
torchft's lighthouse (the *coordinator*, ``lightning-diloco coordinator``): at every outer step the islands present
form a quorum, sum their pseudo-gradients with an explicit count, and commit the same outer step; one that died is
left out of the next quorum, one that joins is healed from a live peer first.

One outer step of an island (:class:`Quorum`, driven by :meth:`lightning_diloco.rounds.Rounds.start`):

1. ``begin``: a quorum of the islands present. An island behind the others (a newcomer, a restarted island, one
   whose step was not committed) receives a live peer's state first: the global weights, the outer optimizer and the
   round counters. It then takes part with nothing to contribute (a share of 0).
2. ``agree``: every island's fingerprint of its global state (exact integer sums of the bits) must be the same;
   after a fork (an island that was alone in a quorum, or a coordinator that restarted) the islands of the heavier
   lineage (more island-steps committed) win, the others step back and heal at the next attempt.
3. ``sum_``: the sum of ``share * pseudo-gradient`` and of the shares, over the islands.
4. ``commit``: torchft's vote; an attempt that failed anywhere (a peer died inside the sum) is retried with a new
   quorum, from this island's unchanged pseudo-gradient.

Only the first process of an island (its *leader*) talks to the other islands; it shares what it learns with the
island's processes over the island's own process group. torchft is an optional dependency
(``pip install lightning-diloco[islands]``).
"""

import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import Module

from lightning_diloco.census import OuterSyncError
from lightning_diloco.collectives import CommStats
from lightning_diloco.compression import ErrorFeedback
from lightning_diloco.workers import ProcessGroupWorkers, Workers, _unflatten_into

log = logging.getLogger(__name__)

#: torchft reads these and lets them override its constructor's arguments; the strategy's arguments win here
TORCHFT_OVERRIDES = (
    "TORCHFT_TIMEOUT_SEC", "TORCHFT_QUORUM_TIMEOUT_SEC", "TORCHFT_CONNECT_TIMEOUT_SEC", "TORCHFT_QUORUM_RETRIES",
    "TORCHFT_MANAGER_PORT",
)
_FINGERPRINT_MOD = 2**52  # exact in float64


class IslandsError(OuterSyncError):
    """The islands could not complete an outer step: no quorum in time, or a fork that did not resolve."""


class Fork(Exception):
    """The islands of this quorum hold different global states; this attempt commits nothing."""


def require_torchft() -> Any:
    try:
        import torchft
    except ImportError as err:
        raise ImportError(
            "Islands mode (`coordinator=...`) needs torchft. Install it with `pip install lightning-diloco[islands]`"
            " (or `pip install torchft`)."
        ) from err
    return torchft


@dataclass(frozen=True)
class IslandOptions:
    """How an island reaches the others.

    Attributes:
        coordinator: the lighthouse's address, ``http://HOST:PORT``.
        island: this island's name (in logs and in the coordinator's status page).
        address: the host name or address at which the other islands reach this island's leader.
        quorum_timeout: seconds an island waits for a quorum (for the coordinator, or for ``min_islands`` islands)
            before it stops with :class:`IslandsError`.
        sync_timeout: seconds a collective between islands may wait for a peer (a hung island is dropped after it).

    """

    coordinator: str
    island: str
    address: str
    quorum_timeout: float
    sync_timeout: float


def fingerprint(tensors: list[Tensor]) -> int:
    """An exact, device-independent digest of ``tensors``' bits (equal states give equal digests everywhere)."""
    digest = 0
    for t in tensors:
        t = t.detach().contiguous()
        width = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        bits = int(t.view(width).to(torch.int64).sum()) if t.numel() else 0
        digest = (digest * 1_000_003 + bits + t.numel()) % _FINGERPRINT_MOD
    return digest


class Quorum:
    """This island's side of the outer steps between islands (see the module's documentation).

    Args:
        options: how to reach the coordinator and the other islands.
        group: the island's own gloo group of all its processes (``None`` for an island of one process).
        state_dict: the state a healing peer receives (global weights, outer optimizer, round counters).
        load_state_dict: takes a peer's state (called on every process of the island, from :meth:`begin`).
        inform: how news (an island healed, dropped, a fork) is reported.

    """

    def __init__(
        self, options: IslandOptions, group: Optional[dist.ProcessGroup], state_dict: Callable[[], Any],
        load_state_dict: Callable[[Any], None], inform: Callable[[str], None],
    ) -> None:
        self.options, self.group = options, group
        self._state_dict, self._load_state_dict, self._inform = state_dict, load_state_dict, inform
        self.leader = group is None or dist.get_rank(group) == 0
        self._manager: Any = None
        self._store: Any = None
        self._healed: Any = None
        self._committed = {"step": 0, "batches_committed": 0}  # torchft's counters at the last commit
        self.islands = 0  # islands in the latest committed outer step
        self.members = 0  # islands in the current quorum
        self.most_islands = 0  # the most islands in one committed outer step so far
        self.heals = 0
        self.forks = 0
        if self.leader:
            require_torchft()
            self._connect()

    # -- the leader's link ------------------------------------------------------------------------------------------

    def _connect(self) -> None:
        """A new torchft Manager (and the store its peers reconfigure through) at this island's leader."""
        from torchft import Manager, ProcessGroupGloo

        o = self.options
        self._store = dist.TCPStore(o.address, 0, is_master=True, wait_for_workers=False,
                                    timeout=timedelta(seconds=o.sync_timeout))
        saved = {k: os.environ.pop(k) for k in TORCHFT_OVERRIDES if k in os.environ}
        try:
            self._manager = Manager(
                pg=ProcessGroupGloo(timeout=timedelta(seconds=o.sync_timeout)),
                load_state_dict=self._receive, state_dict=self._state_dict, min_replica_size=1,
                use_async_quorum=False, timeout=timedelta(seconds=o.sync_timeout),
                quorum_timeout=timedelta(seconds=_attempt_seconds(o.quorum_timeout)),
                connect_timeout=timedelta(seconds=o.sync_timeout),
                rank=0, world_size=1, store_addr=o.address, store_port=self._store.port, lighthouse_addr=o.coordinator,
                replica_id=o.island, hostname=o.address, init_sync=True, quorum_retries=0,
            )
        finally:
            os.environ.update(saved)
        self._manager.load_state_dict(dict(self._committed))

    def _receive(self, state: Any) -> None:
        self._healed = state

    def _reconnect(self) -> None:
        try:
            self._manager.shutdown(wait=False)
        except Exception:  # noqa: BLE001 (a manager whose coordinator is gone may fail to shut down; it is dropped)
            pass
        self._connect()

    # -- one attempt of an outer step -------------------------------------------------------------------------------

    def begin(self) -> bool:
        """Form a quorum; return whether this island was behind and now holds a peer's state."""
        healed, members, failure = None, 0, None
        if self.leader:
            try:
                healed, members = self._quorum()
            except IslandsError as err:
                failure = str(err)
        healed, self.members, self._committed, failure = self._share_object(
            (healed, members, self._committed, failure)
        )
        if failure is not None:  # on every process of the island, so that none waits for the others
            raise IslandsError(failure)
        if healed is not None:
            self._load_state_dict(healed)
            self.heals += 1
            self._inform(f"Island {self.options.island}: healed from a live peer (global weights, outer optimizer and"
                         " round counters).")
        return healed is not None

    def _quorum(self) -> tuple[Any, int]:
        """The leader's quorum, reconnecting while the coordinator is away: the state received from a peer if this
        island healed (else ``None``), and the islands in the quorum."""
        self._healed = None
        started = time.monotonic()
        while True:
            try:
                self._manager.start_quorum()
                break
            except Exception as err:  # noqa: BLE001 (torchft raises TimeoutError, RuntimeError, its own kinds)
                waited = time.monotonic() - started
                if waited >= self.options.quorum_timeout:
                    raise self._no_quorum(waited, err) from err
                self._inform(f"Island {self.options.island}: no quorum yet ({err}); reconnecting to the coordinator.")
                time.sleep(min(1.0, self.options.quorum_timeout / 10))
                self._reconnect()
        healed, self._healed = self._healed, None
        if healed is not None:
            self._committed = dict(self._manager.state_dict())
        return healed, self._manager.num_participants()

    def agree(self, digest: int, progress: int) -> None:
        """Raise :class:`Fork` unless every island of the quorum holds the global state ``digest``.

        After a fork the winner is the heaviest lineage (most island-steps committed), then the furthest round
        (``progress``: optimizer steps under DiLoCo), then the larger digest; the others step back one committed
        step, so that the next attempt finds them behind and heals them from a winner.
        """
        v = torch.tensor([digest, -digest], dtype=torch.float64)
        self._reduce(v, "max")
        if v[0] == digest and -v[1] == digest:
            return
        self.forks += 1
        loses = False
        for mine in (float(self._committed["batches_committed"]), float(progress), float(digest)):
            best = torch.tensor([-1.0 if loses else mine], dtype=torch.float64)
            self._reduce(best, "max")
            loses = loses or mine < best.item()
        if loses:
            back = {"step": max(self._committed["step"] - 1, 0), "batches_committed": 0}
            if self.leader:
                self._manager.load_state_dict(back)
            self._committed = back
        self._inform(
            f"Island {self.options.island}: the islands' global states differ (a fork: an island was alone in a quorum,"
            " started from other weights, or the coordinator restarted). "
            + ("This island steps back and heals from a peer." if loses else "This island keeps its state.")
            + " No outer step is committed in this attempt."
        )
        raise Fork

    def sum_(self, flat: Tensor) -> None:
        """Sum ``flat`` (a float CPU tensor) over the islands of this quorum, in place, on every process."""
        self._reduce(flat, "sum")

    def commit(self, failed: Optional[BaseException] = None) -> bool:
        """torchft's vote on this attempt (``failed`` votes no); on every process of the island."""
        ok = 0.0
        if self.leader:
            if failed is not None:
                self._manager.report_error(failed if isinstance(failed, Exception) else RuntimeError(str(failed)))
            try:
                ok = float(self._manager.should_commit())
            except Exception as err:  # noqa: BLE001 (the vote itself can fail when a peer dies)
                log.info(f"should_commit failed: {err}")
            if ok:
                self._committed = dict(self._manager.state_dict())
                self.islands = self._manager.num_participants()
        c = self._committed
        flag = torch.tensor([ok, self.islands, c["step"], c["batches_committed"]], dtype=torch.float64)
        self._broadcast(flag)  # every process of the island knows the counters (a fork's lineage, checkpoints)
        self.islands = int(flag[1])
        self.most_islands = max(self.most_islands, self.islands)
        self._committed = {"step": int(flag[2]), "batches_committed": int(flag[3])}
        return bool(flag[0])

    # -- the island's own processes ---------------------------------------------------------------------------------

    def _reduce(self, tensor: Tensor, op: str) -> None:
        """Reduce across islands at the leader (an error is raised on every process of the island), then share."""
        error = torch.zeros(1, dtype=torch.float64)
        if self.leader:
            from torch.distributed import ReduceOp

            try:
                self._manager.allreduce(tensor, reduce_op=ReduceOp.SUM if op == "sum" else ReduceOp.MAX).wait()
                if self._manager.errored() is not None:
                    raise RuntimeError(str(self._manager.errored().original_exception).splitlines()[0])
            except Exception as err:  # noqa: BLE001
                log.info(f"island collective failed: {err}")
                error[0] = 1.0
        self._broadcast(error)
        if error.item():
            raise RuntimeError("a collective between islands failed (a peer died or stalled)")
        self._broadcast(tensor)

    def _broadcast(self, tensor: Tensor) -> None:
        if self.group is not None:
            dist.broadcast(tensor, src=dist.get_global_rank(self.group, 0), group=self.group)

    def _share_object(self, obj: Any) -> Any:
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def _no_quorum(self, waited: float, err: BaseException) -> IslandsError:
        o = self.options
        return IslandsError(
            f"Island {o.island}: no quorum of islands for {waited:.0f} s (`quorum_timeout={o.quorum_timeout}`). The"
            f" coordinator at {o.coordinator} is unreachable, or fewer islands than its `--min-islands` are running."
            " Start (or restart) the coordinator and resume every island from its last checkpoint (`ckpt_path='last'`):"
            f" the islands heal from the newest one. Cause: {err}"
        )

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """torchft's counters at the last committed outer step (a restarted island resumes from them)."""
        return dict(self._committed)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._committed = {"step": int(state["step"]), "batches_committed": int(state["batches_committed"])}
        if self.leader:
            self._manager.load_state_dict(dict(self._committed))

    def close(self) -> None:
        if self._manager is not None:
            self._manager.shutdown(wait=False)
            self._manager = None


class IslandWorkers(Workers):
    """The workers of islands mode: this island is one worker (its processes train one replica with DDP), and the
    means run over the islands of the current quorum.

    Args:
        local: the island's own processes.
        quorum: the link to the other islands.

    """

    def __init__(self, local: ProcessGroupWorkers, quorum: Quorum) -> None:
        self.local, self.quorum = local, quorum
        self.healthy: Optional[int] = 0

    @property
    def index(self) -> int:
        return 0

    @property
    def count(self) -> int:
        return 1

    def gather_rows(self, row: Tensor) -> Tensor:
        return self.local.gather_rows(row)

    def average_(
        self, tensors: list[Tensor], compression: str, bucket_cap_mb: float, share: float, total: float,
        feedback: Optional[ErrorFeedback],
    ) -> CommStats:
        return self._mean_(tensors, share)

    def average_buffers_(self, buffers: list[Tensor], bucket_cap_mb: float, share: float, total: float) -> CommStats:
        topology = self.local.topology
        if topology.intra_sync is not None:  # the island's processes take its first process's buffers
            flat = torch.cat([b.reshape(-1) for b in buffers])
            dist.broadcast(flat, src=0, group=topology.intra_sync)
            _unflatten_into(flat, buffers)
        return self._mean_(buffers, share)

    @torch.no_grad()
    def _mean_(self, tensors: list[Tensor], share: float) -> CommStats:
        """``sum_i share_i t_i / sum_i share_i`` over the islands, with the sum of shares sent beside the tensors."""
        started = time.perf_counter()
        flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors] + [torch.ones(1)]).mul_(share)
        self.quorum.sum_(flat)
        total = float(flat[-1])
        self.healthy = round(total)
        if total > 0:
            _unflatten_into(flat[:-1].div_(total), tensors)
        k = max(self.quorum.members, 1)
        sent = 2 * (k - 1) * flat.numel() * flat.element_size() // k if self.quorum.leader else 0
        seconds = time.perf_counter() - started
        return CommStats("all_reduce", "none", k, flat.numel() - 1, 1, 1, sent, seconds, seconds)

    def broadcast_(self, tensors: list[Tensor]) -> None:
        self.local.broadcast_(tensors)

    def gather_objects(self, obj: Any) -> list[Any]:
        return self.local.gather_objects(obj)

    def mean_gradients_(self, module: Module, bucket_cap_mb: float) -> int:
        return self.local.mean_gradients_(module, bucket_cap_mb)


def _attempt_seconds(quorum_timeout: float) -> float:
    """How long one quorum request may wait: a quarter of ``quorum_timeout`` (at least 10 s). A request sent while
    the coordinator is away fails only when it times out, and the Manager then fails at once every time after; the
    island replaces it and asks again, so the requests of one ``quorum_timeout`` must leave time for that."""
    return min(quorum_timeout, max(10.0, quorum_timeout / 4))
