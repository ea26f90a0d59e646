"""Tests of the command line interface, the configs and the plotting example."""

import csv
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import TQDMProgressBar

from helpers import launch
from helpers.launch import ROOT
from helpers.checkpoints import read_checkpoint
from lightning_diloco import DiLoCoStrategy
from lightning_diloco.cli import DiLoCoCLI, build_cli
from lightning_diloco.data import LMDataModule
from lightning_diloco.gpt import GPT, GPTConfig, GPTLightningModule
from lightning_diloco.progress import DiLoCoProgressBar, FitSummary

CONFIGS = ROOT / "configs"
# DistributedDataParallel's keyword arguments that DDPStrategy passes through **kwargs: not the strategy's options
DDP_KWARGS = ("check_reduction", "process_group", "output_device", "device_ids")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """In-process CLI calls get their arguments from `args`, not from pytest's command line."""
    monkeypatch.setattr(sys, "argv", ["lightning-diloco"])


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _values(rows, column):
    return [float(r[column]) for r in rows if r.get(column)]


def _closing_line(output):
    lines = [line for line in output.splitlines() if line.startswith("Run finished:")]
    assert len(lines) == 1, output[-3000:]  # rank 0 only
    return lines[0]


def _amount(text):
    value, unit = text.split()
    return float(value) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


def test_print_config_shows_the_strategy_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(CONFIGS / "tiny.yaml"), f"--data.cache_dir={tmp_path}", "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_diloco.DiLoCoStrategy"
    init_args = strategy["init_args"]
    written = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())["trainer"]["strategy"]["init_args"]
    assert init_args["inner_steps"] == written["inner_steps"]
    assert init_args["sync_warmup_steps"] == written["sync_warmup_steps"] > 0
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
    written = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())["trainer"]["strategy"]["init_args"]
    assert cli.trainer.strategy.config.inner_steps == written["inner_steps"]
    assert cli.trainer.strategy.config.sync_warmup_steps == written["sync_warmup_steps"]
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
            assert cli.trainer.strategy.config.inner_steps == 500
            outer = raw["trainer"]["strategy"]["init_args"]
            assert (outer["outer_lr"], outer["outer_momentum"], outer["outer_nesterov"]) == (0.7, 0.9, True)
    assert ("ddp" in name) == (type(cli.trainer.strategy).__name__ == "DDPStrategy")


#: the data and schedule of the shortened tiny runs (each of `fit`, `validate`, `test` takes them)
TINY_DATA = [
    "--data.max_chars=200000",
    "--data.vocab_size=384",
    "--data.seq_len=32",
    "--data.batch_size=4",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.enable_progress_bar=false",
]


