"""open_clip models for the contrastive trainers, built from a name or an inline architecture."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import open_clip
import torch
from open_clip.model import CustomTextCLIP
from PIL import Image

from mm.errors import UserError


@dataclass
class ClipModelConfig:
    name: str = ""  # an open_clip architecture name (ViT-B-32, ...); or leave empty and give `arch`
    arch: dict = field(default_factory=dict)  # inline open_clip model config: embed_dim, vision_cfg, text_cfg
    pretrained: str = ""  # a local checkpoint file; nothing is downloaded
    # Standard open_clip checkpoints keep the text tower's parameters on the top module; we always
    # build CustomTextCLIP (text tower as its own module) so ZeRO-3 gathers them when the tower runs.


def build_clip(cfg: ClipModelConfig, load_pretrained: bool = True) -> CustomTextCLIP:
    """Build the model; `pretrained` must be a local file (open_clip converts standard checkpoints)."""
    if bool(cfg.name) == bool(cfg.arch):
        raise UserError("model: give exactly one of model.name (an open_clip architecture) or model.arch")
    pretrained = cfg.pretrained if load_pretrained else ""
    if pretrained and not os.path.isfile(pretrained):
        raise UserError(f"model.pretrained: no such file {pretrained!r} (give a local checkpoint path; "
                        "nothing is downloaded)")
    if cfg.arch:
        try:
            model = CustomTextCLIP(**cfg.arch, output_dict=True)
        except TypeError as e:
            raise UserError(f"model.arch: {e}") from None
        if pretrained:
            open_clip.load_checkpoint(model, pretrained)
        return model
    if cfg.name not in open_clip.list_models():
        raise UserError(f"model.name: unknown open_clip architecture {cfg.name!r}")
    return open_clip.create_model(cfg.name, pretrained=pretrained or None, force_custom_text=True,
                                  output_dict=True, pretrained_text=False)


def _arch(cfg: ClipModelConfig) -> dict:
    return cfg.arch or open_clip.get_model_config(cfg.name) or {}


def clip_tokenizer(cfg: ClipModelConfig) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for the architecture (the CLIP BPE ships inside open_clip: no download)."""
    context_length = _arch(cfg).get("text_cfg", {}).get("context_length", 77)
    if cfg.name:
        return open_clip.get_tokenizer(cfg.name, context_length=context_length)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def clip_preprocess(cfg: ClipModelConfig, is_train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's image transform for the architecture's input size (OpenAI mean/std)."""
    size = _arch(cfg).get("vision_cfg", {}).get("image_size", 224)
    return open_clip.image_transform(size, is_train=is_train)


def clip_outputs(model: torch.nn.Module, image: torch.Tensor, text: torch.Tensor) -> dict[str, Any]:
    """Forward through the model's own forward (so ZeRO-3 gathers), with the logit scale clamped.

    The clamp is applied to the value, never in place: an in-place clamp of the parameter after
    step() would be undone by ZeRO-1/2, which keeps the fp32 master copy in the optimizer.
    """
    out = model(image, text)
    out["logit_scale"] = out["logit_scale"].clamp(max=100.0)
    return out
