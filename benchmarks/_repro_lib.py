"""Shared pieces of :mod:`benchmarks.reproduce`: the experiment plan, the model wrapper and the evaluation.

Nothing here starts processes; ``_repro_train`` runs the plans, ``reproduce`` drives and reports. It imports nothing
from this package, so that it also loads as a top-level module (``tests/test_reproduce.py`` does).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used, so that the driver starts fast
    import torch

#: The model of every run: the ``tiny`` preset shrunk so that one inner step costs a few tens of milliseconds on one
#: thread (2 layers, hidden 64, 4 heads, a 512-token byte-level BPE, 64-token context; about 0.14M parameters).
MODEL: dict[str, Any] = {"preset": "tiny", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 512, "block_size": 64}

#: Inner optimizer (the module's AdamW): peak lr, warm-up, weight decay, betas; the cosine decays to 10% of the peak
#: over pre-training plus the measured phase, as the paper's single schedule covers its 24k + 64k steps.
INNER: dict[str, Any] = {
    "lr": 2e-3, "warmup_steps": 100, "weight_decay": 0.1, "betas": (0.9, 0.95), "min_lr_ratio": 0.1,
}

#: Paper defaults of the outer optimizer (Douillard et al. 2023, section 3).
PAPER_OUTER = {"type": "nesterov", "lr": 0.7, "momentum": 0.9}

#: Per size: the data, the budget, and the grids of the sweeps. ``steps`` is the token budget per worker of the
#: measured phase (every run: ``steps`` optimizer steps of ``batch_size`` sequences per worker), after a shared
#: synchronous pre-training of ``pretrain_steps`` steps. ``k`` workers in the main comparison, H = ``inner_steps``.
#: ``outer_lr``: Nesterov lr (momentum 0.9), 1.0 chosen over the paper's 0.7 at H = 50 (both are run). ``adam_lr``:
#: outer Adam's lr, about the RMS of one element of the mean pseudo-gradient in the first rounds at H = 50.
SIZES: dict[str, dict[str, Any]] = {
    "smoke": {
        "data": {"max_chars": 1_000_000},
        "k": 2,
        "batch_size": 8,
        "pretrain_steps": 8,
        "steps": 8,
        "warmup_steps": 2,
        "inner_steps": 4,
        "h_sweep": [2, 4, 8],
        "workers": [1, 2],
        "num_fragments": 2,
        "outer_lr": 1.0,
        "adam_lr": 3e-3,
        "eval_every": 4,
        "curve_sequences": 32,
        "final_sequences": 64,
    },
    "small": {
        "data": {"max_chars": None},
        "k": 4,
        "batch_size": 8,
        "pretrain_steps": 400,
        "steps": 400,
        "warmup_steps": 50,
        "inner_steps": 20,
        "h_sweep": [5, 10, 20, 50, 100],
        "workers": [1, 2, 4],
        "num_fragments": 2,
        "outer_lr": 1.0,
        "adam_lr": 3e-3,
        "eval_every": 20,
        "curve_sequences": 512,
        "final_sequences": None,
    },
    "full": {
        "data": {"max_chars": None},
        "k": 4,
        "batch_size": 8,
        "pretrain_steps": 1000,
        "steps": 1000,
        "warmup_steps": 100,
        "inner_steps": 50,
        "h_sweep": [10, 25, 50, 100, 250],
        "workers": [1, 2, 4, 8],
        "num_fragments": 2,
        "outer_lr": 1.0,
        "adam_lr": 3e-3,
        "eval_every": 50,
        "curve_sequences": 512,
        "final_sequences": None,
    },
}

#: Corpus and tokenizer (the offline standard-library corpus, shared token cache).
DATA: dict[str, Any] = {"dataset": "stdlib", "vocab_size": 512, "seq_len": 64, "val_fraction": 0.05}

def spec_key(spec: dict[str, Any]) -> str:
    """A short hash of everything that determines a run's result (not its name or paths)."""
    relevant = {k: v for k, v in spec.items() if k not in ("name", "result", "label", "save_checkpoint")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]


