"""DiLoCoStrategy against an independent simulation, in real multi-process runs (gloo on CPU)."""

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DistributedSampler

from helpers.checkpoints import read_checkpoint
from helpers.launch import load_ranks, run_script
from helpers.reference import simulate
from helpers.toy import ToyData

K, H, STEPS = 2, 5, 24  # 3 epochs of 8 batches: epoch ends (8, 16) fall mid-round, the last round is partial


@pytest.fixture(scope="module")
def diloco_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """k=2 workers, AdamW inner, Nesterov outer, H=3, 20 steps (2.5 epochs), a checkpoint at every epoch end."""
    out = tmp_path_factory.mktemp("diloco")
    run_script("train_toy.py", "--out", str(out), "--ckpt-dir", str(out / "ckpt"), "--inner-steps", str(H))
    return out, load_ranks(out, K)


def _simulate(ranks: list[dict[str, Any]], **kwargs: Any):
    indices = [r["indices"] for r in ranks]
    args = dict(init_seed=1000, inner_steps=H, outer_lr=0.7, outer_momentum=0.9)
    args.update(kwargs)
    return simulate(indices, **args)


def test_workers_see_disjoint_shards_of_distributed_sampler(diloco_run):
    _, ranks = diloco_run
    data = ToyData()
    for rank, record in enumerate(ranks):
        expected = []
        for epoch in range(3):
            sampler = DistributedSampler(data, num_replicas=K, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            order = list(sampler)
            expected += [order[i : i + 4] for i in range(0, len(order), 4)]
        assert record["indices"] == expected[:STEPS]
    for b in range(STEPS):
        assert not set(ranks[0]["indices"][b]) & set(ranks[1]["indices"][b])


def test_ranks_start_differently_but_train_from_rank_zero(diloco_run):
    _, ranks = diloco_run
    assert not torch.allclose(ranks[0]["init"], ranks[1]["init"])


def test_two_workers_equal_the_simulation(diloco_run):
    _, ranks = diloco_run
    sim = _simulate(ranks)
    assert sim.syncs == [5, 10, 15, 20, 24]
    for rank, record in enumerate(ranks):
        for b, local in enumerate(record["local"]):
            torch.testing.assert_close(local, sim.local[rank][b], rtol=0, atol=1e-6)
        for key, value in sim.final.items():
            torch.testing.assert_close(record["final"][key], value, rtol=0, atol=1e-6, msg=key)


def test_an_outer_lr_schedule_follows_the_reference_and_resumes_bitwise(tmp_path):
    """``outer_lr_scheduler=ExponentialLR(gamma=0.5)``: the n-th outer step has lr 0.7 * 0.5^n, as the reference
    computes it; a resume from a mid-round checkpoint goes on with the schedule where it was, bitwise."""
    args = ("--inner-steps", str(H), "--outer-lr-decay", "0.5")
    run_script("train_toy.py", "--out", str(tmp_path / "full"), "--ckpt-dir", str(tmp_path / "ckpt"), *args)
    ranks = load_ranks(tmp_path / "full", K)
    sim = _simulate(ranks, outer_lr=lambda n: 0.7 * 0.5**n)
    constant = _simulate(ranks)
    for rank, record in enumerate(ranks):
        for key, value in sim.final.items():
            torch.testing.assert_close(record["final"][key], value, rtol=0, atol=1e-6, msg=key)
    assert not torch.allclose(constant.final["net.0.weight"], sim.final["net.0.weight"], atol=1e-4)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=8.ckpt"  # 3 steps into round 2, one outer step taken
    assert read_checkpoint(ckpt)["diloco"]["outer"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.35)
    run_script("train_toy.py", "--out", str(tmp_path / "resumed"), "--resume", str(ckpt), *args)
    for rank, record in enumerate(load_ranks(tmp_path / "resumed", K)):
        for key, value in ranks[rank]["final"].items():
            assert torch.equal(record["final"][key], value), key


def test_an_outer_momentum_warmup_and_decay_follow_the_reference_and_resume_bitwise(tmp_path):
    """``MomentumWarmupDecay(warmup_steps=2, total_steps=6, decay_steps=2, final=0.5)`` gives the 5 outer steps of
    this run the momenta 0, 0.45, 0.9, 0.9, 0.7 (the first one with an empty buffer, which then holds its gradient),
    as the reference computes them by formula; a mid-round resume continues the schedule bitwise."""
    args = ("--inner-steps", str(H), "--momentum-warmup", "2")
    run_script("train_toy.py", "--out", str(tmp_path / "full"), "--ckpt-dir", str(tmp_path / "ckpt"), *args)
    ranks = load_ranks(tmp_path / "full", K)
    momenta = [0.0, 0.45, 0.9, 0.9, 0.7]
    sim = _simulate(ranks, outer_momentum=lambda n: momenta[n])
    for rank, record in enumerate(ranks):
        for b, local in enumerate(record["local"]):
            torch.testing.assert_close(local, sim.local[rank][b], rtol=0, atol=1e-6)
        for key, value in sim.final.items():
            torch.testing.assert_close(record["final"][key], value, rtol=0, atol=1e-6, msg=key)
    constant = _simulate(ranks)
    assert not torch.allclose(constant.final["net.0.weight"], sim.final["net.0.weight"], atol=1e-4)
    ckpt = tmp_path / "ckpt" / "epoch=1-step=16.ckpt"  # 1 step into round 4, three outer steps taken
    run_script("train_toy.py", "--out", str(tmp_path / "resumed"), "--resume", str(ckpt), *args)
    for rank, record in enumerate(load_ranks(tmp_path / "resumed", K)):
        for key, value in ranks[rank]["final"].items():
            assert torch.equal(record["final"][key], value), key


def test_local_weights_differ_between_syncs_and_agree_after(diloco_run):
    _, ranks = diloco_run
    for b, step in enumerate(ranks[0]["steps"]):
        same = torch.equal(ranks[0]["local"][b], ranks[1]["local"][b])
        assert same == (step % H == 0), f"step {step}"
    torch.testing.assert_close(ranks[0]["final"], ranks[1]["final"], rtol=0, atol=0)


def test_validation_sees_global_weights(diloco_run):
    _, ranks = diloco_run
    sim = _simulate(ranks)
    steps = [step for step, _ in ranks[0]["val"]]
    assert steps == [0, 8, 16, 24]  # sanity check, then every epoch end
    for record in ranks:
        for step, weights in record["val"]:
            last_sync = step - step % H
            torch.testing.assert_close(weights, sim.global_at[last_sync], rtol=0, atol=1e-6)
            if step % H:
                assert not torch.allclose(weights, record["local"][step - 1])


def test_checkpoint_holds_global_model_and_every_worker(diloco_run):
    out, ranks = diloco_run
    sim = _simulate(ranks)
    ckpt = read_checkpoint(out / "ckpt" / "epoch=0-step=8.ckpt")
    state = ckpt["diloco"]
    assert (state["step"], state["last_sync"], state["num_workers"]) == (8, [5], K)
    assert state["outer"]["outer_step"] == 1
    global_flat = torch.cat([v.reshape(-1) for k, v in ckpt["state_dict"].items() if not k.endswith(("_mean", "_var", "tracked"))])
    torch.testing.assert_close(global_flat, sim.global_at[5], rtol=0, atol=1e-6)
    for rank in range(K):
        local = torch.cat([v.reshape(-1) for k, v in state["workers"][rank]["module"].items() if not k.endswith(("_mean", "_var", "tracked"))])
        torch.testing.assert_close(local, sim.local[rank][7], rtol=0, atol=1e-6)
    # every worker's inner optimizer state is its own (and worker 0's is the consolidated `optimizer_states`)
    assert ckpt["optimizer_states"] is state["workers"][0]["optimizer_states"]
    states = [w["optimizer_states"] for w in state["workers"]]
    exp_avg = [s[0]["state"][0]["exp_avg"] for s in states]
    assert not torch.equal(exp_avg[0], exp_avg[1])  # inner optimizer states are per worker


def test_mid_round_resume_is_bitwise_exact(diloco_run, tmp_path):
    out, ranks = diloco_run
    ckpt = out / "ckpt" / "epoch=0-step=8.ckpt"  # step 8: three steps into the second round
    run_script("train_toy.py", "--out", str(tmp_path / "resumed"), "--resume", str(ckpt), "--inner-steps", str(H))
    resumed = load_ranks(tmp_path / "resumed", K)
    for rank in range(K):
        for key, value in ranks[rank]["final"].items():
            assert torch.equal(resumed[rank]["final"][key], value), key
        assert not any("no DiLoCo state" in w for w in resumed[rank]["warnings"])

    # Without the DiLoCo state the same resume starts a new round from the global weights, and must differ.
    stripped = read_checkpoint(ckpt)
    del stripped["diloco"]
    torch.save(stripped, tmp_path / "plain.ckpt")
    run_script("train_toy.py", "--out", str(tmp_path / "plain"), "--resume", str(tmp_path / "plain.ckpt"),
               "--inner-steps", str(H))
    plain = load_ranks(tmp_path / "plain", K)
    assert any("no DiLoCo state" in w for w in plain[0]["warnings"])
    assert not torch.allclose(plain[0]["final"]["net.0.weight"], ranks[0]["final"]["net.0.weight"], atol=1e-4)


def test_h1_with_sgd_equals_synchronous_ddp(tmp_path):
    common = ["--optimizer", "sgd", "--lr", "0.1", "--max-steps", "6"]
    run_script("train_toy.py", "--out", str(tmp_path / "ddp"), "--strategy", "ddp", *common)
    run_script("train_toy.py", "--out", str(tmp_path / "diloco"), "--inner-steps", "1", "--outer-lr", "1",
               "--outer-momentum", "0", *common)
    ddp, diloco = load_ranks(tmp_path / "ddp", K), load_ranks(tmp_path / "diloco", K)
    assert ddp[0]["indices"] == diloco[0]["indices"]
    for b in range(6):
        torch.testing.assert_close(diloco[0]["local"][b], ddp[0]["local"][b], rtol=0, atol=1e-6)
    # and DiLoCo with H=1 is not trivially equal to anything: AdamW inner with the default outer differs
    assert not torch.allclose(diloco[0]["local"][0], diloco[0]["init"])


# ------------------------------------------------------------------------------------------------------------------
# One worker, in this process
# ------------------------------------------------------------------------------------------------------------------

import lightning as L  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from helpers.toy import ToyModule, loaders  # noqa: E402
from lightning_diloco import DiLoCoStrategy  # noqa: E402
from lightning_diloco.checkpointing import consolidate  # noqa: E402


def _fit(strategy: Any, module: L.LightningModule, steps: int = 12, **trainer_kwargs: Any) -> L.Trainer:
    train, val = loaders()
    kwargs = dict(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  use_distributed_sampler=False)
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(strategy=strategy, **kwargs)
    trainer.fit(module, train, val)
    return trainer


def test_one_worker_with_outer_sgd_lr1_equals_plain_training():
    diloco = ToyModule()
    _fit(DiLoCoStrategy(inner_steps=4, outer_lr=1.0, outer_momentum=0.0), diloco, steps=10)
    plain = ToyModule()
    _fit("auto", plain, steps=10)
    assert diloco.record["indices"] == plain.record["indices"]
    for a, b in zip(diloco.record["local"], plain.record["local"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # the default outer optimizer does move the weights away from plain training
    nesterov = ToyModule()
    _fit(DiLoCoStrategy(inner_steps=4), nesterov, steps=10)
    assert not torch.allclose(nesterov.record["local"][-1], plain.record["local"][-1], atol=1e-3)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_gradient_accumulation_counts_optimizer_steps(manual: bool):
    module = ToyModule(manual=manual, accumulate=2)
    accumulate = {} if manual else {"accumulate_grad_batches": 2}
    trainer = _fit(DiLoCoStrategy(inner_steps=3), module, steps=7, **accumulate)
    assert trainer.global_step == 7 and len(module.record["indices"]) == 14
    assert trainer.strategy.outer.outer_step == 3  # after steps 3 and 6, and the final partial round
    sim = simulate([module.record["indices"]], init_seed=1000, inner_steps=3, outer_lr=0.7, outer_momentum=0.9,
                   accumulate=2)
    assert sim.syncs == [3, 6, 7]
    for b, local in enumerate(module.record["local"]):
        torch.testing.assert_close(local, sim.local[0][b], rtol=0, atol=1e-6)


def test_outer_step_metrics_reach_the_logger(tmp_path):
    trainer = _fit(DiLoCoStrategy(inner_steps=4), ToyModule(), steps=9, logger=CSVLogger(tmp_path, name="run"))
    import csv

    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = [(int(r["step"]), r) for r in rows if r.get("diloco/outer_step")]
    assert [float(r["diloco/outer_step"]) for _, r in logged] == [1.0, 2.0, 3.0]
    assert [step for step, _ in logged] == [4, 8, 9]
    for _, r in logged:
        assert float(r["diloco/pseudo_grad_norm"]) > 0
        assert float(r["diloco/sync_seconds"]) >= 0
        assert float(r["diloco/bytes_sent"]) == 0.0  # one worker sends nothing


def test_eval_weights_local_sees_the_replica():
    module = ToyModule()
    _fit(DiLoCoStrategy(inner_steps=5, eval_weights="local"), module, steps=8, limit_val_batches=1,
         val_check_interval=8, num_sanity_val_steps=0)
    (step, weights), = module.record["val"]
    assert step == 8
    torch.testing.assert_close(weights, module.record["local"][7], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"inner_steps": 0}, r"`inner_steps` must be an integer >= 1"),
        ({"inner_steps": 2.5}, r"`inner_steps` must be an integer >= 1"),
        ({"outer_lr": 0.0}, r"`outer_lr` must be a positive number"),
        ({"outer_lr": float("nan")}, r"`outer_lr` must be a positive number"),
        ({"outer_momentum": 1.0}, r"`outer_momentum` must be in \[0, 1\)"),
        ({"outer_momentum": -0.1}, r"`outer_momentum` must be in \[0, 1\)"),
        ({"eval_weights": "best"}, r"`eval_weights` must be 'global' or 'local'"),
        ({"outer_device": "gpu0"}, r"`outer_device='gpu0'` is not a device"),
        ({"outer_bucket_cap_mb": 0}, r"`outer_bucket_cap_mb` must be positive"),
        (
            {"outer_optimizer": lambda p: torch.optim.Adam(p), "outer_lr": 0.5},
            r"`outer_lr` configure the default outer optimizer, which `outer_optimizer` replaces",
        ),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        DiLoCoStrategy(**kwargs)


def test_sync_batchnorm_is_refused():
    with pytest.raises(ValueError, match=r"`Trainer\(sync_batchnorm=True\)` would all-reduce .* Set `sync_batchnorm=False`"):
        _fit(DiLoCoStrategy(inner_steps=2), ToyModule(), steps=2, sync_batchnorm=True)


class TwoOptimizers(ToyModule):
    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[3].parameters(), lr=0.1)]