def _tiny_config_checkpointing_every_2_steps(directory):
    """configs/tiny.yaml with its ModelCheckpoint saving every 2 steps; all its other settings (save_last) kept."""
    config = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    (checkpoint,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(".ModelCheckpoint")]
    checkpoint["init_args"]["every_n_train_steps"] = 2
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# the tiny config shortened: one synchronous step, then H=2; validation at step 4
TINY_SHORT = [
    "--trainer.strategy.init_args.inner_steps=2", "--trainer.strategy.init_args.sync_warmup_steps=1",
    "--trainer.val_check_interval=4", "--trainer.log_every_n_steps=1", "--model.warmup_steps=2",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real 2-process DiLoCo fit of the tiny config, shortened to 4 steps (checkpoints at steps 2 and 4)."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    config = _tiny_config_checkpointing_every_2_steps(workdir)
    args = [
        sys.executable, "-m", "lightning_diloco", "fit",
        "--config", str(config),
        *TINY_DATA,
        "--trainer.max_steps=4",
        *TINY_SHORT,
        f"--data.cache_dir={workdir / 'cache'}",
    ]  # fmt: skip
    proc = launch.run(args, timeout=300, cwd=workdir)
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
    proc = launch.run(
        [sys.executable, str(ROOT / "examples" / "plot_runs.py"), str(run), str(run / "version_0"), "-o", str(out)],
        timeout=300, cwd=tmp_path,
    )
    assert out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "final val_loss" in proc.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = launch.run([sys.executable, ROOT / "examples" / "plot_runs.py", empty], timeout=300, cwd=tmp_path,
                      returncode=1)
    assert "No metrics.csv" in proc.stderr


def test_tiny_fit_ends_with_the_closing_line(tiny_run):
    workdir, proc = tiny_run
    rows = _rows(workdir / "runs" / "tiny" / "version_0" / "metrics.csv")
    line = _closing_line(proc.stdout + proc.stderr)
    assert line.startswith(f"Run finished: {os.path.join('runs', 'tiny', 'version_0')} | ")
    assert f"val_ppl {_values(rows, 'val_ppl')[-1]:.2f}" in line
    # the strategy logs every outer step's bytes; the line adds them up
    sent = _values(rows, "diloco/bytes_sent")
    assert len(sent) == 2 and f"in {len(sent)} outer steps)" in line  # after DiLoCo's step 2, and a final one
    gpt = GPT(GPTConfig.from_preset("tiny", vocab_size=384, block_size=32))
    params = gpt.num_parameters()
    # one synchronous warm-up step: a ring all-reduce of the gradients and of a flag per parameter tensor
    warmup = 2 * (2 - 1) / 2 * (params + len(list(gpt.parameters()))) * 4
    assert _amount(line.split("DiLoCo ")[1].split(" (")[0]) == pytest.approx(sum(sent) + warmup, rel=5e-3)
    assert _amount(line.split("(")[1].split(" in the synchronous warm-up")[0]) == pytest.approx(warmup, rel=5e-3)
    ddp = 4 * 2 * (2 - 1) / 2 * params * 4  # 4 steps of a ring all-reduce of fp32 gradients among 2 workers
    assert f"{params:,} fp32 gradients among 2 workers" in line
    assert _amount(line.split("DDP would send ")[1].split(" for")[0]) == pytest.approx(ddp, rel=5e-3)


def test_token_cache_message_reports_the_test_split_as_the_validation_split(tiny_run):
    workdir, proc = tiny_run
    (meta,) = (workdir / "cache").glob("*/meta.json")
    splits = json.loads(meta.read_text())["splits"]
    assert splits["test"]["documents"] == 0  # test_fraction=0: LMDataModule tests on the validation documents
    (line,) = [x for x in (proc.stdout + proc.stderr).splitlines() if "Token cache ready" in x]
    val = splits["val"]
    assert f"test = val {val['documents']} documents / {val['tokens']} tokens" in line
    assert "test 0 documents" not in line


def test_tiny_config_keeps_one_copy_of_the_last_checkpoint(tiny_run):
    workdir, _ = tiny_run
    checkpoints = workdir / "runs" / "tiny" / "version_0" / "checkpoints"
    files = [p for p in checkpoints.iterdir() if not p.is_symlink()]
    assert len(files) == 1 and "step=4" in files[0].name, sorted(p.name for p in checkpoints.iterdir())
    last = checkpoints / "last.ckpt"
    assert last.is_symlink() and last.resolve() == files[0].resolve()
    assert read_checkpoint(last)["global_step"] == 4


def test_resume_from_the_last_link_and_the_final_outer_step_in_the_closing_line(tiny_run, tmp_path):
    workdir, _ = tiny_run
    last = workdir / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    args = [
        str(Path(sys.executable).parent / "lightning-diloco"), "fit",
        "--config", str(workdir / "tiny.yaml"),
        *TINY_DATA,
        "--trainer.max_steps=5",  # one step after the checkpoint: its round closes in the strategy's on_train_end
        *TINY_SHORT,
        f"--data.cache_dir={workdir / 'cache'}",
        f"--ckpt_path={last}",
    ]  # fmt: skip
    proc = launch.run(args, timeout=300, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert f"Restored all states from the checkpoint at {last}" in output
    rows = _rows(tmp_path / "runs" / "tiny" / "version_0" / "metrics.csv")
    assert [int(r["step"]) for r in rows if r.get("train_loss")] == [4]  # the 5th optimizer step alone
    sent = _values(rows, "diloco/bytes_sent")
    line = _closing_line(output)
    assert len(sent) == 1 and "(1 outer steps)" in line and "for the same 1 steps" in line
    assert _amount(line.split("DiLoCo ")[1].split(" (")[0]) == pytest.approx(sent[0], rel=5e-3)


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_evaluation_logs_into_the_run_folder_of_its_checkpoint(tiny_run, subcommand):
    workdir, _ = tiny_run
    run = workdir / "runs" / "tiny" / "version_0"
    training_metrics = (run / "metrics.csv").read_bytes()
    args = [
        str(Path(sys.executable).parent / "lightning-diloco"), subcommand,
        "--config", str(workdir / "tiny.yaml"),
        *TINY_DATA,
        f"--data.cache_dir={workdir / 'cache'}",
        "--ckpt_path", os.path.join("runs", "tiny", "version_0", "checkpoints", "last.ckpt"),
    ]  # fmt: skip
    proc = launch.run(args, timeout=300, cwd=workdir)
    output = proc.stdout + proc.stderr
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]  # no new version without training metrics
    assert (run / "metrics.csv").read_bytes() == training_metrics
    evaluation = run / subcommand / "version_0"
    assert f"logs to {os.path.join('runs', 'tiny', 'version_0', subcommand, 'version_0')}" in output
    assert (evaluation / "config.yaml").is_file()
    got = _values(_rows(evaluation / "metrics.csv"), f"{'val' if subcommand == 'validate' else 'test'}_loss")
    # the checkpoint holds the weights of the fit's validation at step 4 (right after the outer step), and the test
    # split is the validation split (test_fraction=0)
    assert got == pytest.approx([_values(_rows(run / "metrics.csv"), "val_loss")[-1]], rel=1e-5)
    assert "dirpath has changed" not in output
    if subcommand == "test":
        (meta,) = (workdir / "cache").glob("*/meta.json")
        val = json.loads(meta.read_text())["splits"]["val"]
        assert f"Testing on test = val {val['documents']} documents / {val['tokens']} tokens" in output


def _plot_runs_module():
    spec = importlib.util.spec_from_file_location("plot_runs", ROOT / "examples" / "plot_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_runs_takes_the_newest_version_with_training_metrics(tiny_run, tmp_path, capsys):
    workdir, _ = tiny_run
    runs = tmp_path / "runs" / "tiny"
    (runs / "version_0").mkdir(parents=True)
    shutil.copy(workdir / "runs" / "tiny" / "version_0" / "metrics.csv", runs / "version_0" / "metrics.csv")
    for version, val_loss in ((1, 9.5), (10, 8.5)):  # what an evaluation-only run leaves: one validation row
        (runs / f"version_{version}").mkdir()
        (runs / f"version_{version}" / "metrics.csv").write_text(f"epoch,step,val_loss,val_ppl\n0,0,{val_loss},1\n")
    plot_runs = _plot_runs_module()
    plot_runs.main([str(runs), "-o", str(tmp_path / "curves.png")])
    out = capsys.readouterr().out
    assert "using version_0, the newest version with `train_loss` values" in out
    assert "(newer without them: version_1, version_10)" in out
    val = _values(_rows(runs / "version_0" / "metrics.csv"), "val_loss")
    assert f"final val_loss {val[-1]:.4f}" in out
    assert plot_runs.find_metrics(runs) == runs / "version_0" / "metrics.csv"
    # with no version that trained, the newest is used, and said so
    shutil.rmtree(runs / "version_0")
    path, note = plot_runs.choose_version(runs)
    assert path == runs / "version_10" / "metrics.csv" and "no version has `train_loss` values" in note


# ------------------------------------------------------------------------------------------------------------------
# Argument errors: one line
# ------------------------------------------------------------------------------------------------------------------

ARGUMENT_ERRORS = {
    "inner_steps": ("--trainer.strategy.init_args.inner_steps=0", lambda: DiLoCoStrategy(inner_steps=0)),
    "outer_momentum": ("--trainer.strategy.init_args.outer_momentum=2", lambda: DiLoCoStrategy(outer_momentum=2.0)),
    "lr": ("--model.lr=-1", lambda: GPTLightningModule(lr=-1.0)),
    "val_fraction": ("--data.val_fraction=2", lambda: LMDataModule(val_fraction=2.0)),
    # raised by the strategy when the Trainer is built, before any process is started
    "processes_per_worker": (
        "--trainer.strategy.init_args.processes_per_worker=3",
        lambda: L.Trainer(strategy=DiLoCoStrategy(processes_per_worker=3), accelerator="cpu", devices=2, logger=False),
    ),
}


@pytest.mark.parametrize("name", list(ARGUMENT_ERRORS))
def test_argument_errors_print_one_line(name, tmp_path, capsys):
    arg, build = ARGUMENT_ERRORS[name]
    with pytest.raises((ValueError, TypeError)) as expected:
        build()
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(CONFIGS / "tiny.yaml"), f"--data.cache_dir={tmp_path}", arg])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith(f"lightning-diloco fit: error: {expected.value}\n") and "Traceback" not in err


