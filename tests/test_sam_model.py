"""TopoLoRA-SAM model: parameter counts, step-0 equality with plain SAM, freezing, LoRA merge, checkpoints.

Tiny SAMs (width 32, depth 2) at 64 x 64 inputs keep every forward pass well under a second; vit_b is only
built, never run.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from mm.errors import UserError
from mm.models.sam import (
    SamModelConfig,
    build_sam,
    build_topolora_sam,
    merge_lora,
    prepare_image,
    prepare_mask,
    resized_shape,
    restore_logits,
    trainable_parameter_report,
)

TINY = {"variant": "custom", "encoder_embed_dim": 32, "encoder_depth": 2, "encoder_num_heads": 2,
        "encoder_global_attn_indexes": [1], "image_size": 64}


def _plain_sam(image_size: int, dim: int = 32, seed: int = 0):
    """A plain SAM made directly from segment_anything's modules (as its _build_sam does), with its
    zero-initialised position tables randomised so that loading and resizing them matters."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    grid = image_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(depth=2, embed_dim=dim, img_size=image_size, mlp_ratio=4,
                                      norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=16,
                                      qkv_bias=True, use_rel_pos=True, global_attn_indexes=[1],
                                      window_size=14, out_chans=256),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                     input_image_size=(image_size, image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048,
                                                               num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "pos" in name:
                p.normal_(0, 0.5)
    return sam.eval()


def _plain_sam_logits(sam, image_uint8: torch.Tensor) -> torch.Tensor:
    """segment_anything's own prompt-free prediction: Sam.forward with no prompt keys, single mask; its
    low-res logits brought to the input size by its own postprocess_masks."""
    size = image_uint8.shape[-1]
    out = sam([{"image": image_uint8.float(), "original_size": (size, size)}], multimask_output=False)[0]
    return sam.postprocess_masks(out["low_res_logits"], (size, size), (size, size))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    sam = _plain_sam(64)
    path = tmp_path_factory.mktemp("sam") / "tiny_sam.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


def test_vit_b_parameter_counts():
    model = build_topolora_sam(SamModelConfig(variant="vit_b"), load_checkpoint=False)
    report = trainable_parameter_report(model)
    assert report["trainable"] == 4_929_508
    assert report["total"] == 94_606_640
    assert report["groups"]["mask_decoder"] == 4_058_340
    assert report["groups"]["lora"] == 737_280
    assert report["groups"]["adapter"] == 133_888


def test_vit_b_matches_segment_anything_builder():
    from segment_anything import build_sam_vit_b

    ours = {k: v.shape for k, v in build_sam(SamModelConfig(variant="vit_b")).state_dict().items()}
    theirs = {k: v.shape for k, v in build_sam_vit_b().state_dict().items()}
    assert ours == theirs


def test_qkv_target_and_only_encoder_linears():
    model = build_topolora_sam(SamModelConfig(**TINY, lora_targets=["qkv"]))
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora and all(n.startswith("image_encoder.blocks.") and ".attn.qkv." in n for n in lora)
    assert len(lora) == 2 * 2  # A and B in each of the 2 blocks
    with pytest.raises(UserError, match="LoRA target"):
        build_topolora_sam(SamModelConfig(**TINY, lora_targets=["transformer.layers"]))


def test_step0_equals_plain_sam_and_keeps_input_size(tiny_checkpoint):
    sam, path = tiny_checkpoint
    model = build_topolora_sam(SamModelConfig(**TINY, checkpoint=str(path))).train()
    image = torch.randint(0, 256, (3, 64, 64), generator=torch.Generator().manual_seed(1))
    x, hw = prepare_image(image, 64)
    assert hw == (64, 64) and x.shape == (1, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (1, 1, 64, 64)
    expected = _plain_sam_logits(sam, image)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    # A batch is decoded image by image: the same logits as one at a time.
    image2 = torch.randint(0, 256, (3, 64, 64), generator=torch.Generator().manual_seed(2))
    batch, _ = prepare_image(torch.stack([image, image2]), 64)
    both = model(batch)
    torch.testing.assert_close(both[:1], logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1:], _plain_sam_logits(sam, image2), atol=1e-5, rtol=1e-5)


def test_only_lora_adapter_decoder_train(tiny_checkpoint):
    _, path = tiny_checkpoint
    model = build_topolora_sam(SamModelConfig(**TINY, checkpoint=str(path))).train()
    for name, p in model.named_parameters():
        expected = ".lora_" in name or name.startswith(("adapter.", "mask_decoder."))
        assert p.requires_grad == expected, name
    x, _ = prepare_image(torch.rand(2, 3, 64, 64) * 255, 64)
    model(x).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(".lora_B" in n for n in grads) and "adapter.out.weight" in grads
    assert not any(n.startswith(("prompt_encoder.", "image_encoder.patch_embed")) for n in grads)
    report = trainable_parameter_report(model)
    assert report["trainable"] == sum(report["groups"][g] for g in ("lora", "adapter", "mask_decoder"))


def test_merge_lora_same_outputs(tiny_checkpoint):
    _, path = tiny_checkpoint
    model = build_topolora_sam(SamModelConfig(**TINY, checkpoint=str(path)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B" in name or name == "adapter.out.weight":
                p.normal_(0, 0.05)
    model.eval()
    x, _ = prepare_image(torch.rand(1, 3, 64, 64) * 255, 64)
    with torch.no_grad():
        before = model(x)
        merged = merge_lora(model)
        after = merged(x)
    assert not any("lora" in n for n in merged.state_dict())
    assert isinstance(merged.image_encoder.blocks[0].mlp.lin1, nn.Linear)
    assert not torch.allclose(before, _plain(path)(x), atol=1e-3)  # LoRA/adapter changed the output...
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)  # ...and the merge kept it


def _plain(path):
    return build_topolora_sam(SamModelConfig(**TINY, checkpoint=str(path))).eval()


def test_checkpoint_errors(tmp_path, tiny_checkpoint):
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match="nope.pth"):
        build_topolora_sam(SamModelConfig(**TINY, checkpoint=str(missing)))
    wider = tmp_path / "wider.pth"
    torch.save(_plain_sam(64, dim=48).state_dict(), wider)
    with pytest.raises(UserError, match=r"wider\.pth does not fit.*width 48"):
        build_topolora_sam(SamModelConfig(**TINY, checkpoint=str(wider)))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="garbage.pth"):
        build_topolora_sam(SamModelConfig(**TINY, checkpoint=str(garbage)))
    # load_checkpoint=False ignores the path entirely (the trainer restores its own state).
    build_topolora_sam(SamModelConfig(**TINY, checkpoint=str(missing)), load_checkpoint=False)


