"""The Task contract: what makes the trainers interchangeable on the one engine."""

from __future__ import annotations

from typing import Any

import torch

from mm.config import RunConfig
from mm.data.loader import Loader


class Task:
    """A trainer plugs into the engine by implementing these; the engine knows nothing else of it.

    - build_model: the nn.Module whose trainable parameters are exactly those meant to train;
    - batches: an iterable of batches built on mm.data (with a state_dict for exact resume);
    - losses: named scalar tensors, `loss` the one to optimise; called on the engine so that
      ZeRO-3 gathers parameters through the model's own forward;
    - evaluate: named floats; called on every rank (ZeRO-3 gathers are collective).
    """

    name: str = ""
    config_class: type = RunConfig

    def check_config(self, cfg: Any) -> None:
        """Raise UserError on values the config types cannot check; runs before any input is read."""

    def build_model(self, cfg: Any, load_pretrained: bool = True) -> torch.nn.Module:
        raise NotImplementedError

    def batches(self, cfg: Any, split: str, rank: int = 0, world_size: int = 1,
                state: dict | None = None) -> Loader:
        raise NotImplementedError

    def losses(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, cfg: Any) -> dict[str, float]:
        return {}

    # A task whose model is mostly frozen pretrained weights may export only what trains; loading then
    # rebuilds the rest from the base checkpoint (mm.engine.checkpoint.load_exported).
    def export_keys(self, model: torch.nn.Module, cfg: Any) -> set[str] | None:
        """State-dict keys the exported file holds; None = every weight (a full export)."""
        return None

    def export_metadata(self, cfg: Any) -> dict[str, str]:
        """Extra metadata of a trainable-only export (what identifies its base weights)."""
        return {}

    def build_export_base(self, cfg: Any, meta: dict[str, str], path: str,
                          base_checkpoint: str | None = None) -> torch.nn.Module:
        """The model with its base weights loaded, for a trainable-only export to complete."""
        raise NotImplementedError(f"{self.name} has no trainable-only exports")