def test_errors_outside_the_package_keep_their_traceback(tmp_path):
    with pytest.raises(ValueError, match="num_nodes"):  # Lightning's own
        build_cli(["fit", "--config", str(CONFIGS / "tiny.yaml"), f"--data.cache_dir={tmp_path}",
                   "--trainer.num_nodes=0"])


def test_argument_error_of_the_console_script_is_one_line(tmp_path):
    proc = launch.run(
        [str(Path(sys.executable).parent / "lightning-diloco"), "fit", "--config", str(CONFIGS / "tiny.yaml"),
         f"--data.cache_dir={tmp_path}", "--trainer.strategy.init_args.outer_momentum=2"],
        timeout=300, cwd=tmp_path, returncode=2,
    )
    with pytest.raises(ValueError) as expected:
        DiLoCoStrategy(outer_momentum=2.0)
    assert proc.stderr.splitlines()[-1] == f"lightning-diloco fit: error: {expected.value}"
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------------------------
# Progress bar and closing line by default; the strategy's help
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, bar",
    [
        ([], DiLoCoProgressBar),
        (["--trainer.enable_progress_bar=false"], None),
        (["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"], TQDMProgressBar),
    ],
)
def test_cli_adds_the_step_progress_bar_unless_configured_otherwise(extra, bar, tmp_path):
    cli = build_cli(["--config", str(CONFIGS / "tiny.yaml"), f"--data.cache_dir={tmp_path}", *extra], run=False)
    assert type(cli.trainer.progress_bar_callback) is (type(None) if bar is None else bar)
    assert sum(isinstance(c, FitSummary) for c in cli.trainer.callbacks) == 1


