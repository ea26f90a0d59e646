"""Tests of the command line interface, the configs and the plotting example."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_diloco.cli import DiLoCoCLI, build_cli
from lightning_diloco.data import LMDataModule
from lightning_diloco.gpt import GPTLightningModule

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
# keyword arguments of torch's DistributedDataParallel that must not leak into the strategy's options
DDP_KWARGS = ("find_unused_parameters", "broadcast_buffers", "gradient_as_bucket_view", "static_graph")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """In-process CLI calls get their arguments from `args`, not from pytest's command line."""
    monkeypatch.setattr(sys, "argv", ["lightning-diloco"])


def _run(args, cwd, timeout=300):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("PL_GLOBAL_SEED", None)
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_print_config_shows_the_strategy_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(CONFIGS / "tiny.yaml"), f"--data.cache_dir={tmp_path}", "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_diloco.DiLoCoStrategy"
    init_args = strategy["init_args"]
    assert init_args["inner_steps"] == 50
    assert init_args["outer_lr"] == 0.7 and init_args["outer_momentum"] == 0.9 and init_args["outer_nesterov"] is True
    assert not set(DDP_KWARGS) & set(init_args), sorted(init_args)
    # vocab_size and block_size are linked from the data section, so they are not model options
    assert "vocab_size" not in config["model"] and "block_size" not in config["model"]
    assert config["data"]["vocab_size"] == 2048 and config["data"]["seq_len"] == 128
    assert config["trainer"]["gradient_clip_val"] == 1.0


def test_subcommands():
    assert set(DiLoCoCLI.subcommands()) == {"fit", "validate", "test"}


def test_tiny_config_instantiates(tmp_path):
    from lightning_diloco import DiLoCoStrategy

    cli = build_cli(["--config", str(CONFIGS / "tiny.yaml"), f"--data.cache_dir={tmp_path}"], run=False)
    assert isinstance(cli.model, GPTLightningModule) and isinstance(cli.datamodule, LMDataModule)
    assert cli.model.config.vocab_size == cli.datamodule.hparams.vocab_size == 2048
    assert cli.model.config.block_size == cli.datamodule.hparams.seq_len == 128
    assert isinstance(cli.trainer.strategy, DiLoCoStrategy)
    assert cli.trainer.strategy.inner_steps == 50
    assert cli.trainer.num_devices == 2 and cli.trainer.max_steps == 300
    assert cli.trainer.gradient_clip_val == 1.0
    assert cli.datamodule.source.dataset == "stdlib"


@pytest.mark.parametrize("name", ["tiny_ddp", "c4_150m", "c4_150m_ddp"])
def test_other_configs_instantiate(name, tmp_path):
    args = ["--config", str(CONFIGS / f"{name}.yaml"), f"--data.cache_dir={tmp_path}"]
    if name.startswith("c4"):
        # build on CPU (no GPU needed to check the config); the model is 150M parameters
        args += ["--trainer.accelerator=cpu", "--trainer.precision=32"]
    cli = build_cli(args, run=False)
    hp = cli.datamodule.hparams
    if name.startswith("c4"):
        assert (hp.dataset, hp.dataset_config, hp.streaming) == ("allenai/c4", "en", True)
        assert (hp.seq_len, hp.vocab_size) == (1024, 32000)
        assert cli.trainer.num_devices * hp.batch_size == 512
        assert cli.trainer.max_steps == 88_000
        model = cli.model.hparams
        assert (model.preset, model.lr, model.weight_decay, model.warmup_steps) == ("150m", 4e-4, 0.1, 1000)
        assert 140e6 < cli.model.model.num_parameters() < 160e6
        raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert raw["trainer"]["precision"] == "bf16-mixed"
        if name == "c4_150m":
            assert cli.trainer.strategy.inner_steps == 500
            outer = raw["trainer"]["strategy"]["init_args"]
            assert (outer["outer_lr"], outer["outer_momentum"], outer["outer_nesterov"]) == (0.7, 0.9, True)
    assert ("ddp" in name) == (type(cli.trainer.strategy).__name__ == "DDPStrategy")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real 2-process DiLoCo fit of the tiny config, shortened to 4 steps."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    args = [
        sys.executable, "-m", "lightning_diloco", "fit",
        "--config", str(CONFIGS / "tiny.yaml"),
        "--trainer.max_steps=4",
        "--trainer.strategy.init_args.inner_steps=2",
        "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--model.warmup_steps=2",
        "--data.max_chars=200000",
        "--data.vocab_size=384",
        "--data.seq_len=32",
        "--data.batch_size=4",
        f"--data.cache_dir={workdir / 'cache'}",
    ]  # fmt: skip
    proc = _run(args, cwd=workdir)
    return workdir, proc


def test_tiny_fit_with_two_workers(tiny_run):
    workdir, proc = tiny_run
    run_dir = workdir / "runs" / "tiny" / "version_0"
    assert (run_dir / "config.yaml").is_file()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["strategy"]["init_args"]["inner_steps"] == 2
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    val = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    assert len(train) == 4 and len(val) == 1
    assert all(0 < loss < 10 for loss in train + val)
    assert {"train_ppl", "val_ppl"} <= set(rows[0])
    assert "`Trainer.fit` stopped: `max_steps=4` reached" in proc.stdout + proc.stderr


def test_plot_runs(tiny_run, tmp_path):
    workdir, _ = tiny_run
    out = tmp_path / "curves.png"
    run = workdir / "runs" / "tiny"
    proc = _run(
        [sys.executable, str(ROOT / "examples" / "plot_runs.py"), str(run), str(run / "version_0"), "-o", str(out)],
        cwd=tmp_path,
    )
    assert out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "final val_loss" in proc.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "plot_runs.py"), str(empty)], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "No metrics.csv" in proc.stderr
