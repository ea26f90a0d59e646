"""DiLoCoStrategy where code written for DDPStrategy expects a DDPStrategy: its signature, its keywords, pickling for
spawn, every start method, and callbacks that re-register the module's parameters."""

import functools
import inspect
import pickle
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.utils import parametrize, prune

from helpers.launch import run_script
from helpers.toy import ToyModule
from lightning_diloco import DiLoCoStrategy
from lightning_diloco.outer import OuterState, default_outer_optimizer

# ------------------------------------------------------------------------------------------------------------------
# The constructor: DDPStrategy's positional order and keywords
# ------------------------------------------------------------------------------------------------------------------


def test_ddp_positional_arguments_come_first_in_ddps_order():
    ddp = list(inspect.signature(DDPStrategy.__init__).parameters.values())[1:-1]  # without self and **kwargs
    ours = list(inspect.signature(DiLoCoStrategy.__init__).parameters.values())[1 : len(ddp) + 1]
    assert [(p.name, p.default, p.kind) for p in ours] == [(p.name, p.default, p.kind) for p in ddp]
    accelerator = CPUAccelerator()
    strategy = DiLoCoStrategy(accelerator, [torch.device("cpu")] * 2)
    assert strategy.accelerator is accelerator and strategy.parallel_devices == [torch.device("cpu")] * 2
    assert strategy.config.inner_steps == 500


def test_a_number_in_ddps_first_place_says_to_use_keywords():
    with pytest.raises(TypeError, match=r"DiLoCoStrategy\(inner_steps=100\)"):
        DiLoCoStrategy(100)


def test_ddp_keywords_are_accepted_and_kept_for_the_workers_ddp():
    hook = functools.partial(print)
    strategy = DiLoCoStrategy(
        find_unused_parameters=True, static_graph=True, gradient_as_bucket_view=True, broadcast_buffers=False,
        bucket_cap_mb=10, check_reduction=True, ddp_comm_hook=hook, inner_steps=7,
    )
    assert strategy._ddp_kwargs == {
        "find_unused_parameters": True, "static_graph": True, "gradient_as_bucket_view": True,
        "broadcast_buffers": False, "bucket_cap_mb": 10, "check_reduction": True,
    }
    assert strategy._ddp_comm_hook is hook and strategy.config.inner_steps == 7 and strategy.config.outer_bucket_cap_mb == 128


def test_ddp_keywords_are_kept_as_ddp_keeps_them_only_those_given():
    # as Lightning's own test of its registry expects of DDPStrategy
    assert DiLoCoStrategy()._ddp_kwargs == {}
    assert DiLoCoStrategy(find_unused_parameters=False)._ddp_kwargs == {"find_unused_parameters": False}
    assert DDPStrategy(find_unused_parameters=False)._ddp_kwargs == {"find_unused_parameters": False}


def test_a_cli_default_strategy_with_ddp_keywords(monkeypatch):
    from jsonargparse import lazy_instance

    monkeypatch.setattr(sys, "argv", ["any.py", "--trainer.strategy.process_group_backend=gloo",
                                      "--trainer.accelerator=cpu", "--trainer.logger=false"])
    default = lazy_instance(DiLoCoStrategy, find_unused_parameters=True, inner_steps=9)
    cli = LightningCLI(ToyModule, run=False, trainer_defaults={"strategy": default})
    assert cli.config.trainer.strategy.init_args.find_unused_parameters is True
    strategy = cli.config_init.trainer.strategy
    assert isinstance(strategy, DiLoCoStrategy) and strategy is not default
    assert strategy.process_group_backend == "gloo" and strategy.config.inner_steps == 9
    assert strategy._ddp_kwargs == {"find_unused_parameters": True}


def test_lightnings_registry_style_init_params_work():
    trainer = L.Trainer(
        strategy=DiLoCoStrategy(find_unused_parameters=False, start_method="spawn"), accelerator="cpu", devices=2,
        logger=False,
    )
    assert isinstance(trainer.strategy, DiLoCoStrategy) and trainer.strategy._start_method == "spawn"


def test_unknown_keyword_lists_what_is_accepted():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) `find_unused_params`.*find_unused_parameters"):
        DiLoCoStrategy(find_unused_params=True)


