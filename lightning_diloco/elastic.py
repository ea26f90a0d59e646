"""Process-group start-up that survives worker restarts under ``torchrun --max-restarts``.

Under torchrun every worker reaches the others through a ``TCPStore`` hosted by the elastic agent (the launcher
process), which sets ``TORCHELASTIC_USE_AGENT_STORE=True``. That store lives as long as the agent, across worker
restarts, but ``init_process_group`` writes its keys under names that are the same in every attempt: gloo publishes
each rank's listening address under ``default_pg/0//cpu//0/<rank>``. After a restart those keys still hold the
addresses of the killed workers; a new worker that reads one before its peer has overwritten it connects to a dead
address and fails ("Gloo connectFullMesh failed ... Connect timeout" or "Connection refused"), which costs a restart,
and the race repeats at every restart.

:func:`attempt_store` gives every attempt a namespace of its own in the agent's store, so that no worker ever reads a
key written by a previous attempt.
"""

import logging
import os
import warnings
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

log = logging.getLogger(__name__)

STORE_PREFIX = "lightning_diloco/attempt"


def restart_attempt() -> Optional[int]:
    """The number of times torchrun has restarted this worker group (0 for the first attempt), or ``None``."""
    value = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    return int(value) if value not in (None, "") else None


def attempt_store_prefix() -> Optional[str]:
    """The key prefix of this attempt in torchrun's agent store, or ``None`` when no prefix is needed.

    A prefix is needed when the workers use the agent's store (``TORCHELASTIC_USE_AGENT_STORE=True``, which torchrun
    sets for its static rendezvous and for ``--rdzv-backend c10d``), because that store outlives a restart. It comes
    from ``TORCHELASTIC_RESTART_COUNT``, which all workers of one agent share. Agents on several nodes may count
    restarts differently (a rendezvous round that one node's agent enters because of another node's failure is not
    counted as a restart of its own), so with several agents no prefix is used and a warning says how to launch:
    ``--rdzv-backend c10d`` with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` starts a new store for every attempt.
    """
    attempt = restart_attempt()
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        if os.environ.get("RANK", "0") == "0":  # plain `warnings`: this runs before Lightning knows the ranks
            warnings.warn(
                "torchrun runs several agents that share one store for all restart attempts, so restarted workers"
                " can read the addresses of killed ones and fail to connect. For restarts that reconnect dependably,"
                " launch with `--rdzv-backend c10d` and set `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` in the environment"
                " of every node: then every attempt gets a new store.",
                stacklevel=2,
            )
        return None
    return f"{STORE_PREFIX}{attempt}/"


def attempt_store(rank: int, world_size: int, timeout: timedelta) -> Optional[dist.Store]:
    """A store for ``init_process_group`` that no previous torchrun attempt has written to, or ``None``.

    It is the ``env://`` store that ``init_process_group`` would make itself (a client of the agent's store at
    ``MASTER_ADDR:MASTER_PORT``), under the prefix of :func:`attempt_store_prefix`. ``None`` means that the default
    store is fine (no torchrun, or a store that is new for every attempt): let ``init_process_group`` make it.

    Args:
        rank: the global rank of this process.
        world_size: the number of processes.
        timeout: how long store operations (and the connection to the store) may take.

    """
    prefix = attempt_store_prefix()
    if prefix is None:
        return None
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    log.debug(f"Rank {rank}: process group keys go under {prefix!r} in the agent's store")
    # init_process_group adds "default_pg" only to the stores it makes itself; keep the same key layout
    return dist.PrefixStore(f"{prefix}default_pg", store)
