"""Structure-CLIP's model: an open_clip CustomTextCLIP plus the Knowledge-Enhanced Encoder (KEE).

What each loss term sees (as in the authors' released training code):

* the base contrastive loss scores images against the KEE-fused caption embedding
  ``normalize(t + kee_weight * KEE(triples of the caption's scene graph))``;
* the hard-negative hinge compares the PLAIN text-tower embeddings of the caption and of its swapped
  negative. The negative is a swap inside the caption's own text (mm.scenegraph.negatives): it keeps
  every word and changes only their order, so the text tower itself must learn word order; with the hinge on
  fused embeddings the KEE alone could open the margin (its
  h + r - t differs between the two graphs) and the text tower would learn nothing from the negatives.

Inference: `encode_image` / `encode_text` are the plain CLIP towers (what zero-shot classification
and mm-compositional score for every model); `encode_text_with_triples` is the fused embedding, for
scoring a caption together with the triples of its own scene graph (mm-compositional --kee), as the
released code evaluates VG-Relation / VG-Attribution.

ZeRO-3: the KEE is built with ``own_embedding=True`` (a trainable copy of the text tower's word
embedding, copied after a pretrained checkpoint is loaded), so every parameter it reads belongs to a
module that runs inside its own forward. Positive and negative captions go through the text tower in
one call of the CLIP module's own forward (which also gathers ``logit_scale``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mm.errors import UserError
from mm.models.clip import ClipModelConfig, build_clip
from mm.models.kee import KnowledgeEnhancedEncoder, encode_triples


@dataclass
class StructureClipModelConfig(ClipModelConfig):
    kee: bool = True  # fuse scene-graph triples into the text embedding the base loss scores
    kee_weight: float = 0.2  # weight of the KEE vector added to the text embedding
    kee_layers: int = 2  # transformer layers over the triple sequence
    kee_heads: int = 4  # attention heads (the text width must be divisible by it)
    max_triples: int = 6  # triples per caption (Structure-CLIP: 6)
    triple_tokens: int = 8  # word pieces kept per head / relation / tail string


class StructureClipModel(nn.Module):
    """CLIP + KEE. `forward` for training; `encode_image` / `encode_text` (plain towers) and
    `encode_text_with_triples` (fused) for evaluation."""

    def __init__(self, cfg: StructureClipModelConfig, load_pretrained: bool = True) -> None:
        super().__init__()
        if cfg.max_triples < 1 or cfg.triple_tokens < 1:
            raise UserError("model.max_triples and model.triple_tokens must be >= 1")
        clip = build_clip(cfg, load_pretrained)
        self.cfg = cfg
        self.clip = clip
        self.kee: KnowledgeEnhancedEncoder | None = None
        if cfg.kee:
            token_embedding = getattr(clip.text, "token_embedding", None)
            output_dim = getattr(clip.text, "output_dim", None)
            if not isinstance(token_embedding, nn.Embedding) or not output_dim:
                raise UserError("model: the KEE needs an open_clip transformer text tower with its own word "
                                f"embedding, got {type(clip.text).__name__}; set model.kee=false")
            self.kee = KnowledgeEnhancedEncoder(token_embedding, int(output_dim), layers=cfg.kee_layers,
                                                heads=cfg.kee_heads, weight=cfg.kee_weight, enabled=True,
                                                own_embedding=True)

    # -- evaluation: the plain towers -----------------------------------------------------------------

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_image(image, normalize=normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The text tower alone (no triples): what zero-shot and compositional evaluation score."""
        return self.clip.encode_text(text, normalize=normalize)

    def encode_text_with_triples(self, text: torch.Tensor, triples: torch.Tensor,
                                 triple_mask: torch.Tensor) -> torch.Tensor:
        """The text tower's embedding fused with the caption's own triples (`encode_triples` of its
        scene graph); the plain embedding when the KEE is off. L2-normalised."""
        features = self.clip.encode_text(text, normalize=True)
        return features if self.kee is None else self.kee(features, triples, triple_mask)

    def encode_captions(self, captions: Sequence[str], tokenizer: Callable,
                        parse: Callable[[str], Any]) -> torch.Tensor:
        """Captions scored with the KEE, each with the triples of its own scene graph (`parse` of the
        caption, e.g. mm.scenegraph.parse_simple, so a caption and its swap are treated alike: caption
        -> graph -> triples). (N, D), L2-normalised."""
        cfg = self.cfg
        device = next(self.parameters()).device
        encoded = [encode_triples(parse(c).triples(cfg.max_triples), tokenizer, cfg.max_triples,
                                  cfg.triple_tokens) for c in captions]
        triples = torch.stack([ids for ids, _ in encoded]).to(device)
        mask = torch.stack([m for _, m in encoded]).to(device)
        return self.encode_text_with_triples(tokenizer(list(captions)).to(device), triples, mask)

    # -- training ---------------------------------------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of both open_clip towers (train.grad_checkpointing)."""
        self.clip.set_grad_checkpointing(enable)

    def forward(self, image: torch.Tensor, text: torch.Tensor, neg_text: torch.Tensor | None = None,
                triples: torch.Tensor | None = None, triple_mask: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """image (B, 3, H, W); text, neg_text (B, L) token ids; triples (B, T, 3, K) and triple_mask
        (B, T) of the caption's scene graph, from `encode_triples`.

        Returns image_features; text_features, the caption fused with its triples (the plain tower's
        when the KEE is off or no triples are given: what the base loss scores); tower_text_features
        and neg_text_features, the plain text tower's embeddings of the caption and of the negative
        (what the hard-negative hinge compares; neg_text_features is None without neg_text); and
        logit_scale, exp(parameter) clamped at 100 in value, never in place (ZeRO-1/2 would undo an
        in-place clamp from their fp32 master copy). Features are L2-normalised.
        """
        n = text.shape[0]
        texts = text if neg_text is None else torch.cat([text, neg_text.to(text.device)])
        out = self.clip(image, texts)
        tower = out["text_features"][:n]
        fused = tower
        if self.kee is not None and triples is not None:
            fused = self.kee(tower, triples, triple_mask)
        return {"image_features": out["image_features"], "text_features": fused, "tower_text_features": tower,
                "neg_text_features": out["text_features"][n:] if neg_text is not None else None,
                "logit_scale": out["logit_scale"].clamp(max=100.0)}
