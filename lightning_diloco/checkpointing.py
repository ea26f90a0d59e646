"""The ``"diloco"`` entry of a checkpoint: what it holds, where each part lies, and how a run resumes from it.

A checkpoint of the DiLoCo phase is a directory (:mod:`lightning_diloco.checkpoint_dir`). Rank 0 writes the small
part, ``meta.pt``: Lightning's own entries (loops, callbacks, hyperparameters, schedulers) and the ``"diloco"`` entry's
counters, the syncs in flight and the layout of the rest. Every rank writes the tensors it holds, under these keys:

- ``outer/params/<i>``, ``outer/buffers/<name>``, ``outer/optimizer/<i>/<key>``: the global weights (in their
  master dtype), the global buffers and the outer optimizer state, one copy for all workers;
- ``pending/<n>/deltas/<i>``, ``pending/<n>/buffers/<name>``: the means of the syncs in flight;
- with eager updates every worker holds its own global state, so these two lie under ``workers/<w>/`` (the syncs in
  flight with the others' part of their means, see :mod:`lightning_diloco.eager`);
- ``state_dict/<key>``: entries of the model's ``state_dict`` that have no global value (integer buffers);
- ``workers/<w>/module/<key>``, ``workers/<w>/optimizer/<o>/<i>/<key>``, ``workers/<w>/extra``: worker ``w``'s local
  weights and buffers, inner optimizer state and census, written by its own processes;
- ``workers/<w>/feedback/<j>/<f>/<key>``: the error-feedback residuals of process ``j`` of worker ``w``.

A sharded worker's tensors are ``DTensor`` chunks; no rank ever holds another worker's state, and the global state is
read and written in the chunks each process holds. A checkpoint of the synchronous warm-up (every worker holds the same
state: Lightning's) and a checkpoint of weights only are single files, as Lightning writes them.

Resuming on the number of workers that wrote it restores each worker exactly, on any number of processes per worker.
Resuming on another number closes the open round with the mean pseudo-gradient of all saved workers (read one worker
at a time, through :meth:`~lightning_diloco.rounds.Rounds.close_round`, the path every outer step lands by); every
worker then starts from the new global weights and worker ``w`` takes saved worker ``w mod k``'s inner optimizer
state. Error-feedback residuals are restored when the layout (workers, processes per worker, sharding) is the same.

:func:`consolidate` turns a directory into one Lightning checkpoint file of the global model.
"""

import io
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.nn import Module
from torch.optim import Optimizer

from lightning_diloco import checkpoint_dir
from lightning_diloco.census import Census
from lightning_diloco.config import DiLoCoConfig
from lightning_diloco.outer import OuterState, master_dtype
from lightning_diloco.rounds import Rounds
from lightning_diloco.sharding import local, to_global

CHECKPOINT_KEY = "diloco"
VERSION = 2


def warmup_entry(warmup_taken: int, bytes_sent: dict[str, float]) -> dict[str, Any]:
    """The entry of a checkpoint written during the synchronous warm-up."""
    return {"version": VERSION, "warmup_taken": warmup_taken, "bytes_sent": dict(bytes_sent)}


def global_prefix(eager_rounds: int, worker: int) -> str:
    """Where worker ``worker``'s global state lies: one copy for all workers, or its own with eager updates."""
    return f"workers/{worker}/" if eager_rounds else ""


def layout(num_workers: int, processes_per_worker: int, sharded: bool) -> dict[str, Any]:
    """How a run's workers are laid out (what error-feedback residuals depend on)."""
    return {"num_workers": num_workers, "processes_per_worker": processes_per_worker, "sharded": sharded}


# -- saving ------------------------------------------------------------------------------------------------------------


