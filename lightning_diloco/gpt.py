"""A GPT-style decoder-only language model and a LightningModule that trains it.

The file has two halves:

1. :class:`GPT`, a plain :class:`torch.nn.Module` (pre-norm transformer blocks, causal self-attention through
   :func:`torch.nn.functional.scaled_dot_product_attention`, learned absolute position embeddings, input and output
   embeddings tied). It knows nothing about Lightning.
2. :class:`GPTLightningModule`, a thin :class:`~lightning.pytorch.LightningModule` around it: next-token loss,
   perplexity, AdamW with linear warm-up and cosine decay.

Batches are ``LongTensor`` of shape ``[B, T + 1]`` (what :class:`lightning_diloco.data.LMDataModule` yields): the
inputs are ``batch[:, :-1]`` and the targets ``batch[:, 1:]``. A pair ``(inputs, targets)`` of ``[B, T]`` tensors is
accepted too.
"""

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_diloco.optimizers import MuonAdamW

#: Named model sizes. ``60m``/``150m``/``400m`` are the three models of the DiLoCo paper (Douillard et al. 2023,
#: Table 5: layers/hidden/heads 3/896/16, 12/896/16, 12/1536/12, 4x MLP, 32k vocabulary, 1024 context).
#: ``tiny`` (about 0.9M parameters) trains in minutes on a laptop CPU.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 3, "n_embd": 128, "n_head": 4, "vocab_size": 2048, "block_size": 128},
    "60m": {"n_layer": 3, "n_embd": 896, "n_head": 16, "vocab_size": 32000, "block_size": 1024},
    "150m": {"n_layer": 12, "n_embd": 896, "n_head": 16, "vocab_size": 32000, "block_size": 1024},
    "400m": {"n_layer": 12, "n_embd": 1536, "n_head": 12, "vocab_size": 32000, "block_size": 1024},
}


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of a :class:`GPT`.

    Args:
        vocab_size: Number of token ids.
        block_size: Longest sequence the model accepts (number of position embeddings).
        n_layer: Number of transformer blocks.
        n_head: Number of attention heads; must divide ``n_embd``.
        n_embd: Hidden size.
        mlp_ratio: Hidden size of the MLP as a multiple of ``n_embd``.
        dropout: Dropout probability on embeddings, attention and residual branches. ``0.0`` (the default) keeps
            training bit-for-bit reproducible, which exact-resume checks rely on.
        bias: Whether linear layers and layer norms have biases.
    """

    vocab_size: int = 32000
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 16
    n_embd: int = 896
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"`n_embd` ({self.n_embd}) must be divisible by `n_head` ({self.n_head}). Pick a head count that"
                f" divides the hidden size."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}.")

    @classmethod
    def from_preset(cls, preset: Optional[str] = None, **overrides: Any) -> "GPTConfig":
        """Build a config from a named preset, replacing the fields given in ``overrides`` that are not ``None``.

        Args:
            preset: One of :data:`PRESETS` (``tiny``, ``60m``, ``150m``, ``400m``) or ``None`` for the dataclass
                defaults.
            **overrides: Field values that replace the preset's.

        Raises:
            ValueError: If the preset name is unknown.
        """
        if preset is None:
            base = cls()
        else:
            if preset not in PRESETS:
                raise ValueError(f"Unknown model preset {preset!r}. Choose one of {sorted(PRESETS)} or pass `None`.")
            base = cls(**PRESETS[preset])
        return replace(base, **{key: value for key, value in overrides.items() if value is not None})


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position only attends to itself and earlier positions."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch, time, channels = x.shape
        q, k, v = self.qkv(x).split(channels, dim=2)
        # [B, T, C] -> [B, heads, T, C // heads]
        q, k, v = (t.view(batch, time, self.n_head, channels // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(batch, time, channels)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: linear, GELU, linear."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer language model.

    Args:
        config: The model sizes.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # tied embeddings: the output projection reuses the token embedding matrix
        self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialize weights: N(0, 0.02), residual output projections scaled by ``1 / sqrt(2 * n_layer)``."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    def forward(self, idx: Tensor) -> Tensor:
        """Compute next-token logits.

        Args:
            idx: Token ids of shape ``[B, T]`` with ``T <= block_size``.

        Returns:
            Logits of shape ``[B, T, vocab_size]``.
        """
        time = idx.size(1)
        if time > self.config.block_size:
            raise ValueError(
                f"Sequence length {time} exceeds the model's block_size {self.config.block_size}. Use shorter"
                " sequences or build the model with a larger `block_size`."
            )
        pos = torch.arange(time, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters, counting the tied embedding matrix once.

        Args:
            exclude_embeddings: Leave out the token and position embeddings.
        """
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.wte.weight.numel() + self.wpe.weight.numel()
        return total


