"""Structure-CLIP's model: an open_clip CustomTextCLIP plus the Knowledge-Enhanced Encoder (KEE).

Training (`forward`) fuses each caption's scene-graph triples into its text embedding:
``normalize(t + kee_weight * KEE(triples))``. Inference (`encode_image` / `encode_text`) is the plain
CLIP towers: text WITHOUT triples, so zero-shot classification and the compositional evaluation
(mm-compositional) score a Structure-CLIP model exactly as they score a CLIP model.

Which triples the hard negative gets: the triples of ITS OWN (swapped) scene graph. A caption's fused
embedding is then a function of that caption alone (caption -> graph -> triples), the same function
for positives and negatives. Giving the negative the positive's triples would hand it the true
structure -- which object is the subject, which colour belongs to which shape -- i.e. the answer the
hinge asks the model to find from the text; and since the fused vectors of the two captions would
share the same KEE term, the KEE could never learn to tell the swap apart.

ZeRO-3: the KEE is built with ``own_embedding=True`` (a trainable copy of the text tower's word
embedding, copied after a pretrained checkpoint is loaded), so every parameter it reads belongs to a
module that runs inside its own forward. Positive and negative captions go through the text tower in
one call of the CLIP module's own forward (which also gathers ``logit_scale``), and through the KEE in
one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mm.errors import UserError
from mm.models.clip import ClipModelConfig, build_clip
from mm.models.kee import KnowledgeEnhancedEncoder


@dataclass
class StructureClipModelConfig(ClipModelConfig):
    kee: bool = True  # fuse scene-graph triples into the text embedding during training
    kee_weight: float = 0.2  # weight of the KEE vector added to the text embedding
    kee_layers: int = 2  # transformer layers over the triple sequence
    kee_heads: int = 4  # attention heads (the text width must be divisible by it)
    max_triples: int = 6  # triples per caption (Structure-CLIP: 6)
    triple_tokens: int = 8  # word pieces kept per head / relation / tail string


class StructureClipModel(nn.Module):
    """CLIP + KEE. `forward` for training, `encode_image` / `encode_text` (plain towers) for evaluation."""

    def __init__(self, cfg: StructureClipModelConfig, load_pretrained: bool = True) -> None:
        super().__init__()
        if cfg.max_triples < 1 or cfg.triple_tokens < 1:
            raise UserError("model.max_triples and model.triple_tokens must be >= 1")
        clip = build_clip(cfg, load_pretrained)
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

    # -- training ---------------------------------------------------------------------------------------

    def forward(self, image: torch.Tensor, text: torch.Tensor, neg_text: torch.Tensor | None = None,
                triples: torch.Tensor | None = None, triple_mask: torch.Tensor | None = None,
                neg_triples: torch.Tensor | None = None, neg_triple_mask: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """image (B, 3, H, W); text, neg_text (B, L) token ids; triples / neg_triples (B, T, 3, K) and
        masks (B, T) from `encode_triples` (the negative's are its own swapped graph's).

        Returns image_features, text_features (fused with the triples when the KEE is on),
        neg_text_features (fused with the negative's triples; None without neg_text) and logit_scale,
        exp(parameter) clamped at 100 in value, never in place (ZeRO-1/2 would undo an in-place clamp
        from their fp32 master copy). Features are L2-normalised.
        """
        n = text.shape[0]
        texts = text if neg_text is None else torch.cat([text, neg_text.to(text.device)])
        out = self.clip(image, texts)
        text_features = out["text_features"]
        if self.kee is not None and triples is not None:
            ids, mask = triples, triple_mask
            if neg_text is not None:
                if neg_triples is None:
                    neg_triples = torch.full_like(triples, -1)
                    neg_triple_mask = torch.zeros_like(triple_mask)
                ids, mask = torch.cat([triples, neg_triples]), torch.cat([triple_mask, neg_triple_mask])
            text_features = self.kee(text_features, ids, mask)
        return {"image_features": out["image_features"], "text_features": text_features[:n],
                "neg_text_features": text_features[n:] if neg_text is not None else None,
                "logit_scale": out["logit_scale"].clamp(max=100.0)}


def build_structure_clip(cfg: StructureClipModelConfig, load_pretrained: bool = True) -> StructureClipModel:
    return StructureClipModel(cfg, load_pretrained)