def diloco_entry(
    config: DiLoCoConfig, rounds: dict[str, Any], outer: OuterState, module: Module, workers_layout: dict[str, Any],
    warmup_taken: int, bytes_sent: dict[str, float],
) -> dict[str, Any]:
    """The ``"diloco"`` entry of ``meta.pt`` (counters and layout; no tensor).

    Args:
        config: DiLoCo's options.
        rounds: :meth:`Rounds.state_dict` (the counters and the syncs in flight).
        outer: the global weights and the outer optimizer.
        module: the worker's replica (for the layout of the model's ``state_dict``).
        workers_layout: this run's :func:`layout`.
        warmup_taken: the synchronous warm-up steps taken.
        bytes_sent: the bytes sent so far.

    """
    optimizer = outer.optimizer.state_dict()
    pending = [{k: v for k, v in p.items() if k not in ("deltas", "buffers")} | {"buffers": list(p["buffers"])}
               for p in rounds["pending"]]
    return {
        "version": VERSION,
        "warmup_taken": warmup_taken,
        "bytes_sent": dict(bytes_sent),
        "inner_steps": config.inner_steps,
        "num_fragments": config.num_fragments,
        "eager_rounds": config.eager_rounds,
        **workers_layout,
        "step": rounds["step"],
        "last_sync": rounds["last_sync"],
        "pending": pending,
        "outer": {
            "names": list(outer.names), "buffers": list(outer.buffers), "outer_step": outer.outer_step,
            "param_groups": optimizer["param_groups"], "state": _objects(optimizer["state"]),
            "scheduler": outer.scheduler.state_dict() if outer.scheduler is not None else None,
        },
        "state_dict": _state_dict_layout(outer, module),
    }


def rank_tensors(
    outer: OuterState, rounds: dict[str, Any], module_state: dict[str, Any], optimizers: list[Optimizer],
    fragments: list[list[int]], fragments_feedback: list[Optional[dict[str, Any]]], census: Census, worker: int,
    index_in_worker: int, own_entries: dict[str, Tensor], prefix: str = "",
) -> dict[str, Any]:
    """What this rank writes: the global state it holds (under ``prefix``, see :func:`global_prefix`) and its
    worker's local state (see the module's list)."""
    out: dict[str, Any] = {}
    for i, (g, p) in enumerate(zip(outer.params, outer.locals)):
        out[f"{prefix}outer/params/{i}"] = to_global(g.detach(), p)
    for name, b in outer.buffers.items():
        out[f"{prefix}outer/buffers/{name}"] = b
    for i, values in outer.optimizer.state_dict()["state"].items():
        for key, value in _tensors(values).items():
            out[f"{prefix}outer/optimizer/{i}/{key}"] = _global_like(value, outer.params[i].shape, outer.locals[i])
    for n, p in enumerate(rounds["pending"]):
        for j, d in zip(fragments[p["fragment"]], p["deltas"]):
            out[f"{prefix}pending/{n}/deltas/{j}"] = to_global(d, outer.locals[j])
        for name, b in p["buffers"].items():
            out[f"{prefix}pending/{n}/buffers/{name}"] = b
    for key, value in own_entries.items():
        out[f"state_dict/{key}"] = value
    prefix = f"workers/{worker}"
    for key, value in module_state.items():
        if isinstance(value, Tensor):
            out[f"{prefix}/module/{key}"] = value
    extra: dict[str, Any] = {"optimizers": [], "census": census.state_dict()}
    for o, optimizer in enumerate(optimizers):
        state = optimizer.state_dict()
        params = _flat_params(optimizer)
        for i, values in state["state"].items():
            for key, value in _tensors(values).items():
                out[f"{prefix}/optimizer/{o}/{i}/{key}"] = _global_like(value, local(params[i]).shape, params[i])
        extra["optimizers"].append({"param_groups": state["param_groups"], "state": _objects(state["state"])})
    out[f"{prefix}/extra"] = _pack(extra)
    for f, feedback in enumerate(fragments_feedback):
        for key, value in (feedback or {}).get("residuals", {}).items():
            out[f"{prefix}/feedback/{index_in_worker}/{f}/{key}"] = value
    return out


def own_entries(module_state: dict[str, Any], entry: dict[str, Any]) -> dict[str, Tensor]:
    """The model's ``state_dict`` entries that have no global value (written under ``state_dict/``)."""
    return {key: module_state[key] for key, (kind, _, _) in entry["state_dict"].items() if kind == "own"}


# -- checks ------------------------------------------------------------------------------------------------------------


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
    if state.get("eager_rounds", 0) != config.eager_rounds:
        raise ValueError(
            f"The checkpoint was written with `eager_rounds={state.get('eager_rounds', 0)}` but this run has"
            f" `eager_rounds={config.eager_rounds}`: the syncs in flight and the global state are kept differently."
            " Resume with the same `eager_rounds`, and change it after the run's end (which averages the workers'"
            " global states)."
        )