class WarmupCosineSchedule:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_lr_ratio``.

    Used as the ``lr_lambda`` of :class:`torch.optim.lr_scheduler.LambdaLR` (a callable object, so its settings are
    saved in the scheduler's ``state_dict``).

    Args:
        warmup_steps: Steps of linear warm-up. Step ``s`` (0-based) of the warm-up uses ``(s + 1) / warmup_steps``.
        decay_steps: Step at which the cosine reaches ``min_lr_ratio``; the multiplier stays there afterwards.
        min_lr_ratio: Floor of the decay as a fraction of the peak learning rate.
    """

    def __init__(self, warmup_steps: int, decay_steps: int, min_lr_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class MeanLossPerplexity(MeanMetric):
    """Perplexity as ``exp`` of the (token-weighted) mean cross-entropy, synchronized across processes."""

    def compute(self) -> Tensor:
        return torch.exp(super().compute())


class GPTLightningModule(LightningModule):
    """Trains a :class:`GPT` on next-token prediction.

    Model sizes come from ``preset``; any size argument that is not ``None`` overrides the preset. The optimizer is
    AdamW with weight decay on the weight matrices of linear layers only (biases, layer norms and the token/position
    embeddings, which include the tied output matrix, get no decay), ``betas=(0.9, 0.95)`` as is common for language
    model pre-training, linear warm-up and cosine decay to ``min_lr_ratio * lr``. The learning rate is stepped every
    optimizer step. Gradient clipping is left to the Trainer: pass ``Trainer(gradient_clip_val=1.0)`` (the configs in
    ``configs/`` do).

    Logged metrics: ``train_loss`` and ``train_ppl`` every step (this worker's batch, not synchronized across
    processes, so that logging adds no communication); ``val_loss``/``val_ppl`` and ``test_loss``/``test_ppl`` per
    evaluation, averaged over all tokens of all processes.

    Args:
        preset: Named size, one of ``tiny``, ``60m``, ``150m``, ``400m`` (see :data:`PRESETS`), or ``None`` to use
            the :class:`GPTConfig` defaults.
        vocab_size: Number of token ids; must be at least the tokenizer's vocabulary size.
        block_size: Longest sequence length.
        n_layer: Number of transformer blocks.
        n_head: Number of attention heads.
        n_embd: Hidden size.
        mlp_ratio: MLP hidden size as a multiple of ``n_embd``.
        dropout: Dropout probability (default ``0.0``).
        bias: Biases in linear layers and layer norms.
        lr: Peak learning rate of AdamW (paper: ``4e-4``).
        weight_decay: AdamW weight decay on the weight matrices (paper: ``0.1``).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: Linear warm-up steps (paper: 1000).
        decay_steps: Step at which the cosine decay ends. ``None`` uses ``Trainer(max_steps)``, or the estimated number
            of optimizer steps when ``max_steps`` is not set.
        min_lr_ratio: The learning rate decays to ``min_lr_ratio * lr``.
        optimizer: ``"adamw"``, or ``"muon"``: Muon (``torch.optim.Muon``) on the weight matrices of the blocks and
            AdamW on the rest (embeddings, norms, biases), as one optimizer
            (:class:`~lightning_diloco.optimizers.MuonAdamW`); the warm-up and cosine schedule apply to both.
        muon_lr: Peak learning rate of Muon (with ``optimizer="muon"``).
        muon_momentum: Momentum of Muon (with ``optimizer="muon"``).
    """

    def __init__(
        self,
        preset: Optional[str] = "tiny",
        vocab_size: Optional[int] = None,
        block_size: Optional[int] = None,
        n_layer: Optional[int] = None,
        n_head: Optional[int] = None,
        n_embd: Optional[int] = None,
        mlp_ratio: Optional[int] = None,
        dropout: float = 0.0,
        bias: bool = False,
        lr: float = 4e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_steps: int = 1000,
        decay_steps: Optional[int] = None,
        min_lr_ratio: float = 0.1,
        optimizer: str = "adamw",
        muon_lr: float = 0.02,
        muon_momentum: float = 0.95,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if optimizer not in ("adamw", "muon"):
            raise ValueError(f"`optimizer` must be 'adamw' or 'muon', got {optimizer!r}.")
        if lr <= 0:
            raise ValueError(f"`lr` must be positive, got {lr}.")
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}.")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"`min_lr_ratio` must be in [0, 1], got {min_lr_ratio}.")
        self.config = GPTConfig.from_preset(
            preset,
            vocab_size=vocab_size,
            block_size=block_size,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            bias=bias,
        )
        self.model = GPT(self.config)
        self.val_loss = MeanMetric()
        self.val_ppl = MeanLossPerplexity()
        self.test_loss = MeanMetric()
        self.test_ppl = MeanLossPerplexity()

    def forward(self, idx: Tensor) -> Tensor:
        """Next-token logits ``[B, T, vocab_size]`` for token ids ``[B, T]``."""
        return self.model(idx)

    @staticmethod
    def split_batch(batch: Union[Tensor, tuple[Tensor, Tensor], list[Tensor]]) -> tuple[Tensor, Tensor]:
        """Turn a batch into ``(inputs, targets)``.

        Args:
            batch: ``[B, T + 1]`` token ids (inputs are all but the last token, targets all but the first), or a pair
                of ``[B, T]`` tensors.
        """
        if isinstance(batch, Tensor):
            if batch.dim() != 2 or batch.size(1) < 2:
                raise ValueError(
                    f"Expected a batch of token ids shaped [B, T + 1] with T >= 1, got {tuple(batch.shape)}."
                )
            return batch[:, :-1], batch[:, 1:]
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise TypeError(f"Expected a [B, T + 1] tensor or an (inputs, targets) pair, got {type(batch).__name__}.")

    def loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy over all positions (computed in float32)."""
        logits = self(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def training_step(self, batch: Union[Tensor, tuple[Tensor, Tensor]], batch_idx: int) -> Tensor:
        loss = self.loss(*self.split_batch(batch))
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_ppl", torch.exp(loss.detach()), prog_bar=True)
        return loss

    def validation_step(self, batch: Union[Tensor, tuple[Tensor, Tensor]], batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss, self.val_ppl, "val")

    def test_step(self, batch: Union[Tensor, tuple[Tensor, Tensor]], batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss, self.test_ppl, "test")

    def _evaluate(self, batch: Any, loss_metric: MeanMetric, ppl_metric: MeanMetric, prefix: str) -> None:
        inputs, targets = self.split_batch(batch)
        loss = self.loss(inputs, targets)
        # weight by tokens so that a smaller last batch counts for what it holds
        loss_metric.update(loss, weight=targets.numel())
        ppl_metric.update(loss, weight=targets.numel())
        self.log(f"{prefix}_loss", loss_metric, prog_bar=True, on_step=False, on_epoch=True)
        self.log(f"{prefix}_ppl", ppl_metric, prog_bar=True, on_step=False, on_epoch=True)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups: linear-layer weight matrices decay, everything else does not."""
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        seen: set[int] = set()
        for module in self.model.modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) in seen or not param.requires_grad:
                    continue
                seen.add(id(param))
                # the output projection shares the embedding matrix; it is only ever seen as the embedding
                is_matrix = isinstance(module, nn.Linear) and name == "weight" and module is not self.model.lm_head
                (decay if is_matrix else no_decay).append(param)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def total_decay_steps(self) -> int:
        """Length of the warm-up plus cosine schedule in optimizer steps."""
        if self.hparams.decay_steps is not None:
            return int(self.hparams.decay_steps)
        trainer = self._trainer
        if trainer is not None and trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        if trainer is not None:
            estimated = trainer.estimated_stepping_batches
            if math.isfinite(estimated):
                return int(estimated)
        raise ValueError(
            "Cannot tell how long the cosine schedule should be. Set `Trainer(max_steps=...)` or pass"
            " `decay_steps` to the module."
        )

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        optimizer: torch.optim.Optimizer
        if h.optimizer == "muon":
            matrices, rest = self.parameter_groups()
            optimizer = MuonAdamW(
                matrices["params"], rest["params"],
                muon={"lr": h.muon_lr, "momentum": h.muon_momentum, "weight_decay": h.weight_decay},
                adamw={"lr": h.lr, "betas": tuple(h.betas), "eps": h.eps, "weight_decay": 0.0},
            )
        else:
            optimizer = torch.optim.AdamW(self.parameter_groups(), lr=h.lr, betas=tuple(h.betas), eps=h.eps)
        schedule = WarmupCosineSchedule(self.hparams.warmup_steps, self.total_decay_steps(), self.hparams.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def config_dict(self) -> dict[str, Any]:
        """The resolved model sizes (preset plus overrides) as a dictionary."""
        return asdict(self.config)


def count_parameters(preset: str, **overrides: Any) -> int:
    """Number of parameters of a preset, built on the ``meta`` device (no memory is allocated).

    Args:
        preset: A key of :data:`PRESETS`.
        **overrides: :class:`GPTConfig` fields replacing the preset's.
    """
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(preset, **overrides))
    return model.num_parameters()
