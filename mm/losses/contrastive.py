"""CLIP's InfoNCE over the global batch: local rows against every rank's candidates."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm.dist import all_gather_with_grad, rank


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric cross-entropy of local images vs all texts and local texts vs all images.

    Each rank takes the mean over its own rows; averaging gradients over ranks (as DeepSpeed does)
    then gives exactly the single-process gradient of the loss on the global batch.
    """
    # Half-precision engines hand over bf16/fp16 features; the softmax is done in fp32.
    image_features, text_features = image_features.float(), text_features.float()
    logit_scale = logit_scale.float()
    all_images = all_gather_with_grad(image_features)
    all_texts = all_gather_with_grad(text_features)
    n = image_features.shape[0]
    labels = torch.arange(n, device=image_features.device) + rank() * n
    logits_per_image = logit_scale * image_features @ all_texts.T
    logits_per_text = logit_scale * text_features @ all_images.T
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    return {"loss": loss, "logit_scale": logit_scale.detach()}