def outer_label(outer: dict[str, Any]) -> str:
    if outer["type"] == "nesterov":
        return f"Nesterov lr {outer['lr']:g}, momentum {outer['momentum']:g}"
    if outer["type"] == "sgd":
        return "plain averaging (SGD lr 1, no momentum: FedAvg)" if outer["lr"] == 1 else f"SGD lr {outer['lr']:g}"
    if outer["type"] == "adam":
        return f"Adam lr {outer['lr']:g}, betas {tuple(outer['betas'])}"
    raise ValueError(f"unknown outer optimizer {outer!r}")


def build_plan(size: str, out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The pre-training spec and the specs of every measured run, in the order they run.

    Every measured run starts from the pre-trained checkpoint (weights and AdamW state), continues the same learning
    rate schedule, and takes ``steps`` optimizer steps of ``batch_size`` sequences per worker.
    """
    cfg = SIZES[size]
    K = cfg["k"]
    steps, pre = cfg["steps"], cfg["pretrain_steps"]
    data = {**DATA, **cfg["data"], "batch_size": cfg["batch_size"]}
    inner = {**INNER, "warmup_steps": cfg["warmup_steps"], "decay_steps": pre + steps}
    evaluation = {k: cfg[k] for k in ("eval_every", "curve_sequences", "final_sequences")}
    ckpt = str(out / "pretrained.pt")
    pretrain = {
        "name": "pretrain", "kind": "single", "workers": 1, "steps": pre, "schedule_offset": 0, "init": None,
        "model": MODEL, "inner": inner, "data": {**data, "sharding": "iid", "seed": 0}, "eval": evaluation,
        "seed": 0, "save_checkpoint": ckpt, "label": f"synchronous pre-training ({pre} steps, 1 worker)",
    }
    base = {
        "steps": steps, "schedule_offset": pre, "init": ckpt, "init_key": spec_key(pretrain), "model": MODEL,
        "inner": inner, "data": {**data, "sharding": "iid", "seed": 1}, "eval": evaluation, "seed": 1,
    }
    h0 = cfg["inner_steps"]
    main_outer = {"type": "nesterov", "lr": cfg["outer_lr"], "momentum": 0.9}

    def diloco(name: str, label: str, workers: int = K, **over: Any) -> dict[str, Any]:
        d = {"inner_steps": h0, "outer": main_outer, "compression": "none", "error_feedback": False,
             "num_fragments": 1, "overlap_steps": 0, "overlap_mixing": 0.5, "eager_rounds": 0,
             "outer_lr_schedule": None, "outer_momentum_schedule": None}
        sharding = over.pop("sharding", "iid")
        optimizer = over.pop("optimizer", "adamw")
        d.update(over)
        spec = {**base, "name": name, "kind": "diloco", "workers": workers, "diloco": d, "label": label}
        if optimizer != "adamw":
            spec["inner"] = {**base["inner"], "optimizer": optimizer}
        spec["data"] = {**base["data"], "sharding": sharding}
        return spec

    runs = [
        {**base, "name": "single", "kind": "single", "workers": 1, "label": "1 worker (baseline)"},
        {**base, "name": f"ddp_k{K}", "kind": "ddp", "workers": K, "label": f"DDP, {K} workers ({K}x batch)"},
        diloco("diloco_main", f"DiLoCo, {K} workers, H={h0}, outer {outer_label(main_outer)}"),
    ]
    for h in cfg["h_sweep"]:
        if h != h0:
            runs.append(diloco(f"diloco_h{h}", f"DiLoCo, {K} workers, H={h}", inner_steps=h))
    for k in cfg["workers"]:
        if k != K:
            runs.append(diloco(f"diloco_k{k}", f"DiLoCo, {k} worker{'s' if k > 1 else ''}, H={h0}", workers=k))
    outers = [
        ("outer_fedavg", {"type": "sgd", "lr": 1.0, "momentum": 0.0}),
        ("outer_adam", {"type": "adam", "lr": cfg["adam_lr"], "betas": [0.9, 0.999]}),
    ]
    if main_outer != PAPER_OUTER:
        outers.insert(0, ("outer_paper", PAPER_OUTER))
    for name, outer in outers:
        runs.append(diloco(name, f"DiLoCo, outer {outer_label(outer)}", outer=outer))
    runs.append(diloco("noniid", f"DiLoCo, {K} workers, non-i.i.d. shards", sharding="noniid"))
    for comp, what in (("bf16", "bf16"), ("int8", "int8"), ("e3m0", "4-bit E3M0")):
        runs.append(diloco(f"comp_{comp}", f"DiLoCo, pseudo-gradients in {what}", compression=comp))
    f = cfg["num_fragments"]
    runs.append(diloco("stream", f"Streaming DiLoCo, {f} fragments, no overlap", num_fragments=f))
    runs.append(diloco("stream_overlap", f"Streaming, {f} fragments, overlap 1 step (alpha 0.5)",
                       num_fragments=f, overlap_steps=1))
    runs.append(diloco("stream_overlap_e3m0", f"Streaming, {f} fragments, overlap 1, 4-bit E3M0",
                       num_fragments=f, overlap_steps=1, compression="e3m0"))
    # what the overlap costs without the mixing (alpha = 0: the outer update replaces the local weights one step
    # late), and 4-bit pseudo-gradients with error feedback
    runs.append(diloco("stream_overlap_a0", f"Streaming, {f} fragments, overlap 1 step, alpha 0",
                       num_fragments=f, overlap_steps=1, overlap_mixing=0.0))
    runs.append(diloco("comp_e3m0_ef", "DiLoCo, pseudo-gradients in 4-bit E3M0, error feedback", compression="e3m0",
                       error_feedback=True))
    # the 2025-2026 options (docs/results.md, "The frontier"): eager updates, sparse and 2-bit pseudo-gradients,
    # outer schedules, Muon as the inner optimizer
    outer_steps = steps // h0
    quarter = max(outer_steps // 4, 1)
    runs += [
        # eager updates with the paper's outer lr 0.7 (at lr 1.0 they lose 26%, see docs/results.md)
        diloco("eager", f"DiLoCo, eager updates, one round hidden, outer {outer_label(PAPER_OUTER)}", eager_rounds=1,
               outer=PAPER_OUTER),
        diloco("eager_stream", f"Streaming, {f} fragments, eager updates, outer {outer_label(PAPER_OUTER)}",
               num_fragments=f, eager_rounds=1, outer=PAPER_OUTER),
        diloco("sparse_ef", "DiLoCo, sparse top-1.56% 2-bit + error feedback, outer SGD lr 1 (no momentum)",
               compression="sparse", error_feedback=True, outer={"type": "sgd", "lr": 1.0, "momentum": 0.0}),
        diloco("comp_int2_ef", "DiLoCo, 2-bit (ternary) pseudo-gradients, error feedback", compression="int2",
               error_feedback=True),
        diloco("outer_cosine", "DiLoCo, outer lr cosine to 10%", outer_lr_schedule="cosine"),
        diloco("outer_momentum_schedule", f"DiLoCo, outer momentum 0 to 0.9 over {quarter}, to 0.5 over the last"
               f" {quarter} outer steps", outer_momentum_schedule={"warmup_steps": quarter, "total_steps": outer_steps,
                                                                  "decay_steps": quarter, "final": 0.5}),
        diloco("muon", "DiLoCo, Muon inner optimizer", optimizer="muon"),
        diloco("muon_int2_ef", "DiLoCo, Muon inner optimizer, 2-bit + error feedback", optimizer="muon",
               compression="int2", error_feedback=True),
    ]
    for spec in [pretrain, *runs]:
        spec["result"] = str(out / "runs" / f"{spec['name']}.json")
    return pretrain, runs


# ------------------------------------------------------------------------------------------------------------------
# Model: the package's GPT, started from the pre-trained checkpoint, continuing its learning-rate schedule
# ------------------------------------------------------------------------------------------------------------------


class OffsetSchedule:
    """``schedule(step + offset)``: the measured phase continues the pre-training's schedule where it stopped."""

    def __init__(self, schedule: Any, offset: int) -> None:
        self.schedule = schedule
        self.offset = offset

    def __call__(self, step: int) -> float:
        return self.schedule(step + self.offset)


def build_module(spec: dict[str, Any]) -> Any:
    """A ``GPTLightningModule`` for ``spec``, with the pre-trained weights and AdamW state if ``spec['init']``."""
    import torch

    from lightning_diloco.gpt import GPTLightningModule, WarmupCosineSchedule

    inner = spec["inner"]

    class ReproGPT(GPTLightningModule):
        def configure_optimizers(self) -> dict[str, Any]:
            hp = self.hparams
            if hp.optimizer == "muon":  # a fresh Muon state: the pre-training's is AdamW's
                optimizer = super().configure_optimizers()["optimizer"]
            else:
                optimizer = torch.optim.AdamW(self.parameter_groups(), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps)
                if init is not None:
                    optimizer.load_state_dict(init["optimizer"])
            for group in optimizer.param_groups:
                group["initial_lr"] = group["lr"] = group["lr"] if hp.optimizer == "muon" else hp.lr
            schedule = WarmupCosineSchedule(hp.warmup_steps, hp.decay_steps, hp.min_lr_ratio)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, OffsetSchedule(schedule, spec["schedule_offset"]))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    init = torch.load(spec["init"], map_location="cpu", weights_only=True) if spec.get("init") else None
    module = ReproGPT(
        **spec["model"], lr=inner["lr"], weight_decay=inner["weight_decay"], betas=tuple(inner["betas"]),
        warmup_steps=inner["warmup_steps"], decay_steps=inner["decay_steps"], min_lr_ratio=inner["min_lr_ratio"],
        optimizer=inner.get("optimizer", "adamw"),
    )
    if init is not None:
        module.load_state_dict(init["state_dict"])
    return module


