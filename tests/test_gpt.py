"""Tests of the GPT model and its LightningModule."""

import itertools
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_diloco.gpt import (
    GPT,
    PRESETS,
    GPTConfig,
    GPTLightningModule,
    WarmupCosineSchedule,
    count_parameters,
)

SMALL = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)


def test_forward_shape_and_dtype():
    model = GPT(SMALL)
    idx = torch.randint(0, SMALL.vocab_size, (3, 11))
    logits = model(idx)
    assert logits.shape == (3, 11, SMALL.vocab_size)
    assert logits.dtype == torch.float32


def test_sequence_longer_than_block_size_is_rejected():
    model = GPT(SMALL)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, SMALL.block_size + 1, dtype=torch.long))


def test_causal_masking():
    """Changing token k may change logits at positions >= k only."""
    torch.manual_seed(0)
    model = GPT(SMALL).double().eval()
    idx = torch.randint(0, SMALL.vocab_size, (2, SMALL.block_size))
    k = 9
    changed = idx.clone()
    changed[:, k] = (changed[:, k] + 1) % SMALL.vocab_size
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :k], after[:, :k], rtol=0, atol=1e-12)
    assert not torch.allclose(before[:, k:], after[:, k:])


def test_embeddings_are_tied():
    model = GPT(SMALL)
    assert model.lm_head.weight is model.wte.weight
    untied = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert untied - model.num_parameters() == SMALL.vocab_size * SMALL.n_embd
    # the output layer's gradient lands on the shared matrix
    model(torch.randint(0, SMALL.vocab_size, (1, 4))).sum().backward()
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("preset", "millions"), [("60m", 60), ("150m", 150), ("400m", 400)])
def test_paper_preset_sizes(preset, millions):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(preset))
    assert all(p.is_meta for p in model.parameters())
    n = model.num_parameters()
    assert n == count_parameters(preset)
    assert abs(n / 1e6 - millions) / millions < 0.1, f"{preset}: {n / 1e6:.1f}M parameters"


def test_paper_preset_shapes():
    assert (PRESETS["60m"]["n_layer"], PRESETS["60m"]["n_embd"], PRESETS["60m"]["n_head"]) == (3, 896, 16)
    assert (PRESETS["150m"]["n_layer"], PRESETS["150m"]["n_embd"], PRESETS["150m"]["n_head"]) == (12, 896, 16)
    assert (PRESETS["400m"]["n_layer"], PRESETS["400m"]["n_embd"], PRESETS["400m"]["n_head"]) == (12, 1536, 12)
    assert all(PRESETS[p]["vocab_size"] == 32000 for p in ("60m", "150m", "400m"))


def test_tiny_preset_is_cpu_sized():
    assert 0.5e6 <= count_parameters("tiny") <= 1.0e6


def test_config_errors():
    with pytest.raises(ValueError, match="Unknown model preset"):
        GPTConfig.from_preset("1b")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="vocab_size"):
        GPTConfig(vocab_size=0)


def test_module_overrides_preset():
    module = GPTLightningModule(preset="tiny", vocab_size=300, block_size=40, n_layer=1)
    assert module.config.vocab_size == 300
    assert module.config.block_size == 40
    assert module.config.n_layer == 1
    assert module.config.n_embd == PRESETS["tiny"]["n_embd"]
    assert module.hparams.lr == 4e-4 and module.hparams.weight_decay == 0.1
    assert module.config.dropout == 0.0


def test_batch_formats_give_the_same_loss():
    torch.manual_seed(0)
    module = GPTLightningModule(preset=None, vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)
    batch = torch.randint(0, 50, (2, 9))
    loss_packed = module.loss(*module.split_batch(batch))
    loss_pair = module.loss(*module.split_batch((batch[:, :-1], batch[:, 1:])))
    torch.testing.assert_close(loss_packed, loss_pair)
    # an untrained model predicts roughly uniformly
    assert abs(loss_packed.item() - math.log(50)) < 0.5
    with pytest.raises(ValueError, match=r"\[B, T \+ 1\]"):
        module.split_batch(torch.zeros(4, dtype=torch.long))


def test_weight_decay_only_on_linear_weight_matrices():
    module = GPTLightningModule(preset=None, vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=True)
    decay, no_decay = module.parameter_groups()
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decay_ids = {id(p) for p in decay["params"]}
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert {names[i] for i in decay_ids} == {
        f"blocks.{b}.{layer}.weight" for b in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
    }
    # every parameter is in exactly one group, the tied embedding once
    all_ids = [id(p) for group in (decay, no_decay) for p in group["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(list(module.model.parameters()))
    assert id(module.model.wte.weight) not in decay_ids


def test_warmup_cosine_schedule():
    schedule = WarmupCosineSchedule(warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.55)
    assert schedule(110) == pytest.approx(0.1)
    assert schedule(500) == pytest.approx(0.1)
    values = [schedule(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


class _Repeating(Dataset):
    """The same short token pattern over and over: a model can learn it in a few dozen steps."""

    def __init__(self, length: int = 17, size: int = 256) -> None:
        self.sequence = torch.tensor([(3 * i) % 13 for i in range(length)])
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.roll(self.sequence, -(index % 13))


class _Recorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_loss_falls_on_a_tiny_run(tmp_path):
    L.seed_everything(0)
    module = GPTLightningModule(
        preset=None, vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32, lr=3e-3, warmup_steps=5
    )
    recorder = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=40,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(_Repeating(), batch_size=8, shuffle=True))
    first, last = sum(recorder.losses[:3]) / 3, sum(recorder.losses[-3:]) / 3
    assert first > 2.0
    assert last < 0.5 * first, recorder.losses
    # warm-up then cosine decay over max_steps
    assert recorder.lrs[0] == pytest.approx(3e-3 / 5)
    assert max(recorder.lrs) == pytest.approx(3e-3)
    assert recorder.lrs[-1] < 0.2 * 3e-3
    assert trainer.logged_metrics.keys() >= {"train_loss", "train_ppl"}
    torch.testing.assert_close(trainer.logged_metrics["train_ppl"], trainer.logged_metrics["train_loss"].exp())

    result = trainer.validate(module, DataLoader(_Repeating(size=32), batch_size=8), verbose=False)[0]
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]), rel=1e-5)
    assert result["val_loss"] < first


def test_cosine_length_needs_a_bound():
    module = GPTLightningModule(preset=None, vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)
    with pytest.raises(ValueError, match="max_steps"):
        module.total_decay_steps()
    module = GPTLightningModule(preset=None, vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8, decay_steps=7)
    assert module.total_decay_steps() == 7
