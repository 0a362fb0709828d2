"""FILIP: token-wise late-interaction contrastive pretraining (docs/methods.md §1) on the shared engine.

The loss's memory settings (loss.chunk_size, loss.gather_dtype, loss.keep_*_tokens) change how
the loss is computed, not the model: a run may resume with other values. Configs and exports written
when they sat under `model:` are read with them moved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from mm.config import RunConfig
from mm.data.loader import Loader
from mm.engine.task import ONE_RANK, World
from mm.errors import UserError
from mm.losses.filip import FilipLoss
from mm.models.clip import clip_preprocess, clip_tokenizer
from mm.models.filip import FilipModel, FilipModelConfig
from mm.tasks.base import TaskBase, image_text_batches, zeroshot_metrics

GATHER_DTYPES = {"": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class FilipLossConfig:
    chunk_size: int = 0  # text candidates per similarity chunk; 0 = sized automatically
    gather_dtype: str = ""  # dtype text tokens are all-gathered in: "" (as they are), bf16, fp16
    keep_image_tokens: float = 0.0  # FILIP token reduction: fraction of image tokens kept; 0 = off
    keep_text_tokens: float = 0.0  # the same for text tokens, chosen before the gather (FILIP: 0.25 both)


@dataclass
class FilipRunConfig(RunConfig):
    model: FilipModelConfig = field(default_factory=FilipModelConfig)
    loss: FilipLossConfig = field(default_factory=FilipLossConfig)

    MOVED: ClassVar[dict[str, str]] = {**RunConfig.MOVED, **{f"model.{k}": f"loss.{k}" for k in
                                                             ("chunk_size", "gather_dtype", "keep_image_tokens")}}


def check_loss_config(loss: FilipLossConfig) -> None:
    if loss.chunk_size < 0:
        raise UserError(f"loss.chunk_size must be >= 0 (0 = auto), got {loss.chunk_size}")
    if loss.gather_dtype not in GATHER_DTYPES:
        raise UserError(f"loss.gather_dtype must be one of '', bf16, fp16; got {loss.gather_dtype!r}")
    for key in ("keep_image_tokens", "keep_text_tokens"):
        value = getattr(loss, key)
        if not 0 <= value <= 1:
            raise UserError(f"loss.{key} must be in [0, 1] (0 = off), got {value}")


class FilipTask(TaskBase):
    name = "filip"
    config_class = FilipRunConfig

    def __init__(self, cfg: FilipRunConfig | None = None) -> None:
        super().__init__(cfg)
        lc = self.cfg.loss
        check_loss_config(lc)
        self.loss = FilipLoss(chunk_size=lc.chunk_size or None, gather_dtype=GATHER_DTYPES[lc.gather_dtype],
                              keep_image_tokens=lc.keep_image_tokens or None,
                              keep_text_tokens=lc.keep_text_tokens or None)

    def build_model(self, load_pretrained: bool = True) -> torch.nn.Module:
        return FilipModel(self.cfg.model, load_pretrained)

    def batches(self, split: str, world: World = ONE_RANK, state: dict | None = None) -> Loader:
        return image_text_batches(self.cfg, split, world, state)

    def losses(self, model: torch.nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        return self.loss_from_embeddings(self.embed(model, batch), batch)

    # The embed / loss split that train.contrastive_accum accumulates contrastive batches with.
    def embed(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        # Through the model's own forward (the engine's), so ZeRO-3 gathers every parameter it uses.
        return model(batch["image"], batch["text"])

    def loss_from_embeddings(self, embeddings: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        e = embeddings
        return self.loss(e["image_tokens"], e["image_mask"], e["text_tokens"], e["text_mask"], e["logit_scale"])

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Pooled (CLIP-style, mean of normalised tokens) and token-wise zero-shot metrics."""
        return zeroshot_metrics(model, self.cfg, *self.eval_inputs(), scorings=("pooled", "tokenwise"))

    def eval_inputs(self) -> tuple[Callable, Callable]:
        return clip_tokenizer(self.cfg.model), clip_preprocess(self.cfg.model, False)