def test_checkpoint_of_another_input_size_is_resized(tmp_path):
    big = _plain_sam(128)  # 8 x 8 tokens; the model runs at 64 (4 x 4 tokens)
    with torch.no_grad():
        big.image_encoder.pos_embed.fill_(0.25)
        big.image_encoder.blocks[1].attn.rel_pos_h.fill_(0.5)
    path = tmp_path / "sam128.pth"
    torch.save(big.state_dict(), path)
    model = build_topolora_sam(SamModelConfig(**TINY, checkpoint=str(path)))
    enc = model.image_encoder
    assert enc.pos_embed.shape == (1, 4, 4, 32)
    torch.testing.assert_close(enc.pos_embed, torch.full_like(enc.pos_embed, 0.25))
    assert enc.blocks[1].attn.rel_pos_h.shape == (2 * 4 - 1, 16)  # global block: resized from 15 rows
    assert enc.blocks[0].attn.rel_pos_h.shape == (2 * 14 - 1, 16)  # windowed block: unchanged
    torch.testing.assert_close(enc.blocks[0].attn.rel_pos_w, big.image_encoder.blocks[0].attn.rel_pos_w)
    torch.testing.assert_close(enc.blocks[1].attn.rel_pos_h, torch.full((7, 16), 0.5))
    assert model(prepare_image(torch.rand(1, 3, 64, 64) * 255, 64)[0]).shape == (1, 1, 64, 64)


def test_pre_and_post_processing():
    image = torch.full((1, 3, 50, 100), 255.0)
    x, hw = prepare_image(image, 64)
    assert hw == resized_shape(50, 100, 64) == (32, 64)
    assert x.shape == (1, 3, 64, 64)
    assert torch.all(x[:, :, 32:] == 0)  # padded bottom rows are zero after normalisation
    torch.testing.assert_close(x[0, :, 0, 0], (255 - torch.tensor([123.675, 116.28, 103.53])) /
                               torch.tensor([58.395, 57.12, 57.375]))
    grey, _ = prepare_image(torch.zeros(1, 1, 64, 64), 64)
    assert grey.shape == (1, 3, 64, 64)
    mask = prepare_mask(torch.ones(50, 100), 64)
    assert mask.shape == (1, 1, 64, 64) and mask[..., :32, :].min() == 1 and mask[..., 32:, :].max() == 0
    back = restore_logits(mask, hw, (50, 100))
    assert back.shape == (1, 1, 50, 100) and torch.all(back == 1)


def test_wrong_variant_message_names_it(tmp_path):
    from mm.models.sam import _describe_encoder

    state = {"image_encoder.patch_embed.proj.weight": torch.empty(1024, 3, 16, 16)}
    state.update({f"image_encoder.blocks.{i}.norm1.weight": torch.empty(1024) for i in range(24)})
    assert _describe_encoder(state) == " (it holds a vit_l image encoder)"
    path = tmp_path / "sam_vit_l_like.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"sam_vit_l_like\.pth does not fit custom \(it holds a vit_l"):
        build_topolora_sam(SamModelConfig(**TINY, checkpoint=str(path)))


@pytest.mark.parametrize("shape,size", [((584, 565), 1024), ((960, 999), 64), ((50, 70), 64), ((37, 300), 64)])
def test_prepare_image_resizes_exactly_as_segment_anything(shape, size):
    from segment_anything.utils.transforms import ResizeLongestSide

    from mm.models.sam import PIXEL_MEAN, PIXEL_STD

    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    reference = ResizeLongestSide(size).apply_image(image)  # SAM's own preprocessing, uint8 HWC
    x, (h, w) = prepare_image(torch.from_numpy(image).permute(2, 0, 1).float(), size)
    assert (h, w) == reference.shape[:2]
    restored = x[0, :, :h, :w] * torch.tensor(PIXEL_STD).view(3, 1, 1) + torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    assert torch.equal(restored.round().to(torch.uint8), torch.from_numpy(reference).permute(2, 0, 1))
