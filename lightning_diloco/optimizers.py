"""Muon for the weight matrices and AdamW for the rest, as one ``torch.optim.Optimizer``.

Muon (``torch.optim.Muon``) orthogonalizes the momentum of a 2-D weight matrix with a Newton-Schulz iteration; it is
meant for the hidden matrices of a network, with AdamW for embeddings, norms and biases (MuLoCo, arXiv 2505.23725,
runs it as DiLoCo's inner optimizer). Lightning and DiLoCo's checkpoints expect one optimizer per module, so
:class:`MuonAdamW` is one: its parameter groups are Muon's followed by AdamW's, and the two share its ``state``, so
``state_dict``, ``load_state_dict``, learning-rate schedulers and Lightning's learning-rate monitor see one optimizer.
A step is Muon's step of its groups, then AdamW's of theirs, exactly as the two optimizers would take them apart.

Muon needs whole matrices: with ``sharding="fsdp"`` every process holds chunks of each matrix, and Muon on a chunk is
not Muon on the matrix, so shard a Muon-trained model only where the matrices stay whole.
"""

from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.optim import AdamW, Muon, Optimizer

__all__ = ["MuonAdamW"]


class MuonAdamW(Optimizer):
    """Muon on ``muon_params`` (2-D weight matrices) and AdamW on ``adamw_params``.

    Args:
        muon_params: parameters or parameter groups for Muon (every tensor 2-D).
        adamw_params: parameters or parameter groups for AdamW.
        muon: keyword arguments of ``torch.optim.Muon`` (``lr``, ``momentum``, ``weight_decay``, ...).
        adamw: keyword arguments of ``torch.optim.AdamW`` (``lr``, ``betas``, ``eps``, ``weight_decay``, ...).

    """

    def __init__(
        self, muon_params: Iterable[Any], adamw_params: Iterable[Any], muon: Optional[dict[str, Any]] = None,
        adamw: Optional[dict[str, Any]] = None,
    ) -> None:
        self._muon = Muon(muon_params, **(muon or {}))
        self._adamw = AdamW(adamw_params, **(adamw or {}))
        for group in self._muon.param_groups:
            group["optimizer"] = "muon"
        for group in self._adamw.param_groups:
            group["optimizer"] = "adamw"
        super().__init__([*self._muon.param_groups, *self._adamw.param_groups], {})
        self._share()

    def _share(self) -> None:
        """Let the two optimizers work on this optimizer's groups and state (after a ``load_state_dict`` too)."""
        self._muon.param_groups = [g for g in self.param_groups if g["optimizer"] == "muon"]
        self._adamw.param_groups = [g for g in self.param_groups if g["optimizer"] == "adamw"]
        self._muon.state = self.state
        self._adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon.step()
        self._adamw.step()
        return loss

    @staticmethod
    def split(params: Iterable[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``params`` as (2-D, the rest)."""
        params = list(params)
        return [p for p in params if p.dim() == 2], [p for p in params if p.dim() != 2]