def outer_schedules(d: dict[str, Any], steps: int) -> dict[str, Any]:
    """``DiLoCoStrategy`` keyword arguments for a run's outer learning-rate and momentum schedules."""
    import functools

    import torch

    from lightning_diloco.schedules import MomentumWarmupDecay

    out: dict[str, Any] = {}
    if d.get("outer_lr_schedule") == "cosine":
        outer_steps = max(steps // d["inner_steps"] * d["num_fragments"], 1)
        lr = d["outer"]["lr"]
        out["outer_lr_scheduler"] = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=outer_steps,
                                                      eta_min=0.1 * lr)
    if d.get("outer_momentum_schedule"):
        out["outer_momentum_schedule"] = MomentumWarmupDecay(**d["outer_momentum_schedule"])
    return out


def outer_optimizer(outer: dict[str, Any]) -> dict[str, Any]:
    """``DiLoCoStrategy`` keyword arguments for an outer optimizer spec."""
    import functools

    import torch

    if outer["type"] == "nesterov":
        return {"outer_lr": outer["lr"], "outer_momentum": outer["momentum"], "outer_nesterov": True}
    if outer["type"] == "sgd":
        return {"outer_lr": outer["lr"], "outer_momentum": outer["momentum"], "outer_nesterov": False}
    if outer["type"] == "adam":
        return {"outer_optimizer": functools.partial(torch.optim.Adam, lr=outer["lr"], betas=tuple(outer["betas"]))}
    raise ValueError(f"unknown outer optimizer {outer!r}")