def _help(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(list(args))
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_strategy_help_takes_a_registered_name(capsys):
    by_class = _help(capsys, "fit", "--trainer.strategy.help", "lightning_diloco.DiLoCoStrategy")
    assert "--trainer.strategy.inner_steps" in by_class
    assert _help(capsys, "fit", "--trainer.strategy.help", "diloco") == by_class
    ddp = _help(capsys, "fit", "--trainer.strategy.help", "lightning.pytorch.strategies.DDPStrategy")
    assert _help(capsys, "fit", "--trainer.strategy.help=ddp") == ddp != by_class


def test_fit_help_says_how_to_see_the_strategy_options(capsys):
    text = " ".join(_help(capsys, "fit", "--help").split())
    commands = set(re.findall(r"`(lightning-diloco fit --trainer\.strategy\.help \w+)`", text))
    assert commands, text[:2000]
    by_class = _help(capsys, "fit", "--trainer.strategy.help", "lightning_diloco.DiLoCoStrategy")
    for command in commands:  # the command the help suggests prints DiLoCo's options
        assert _help(capsys, *command.split()[1:]) == by_class


def test_two_islands_through_the_command_line(tmp_path):
    """Islands mode from `lightning-diloco`: a coordinator and two `fit` launches of the tiny config, each on its own
    half of the data, meet at outer steps."""
    pytest.importorskip("torchft")
    port = launch.free_port()
    coordinator = launch.start([sys.executable, "-m", "lightning_diloco", "coordinator", "--port", str(port),
                                "--grace", "3", "--heartbeat-timeout", "2"], merge=True)
    islands = []
    for shard, name in enumerate("ab"):
        s = "--trainer.strategy.init_args."
        args = [
            sys.executable, "-m", "lightning_diloco", "fit", "--config", str(CONFIGS / "tiny.yaml"), *TINY_DATA,
            "--trainer.devices=1", "--trainer.max_steps=8", f"{s}inner_steps=4", f"{s}sync_warmup_steps=0",
            f"{s}coordinator=127.0.0.1:{port}", f"{s}island={name}", f"{s}island_address=127.0.0.1",
            f"{s}sync_timeout=30", "--trainer.val_check_interval=8", "--trainer.log_every_n_steps=1",
            f"--data.shard={shard}", "--data.num_shards=2", f"--data.cache_dir={tmp_path / 'cache'}",
            f"--trainer.logger.init_args.name={name}",
        ]
        env = launch.clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(launch.free_port()))
        islands.append(launch.start(args, env=env, cwd=tmp_path, merge=True))
    done = launch.finish(islands, 300)
    launch.finish([coordinator], 1)
    for name, proc in zip("ab", done):
        assert proc.returncode == 0, launch.failure_summary(proc.stdout)
        assert "among 2 workers" in _closing_line(proc.stdout)  # the islands it met, not its own one process
        rows = _rows(tmp_path / "runs" / name / "version_0" / "metrics.csv")
        assert max(_values(rows, "diloco/islands")) == 2
        saved = yaml.safe_load((tmp_path / "runs" / name / "version_0" / "config.yaml").read_text())
        assert (saved["data"]["shard"], saved["data"]["num_shards"]) == ("ab".index(name), 2)


