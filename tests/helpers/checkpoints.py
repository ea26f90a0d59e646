"""Reading checkpoints in tests: a DiLoCo checkpoint directory whole (as one dictionary), or a single file."""

from pathlib import Path
from typing import Any, Union

import torch

from lightning_diloco import checkpoint_dir
from lightning_diloco.checkpointing import read


def read_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """The checkpoint at ``path`` as one dictionary (see :func:`lightning_diloco.checkpointing.read`)."""
    if checkpoint_dir.is_checkpoint_dir(path):
        return read(path)
    return torch.load(path, map_location="cpu", weights_only=False)
