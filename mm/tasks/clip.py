"""The CLIP baseline: any open_clip architecture, InfoNCE over the global batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mm.config import RunConfig
from mm.data.loader import Loader
from mm.engine.task import ONE_RANK, World
from mm.losses.contrastive import clip_loss
from mm.models.clip import ClipModelConfig, build_clip, clip_outputs, clip_preprocess, clip_tokenizer
from mm.tasks.base import TaskBase, image_text_batches, zeroshot_metrics


@dataclass
class ClipRunConfig(RunConfig):
    model: ClipModelConfig = field(default_factory=ClipModelConfig)


class ClipTask(TaskBase):
    name = "clip"
    config_class = ClipRunConfig

    def __init__(self, cfg: ClipRunConfig | None = None) -> None:
        super().__init__(cfg)
        self.loss = clip_loss  # InfoNCE has no settings: the temperature is a model parameter

    def build_model(self, load_pretrained: bool = True) -> torch.nn.Module:
        return build_clip(self.cfg.model, load_pretrained)

    def batches(self, split: str, world: World = ONE_RANK, state: dict | None = None) -> Loader:
        return image_text_batches(self.cfg, split, world, state)

    def losses(self, model: torch.nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        return self.loss_from_embeddings(self.embed(model, batch), batch)

    # The embed / loss split that train.contrastive_accum accumulates contrastive batches with.
    def embed(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        out = clip_outputs(model, batch["image"], batch["text"])
        return {k: out[k] for k in ("image_features", "text_features", "logit_scale")}

    def loss_from_embeddings(self, embeddings: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        return self.loss(embeddings["image_features"], embeddings["text_features"], embeddings["logit_scale"])

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return zeroshot_metrics(model, self.cfg, *self.eval_inputs())

    def eval_inputs(self) -> tuple[Callable, Callable]:
        return clip_tokenizer(self.cfg.model), clip_preprocess(self.cfg.model, False)
