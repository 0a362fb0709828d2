"""Structure-CLIP's loss: a contrastive base over the global batch plus a hinge on scene-graph hard
negatives.

    L = base(v, t) + neg_weight * mean_{i with a negative} relu(neg_margin - (cos(v_i, p_i) - cos(v_i, n_i)))

t is the text embedding the base loss scores (Structure-CLIP: fused with the KEE), p and n the
embeddings the hinge compares (Structure-CLIP: the plain text tower's, of the caption and of its
negative; p defaults to t).

base is CLIP's InfoNCE (mm.losses.contrastive.clip_loss; the default) or the released code's hinge
with the in-batch hardest negative (VSE++ "max violation", margin 0.2): for each local sample i,
max_j relu(margin + cos(v_i, t_j) - cos(v_i, t_i)) + max_j relu(margin + cos(v_j, t_i) - cos(v_i, t_i))
over every rank's candidates j != i, averaged over samples (VSE++ sums over the batch; the mean keeps
the scale independent of the batch size). Defaults are the released code's: margin 0.2, weight 5,
negative margin 0.1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mm.dist import all_gather_with_grad, is_dist, rank, world_size
from mm.losses.contrastive import clip_loss

BASES = ("infonce", "hinge")


def hardest_negative_hinge(image: torch.Tensor, text: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """VSE++ max-violation hinge of the local rows against every rank's candidates (features are
    L2-normalised here); mean over local rows."""
    all_images, all_texts = all_gather_with_grad(image), all_gather_with_grad(text)
    n = image.shape[0]
    cols = torch.arange(n, device=image.device) + rank() * n
    rows = torch.arange(n, device=image.device)
    positive = (image * text).sum(-1, keepdim=True)  # (n, 1)
    own = torch.zeros(n, all_texts.shape[0], dtype=torch.bool, device=image.device)
    own[rows, cols] = True
    cost_i2t = (margin + image @ all_texts.T - positive).clamp(min=0).masked_fill(own, 0)
    cost_t2i = (margin + text @ all_images.T - positive).clamp(min=0).masked_fill(own, 0)
    return (cost_i2t.max(1).values + cost_t2i.max(1).values).mean()


def structure_clip_loss(image: torch.Tensor, text: torch.Tensor, neg_text: torch.Tensor,
                        has_neg: torch.Tensor, logit_scale: torch.Tensor, base: str = "infonce",
                        margin: float = 0.2, neg_weight: float = 5.0,
                        neg_margin: float = 0.1, hinge_text: torch.Tensor | None = None
                        ) -> dict[str, torch.Tensor]:
    """image, text, neg_text: (B, D) local features (L2-normalised here, in fp32); neg_text rows where
    has_neg (B,) is False are ignored (any placeholder, e.g. the positive caption's features).
    hinge_text: (B, D) the positive captions' features the hinge compares with neg_text (default text).

    The negative term is averaged over the samples with a negative in the global batch: each rank
    divides its sum by the global count over the world size, so averaging gradients over ranks (as
    DeepSpeed does) gives exactly the single-process gradient; it is 0 when no sample has one.
    Returns loss, base, neg_hinge (this rank's term as above, before the weight), neg_share (share of
    the global batch with a negative, detached) and logit_scale.
    """
    if base not in BASES:
        raise ValueError(f"structure_clip_loss: base must be one of {BASES}, got {base!r}")
    hinge_text = text if hinge_text is None else hinge_text
    image, text, neg_text, hinge_text = (F.normalize(x.float(), dim=-1) for x in (image, text, neg_text, hinge_text))
    logit_scale = logit_scale.float()
    if base == "infonce":
        base_loss = clip_loss(image, text, logit_scale)["loss"]
    else:
        base_loss = hardest_negative_hinge(image, text, margin)

    has_neg = has_neg.to(image.device).bool()
    counts = torch.stack([has_neg.sum(), torch.tensor(has_neg.numel(), device=image.device)]).float()
    if is_dist():
        dist.all_reduce(counts)
    gap = (image * hinge_text).sum(-1) - (image * neg_text).sum(-1)
    per_sample = (neg_margin - gap).clamp(min=0) * has_neg.float()
    neg_hinge = per_sample.sum() * world_size() / counts[0].clamp(min=1)
    return {"loss": base_loss + neg_weight * neg_hinge, "base": base_loss.detach(),
            "neg_hinge": neg_hinge.detach(), "neg_share": (counts[0] / counts[1]).detach(),
            "logit_scale": logit_scale.detach()}
