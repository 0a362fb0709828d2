"""mm segment decodes a batch of tiles with one call of SAM's mask decoder (sam_logits_batched): the
logits and masks are those of the model's own one-image-at-a-time decoding."""

from __future__ import annotations

import numpy as np
import torch

from mm.evaluate.segment import InferenceOptions, Segmenter, sam_logits_batched
from mm.models.sam import SamModelConfig, build_topolora_sam


def tiny_sam() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = SamModelConfig(variant="custom", encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                         encoder_global_attn_indexes=[1], image_size=64, lora_r=4)
    model = build_topolora_sam(cfg).eval()
    with torch.no_grad():  # a trained-looking adapter and decoder: not the zero-initialised ones
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def test_batched_decode_equals_one_image_at_a_time():
    model = tiny_sam()
    images = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        batched = sam_logits_batched(model, images)
        one_by_one = model(images)  # TopoLoraSam decodes image by image
        singles = torch.cat([model(x[None]) for x in images])
    assert batched.shape == one_by_one.shape == (5, 1, 64, 64)
    assert one_by_one.abs().max() > 0.1
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-5)
    assert torch.equal(batched > 0, one_by_one > 0)


def test_segmenter_output_is_unchanged_by_batched_decoding():
    model = tiny_sam()
    rgb = np.random.default_rng(0).integers(0, 256, (150, 170, 3), dtype=np.uint8)
    seg = Segmenter(model, 64, InferenceOptions(mode="tile", batch_size=8))
    assert seg.batched_decode
    batched = seg.logits(rgb)
    seg.batched_decode = False
    reference = seg.logits(rgb)
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(batched > 0, reference > 0)
