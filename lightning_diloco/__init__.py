"""DiLoCo (Distributed Low-Communication training) as a PyTorch Lightning strategy.

Importing this package registers ``Trainer(strategy="diloco")`` (and ``diloco_spawn``, ``diloco_fork``,
``diloco_notebook``).
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_diloco.outer import OuterState, default_outer_optimizer
from lightning_diloco.strategy import DiLoCoStrategy, OuterSyncError

__version__ = "0.1.0"
__all__ = ["DiLoCoStrategy", "OuterState", "OuterSyncError", "default_outer_optimizer"]

DiLoCoStrategy.register_strategies(StrategyRegistry)