def test_post_local_sgd_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match="set\n? ?the period with `inner_steps`|set the period with `inner_steps`"):
        DiLoCoStrategy(model_averaging_period=4)


def test_ddp_keywords_on_one_process_workers_say_they_do_nothing(caplog):
    trainer = L.Trainer(
        strategy=DiLoCoStrategy(inner_steps=2, find_unused_parameters=True), accelerator="cpu", devices=1,
        max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        use_distributed_sampler=False,
    )
    with caplog.at_level("INFO"):
        trainer.fit(ToyModule(), torch.utils.data.DataLoader(_ToyData(), batch_size=4))
    assert "find_unused_parameters configure the DistributedDataParallel inside a worker" in caplog.text


class _ToyData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> Any:
        from helpers.toy import ToyData

        return ToyData()[i]


# ------------------------------------------------------------------------------------------------------------------
# Pickling, as start_method="spawn" does
# ------------------------------------------------------------------------------------------------------------------


def _roundtrip(strategy: DiLoCoStrategy) -> DiLoCoStrategy:
    return pickle.loads(pickle.dumps(strategy))


def test_the_default_strategy_pickles_and_builds_the_same_outer_optimizer():
    copy = _roundtrip(DiLoCoStrategy(outer_lr=0.5, outer_momentum=0.8))
    built = copy.config.build_outer_optimizer()([nn.Parameter(torch.zeros(2))])
    assert isinstance(built, torch.optim.SGD)
    assert (built.defaults["lr"], built.defaults["momentum"], built.defaults["nesterov"]) == (0.5, 0.8, True)


def test_a_partial_outer_optimizer_pickles():
    copy = _roundtrip(DiLoCoStrategy(outer_optimizer=functools.partial(torch.optim.Adam, lr=0.01)))
    built = copy.config.build_outer_optimizer()([nn.Parameter(torch.zeros(2))])
    assert isinstance(built, torch.optim.Adam) and built.defaults["lr"] == 0.01


def test_an_outer_optimizer_from_a_cli_class_path_pickles(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  strategy:\n    class_path: lightning_diloco.DiLoCoStrategy\n    init_args:\n"
        "      inner_steps: 4\n      outer_optimizer:\n        class_path: torch.optim.SGD\n"
        "        init_args: {lr: 0.3, momentum: 0.5}\n"
    )
    cli = LightningCLI(ToyModule, run=False, args=["--trainer.accelerator=cpu", "--trainer.logger=false",
                                                   f"--config={config}"])
    copy = _roundtrip(cli.trainer.strategy)
    built = copy.config.build_outer_optimizer()([nn.Parameter(torch.zeros(2))])
    assert isinstance(built, torch.optim.SGD) and (built.defaults["lr"], built.defaults["momentum"]) == (0.3, 0.5)


# ------------------------------------------------------------------------------------------------------------------
# Every start method: fit, validate, test and predict with 2 CPU processes, as the same popen run
# ------------------------------------------------------------------------------------------------------------------


def _drop_in(out: Path, *args: str) -> list[dict[str, Any]]:
    run_script("drop_in.py", "--out", str(out), *args)
    return [torch.load(path, weights_only=False) for path in sorted(out.glob("rank*.pt"))]