def check_model(state: dict[str, Any], outer_names: list[str], buffers: list[str]) -> None:
    if state["outer"]["names"] != outer_names or set(state["outer"]["buffers"]) != set(buffers):
        raise ValueError(
            "The checkpoint's DiLoCo state was written for a different model (parameter names or shapes differ)."
            " Resume with the model that wrote it, or start from its weights alone by loading the `state_dict`"
            " into your model and calling `trainer.fit` without `ckpt_path`."
        )


# -- resuming ----------------------------------------------------------------------------------------------------------


def _source(key: str, kind: str, ref: Any, prefix: str = "") -> str:
    """The checkpoint key of the global model's ``state_dict`` entry ``key`` (see :func:`_state_dict_layout`), with
    the global state under ``prefix``."""
    return {"param": f"{prefix}outer/params/{ref}", "buffer": f"{prefix}outer/buffers/{ref}"}.get(
        kind, f"state_dict/{key}")


@torch.no_grad()
def load_global_model(directory: str, state: dict[str, Any], module: Module) -> None:
    """Load the checkpoint's global model into ``module`` (whose parameters may be ``DTensor`` chunks; worker 0's
    global model with eager updates); every rank calls this at the same point."""
    prefix = global_prefix(state.get("eager_rounds", 0), 0)
    params = list(module.parameters())
    current = module.state_dict()
    targets: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, (kind, ref, _) in state["state_dict"].items():
        if key not in current:
            continue
        source = _source(key, kind, ref, prefix)
        like = params[ref] if kind == "param" else current[key]
        dtype = like.dtype if kind == "own" else master_dtype(like.dtype)
        if source not in targets:
            targets[source] = torch.empty_like(like, dtype=dtype)
        sources[key] = source
    saved = checkpoint_dir.keys(directory)
    missing = [key for key in current if key not in sources]
    differ = [key for key, source in sources.items()
              if source not in saved or saved[source] is None or saved[source][0] != targets[source].shape]
    if missing or differ:
        raise RuntimeError(
            f"the checkpoint's global model holds other shapes (or nothing) for {differ}" if differ else
            f"the checkpoint's global model holds nothing for {missing}"
        )
    checkpoint_dir.load(directory, targets)
    module.load_state_dict({key: targets[source].to(current[key].dtype) for key, source in sources.items()},
                           strict=False)