# ------------------------------------------------------------------------------------------------------------------
# Evaluation on a fixed held-out subset
# ------------------------------------------------------------------------------------------------------------------


def eval_indices(length: int, count: Optional[int]) -> list[int]:
    """``count`` indices spread evenly over ``range(length)`` (all of them for ``None``)."""
    if count is None or count >= length:
        return list(range(length))
    return sorted({round(i * (length - 1) / (count - 1)) for i in range(count)}) if count > 1 else [0]


def evaluate(model: "torch.nn.Module", dataset: Any, indices: Sequence[int], batch_size: int = 64) -> float:
    """Mean next-token cross-entropy of ``model`` (a ``GPT``) over the sequences ``indices`` of ``dataset``."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            batch = torch.stack([dataset[i] for i in indices[start : start + batch_size]])
            inputs, targets = batch[:, :-1], batch[:, 1:]
            logits = model(inputs)
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"))
            tokens += targets.numel()
    model.train(was_training)
    return total / tokens


def global_copy(module: Any, strategy: Any) -> "torch.nn.Module":
    """A copy of the module's ``GPT`` holding the weights the run would publish now.

    For DiLoCo these are the global weights of the last outer step (parameters in ``module.parameters()`` order, so
    that tied parameters are set once); for the other strategies the module's own weights.
    """
    import torch

    model = copy.deepcopy(module.model)
    outer = getattr(strategy, "outer", None)
    if outer is not None:
        with torch.no_grad():
            for param, value in zip(model.parameters(), outer.params):
                param.copy_(value)
            for name, buffer in model.named_buffers():
                key = f"model.{name}"
                if key in outer.buffers:
                    buffer.copy_(outer.buffers[key])
    return model


def ppl(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