@pytest.fixture(scope="module")
def popen_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _drop_in(tmp_path_factory.mktemp("popen"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_popen_workers_end_equal_and_evaluate(popen_run):
    assert len(popen_run) == 2
    _assert_same_weights(popen_run[0]["final"], popen_run[1]["final"])
    main = popen_run[0]
    assert main["validate"][0]["val_loss"] == pytest.approx(main["test"][0]["test_loss"])  # the same loader
    assert sum(len(batch) for batch in main["predict"]) == 32  # rank 0's share of the 64 samples
    assert main["best_model_path"].endswith(".ckpt")


@pytest.mark.parametrize("strategy", ["diloco_spawn", "diloco_notebook"])
def test_spawn_and_notebook_end_where_popen_ends(popen_run, tmp_path, strategy):
    (main,) = _drop_in(tmp_path, "--strategy", strategy)
    _assert_same_weights(main["final"], popen_run[0]["final"])  # the main process holds the global model
    assert main["validate"] == popen_run[0]["validate"] and main["test"] == popen_run[0]["test"]
    # as with ddp_spawn, predictions stay in the worker processes; the checkpoint path comes back
    assert main["predict"] is None
    assert Path(main["best_model_path"]).name == Path(popen_run[0]["best_model_path"]).name


def test_ddp_keywords_reach_a_workers_ddp(tmp_path):
    ranks = _drop_in(tmp_path, "--worker-ddp")  # the script asserts on the DistributedDataParallel it finds
    _assert_same_weights(ranks[0]["final"], ranks[1]["final"])


# ------------------------------------------------------------------------------------------------------------------
# Parameters re-registered during training (pruning, parametrizations)
# ------------------------------------------------------------------------------------------------------------------


def test_model_pruning_trains_through_outer_steps(tmp_path):
    ranks = _drop_in(tmp_path, "--prune")
    _assert_same_weights(ranks[0]["final"], ranks[1]["final"])  # the same masks and the same global weights
    weight = ranks[0]["final"]["net.0.weight"]
    assert "net.0.weight_orig" not in ranks[0]["final"]  # ModelPruning made it permanent at the end
    assert (weight == 0).float().mean() >= 0.3  # pruned at every epoch end by 30% of what is left


def test_a_parametrization_added_mid_training(tmp_path):
    ranks = _drop_in(tmp_path, "--parametrize")
    _assert_same_weights(ranks[0]["final"], ranks[1]["final"])
    assert "net.3.parametrizations.weight.original" in ranks[0]["final"]


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


def test_outer_state_follows_a_pruned_weight_with_its_momentum():
    model = _linear()
    outer = OuterState(model, default_outer_optimizer(lr=0.7, momentum=0.9, nesterov=True), "cpu")
    first = model[0].weight
    with torch.no_grad():
        first.add_(0.1)  # one round of local progress
    outer.step(outer.pseudo_gradients(torch.device("cpu")))
    global_before = outer.params[0].detach().clone()
    momentum_before = outer.optimizer.state[outer.params[0]]["momentum_buffer"].clone()
    outer.copy_to(model)

    prune.l1_unstructured(model[0], "weight", amount=0.5)  # `weight` becomes `weight_orig` (the same tensor) + a mask
    assert outer.changed(model)
    assert [id(t) for t in outer.untracked(model)] == [id(model[0].weight_mask)]
    outer.follow(model)
    assert not outer.changed(model)
    j = outer.names.index("0.weight_orig")
    assert outer.locals[j] is first and torch.equal(outer.params[j], global_before)
    with torch.no_grad():
        first.sub_(0.2)  # the next round
    delta = outer.pseudo_gradients(torch.device("cpu"))
    outer.step(delta)
    momentum = 0.9 * momentum_before + delta[j]  # the momentum carried over, by the Nesterov formula
    torch.testing.assert_close(outer.params[j].detach(), global_before - 0.7 * (delta[j] + 0.9 * momentum))
    state = outer.module_state_dict(model)
    torch.testing.assert_close(state["0.weight_orig"], outer.params[j].detach())
    assert torch.equal(state["0.weight_mask"], model[0].weight_mask)


def test_outer_state_follows_a_parametrization():
    model = _linear()
    outer = OuterState(model, default_outer_optimizer(), "cpu")
    weight = model[1].weight
    parametrize.register_parametrization(model[1], "weight", nn.Identity())
    assert outer.changed(model) and outer.untracked(model) == []  # the same tensor, under a new name
    outer.follow(model)
    (j,) = [i for i, t in enumerate(outer.locals) if t is weight]
    assert outer.names[j] == "1.parametrizations.weight.original"


def test_per_step_broadcasts_of_lightning_callbacks_are_named(tmp_path):
    """`max_time` makes Lightning's Timer broadcast rank 0's clock at every step; it works, and the user is told."""
    run_script("train_toy.py", "--out", str(tmp_path / "timed"), "--max-time", "00:01:00:00", "--val", "0")
    run_script("train_toy.py", "--out", str(tmp_path / "untimed"), "--val", "0")
    said = "broadcast rank 0's decision at every training step"
    for name, warned in (("timed", True), ("untimed", False)):
        ranks = [torch.load(tmp_path / name / f"rank{r}.pt", weights_only=False) for r in range(2)]
        assert any(said in w for w in ranks[0]["warnings"]) is warned
        _assert_same_weights(ranks[0]["final"], ranks[1]["final"])
