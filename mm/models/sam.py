"""TopoLoRA-SAM: segment_anything's SAM, LoRA in the image encoder, a spatial conv adapter on the image
embedding and a trainable mask decoder, decoding without prompts (docs/methods.md §4).

    model = build_topolora_sam(SamModelConfig(variant="vit_b", checkpoint="sam_vit_b_01ec64.pth"))
    x, resized_hw = prepare_image(batch_uint8, model.image_size)   # normalise, resize longest side, pad
    logits = model(x)                                              # (B, 1, S, S), S = image_size
    probs = restore_logits(logits, resized_hw, original_hw).sigmoid()

Trainable: the LoRA matrices, the adapter and the whole mask decoder; everything else is frozen. With
vit_b that is 4,929,508 of 94,606,640 parameters (decoder 4,058,340 + LoRA 737,280 + adapter 133,888).

Input size: SAM is trained at 1024 x 1024 (64 x 64 tokens of 16 pixels). `image_size` may be any
multiple of 16 (e.g. 256 for CPU runs): the model is then built at that size and a 1024 checkpoint is
resized on loading: the absolute position embedding (1 x 64 x 64 x C) bicubically to the new token
grid, and the relative position tables of the global-attention blocks (2 * 64 - 1 rows) linearly to
2 * tokens - 1 rows (the interpolation SAM itself applies at run time when the sizes differ). The
windowed blocks' tables (2 * 14 - 1 rows) do not depend on the input size and load unchanged. The
prompt encoder's dense positional encoding is computed on the new grid from the same random
frequencies, and the mask decoder works on any grid (its low-res logits are 4x the token grid).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image
from torch import nn

from mm.errors import UserError

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
NATIVE_IMAGE_SIZE = 1024
PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256
WINDOW_SIZE = 14

# The sizes segment_anything's build_sam.py gives each released image encoder.
VARIANTS: dict[str, dict[str, Any]] = {
    "vit_b": {"encoder_embed_dim": 768, "encoder_depth": 12, "encoder_num_heads": 12,
              "encoder_global_attn_indexes": [2, 5, 8, 11]},
    "vit_l": {"encoder_embed_dim": 1024, "encoder_depth": 24, "encoder_num_heads": 16,
              "encoder_global_attn_indexes": [5, 11, 17, 23]},
    "vit_h": {"encoder_embed_dim": 1280, "encoder_depth": 32, "encoder_num_heads": 16,
              "encoder_global_attn_indexes": [7, 15, 23, 31]},
}
LORA_TARGETS = ("mlp.lin1", "mlp.lin2", "attn.qkv", "attn.proj")


@dataclass
class SamModelConfig:
    variant: str = "vit_b"  # vit_b | vit_l | vit_h | custom (then the encoder_* sizes below apply)
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: list[int] = field(default_factory=lambda: [2, 5, 8, 11])
    checkpoint: str = ""  # local path of a segment_anything checkpoint; "" = random initialisation
    image_size: int = 1024
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    # Linear layers of the image encoder's blocks, by their name inside a block ("qkv" means attn.qkv).
    lora_targets: list[str] = field(default_factory=lambda: ["mlp.lin1", "mlp.lin2"])
    adapter: bool = True


def encoder_sizes(cfg: SamModelConfig) -> dict[str, Any]:
    if cfg.variant == "custom":
        return {"encoder_embed_dim": cfg.encoder_embed_dim, "encoder_depth": cfg.encoder_depth,
                "encoder_num_heads": cfg.encoder_num_heads,
                "encoder_global_attn_indexes": list(cfg.encoder_global_attn_indexes)}
    if cfg.variant not in VARIANTS:
        raise UserError(f"SAM variant must be one of {', '.join([*VARIANTS, 'custom'])}, got {cfg.variant!r}")
    return dict(VARIANTS[cfg.variant])


def _check_config(cfg: SamModelConfig) -> None:
    sizes = encoder_sizes(cfg)
    if cfg.image_size < PATCH_SIZE or cfg.image_size % PATCH_SIZE:
        raise UserError(f"SAM image_size must be a positive multiple of {PATCH_SIZE}, got {cfg.image_size}")
    dim, heads, depth = sizes["encoder_embed_dim"], sizes["encoder_num_heads"], sizes["encoder_depth"]
    if dim < 1 or heads < 1 or dim % heads:
        raise UserError(f"SAM encoder_embed_dim {dim} must be a positive multiple of "
                        f"encoder_num_heads {heads}")
    bad = [i for i in sizes["encoder_global_attn_indexes"] if not 0 <= i < depth]
    if depth < 1 or bad:
        raise UserError(f"SAM encoder_global_attn_indexes {bad} lie outside the {depth} blocks")
    if cfg.lora_r < 0:
        raise UserError(f"lora_r must be >= 0 (0 turns LoRA off), got {cfg.lora_r}")
    for target in cfg.lora_targets:
        if _target_name(target) not in LORA_TARGETS:
            raise UserError(f"LoRA target {target!r} is not a linear layer of a SAM encoder block "
                            f"(one of {', '.join(LORA_TARGETS)}, or qkv/proj)")


def _target_name(target: str) -> str:
    short = {"qkv": "attn.qkv", "proj": "attn.proj", "lin1": "mlp.lin1", "lin2": "mlp.lin2"}
    return short.get(target, target)


# ---------------------------------------------------------------------------------------------------
# Plain SAM from segment_anything's modules


def build_sam(cfg: SamModelConfig) -> nn.Module:
    """A segment_anything `Sam` with the config's encoder sizes at `cfg.image_size`, randomly initialised.

    The same construction as segment_anything's `_build_sam` (which only builds 1024 x 1024 models), made
    from its public modeling classes so that the input size can differ; no weights are loaded.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    _check_config(cfg)
    sizes = encoder_sizes(cfg)
    grid = cfg.image_size // PATCH_SIZE
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=sizes["encoder_depth"], embed_dim=sizes["encoder_embed_dim"], img_size=cfg.image_size,
            mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=sizes["encoder_num_heads"],
            patch_size=PATCH_SIZE, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=sizes["encoder_global_attn_indexes"], window_size=WINDOW_SIZE,
            out_chans=PROMPT_EMBED_DIM),
        prompt_encoder=PromptEncoder(embed_dim=PROMPT_EMBED_DIM, image_embedding_size=(grid, grid),
                                     input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=PROMPT_EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD))
    return sam


