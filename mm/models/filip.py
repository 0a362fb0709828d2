"""FILIP's model: an open_clip CustomTextCLIP whose towers hand over per-token features.

What the towers return (open_clip 3.x, `output_tokens = True`):
- image: `VisionTransformer.forward` returns (pooled, tokens) with tokens = x[:, 1:] after ln_post,
  i.e. the PATCH tokens only (the CLS token at position 0 is dropped; it is the `pooled` output),
  unprojected, width = the vision transformer's width. FILIP matches patch tokens only.
- text: `TextTransformer.forward` returns (pooled, tokens) with tokens = every position after
  ln_final, unprojected, width = the text transformer's width. Which positions count is decided by
  `text_token_mask` (default "eot": drop SOT and pads, keep EOT).

Why this module owns its projections and temperature: under ZeRO-3 a parameter is only gathered while
its own module's forward runs. Projecting tokens with open_clip's `visual.proj` after `visual` has
returned would read an empty partition. So the tokens go through this module's own nn.Linear
projections (gathered when each Linear runs) and `logit_scale` sits on this module (gathered during
`FilipModel.forward`). open_clip's own `visual.proj`, `text.text_projection`, `logit_scale` and
`logit_bias` are removed after building (after a pretrained checkpoint has been loaded): they would be
trainable parameters that never receive a gradient. Consequently `self.clip.forward` is not usable;
use this module's `forward`/`encode_*`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mm.errors import UserError
from mm.models.clip import ClipModelConfig, build_clip

KeepSpecial = Literal["eot", "none", "sot", "both"]


def text_token_mask(token_ids: torch.Tensor, pad_id: int = 0, sot_id: int = 49406, eot_id: int = 49407,
                    keep_special: KeepSpecial = "eot") -> torch.Tensor:
    """Bool mask (B, L) of the text tokens FILIP should match, from open_clip token ids.

    Padding: open_clip pads with 0, which is also the BPE id of "!", so padding is taken to be every
    position after the first EOT; rows without an EOT (other tokenizers) fall back to `!= pad_id`.

    Special tokens (a config choice; default "eot"): SOT sits at position 0 under a causal mask, so its
    feature is the same vector for every caption: it adds the same amount to every candidate's score
    and can only dilute the mean, hence dropped. EOT has attended to the whole caption (CLIP uses it
    as the sentence embedding), so it is kept as a summary token. "none" keeps only word tokens,
    "both" keeps SOT and EOT, "sot" keeps SOT only. A caption left with no token keeps its EOT.
    """
    if keep_special not in ("eot", "none", "sot", "both"):
        raise ValueError(f"keep_special must be one of eot, none, sot, both; got {keep_special!r}")
    is_eot = token_ids == eot_id
    has_eot = is_eot.any(1, keepdim=True)
    first_eot = is_eot.int().argmax(1, keepdim=True)
    positions = torch.arange(token_ids.shape[1], device=token_ids.device)
    real = torch.where(has_eot, positions <= first_eot, token_ids != pad_id)
    mask = real.clone()
    if keep_special in ("eot", "none"):
        mask &= token_ids != sot_id
    if keep_special in ("sot", "none"):
        mask &= ~is_eot
    empty = ~mask.any(1)
    if bool(empty.any()):
        mask[empty] = real[empty] & is_eot[empty]
    return mask


@dataclass
class FilipModelConfig(ClipModelConfig):
    embed_dim: int = 256  # width of the shared token space (FILIP-base: 256)
    text_special: str = "eot"  # which special text tokens are matched: eot | none | sot | both


def _check(cfg: FilipModelConfig) -> None:
    if cfg.embed_dim < 1:
        raise UserError(f"model.embed_dim must be >= 1, got {cfg.embed_dim}")
    if cfg.text_special not in ("eot", "none", "sot", "both"):
        raise UserError(f"model.text_special must be one of eot, none, sot, both; got {cfg.text_special!r}")


class FilipModel(nn.Module):
    """Token-level image-text model for FILIP's late-interaction loss (see the module docstring)."""

    def __init__(self, cfg: FilipModelConfig, load_pretrained: bool = True) -> None:
        super().__init__()
        _check(cfg)
        from open_clip.transformer import TextTransformer, VisionTransformer

        clip = build_clip(cfg, load_pretrained)
        visual, text = clip.visual, clip.text
        if not isinstance(visual, VisionTransformer) or not isinstance(text, TextTransformer):
            raise UserError("model: FILIP needs an open_clip ViT image tower and transformer text tower, got "
                            f"{type(visual).__name__} + {type(text).__name__}")
        if getattr(visual, "attn_pool", None) is not None or visual.pool_type == "none":
            raise UserError("model: FILIP needs a ViT with CLS ('tok') or 'avg' pooling (patch tokens), "
                            "not attentional pooling")
        if getattr(text, "cls_emb", None) is not None:
            raise UserError("model: FILIP does not support text towers with an appended CLS token (CoCa)")
        visual.output_tokens = True
        text.output_tokens = True
        # Unused by FILIP (see the module docstring): removed so every parameter gets a gradient.
        visual.proj = None
        text.text_projection = None
        clip.logit_scale = None
        clip.logit_bias = None
        self.clip = clip
        self.image_proj = nn.Linear(visual.transformer.width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(text.transformer.width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=visual.transformer.width ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=text.transformer.width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.text_special = cfg.text_special

    # -- tokens ------------------------------------------------------------------------------------

    def encode_image_tokens(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected patch tokens (B, N_img, embed_dim), unnormalised, and an all-True mask (B, N_img)."""
        _, tokens = self.clip.visual(image)
        tokens = self.image_proj(tokens)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

    def encode_text_tokens(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected text tokens (B, L, embed_dim), unnormalised, and the mask of tokens to match (B, L)."""
        _, tokens = self.clip.text(text)
        return self.text_proj(tokens), text_token_mask(text, keep_special=self.text_special)

    # -- pooled (CLIP-style zero-shot) ---------------------------------------------------------------

    @staticmethod
    def _pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = F.normalize(tokens.float(), dim=-1)
        m = mask.to(tokens.dtype)[..., None]
        mean = (tokens * m).sum(1) / m.sum(1).clamp(min=1)
        return F.normalize(mean, dim=-1)

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Pooled embedding: L2-normalised mean of the normalised projected patch tokens."""
        return self._pool(*self.encode_image_tokens(image))

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Pooled embedding: L2-normalised mean of the normalised projected valid text tokens."""
        return self._pool(*self.encode_text_tokens(text))

    # -- training ------------------------------------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of both open_clip towers (train.grad_checkpointing)."""
        self.clip.set_grad_checkpointing(enable)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tokens and masks for `filip_loss`; `logit_scale` is exp(parameter) clamped at 100 in value
        (never in place: ZeRO-1/2 would undo an in-place clamp from their fp32 master copy)."""
        image_tokens, image_mask = self.encode_image_tokens(image)
        text_tokens, text_mask = self.encode_text_tokens(text)
        return {"image_tokens": image_tokens, "image_mask": image_mask, "text_tokens": text_tokens,
                "text_mask": text_mask, "logit_scale": self.logit_scale.exp().clamp(max=100.0)}