def restore(
    directory: str, state: dict[str, Any], rounds: Rounds, census: Census,
    optimizers: list[Optimizer], module: Module, stored_layout: dict[str, Any], index_in_worker: int,
    to_device: Callable[[Optimizer], None], warn: Callable[[str], None],
) -> None:
    """Resume this worker from a checkpoint directory of the DiLoCo phase (see the module's documentation); every rank
    calls this at the same point.

    Args:
        directory: the checkpoint directory.
        state: its ``"diloco"`` entry (from ``meta.pt``).
        rounds: this worker's round loop, with its outer state.
        census: this worker's census.
        optimizers: the inner optimizers.
        module: the worker's replica.
        stored_layout: this run's :func:`layout`.
        index_in_worker: this process's index in its worker.
        to_device: moves an optimizer's state to the training device.
        warn: rank zero's warning.

    """
    outer = rounds.outer
    check_model(state, outer.names, list(outer.buffers))
    saved_keys = checkpoint_dir.keys(directory)
    me, count, saved = rounds.workers.index, rounds.workers.count, int(state["num_workers"])
    source = me % saved
    eager = state.get("eager_rounds", 0)
    if eager and saved != count:
        raise ValueError(
            f"The checkpoint was written by {saved} workers with eager updates (`eager_rounds={eager}`), where every"
            f" worker holds its own global state; this run has {count}. Resume on {saved} workers, or let that run"
            " end (its end averages the workers' global states) and start from its final checkpoint."
        )
    gp = global_prefix(eager, me)
    targets: dict[str, Any] = {}
    for i, (g, p) in enumerate(zip(outer.params, outer.locals)):
        targets[f"{gp}outer/params/{i}"] = to_global(torch.empty_like(g), p)
    for name, b in outer.buffers.items():
        targets[f"{gp}outer/buffers/{name}"] = torch.empty_like(b)
    _add_targets(targets, saved_keys, f"{gp}outer/optimizer/", lambda i: (outer.params[i], outer.locals[i]))
    for n, p in enumerate(state["pending"]):
        for j in rounds.fragments[p["fragment"]].params:
            targets[f"{gp}pending/{n}/deltas/{j}"] = to_global(torch.empty_like(outer.params[j]), outer.locals[j])
        for name in p["buffers"]:
            targets[f"{gp}pending/{n}/buffers/{name}"] = torch.empty_like(outer.buffers[name])
    for o, optimizer in enumerate(optimizers):
        params = _flat_params(optimizer)
        _add_targets(targets, saved_keys, f"workers/{source}/optimizer/{o}/", lambda i: (local(params[i]), params[i]))
    targets[f"workers/{source}/extra"] = b""
    exact = saved == count
    module_targets = _module_targets(module, source) if exact else {}
    same_layout = exact and {k: state.get(k) for k in stored_layout} == stored_layout
    feedback_prefix = f"workers/{me}/feedback/{index_in_worker}/"
    if same_layout:
        for key, layout_ in saved_keys.items():
            if key.startswith(feedback_prefix) and layout_ is not None:
                targets[key] = torch.empty(layout_[0], dtype=layout_[1])
    loaded = checkpoint_dir.load(directory, {**targets, **module_targets})

    outer.load_state_dict({
        "names": state["outer"]["names"],
        "params": [local(loaded[f"{gp}outer/params/{i}"]) for i in range(len(outer.params))],
        "buffers": {name: loaded[f"{gp}outer/buffers/{name}"] for name in outer.buffers},
        "optimizer": {"state": _merge(state["outer"]["state"], loaded, f"{gp}outer/optimizer/", local_values=True),
                      "param_groups": state["outer"]["param_groups"]},
        "scheduler": state["outer"].get("scheduler"),
        "outer_step": state["outer"]["outer_step"],
    })
    rounds.load_state_dict({
        "step": state["step"], "last_sync": state["last_sync"],
        "pending": [{**p,
                     "deltas": [local(loaded[f"{gp}pending/{n}/deltas/{j}"])
                                for j in rounds.fragments[p["fragment"]].params],
                     "buffers": {name: loaded[f"{gp}pending/{n}/buffers/{name}"] for name in p["buffers"]}}
                    for n, p in enumerate(state["pending"])],
    })
    extra = _unpack(loaded[f"workers/{source}/extra"])
    for o, optimizer in enumerate(optimizers):
        saved_optimizer = extra["optimizers"][o]
        optimizer.load_state_dict({
            "state": _merge(saved_optimizer["state"], loaded, f"workers/{source}/optimizer/{o}/"),
            "param_groups": saved_optimizer["param_groups"],
        })
        to_device(optimizer)
    if exact:
        prefix = f"workers/{me}/module/"
        module.load_state_dict({k[len(prefix):]: v for k, v in module_targets.items()}, strict=False)
        for f, fragment in enumerate(rounds.fragments):
            if fragment.feedback is None or not same_layout:
                continue
            prefix = f"{feedback_prefix}{f}/"
            residuals = {int(k[len(prefix):]): v for k, v in loaded.items() if k.startswith(prefix)}
            fragment.feedback.load_state_dict({"residuals": residuals})
        census.load_state_dict(extra.get("census", {}))
        if not same_layout and any(f.feedback is not None for f in rounds.fragments):
            warn("The checkpoint was written with another number of processes per worker or another sharding: the"
                 " error-feedback residuals start afresh (they are bounded by one round trip's compression error).")
        return
    rounds.close_round(_saved_workers(directory, module, saved, outer.names, list(outer.buffers)))
    warn(
        f"Resuming {saved} DiLoCo workers' checkpoint on {count} workers: their open round was closed with an"
        " outer step over all saved workers, every worker starts from the new global weights, and worker w takes"
        f" saved worker (w mod {saved})'s inner optimizer state."
    )


def _module_targets(module: Module, worker: int) -> dict[str, Tensor]:
    return {f"workers/{worker}/module/{key}": torch.empty_like(value)
            for key, value in module.state_dict().items() if isinstance(value, Tensor)}


def _saved_workers(
    directory: str, module: Module, saved: int, names: list[str], buffers: list[str]
) -> Iterator[dict[str, Tensor]]:
    """Every saved worker's local parameters and floating-point buffers (this process's chunks), one at a time."""
    for w in range(saved):
        targets = _module_targets(module, w)
        checkpoint_dir.load(directory, targets)
        prefix = f"workers/{w}/module/"
        values = {k[len(prefix):]: local(v) for k, v in targets.items()}
        yield {name: values[name] for name in (*names, *buffers)}