def load_sam_checkpoint(sam: nn.Module, path: str | Path, variant: str = "") -> None:
    """Load a segment_anything checkpoint (a plain state dict, as released) into `sam` in place.

    Position embeddings saved at another input size are resized (see the module docstring). A missing
    or unreadable file, or weights of another encoder (e.g. vit_l weights for a vit_b model) raise a
    UserError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"SAM checkpoint {path} does not exist" if not path.exists()
                        else f"SAM checkpoint {path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- pickle/zip errors of many kinds: one message
        raise UserError(f"cannot read SAM checkpoint {path}: {e}") from None
    for key in ("model", "state_dict"):  # wrapped checkpoints, as some fine-tuning repositories save
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"SAM checkpoint {path} is not a state dict of tensors")
    state = resize_position_embeddings(state, sam)
    own = sam.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        what = variant or "the configured SAM"
        found = _describe_encoder(state)
        details = []
        if wrong:
            k = wrong[0]
            details.append(f"{len(wrong)} tensors of another shape, e.g. {k} is {tuple(state[k].shape)} "
                           f"but the model's is {tuple(own[k].shape)}")
        if missing:
            details.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise UserError(f"SAM checkpoint {path} does not fit {what}{found}: {'; '.join(details)}")
    sam.load_state_dict(state)


def _describe_encoder(state: dict[str, torch.Tensor]) -> str:
    """' (it holds a vit_l image encoder)' or the encoder's sizes, from the checkpoint's shapes."""
    weight = state.get("image_encoder.patch_embed.proj.weight")
    if weight is None:
        return " (it holds no SAM image encoder)"
    dim = weight.shape[0]
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    for name, sizes in VARIANTS.items():
        if sizes["encoder_embed_dim"] == dim and sizes["encoder_depth"] == depth:
            return f" (it holds a {name} image encoder)"
    return f" (it holds an image encoder of width {dim} and depth {depth})"


def resize_position_embeddings(state: dict[str, torch.Tensor], sam: nn.Module) -> dict[str, torch.Tensor]:
    """`state` with the image encoder's absolute and relative position embeddings resized to `sam`'s
    input size; tensors whose other dimensions differ are left alone (load_sam_checkpoint reports them).
    """
    own = sam.state_dict()
    out = dict(state)
    key = "image_encoder.pos_embed"
    if key in state and key in own and state[key].shape != own[key].shape:
        src, dst = state[key], own[key]
        if src.dim() == 4 and src.shape[0] == 1 and src.shape[3] == dst.shape[3]:
            # (1, H, W, C) -> (1, C, H, W) for interpolate, and back
            resized = F.interpolate(src.permute(0, 3, 1, 2).float(), size=tuple(dst.shape[1:3]),
                                    mode="bicubic", align_corners=False)
            out[key] = resized.permute(0, 2, 3, 1).to(src.dtype).contiguous()
    for key, dst in own.items():
        if not key.endswith((".attn.rel_pos_h", ".attn.rel_pos_w")) or key not in state:
            continue
        src = state[key]
        if src.shape != dst.shape and src.dim() == 2 and src.shape[1] == dst.shape[1]:
            # (L, C) -> (1, C, L) for interpolate, and back: the linear resize get_rel_pos applies.
            resized = F.interpolate(src.t()[None].float(), size=dst.shape[0], mode="linear",
                                    align_corners=False)
            out[key] = resized[0].t().to(src.dtype).contiguous()
    return out


# ---------------------------------------------------------------------------------------------------
# The adapter and the model


class SpatialAdapter(nn.Module):
    """Residual conv adapter on the 256-channel image embedding: x + up(gelu(bn(point(depthwise(x))))).

    Layout (C = 256, no conv biases): depthwise 3x3 (C * 9 = 2,304) -> 1x1 conv C->C (65,536) ->
    BatchNorm2d (weight + bias: 512; running stats are buffers) -> GELU -> 1x1 conv C->C (65,536),
    zero-initialised, so the adapter starts as the identity. Total 133,888 as published (docs/methods.md §4).
    """

    def __init__(self, channels: int = PROMPT_EMBED_DIM) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(channels)
        self.act = nn.GELU()
        self.out = nn.Conv2d(channels, channels, 1, bias=False)
        nn.init.zeros_(self.out.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.act(self.norm(self.pointwise(self.depthwise(x)))))


def _checkpointed(forward: Any, x: torch.Tensor) -> torch.Tensor:
    # The block's submodules run through their own __call__ in the recomputation too, so ZeRO-3's
    # hooks gather their parameters again in backward.
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, x, use_reentrant=False)
    return forward(x)


class TopoLoraSam(nn.Module):
    """Prompt-free SAM: images (B, 3, S, S), already normalised and padded (prepare_image), to mask
    logits (B, 1, S, S).

    The submodules keep segment_anything's names (image_encoder, prompt_encoder, mask_decoder) so that,
    after merge_lora, the state dict is a SAM checkpoint plus `adapter.*`.
    """

    def __init__(self, sam: nn.Module, config: SamModelConfig) -> None:
        super().__init__()
        self.config = config
        self.image_size = config.image_size
        self.image_encoder = sam.image_encoder
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.adapter = SpatialAdapter(PROMPT_EMBED_DIM) if config.adapter else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the image encoder's blocks (train.grad_checkpointing): each
        block's activations are recomputed in backward instead of kept, the bulk of the memory at 1024
        px. Non-reentrant checkpointing, so the LoRA weights inside the frozen blocks still get their
        gradients although the blocks' inputs need none."""
        for block in self.image_encoder.blocks:
            if enable:
                block.forward = partial(_checkpointed, type(block).forward.__get__(block))
            else:
                block.__dict__.pop("forward", None)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 256, S/16, S/16): the encoder's embedding after the adapter."""
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"SAM expects images of shape (B, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(images.shape)}")
        return self.adapter(self.image_encoder(images))

    def low_res_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, S/4, S/4) single-mask logits (256 x 256 at S = 1024)."""
        return decode_without_prompts(self.mask_decoder, self.prompt_encoder, self.image_embeddings(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        low = self.low_res_logits(images)
        return F.interpolate(low, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)


def decode_without_prompts(decoder: nn.Module, prompt_encoder: nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
    """SAM's mask decoder on a batch of image embeddings with no prompt: (B, 1, h, w) single-mask logits.

    segment_anything's MaskDecoder repeats ONE image's embedding once per prompt, so Sam.forward decodes
    image by image; without prompts every image has the same tokens (an empty sparse set, the learned
    no-mask dense embedding), so each step of the decoder applies to the whole batch at once: the same
    arithmetic as MaskDecoder.predict_masks image by image (tests/test_seg_batched_decode.py), several
    times faster for small images. Decoder weights are reached through module calls only, so ZeRO-3
    gathers them. Every hypernetwork MLP runs as in predict_masks (the unused ones get zero gradients,
    not none), so training is unchanged; the IoU head, whose output is unused, is skipped there too.
    """
    b = embeddings.shape[0]
    device = embeddings.device
    sparse, dense = prompt_encoder(points=None, boxes=None, masks=None)
    n_masks = decoder.num_mask_tokens
    output_tokens = torch.cat([decoder.iou_token(torch.zeros(1, dtype=torch.long, device=device)),
                               decoder.mask_tokens(torch.arange(n_masks, device=device))], dim=0)
    tokens = torch.cat((output_tokens[None].expand(b, -1, -1), sparse.expand(b, -1, -1)), dim=1)
    src = embeddings + dense
    pos = prompt_encoder.get_dense_pe().expand(b, -1, -1, -1)
    _, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos, tokens)
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in range(n_masks)], dim=1)
    _, c, h, w = upscaled.shape
    masks = (hyper @ upscaled.reshape(b, c, h * w)).reshape(b, n_masks, h, w)
    return masks[:, :1]  # multimask_output=False keeps mask token 0


def build_topolora_sam(cfg: SamModelConfig, load_checkpoint: bool = True) -> TopoLoraSam:
    """SAM (+ checkpoint when cfg.checkpoint and load_checkpoint) with LoRA, the adapter and the trainable
    mask decoder; every other parameter frozen. Nothing is downloaded."""
    sam = build_sam(cfg)
    if load_checkpoint and cfg.checkpoint:
        load_sam_checkpoint(sam, cfg.checkpoint, cfg.variant)
    if cfg.lora_r > 0 and cfg.lora_targets:
        _inject_lora(sam.image_encoder, cfg)
    model = TopoLoraSam(sam, cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(_group(name) != "frozen")
    return model


def _inject_lora(encoder: nn.Module, cfg: SamModelConfig) -> None:
    """peft LoRA on the encoder blocks' target linears (in place): y = W0 x + (alpha / r) B A x, A
    kaiming-uniform, B zero (peft's default init). peft fits cleanly: injected into the image encoder
    only, it cannot touch the mask decoder's linears, and its merge folds B A into W0."""
    from peft import LoraConfig, inject_adapter_in_model

    names = "|".join(sorted({_target_name(t).replace(".", r"\.") for t in cfg.lora_targets}))
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=rf"blocks\.\d+\.(?:{names})", bias="none", init_lora_weights=True)
    inject_adapter_in_model(lora, encoder)