def test_two_optimizers_are_refused():
    with pytest.raises(ValueError, match=r"supports one inner optimizer, but `configure_optimizers` returned 2"):
        _fit(DiLoCoStrategy(inner_steps=2), TwoOptimizers(manual=True), steps=2)


def test_outer_optimizer_must_return_an_optimizer():
    with pytest.raises(TypeError, match=r"`outer_optimizer` must return a `torch.optim.Optimizer`"):
        _fit(DiLoCoStrategy(inner_steps=2, outer_optimizer=lambda params: list(params)), ToyModule(), steps=2)


def _checkpoint(tmp_path: Path, steps: int = 3) -> Path:
    trainer = _fit(DiLoCoStrategy(inner_steps=2), ToyModule(), steps=steps)
    path = tmp_path / "one.ckpt"
    trainer.save_checkpoint(path)
    return path


class Wider(ToyModule):
    def __init__(self) -> None:
        super().__init__()
        self.net[3] = torch.nn.Linear(16, 2)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = _checkpoint(tmp_path)
    trainer = L.Trainer(strategy=DiLoCoStrategy(inner_steps=2), accelerator="cpu", devices=1, max_steps=4,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"(?s)does not fit this LightningModule.*net.3.weight.*Pass the checkpoint"):
        trainer.fit(Wider(), loaders()[0], ckpt_path=path)


