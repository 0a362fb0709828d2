"""TopoLoRA-SAM decodes a batch with one call of each step of SAM's mask decoder
(mm.models.sam.decode_without_prompts): its logits and its gradients are those of segment_anything's
own MaskDecoder run image by image, as Sam.forward does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm.models.sam import SamModelConfig, build_topolora_sam


def tiny_sam() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = SamModelConfig(variant="custom", encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                         encoder_global_attn_indexes=[1], image_size=64, lora_r=4)
    model = build_topolora_sam(cfg)
    with torch.no_grad():  # a trained-looking adapter and decoder: not the zero-initialised ones
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def one_image_at_a_time(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """segment_anything's decoder as Sam.forward calls it: one image embedding per call."""
    embeddings = model.image_embeddings(images)
    sparse, dense = model.prompt_encoder(points=None, boxes=None, masks=None)
    pe = model.prompt_encoder.get_dense_pe()
    low = torch.cat([model.mask_decoder(image_embeddings=e[None], image_pe=pe, sparse_prompt_embeddings=sparse,
                                        dense_prompt_embeddings=dense, multimask_output=False)[0]
                     for e in embeddings])
    return F.interpolate(low, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)


def test_batched_decode_equals_segment_anythings_decoder_image_by_image():
    model = tiny_sam().eval()
    images = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        batched = model(images)
        reference = one_image_at_a_time(model, images)
        singles = torch.cat([model(x[None]) for x in images])
    assert batched.shape == reference.shape == (5, 1, 64, 64)
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-5)
    assert torch.equal(batched > 0, reference > 0)


def test_training_gradients_equal_the_image_by_image_decoder():
    images, target = torch.randn(4, 3, 64, 64), (torch.rand(4, 1, 64, 64) > 0.5).float()
    grads = []
    for forward in (lambda m: m(images), lambda m: one_image_at_a_time(m, images)):
        model = tiny_sam().train()
        F.binary_cross_entropy_with_logits(forward(model), target).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    batched, reference = grads
    assert batched.keys() == reference.keys()
    for name in reference:
        # The same parameters get gradients (zeros for the unused mask tokens' MLPs), none for the IoU head.
        assert (batched[name] is None) == (reference[name] is None), name
        if reference[name] is not None:
            torch.testing.assert_close(batched[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(n.startswith("mask_decoder.iou_prediction_head") for n in reference)
    assert all(reference[n] is None for n in reference if n.startswith("mask_decoder.iou_prediction_head"))