def _group(name: str) -> str:
    if ".lora_" in name:
        return "lora"
    if name.startswith("adapter."):
        return "adapter"
    if name.startswith("mask_decoder."):
        return "mask_decoder"
    return "frozen"


def trainable_parameter_report(model: nn.Module) -> dict[str, Any]:
    """{'trainable', 'total', 'fraction', 'groups': {lora, adapter, mask_decoder, frozen}}: parameter
    counts (each group counts all its parameters; 'frozen' is everything else)."""
    groups = {"mask_decoder": 0, "lora": 0, "adapter": 0, "frozen": 0}
    trainable = total = 0
    for name, p in model.named_parameters():
        groups[_group(name)] += p.numel()
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1), "groups": groups}


def trainable_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the parts that train (LoRA, adapter with its BatchNorm statistics, mask
    decoder): what a trainable-only export holds. Everything else comes from the base checkpoint."""
    return {name for name in model.state_dict() if _group(name) != "frozen"}


def checkpoint_identity(path: str | Path) -> dict[str, Any]:
    """{'path' (absolute), 'size' (bytes), 'sha256'} of a base checkpoint file: what a trainable-only
    export records so that it is only ever completed with the weights it was trained on."""
    path = Path(path).resolve()
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {"path": str(path), "size": path.stat().st_size, "sha256": digest.hexdigest()}


def format_parameter_report(report: dict[str, Any]) -> str:
    g = report["groups"]
    return (f"trainable parameters {report['trainable']:,} of {report['total']:,} "
            f"({100 * report['fraction']:.2f}%): mask decoder {g['mask_decoder']:,}, LoRA {g['lora']:,}, "
            f"adapter {g['adapter']:,}")


def merge_lora(model: TopoLoraSam) -> TopoLoraSam:
    """Fold every LoRA update into its base weight (W0 + (alpha/r) B A, peft's merge) and put the plain
    nn.Linear back, in place; returns the model, whose state dict is then SAM's keys plus adapter.*."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in targets:
        module.merge()
        base = module.get_base_layer()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    for name, p in model.named_parameters():
        if _group(name) == "frozen":
            p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------
# Pre- and post-processing (SAM's ResizeLongestSide, normalisation, bottom/right padding)


def resized_shape(height: int, width: int, image_size: int) -> tuple[int, int]:
    """(h, w) with the longest side scaled to image_size, as SAM's ResizeLongestSide rounds it."""
    scale = image_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_like_sam(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, H, W) 0..255 images resized to `size` (h, w) exactly as SAM's ResizeLongestSide.apply_image
    does: quantised to uint8, then PIL's bilinear resize (torchvision's resize of a PIL image, whose
    default interpolation is bilinear). torch's own antialiased bilinear differs from PIL on ~0.1% of
    pixels by one grey level, so PIL is called: SAM's weights were trained on its exact output."""
    h, w = size
    if images.dtype != torch.uint8:
        images = images.round().clamp(0, 255).to(torch.uint8)
    arrays = images.permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack([np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.BILINEAR)) for a in arrays])
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(images.device, torch.float32)


