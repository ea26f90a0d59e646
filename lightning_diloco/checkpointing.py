"""The ``"diloco"`` entry of a checkpoint: what it holds, how it is checked, and how a run resumes from it.

A checkpoint's ``state_dict`` is the global model (so ``load_from_checkpoint`` gives it); the ``"diloco"`` entry adds
the outer optimizer, the round counters, the syncs in flight (their means already in) and every worker's local state:
its weights and buffers, its inner optimizer state (worker 0's is Lightning's own ``optimizer_states``, written once),
its error-feedback residuals and its census. A checkpoint of the synchronous warm-up holds only the warm-up's
progress: every worker's state then is Lightning's.

Resuming on the number of workers that wrote it restores each worker exactly. Resuming on another number closes the
open round with the mean pseudo-gradient of all saved workers (through :meth:`~lightning_diloco.rounds.Rounds.close_round`,
the same path every outer step lands by), then every worker starts from the new global weights and worker ``w`` takes
saved worker ``w mod k``'s inner optimizer state.
"""

from typing import Any, Callable, Optional

from torch import Tensor
from torch.optim import Optimizer

from lightning_diloco.census import Census
from lightning_diloco.config import DiLoCoConfig
from lightning_diloco.outer import OuterState
from lightning_diloco.rounds import Rounds

CHECKPOINT_KEY = "diloco"
VERSION = 1


def warmup_entry(warmup_taken: int, bytes_sent: dict[str, float]) -> dict[str, Any]:
    """The entry of a checkpoint written during the synchronous warm-up."""
    return {"version": VERSION, "warmup_taken": warmup_taken, "bytes_sent": dict(bytes_sent)}


def worker_state(
    module_state: dict[str, Tensor], optimizer_states: list[dict[str, Any]], rounds: Rounds, census: Census
) -> dict[str, Any]:
    """One worker's own state, on the CPU: local weights and buffers, inner optimizer, residuals, census."""
    return {
        "module": {name: t.detach().cpu().clone() for name, t in module_state.items()},
        "optimizer_states": [_to_cpu(state) for state in optimizer_states],
        "error_feedback": [_to_cpu(f.feedback.state_dict()) if f.feedback else None for f in rounds.fragments],
        "speed": census.state_dict(),
    }


def diloco_entry(
    config: DiLoCoConfig, rounds: dict[str, Any], outer: OuterState, workers: list[dict[str, Any]],
    warmup_taken: int, bytes_sent: dict[str, float],
) -> dict[str, Any]:
    """The entry of a checkpoint of the DiLoCo phase.

    Args:
        config: DiLoCo's options.
        rounds: :meth:`Rounds.state_dict` (the counters and the syncs in flight).
        outer: the global weights and the outer optimizer.
        workers: one :func:`worker_state` per worker.
        warmup_taken: the synchronous warm-up steps taken.
        bytes_sent: the bytes sent so far.

    """
    workers = list(workers)
    workers[0] = {**workers[0], "optimizer_states": None}  # worker 0's is Lightning's own `optimizer_states`
    return {
        "version": VERSION,
        "warmup_taken": warmup_taken,
        "bytes_sent": dict(bytes_sent),
        "inner_steps": config.inner_steps,
        "num_fragments": config.num_fragments,
        "num_workers": len(workers),
        "processes_per_worker": config.processes_per_worker,
        **rounds,
        "outer": outer.state_dict(),
        "workers": workers,
    }


def check_resumable(state: dict[str, Any], config: DiLoCoConfig) -> None:
    """Refuse an entry this version or this configuration cannot resume, saying what to do."""
    if state.get("version") != VERSION:
        raise ValueError(
            f"The checkpoint's DiLoCo state has version {state.get('version')!r}; this version of lightning-diloco"
            f" reads version {VERSION}. Resume with the version that wrote it."
        )
    if "num_fragments" in state and state["num_fragments"] != config.num_fragments:
        raise ValueError(
            f"The checkpoint was written with `num_fragments={state['num_fragments']}` but this run has"
            f" `num_fragments={config.num_fragments}`. Resume with the same number of fragments."
        )


def restore(
    state: dict[str, Any], rounds: Rounds, census: Census, optimizers: list[Optimizer],
    lightning_optimizer_states: list[dict[str, Any]], load_module: Callable[[dict[str, Tensor]], None],
    to_device: Callable[[Optimizer], None], warn: Callable[[str], None],
) -> None:
    """Resume this worker from an entry of the DiLoCo phase (see the module's documentation).

    Args:
        state: the entry.
        rounds: this worker's round loop, with its outer state.
        census: this worker's census.
        optimizers: the inner optimizers.
        lightning_optimizer_states: the checkpoint's ``optimizer_states`` (worker 0's).
        load_module: loads a worker's local ``state_dict`` into the module.
        to_device: moves an optimizer's state to the training device.
        warn: rank zero's warning.

    """
    rounds.outer.load_state_dict(state["outer"])
    rounds.load_state_dict(state)
    saved = state["workers"]
    me, count = rounds.workers.index, rounds.workers.count
    worker = saved[me % len(saved)]
    optimizer_states: Optional[list[dict[str, Any]]] = worker["optimizer_states"]
    for optimizer, opt_state in zip(optimizers, optimizer_states or lightning_optimizer_states):
        optimizer.load_state_dict(opt_state)
        to_device(optimizer)
    if len(saved) == count:
        load_module(worker["module"])
        for fragment, residuals in zip(rounds.fragments, worker.get("error_feedback", [])):
            if fragment.feedback is not None and residuals is not None:
                fragment.feedback.load_state_dict(residuals)
        census.load_state_dict(worker.get("speed", {}))
        return
    rounds.close_round([w["module"] for w in saved])
    warn(
        f"Resuming {len(saved)} DiLoCo workers' checkpoint on {count} workers: their open round was closed with an"
        " outer step over all saved workers, every worker starts from the new global weights, and worker w takes"
        f" saved worker (w mod {len(saved)})'s inner optimizer state."
    )


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
