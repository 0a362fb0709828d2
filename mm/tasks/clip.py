"""The CLIP baseline: any open_clip architecture, InfoNCE over the global batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mm.config import RunConfig
from mm.data.classnames import load_classnames, load_templates
from mm.data.image_text import image_text_map
from mm.data.loader import Loader, StreamSpec, default_collate
from mm.losses.contrastive import clip_loss
from mm.metrics.zeroshot import evaluate_zeroshot
from mm.models.clip import ClipModelConfig, build_clip, clip_outputs, clip_preprocess, clip_tokenizer
from mm.tasks.base import Task


@dataclass
class ClipRunConfig(RunConfig):
    model: ClipModelConfig = field(default_factory=ClipModelConfig)


def image_text_batches(cfg: ClipRunConfig, split: str, rank: int, world_size: int,
                       state: dict | None) -> Loader:
    """The shared image-text loader for the contrastive tasks."""
    train = split == "train"
    spec = StreamSpec(
        urls=cfg.data.train if train else cfg.data.val,
        sample_map=image_text_map(clip_preprocess(cfg.model, is_train=train), clip_tokenizer(cfg.model)),
        collate=default_collate, batch_size=cfg.data.batch_size, seed=cfg.train.seed, rank=rank,
        world_size=world_size, num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer if train else 0, repeat=train,
        resampled=cfg.data.resampled and train, weights=cfg.data.train_weights if train else [],
        retries=cfg.data.retries,
    )
    return Loader(spec, state=state, max_bad_fraction=cfg.data.max_bad_fraction)


def zeroshot_metrics(model: torch.nn.Module, cfg: ClipRunConfig) -> dict[str, float]:
    if not cfg.eval.zeroshot_data:
        return {}
    device = next(model.parameters()).device
    metrics = evaluate_zeroshot(model, clip_tokenizer(cfg.model), clip_preprocess(cfg.model, False),
                                cfg.eval.zeroshot_data, load_classnames(cfg.eval.classnames),
                                load_templates(cfg.eval.templates), cfg.eval.batch_size, device=device)
    return {f"zeroshot/{k}": v for k, v in metrics.items()}


class ClipTask(Task):
    name = "clip"
    config_class = ClipRunConfig

    def build_model(self, cfg: ClipRunConfig, load_pretrained: bool = True) -> torch.nn.Module:
        return build_clip(cfg.model, load_pretrained)

    def batches(self, cfg: ClipRunConfig, split: str, rank: int = 0, world_size: int = 1,
                state: dict | None = None) -> Loader:
        return image_text_batches(cfg, split, rank, world_size, state)

    def losses(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        out = clip_outputs(model, batch["image"], batch["text"])
        return clip_loss(out["image_features"], out["text_features"], out["logit_scale"])

    def evaluate(self, model: torch.nn.Module, cfg: ClipRunConfig) -> dict[str, float]:
        return zeroshot_metrics(model, cfg)