def prepare_image(images: torch.Tensor, image_size: int, mean: tuple[float, ...] = PIXEL_MEAN,
                  std: tuple[float, ...] = PIXEL_STD) -> tuple[torch.Tensor, tuple[int, int]]:
    """Model input from images in 0..255, (B, C, H, W) or (C, H, W) with C = 1 (grey, repeated) or 3:
    quantise to uint8 and resize the longest side to image_size as SAM does (resize_like_sam),
    normalise with SAM's pixel mean/std (or `mean`/`std`, in 0..255 units), pad bottom/right with zeros
    (SAM pads after normalising).
    Returns (input, (h, w) after resizing)."""
    x = images[None] if images.dim() == 3 else images
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"images need 1 or 3 channels, got {x.shape[1]}")
    h, w = resized_shape(x.shape[-2], x.shape[-1], image_size)
    x = resize_like_sam(x, (h, w)) if (h, w) != tuple(x.shape[-2:]) else x.float().round().clamp(0, 255)
    x = (x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return F.pad(x, (0, image_size - w, 0, image_size - h)), (h, w)


def prepare_mask(masks: torch.Tensor, image_size: int) -> torch.Tensor:
    """Target (B, 1, H, W) or (H, W) masks resized (nearest) and padded with 0 like prepare_image."""
    m = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    h, w = resized_shape(m.shape[-2], m.shape[-1], image_size)
    if (h, w) != tuple(m.shape[-2:]):
        m = F.interpolate(m, size=(h, w), mode="nearest")
    return F.pad(m, (0, image_size - w, 0, image_size - h))


def restore_logits(logits: torch.Tensor, resized_hw: tuple[int, int],
                   original_hw: tuple[int, int]) -> torch.Tensor:
    """The inverse for outputs: crop the padding, resize (bilinear) to the original (H, W)."""
    h, w = resized_hw
    out = logits[..., :h, :w]
    if (h, w) != tuple(original_hw):
        out = F.interpolate(out, size=tuple(original_hw), mode="bilinear", align_corners=False)
    return out

