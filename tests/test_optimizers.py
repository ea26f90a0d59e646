"""MuonAdamW: Muon on the weight matrices and AdamW on the rest, as one optimizer; and the GPT module trained with it
under DiLoCo."""

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from helpers.checkpoints import read_checkpoint
from lightning_diloco import DiLoCoStrategy
from lightning_diloco.gpt import GPTLightningModule
from lightning_diloco.optimizers import MuonAdamW


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _steps(net: torch.nn.Module, optimizers: list[torch.optim.Optimizer], n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(5, 8, generator=g)
        for o in optimizers:
            o.zero_grad()
        net(x).pow(2).mean().backward()
        for o in optimizers:
            o.step()


def test_a_step_is_torch_muon_on_matrices_then_adamw_on_the_rest():
    net, ref = _net(), _net()
    matrices, rest = MuonAdamW.split(net.parameters())
    assert [p.shape for p in matrices] == [(16, 8), (4, 16)]
    muon, adamw = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.1}, {"lr": 1e-3, "weight_decay": 0.0}
    optimizer = MuonAdamW(matrices, rest, muon=muon, adamw=adamw)
    ref_matrices, ref_rest = MuonAdamW.split(ref.parameters())
    apart = [torch.optim.Muon(ref_matrices, **muon), torch.optim.AdamW(ref_rest, **adamw)]
    _steps(net, [optimizer], 3, seed=1)
    _steps(ref, apart, 3, seed=1)
    for a, b in zip(net.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(net[0].weight, _net()[0].weight)
    # one optimizer's state dict, which a fresh one loads and goes on from exactly
    again = _net()
    again.load_state_dict(net.state_dict())
    loaded = MuonAdamW(*MuonAdamW.split(again.parameters()), muon=muon, adamw=adamw)
    loaded.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    _steps(net, [optimizer], 2, seed=2)
    _steps(again, [loaded], 2, seed=2)
    for a, b in zip(net.parameters(), again.parameters()):
        assert torch.equal(a, b)
    # a scheduler of the one optimizer moves both
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 0.0005]


def _gpt(**kwargs) -> GPTLightningModule:
    torch.manual_seed(0)
    return GPTLightningModule(preset=None, vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16,
                              warmup_steps=2, decay_steps=12, **kwargs)


def _tokens() -> DataLoader:
    g = torch.Generator().manual_seed(3)
    return DataLoader(list(torch.randint(0, 64, (12, 17), generator=g)), batch_size=2)


def _fit(tmp_path, max_epochs: int, ckpt_path=None, ckpt: bool = False) -> GPTLightningModule:
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1,
                                                     save_on_train_epoch_end=True)] if ckpt else []
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=DiLoCoStrategy(inner_steps=4), max_epochs=max_epochs,
                        logger=False, enable_checkpointing=ckpt, callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False)
    module = _gpt(optimizer="muon")
    trainer.fit(module, _tokens(), ckpt_path=ckpt_path)
    return module


def test_the_gpt_trained_with_muon_under_diloco_resumes_bitwise(tmp_path):
    module = _gpt(optimizer="muon")
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, MuonAdamW)
    muon = {id(p) for g in optimizer.param_groups if g["optimizer"] == "muon" for p in g["params"]}
    blocks = {id(m.weight) for m in module.model.blocks.modules() if isinstance(m, torch.nn.Linear)}
    assert muon == blocks  # the blocks' weight matrices; not the (tied) embedding
    full = _fit(tmp_path, 2, ckpt=True)  # 6 steps per epoch, H = 4: the epoch-end checkpoint is mid-round
    ckpt = tmp_path / "ckpt" / "epoch=0-step=6.ckpt"
    assert read_checkpoint(ckpt)["diloco"]["step"] == 6
    resumed = _fit(tmp_path / "again", 2, ckpt_path=ckpt)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_unknown_gpt_optimizer_is_refused():
    with pytest.raises(ValueError, match=r"`optimizer` must be 'adamw' or 'muon', got 'sgd'\."):
        _gpt(optimizer="sgd")