# -- one file ----------------------------------------------------------------------------------------------------------


def read(path: Any) -> dict[str, Any]:
    """A checkpoint directory as one dictionary, in this process: Lightning's entries, ``state_dict`` (the global
    model), ``optimizer_states`` (worker 0's), and ``"diloco"`` with every worker's whole local state under
    ``"workers"`` (``module``, ``optimizer_states``, ``error_feedback`` by process, ``speed``), the outer state under
    ``"outer"`` and the syncs in flight with their means. For inspection and tools; training never reads it whole."""
    meta = _meta(path)
    values = checkpoint_dir.read(path)
    state = dict(meta[CHECKPOINT_KEY])
    gp = global_prefix(state.get("eager_rounds", 0), 0)
    outer = state["outer"]
    optimizer_state = _merge(outer["state"], values, f"{gp}outer/optimizer/")
    state["outer"] = {
        "names": outer["names"], "params": [values[f"{gp}outer/params/{i}"] for i in range(len(outer["names"]))],
        "buffers": {n: values[f"{gp}outer/buffers/{n}"] for n in outer["buffers"]},
        "optimizer": {"state": optimizer_state, "param_groups": outer["param_groups"]},
        "outer_step": outer["outer_step"],
    }
    state["pending"] = [
        {**p, "deltas": [v for k, v in _sorted_items(values, f"{gp}pending/{n}/deltas/")],
         "buffers": {name: values[f"{gp}pending/{n}/buffers/{name}"] for name in p["buffers"]}}
        for n, p in enumerate(state["pending"])
    ]
    workers = []
    for w in range(int(state["num_workers"])):
        prefix = f"workers/{w}"
        extra = _unpack(values[f"{prefix}/extra"])
        module = {k[len(prefix) + 8:]: v for k, v in values.items() if k.startswith(f"{prefix}/module/")}
        optimizers = _worker_optimizers(extra, values, w)
        feedback: dict[int, dict[int, dict[str, Any]]] = {}
        for key, value in values.items():
            if key.startswith(f"{prefix}/feedback/"):
                j, f, r = key[len(prefix) + 10:].split("/")
                feedback.setdefault(int(j), {}).setdefault(int(f), {"residuals": {}})["residuals"][int(r)] = value
        workers.append({"module": module, "optimizer_states": optimizers, "speed": extra["census"],
                        "error_feedback": feedback})
    state["workers"] = workers
    global_model = global_state_dict(state, values)
    return {**{k: v for k, v in meta.items() if k != CHECKPOINT_KEY}, "state_dict": global_model,
            "optimizer_states": workers[0]["optimizer_states"], CHECKPOINT_KEY: state}


def global_state_dict(state: dict[str, Any], values: dict[str, Any]) -> dict[str, Tensor]:
    """The global model's ``state_dict`` (whole tensors, in the model's dtypes) from an entry and its tensors (worker
    0's global model with eager updates)."""
    prefix = global_prefix(state.get("eager_rounds", 0), 0)
    out = {}
    for key, (kind, ref, dtype) in state["state_dict"].items():
        out[key] = values[_source(key, kind, ref, prefix)].to(getattr(torch, dtype))
    return out


def consolidate(path: Any, out: Any) -> None:
    """Write the checkpoint directory ``path`` as one Lightning checkpoint file ``out``: the global model as
    ``state_dict`` (for ``Model.load_from_checkpoint``), worker 0's inner optimizer state, and Lightning's entries;
    without DiLoCo's state, so that any strategy can start from it."""
    from lightning_diloco.io import atomic_write

    if not checkpoint_dir.is_checkpoint_dir(path):
        raise ValueError(
            f"{path} is not a DiLoCo checkpoint directory (a directory with a `meta.pt`). Pass the directory that"
            " `ModelCheckpoint` wrote during DiLoCo; a single-file checkpoint loads with `Model.load_from_checkpoint`"
            " as it is."
        )
    meta = _meta(path)
    gp = global_prefix(meta[CHECKPOINT_KEY].get("eager_rounds", 0), 0)
    values = checkpoint_dir.read(path, (f"{gp}outer/params/", f"{gp}outer/buffers/", "state_dict/",
                                        "workers/0/optimizer/", "workers/0/extra"))
    optimizers = _worker_optimizers(_unpack(values["workers/0/extra"]), values, 0)
    checkpoint = {**{k: v for k, v in meta.items() if k != CHECKPOINT_KEY},
                  "state_dict": global_state_dict(meta[CHECKPOINT_KEY], values), "optimizer_states": optimizers}
    with atomic_write(out) as file:
        torch.save(checkpoint, file)