def test_an_outer_lr_scheduler_from_the_command_line(tmp_path, monkeypatch):
    """`--trainer.strategy.init_args.outer_lr_scheduler=<class path>` with its `init_args`: the strategy gets a callable
    that builds that scheduler on the outer optimizer."""
    from lightning_diloco.cli import build_cli

    monkeypatch.chdir(tmp_path)
    cli = build_cli([
        "--config", str(Path(__file__).parent.parent / "configs" / "tiny.yaml"),
        "--trainer.strategy.init_args.outer_lr_scheduler=torch.optim.lr_scheduler.ExponentialLR",
        "--trainer.strategy.init_args.outer_lr_scheduler.gamma=0.5",
    ], run=False)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.7)
    scheduler = cli.trainer.strategy.config.outer_lr_scheduler(optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.ExponentialLR)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.35)


def test_an_outer_momentum_schedule_and_eager_updates_from_the_command_line(tmp_path, monkeypatch):
    """`outer_momentum_schedule` as a `class_path` with `init_args`, and `eager_rounds`, reach the strategy."""
    from lightning_diloco.cli import build_cli
    from lightning_diloco.schedules import MomentumWarmupDecay

    monkeypatch.chdir(tmp_path)
    cli = build_cli([
        "--config", str(Path(__file__).parent.parent / "configs" / "tiny.yaml"),
        "--trainer.strategy.init_args.outer_momentum_schedule=lightning_diloco.schedules.MomentumWarmupDecay",
        "--trainer.strategy.init_args.outer_momentum_schedule.warmup_steps=4",
        "--trainer.strategy.init_args.eager_rounds=1",
    ], run=False)
    config = cli.trainer.strategy.config
    assert isinstance(config.outer_momentum_schedule, MomentumWarmupDecay)
    assert [config.outer_momentum_schedule(n) for n in (0, 2, 4, 9)] == pytest.approx([0.0, 0.45, 0.9, 0.9])
    assert config.eager_rounds == 1