def test_checkpoint_after_fit_holds_the_global_model(tmp_path):
    path = _checkpoint(tmp_path, steps=3)  # H=2: the final outer step closes round two after step 3
    ckpt = read_checkpoint(path)
    assert ckpt["diloco"]["step"] == 3 and ckpt["diloco"]["last_sync"] == [3]
    consolidate(path, tmp_path / "model.ckpt")  # the checkpoint directory as one Lightning file
    restored = ToyModule.load_from_checkpoint(tmp_path / "model.ckpt")
    for (name, a), b in zip(restored.state_dict().items(), ckpt["diloco"]["workers"][0]["module"].values()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------------------------------
# Registry and LightningCLI
# ------------------------------------------------------------------------------------------------------------------


def test_registered_names_and_start_methods():
    import importlib

    import lightning_diloco
    from lightning.pytorch.strategies import StrategyRegistry

    importlib.reload(lightning_diloco)  # a second import must not raise
    for name, method in [("diloco", "popen"), ("diloco_spawn", "spawn"), ("diloco_fork", "fork")]:
        assert name in StrategyRegistry
        trainer = L.Trainer(strategy=name, accelerator="cpu", devices=1, logger=False)
        assert isinstance(trainer.strategy, DiLoCoStrategy)
        assert trainer.strategy._start_method == method


def test_lightning_cli_flags_and_yaml(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["train.py"])  # the CLI's arguments come from `args`, not pytest's command line
    from lightning.pytorch.cli import LightningCLI

    base = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false"]
    cli = LightningCLI(ToyModule, run=False, args=[*base, "--trainer.strategy=lightning_diloco.DiLoCoStrategy",
                                                   "--trainer.strategy.inner_steps=7",
                                                   "--trainer.strategy.outer_lr=0.5"])
    assert isinstance(cli.trainer.strategy, DiLoCoStrategy) and cli.trainer.strategy.config.inner_steps == 7
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  strategy:\n    class_path: lightning_diloco.DiLoCoStrategy\n    init_args:\n"
        "      inner_steps: 11\n      outer_device: cpu\n      outer_optimizer:\n        class_path: torch.optim.Adam\n"
        "        init_args: {lr: 0.01}\n"
    )
    cli = LightningCLI(ToyModule, run=False, args=[*base, f"--config={config}"])
    strategy = cli.trainer.strategy
    assert strategy.config.inner_steps == 11
    built = strategy.config.build_outer_optimizer()([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(built, torch.optim.Adam) and built.defaults["lr"] == 0.01
    with pytest.raises(SystemExit):
        LightningCLI(ToyModule, run=False, args=[*base, f"--config={config}", "--print_config"])
    printed = capsys.readouterr().out
    assert "inner_steps: 11" in printed
    # DDP's keywords are explicit arguments; DistributedDataParallel's other ones are not dumped into the config
    assert "find_unused_parameters: null" in printed and "static_graph: null" in printed
    assert "check_reduction" not in printed and "process_group:" not in printed and "output_device" not in printed


def _outer_step_warnings(strategy: DiLoCoStrategy, **trainer_kwargs: Any) -> list[str]:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(strategy, ToyModule(), **trainer_kwargs)
    return [str(w.message) for w in caught if "The first outer step comes after" in str(w.message)]


def test_warns_when_no_outer_step_falls_before_the_end():
    (message,) = _outer_step_warnings(DiLoCoStrategy(), steps=20)  # the paper's H=500 on a 20-step run
    assert "after 500 more optimizer steps" in message and "training ends after 20" in message
    assert _outer_step_warnings(DiLoCoStrategy(inner_steps=20), steps=20) == []
    (message,) = _outer_step_warnings(DiLoCoStrategy(inner_steps=10, sync_warmup_steps=15), steps=20)
    assert "after 25 more optimizer steps" in message


def test_warns_when_validation_comes_before_the_first_outer_step():
    val = {"limit_val_batches": 1, "val_check_interval": 4, "check_val_every_n_epoch": None}
    (message,) = _outer_step_warnings(DiLoCoStrategy(inner_steps=6), steps=12, **val)
    assert "validation first runs after 4" in message and "untrained global weights" in message
    assert _outer_step_warnings(DiLoCoStrategy(inner_steps=4), steps=12, **val) == []
    assert _outer_step_warnings(DiLoCoStrategy(inner_steps=6, eval_weights="local"), steps=12, **val) == []
    # with a warm-up the global weights are the synchronously trained ones, not untrained ones
    assert _outer_step_warnings(DiLoCoStrategy(inner_steps=6, sync_warmup_steps=2), steps=12, **val) == []


def test_processes_per_worker_is_checked_before_processes_start():
    # the Trainer's constructor raises, in this one process, before `fit` would launch the other two
    with pytest.raises(ValueError, match=r"`processes_per_worker=2` does not divide the 3 processes"):
        L.Trainer(strategy=DiLoCoStrategy(processes_per_worker=2), accelerator="cpu", devices=3, logger=False)


