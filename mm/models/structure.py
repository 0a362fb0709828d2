"""The STRUCTURE model: a frozen vision and text encoder, each read at one chosen layer, with a trained
head per modality into a shared space; a CLIP-like model with encode_image / encode_text.

What is trained and exported: the two heads (and a digest of the encoders they were trained on).
The frozen encoders are not part of the module's parameters or state dict: training runs on cached
features and never needs them, and at evaluation they load from the local paths recorded in the
config (`model.vision.path`, `model.text.path`), where the HF tokenizer must be anyway. The export
is therefore small (the heads), and the first encode_image / encode_text checks the encoder it
loaded against the digest stored with the heads, so heads are never silently used on other weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from mm.errors import ConfigError, UserError
from mm.models.encoders import (
    EncoderConfig,
    LayerEncoder,
    build_encoder,
    encoder_identity,
    identity_digest,
    resolve_layer,
    text_tokenizer,
    vision_preprocess,
)

HEADS = ("linear", "mlp")


@dataclass
class StructureModelConfig:
    name: str = ""  # a label for evaluation records (e.g. dinov2_minilm)
    vision: EncoderConfig = field(default_factory=lambda: EncoderConfig(kind="timm"))
    text: EncoderConfig = field(default_factory=lambda: EncoderConfig(kind="hf"))
    vision_layer: int = -1  # which layer the head reads; negative counts from the end (-1 = last)
    text_layer: int = -1
    head: str = "linear"  # linear | mlp
    embed_dim: int = 512
    mlp_hidden: int = 1024  # hidden width of the mlp head


def build_head(kind: str, d_in: int, embed_dim: int, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, embed_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
    raise ConfigError(f"model.head must be one of {HEADS}, got {kind!r}")


class StructureModel(nn.Module):
    """Heads over the frozen encoders' features at (vision_layer, text_layer).

    `forward(vision_feats, text_feats)` maps cached features (training); `encode_image(images)` and
    `encode_text(tokens)` run the frozen encoder up to the chosen layer, then the head (evaluation).
    """

    def __init__(self, cfg: StructureModelConfig, vision_dim: int, text_dim: int,
                 vision_layer: int, text_layer: int):
        super().__init__()
        self.cfg = cfg
        self.vision_layer, self.text_layer = vision_layer, text_layer
        self.image_head = build_head(cfg.head, vision_dim, cfg.embed_dim, cfg.mlp_hidden)
        self.text_head = build_head(cfg.head, text_dim, cfg.embed_dim, cfg.mlp_hidden)
        # sha256 of each encoder's identity (config, weights, preprocessing); zeros = not recorded.
        self.register_buffer("encoder_digest", torch.zeros(2, 32, dtype=torch.uint8))
        # Kept out of the module tree on purpose (see the module docstring): a plain dict.
        self._frozen: dict[str, LayerEncoder] = {}
        self._checked = False

    def set_encoder_digest(self, vision: bytes, text: bytes) -> None:
        self.encoder_digest.copy_(torch.tensor([list(vision), list(text)], dtype=torch.uint8))

    def attach_encoders(self, vision: LayerEncoder, text: LayerEncoder) -> None:
        self._frozen = {"vision": vision, "text": text}
        self._checked = False

    def _encoder(self, side: str, device: torch.device) -> LayerEncoder:
        if side not in self._frozen:
            self._frozen[side] = build_encoder(getattr(self.cfg, side), side)
        if not self._checked:
            self._check_digest()
        enc = self._frozen[side]
        if next(enc.parameters()).device != device:
            enc.to(device)
        return enc

    def _check_digest(self) -> None:
        recorded = self.encoder_digest.cpu()
        for row, side in enumerate(("vision", "text")):
            if not recorded[row].any():
                continue
            if side not in self._frozen:
                self._frozen[side] = build_encoder(getattr(self.cfg, side), side)
            ident = encoder_identity(getattr(self.cfg, side), side, self._frozen[side])
            if bytes(recorded[row].tolist()) != identity_digest(ident):
                raise UserError(f"model.{side}: the encoder at {getattr(self.cfg, side).path or '(random init)'!r} "
                                "is not the one these heads were trained on (weights, config or "
                                "preprocessing differ)")
        self._checked = True

    def forward(self, vision_feats: torch.Tensor, text_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_head(vision_feats), self.text_head(text_feats)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        enc = self._encoder("vision", images.device)
        with torch.no_grad():
            feats = enc.layer(images.float(), self.vision_layer)
        out = self.image_head(feats.to(self.image_head_dtype()))
        return nn.functional.normalize(out, dim=-1) if normalize else out

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        enc = self._encoder("text", tokens.device)
        with torch.no_grad():
            feats = enc.layer(tokens, self.text_layer)
        out = self.text_head(feats.to(self.image_head_dtype()))
        return nn.functional.normalize(out, dim=-1) if normalize else out

    def image_head_dtype(self) -> torch.dtype:
        return next(self.image_head.parameters()).dtype


def build_structure_model(cfg: StructureModelConfig, vision_dims: list[int], text_dims: list[int]
                          ) -> StructureModel:
    """Heads sized for the chosen layers, given every layer's width on each side."""
    v = resolve_layer(cfg.vision_layer, len(vision_dims), "model.vision_layer")
    t = resolve_layer(cfg.text_layer, len(text_dims), "model.text_layer")
    return StructureModel(cfg, vision_dims[v], text_dims[t], v, t)


def structure_tokenizer(cfg: StructureModelConfig) -> Callable[[list[str]], torch.Tensor]:
    return text_tokenizer(cfg.text)


def structure_preprocess(cfg: StructureModelConfig) -> Callable:
    return vision_preprocess(cfg.vision)
