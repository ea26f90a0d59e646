"""The cache-building command, ``python -m lightning_diloco.data CONFIG``, run ahead of a (multi-GPU) training run.

:func:`prepare_main` builds the token cache of a LightningCLI config's ``data`` section on its own, so that a long
build (the C4 stream of the paper setup) does not keep a run's other processes waiting at a barrier.
"""

import json
from pathlib import Path
from typing import Optional

from lightning_diloco.data.datamodule import LMDataModule
from lightning_diloco.data.tokens import describe_splits


def prepare_main(argv: Optional[list[str]] = None) -> Path:
    """Build the token cache of a config's ``data`` section ahead of a (multi-GPU) run.

    ``python -m lightning_diloco.data configs/c4_150m.yaml [--cache_dir DIR]``. Useful when building the cache takes
    long: in a training run, the other processes wait for it at a barrier that times out after 30 minutes by default.

    Args:
        argv: Command-line arguments; ``sys.argv[1:]`` when ``None``.

    Returns:
        The cache directory.
    """
    import argparse

    import yaml

    parser = argparse.ArgumentParser(prog="python -m lightning_diloco.data", description=prepare_main.__doc__)
    parser.add_argument("config", help="A LightningCLI YAML config with a `data:` section.")
    parser.add_argument("--cache_dir", default=None, help="Override `data.cache_dir`.")
    args = parser.parse_args(argv)
    with open(args.config) as f:
        config = yaml.safe_load(f) or {}
    data = config.get("data") or {}
    data = dict(data.get("init_args", data))
    if args.cache_dir is not None:
        data["cache_dir"] = args.cache_dir
    datamodule = LMDataModule(**data)
    datamodule.prepare_data()
    meta = json.loads((datamodule.cache_path / "meta.json").read_text())
    print(f"{datamodule.cache_path}: {describe_splits(meta['splits'])}")
    return datamodule.cache_path