# -- helpers -----------------------------------------------------------------------------------------------------------


def _meta(path: Any) -> dict[str, Any]:
    return checkpoint_dir.read_meta(path, lambda file: torch.load(file, map_location="cpu", weights_only=False))


def _worker_optimizers(extra: dict[str, Any], values: dict[str, Any], worker: int) -> list[dict[str, Any]]:
    """Worker ``worker``'s inner optimizer states, whole, from its ``extra`` entry and the loaded tensors."""
    return [{"state": _merge(o["state"], values, f"workers/{worker}/optimizer/{i}/"), "param_groups": o["param_groups"]}
            for i, o in enumerate(extra["optimizers"])]


def _pack(obj: Any) -> bytes:
    """A small object as one opaque value (``torch.distributed.checkpoint`` would flatten a dictionary into keys)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _state_dict_layout(outer: OuterState, module: Module) -> dict[str, tuple[str, Any, str]]:
    """Where every entry of the global model's ``state_dict`` comes from (``("param", i)``, ``("buffer", name)`` or
    ``("own", None)``), with its dtype. Tied parameters appear under each of their names."""
    index = {id(p): i for i, p in enumerate(outer.locals)}
    named = {name: index[id(p)] for name, p in module.named_parameters(remove_duplicate=False) if id(p) in index}
    out: dict[str, tuple[str, Any, str]] = {}
    for key, value in module.state_dict().items():
        if not isinstance(value, Tensor):
            continue
        dtype = str(value.dtype).removeprefix("torch.")
        if key in named:
            out[key] = ("param", named[key], dtype)
        elif key in outer.buffers:
            out[key] = ("buffer", key, dtype)
        else:
            out[key] = ("own", None, dtype)
    return out


def _tensors(values: dict[str, Any]) -> dict[str, Tensor]:
    return {k: v for k, v in values.items() if isinstance(v, Tensor)}


def _objects(state: dict[Any, dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """An optimizer's per-parameter state without its tensors (which travel as tensors), with the names of those."""
    return {i: {"tensors": sorted(_tensors(v)), **{k: x for k, x in v.items() if not isinstance(x, Tensor)}}
            for i, v in state.items()}


def _merge(objects: dict[Any, dict[str, Any]], loaded: dict[str, Any], prefix: str,
           local_values: bool = False) -> dict[Any, dict[str, Any]]:
    """An optimizer's per-parameter state again, from :func:`_objects` and the loaded tensors."""
    out = {}
    for i, values in objects.items():
        entry = {k: v for k, v in values.items() if k != "tensors"}
        for key in values["tensors"]:
            value = loaded[f"{prefix}{i}/{key}"]
            entry[key] = local(value) if local_values else value
        out[i] = entry
    return out


def _global_like(value: Tensor, chunk_shape: torch.Size, param: Tensor) -> Tensor:
    """An optimizer state tensor of a parameter's chunk shape laid out like the parameter (a ``DTensor`` where the
    parameter is one); a ``DTensor`` already, a step count or any other tensor as it is."""
    if isinstance(value, DTensor) or value.dim() == 0 or value.shape != chunk_shape:
        return value
    return to_global(value, param)


def _add_targets(targets: dict[str, Any], saved_keys: dict[str, Any], prefix: str,
                 param_of: Callable[[int], tuple[Tensor, Tensor]]) -> None:
    """Targets for an optimizer's saved state tensors under ``prefix``: chunks laid out like their parameter where
    the saved tensor has the parameter's whole shape, else whole tensors."""
    for key, layout_ in saved_keys.items():
        if not key.startswith(prefix) or layout_ is None:
            continue
        i = int(key[len(prefix):].split("/")[0])
        chunk, param = param_of(i)
        size, dtype = layout_
        if size == param.shape and len(size) > 0:
            targets[key] = to_global(torch.empty_like(local(chunk), dtype=dtype), param)
        else:
            targets[key] = torch.empty(size, dtype=dtype)


def _flat_params(optimizer: Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _sorted_items(values: dict[str, Any], prefix: str) -> list[tuple[int, Any]]:
    return sorted((int(k[len(prefix):]), v) for k, v in values.items() if k.startswith(prefix))
