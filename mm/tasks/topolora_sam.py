"""TopoLoRA-SAM on the shared engine (METHODS.md section 4): prompt-free SAM with LoRA in the image
encoder, a spatial conv adapter and a trainable mask decoder, trained with BCE + soft Dice + soft clDice
on segmentation shards (`key.png|jpg` + `key.mask.png` + optional `key.fov.png`).

What is not here yet (later issues):
- Validation runs at the model's input resolution (the image resized so its longest side is
  model.image_size, padding excluded). Native-resolution sliding-window inference restricted to the
  field of view, as field practice evaluates vessels, belongs to the inference CLI.
- The export (`<out_dir>/export/model.safetensors`) holds every weight, the frozen SAM included; the
  issue asks for trainable-only exports (LoRA + adapter + decoder over a named SAM checkpoint).
- ZeRO 1, 2 and 3 train and export (frozen SAM weights included, see mm/engine/checkpoint.py).
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from mm import dist as mmdist
from mm.config import DataConfig, RunConfig
from mm.data.image_text import decode_image
from mm.data.loader import Loader, SampleError, StreamSpec, default_collate
from mm.errors import UserError
from mm.losses.segmentation import SegLoss
from mm.metrics.segmentation import pool_metrics, segmentation_metrics
from mm.models.sam import (
    SamModelConfig,
    build_topolora_sam,
    format_parameter_report,
    prepare_image,
    prepare_mask,
    trainable_parameter_report,
)
from mm.tasks.base import Task

# Image fields of a segmentation sample; `mask.png` and `fov.png` are separate fields of the same key.
SEG_IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


@dataclass
class SegDataConfig(DataConfig):
    """The shared data section plus the segmentation augmentation (training split only).

    data.image_size is not used here: images go to the model at model.image_size.
    """

    augment: bool = True  # random scale/crop and flips on the training split
    crop_min: float = 0.6  # smallest crop side, as a fraction of the image side (1.0 = no crop)
    hflip: bool = True
    vflip: bool = True
    color_jitter: float = 0.0  # brightness/contrast factors drawn from [1 - j, 1 + j]; 0 = off


@dataclass
class SegLossConfig:
    bce: float = 1.0
    dice: float = 1.0
    cldice: float = 0.5
    cldice_iters: int = 10


@dataclass
class TopoLoraRunConfig(RunConfig):
    model: SamModelConfig = field(default_factory=SamModelConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    loss: SegLossConfig = field(default_factory=SegLossConfig)


# ---------------------------------------------------------------------------------------------------
# Samples


def _decode_extra(raw: dict, key: str, kind: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(raw[key]))
        image.load()
        return image.convert("L")
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for corrupt files
        raise SampleError(f"undecodable_{kind}", f"{raw.get('__key__', '?')}: {e}") from None


def augment(image: torch.Tensor, mask: torch.Tensor, fov: torch.Tensor, rng: random.Random,
            cfg: SegDataConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random crop (a random scale: the crop is resized to the model input later), flips and optional
    colour jitter, all drawn from `rng` (the loader's per-sample generator, so a resumed run draws the
    same). image (3, H, W) float 0..255; mask and fov (1, H, W)."""
    h, w = image.shape[-2:]
    if cfg.crop_min < 1.0:
        ch = max(1, round(h * rng.uniform(cfg.crop_min, 1.0)))
        cw = max(1, round(w * rng.uniform(cfg.crop_min, 1.0)))
        top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
        image, mask, fov = (t[..., top:top + ch, left:left + cw] for t in (image, mask, fov))
    if cfg.hflip and rng.random() < 0.5:
        image, mask, fov = (t.flip(-1) for t in (image, mask, fov))
    if cfg.vflip and rng.random() < 0.5:
        image, mask, fov = (t.flip(-2) for t in (image, mask, fov))
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        brightness, contrast = rng.uniform(1 - j, 1 + j), rng.uniform(1 - j, 1 + j)
        mean = image.mean()
        image = ((image - mean) * contrast + mean * brightness).clamp(0, 255)
    return image, mask, fov


def seg_sample_map(image_size: int, data: SegDataConfig | None = None,
                   train: bool = False) -> Callable[[dict, random.Random], dict[str, Any]]:
    """Sample map for segmentation shards: {image (3,S,S) normalised, mask (1,S,S) 0/1, valid (1,S,S) 0/1,
    key}. `valid` is the field of view (all ones without one) and 0 on the padding. Augmented when
    `train` and data.augment."""
    data = data or SegDataConfig()

    def sample_map(raw: dict, rng: random.Random) -> dict[str, Any]:
        key = raw.get("__key__", "?")
        if "mask.png" not in raw:
            raise SampleError("missing_mask", key)
        image = decode_image(raw, SEG_IMAGE_KEYS, "RGB")
        mask = _decode_extra(raw, "mask.png", "mask")
        if mask.size != image.size:
            raise SampleError("mask_size_mismatch", f"{key}: image {image.size}, mask {mask.size}")
        fov = _decode_extra(raw, "fov.png", "fov") if "fov.png" in raw else None
        if fov is not None and fov.size != image.size:
            raise SampleError("fov_size_mismatch", f"{key}: image {image.size}, fov {fov.size}")
        img = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()
        m = torch.from_numpy((np.asarray(mask) > 127).astype(np.float32))[None]
        v = (torch.from_numpy((np.asarray(fov) > 127).astype(np.float32))[None] if fov is not None
             else torch.ones_like(m))
        if train and data.augment:
            img, m, v = augment(img, m, v, rng, data)
        x, _ = prepare_image(img, image_size)
        return {"image": x[0], "mask": prepare_mask(m, image_size)[0], "valid": prepare_mask(v, image_size)[0],
                "key": key}

    return sample_map


def seg_batches(cfg: TopoLoraRunConfig, split: str, rank: int = 0, world_size: int = 1,
                state: dict | None = None) -> Loader:
    """The shared loader over segmentation shards: endless and shuffled for 'train', one pass otherwise
    (every rank reads the whole val set)."""
    train = split == "train"
    urls = cfg.data.train if train else cfg.data.val
    if not urls:
        raise UserError(f"data.{'train' if train else 'val'}: no shards given")
    spec = StreamSpec(
        urls=urls, sample_map=seg_sample_map(cfg.model.image_size, cfg.data, train),
        collate=default_collate, batch_size=cfg.data.batch_size if train else cfg.eval.batch_size,
        seed=cfg.train.seed, rank=rank if train else 0, world_size=world_size if train else 1,
        num_workers=cfg.data.num_workers if train else 0,
        shuffle_buffer=cfg.data.shuffle_buffer if train else 0, repeat=train,
        resampled=cfg.data.resampled and train, weights=cfg.data.train_weights if train else [],
        drop_last=train,
    )
    return Loader(spec, state=state, max_bad_fraction=cfg.data.max_bad_fraction)


# ---------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, cfg: TopoLoraRunConfig, threshold: float = 0.5
                          ) -> dict[str, float]:
    """Dice, clDice, IoU... of sigmoid(logits) > threshold on cfg.data.val, per image at the model input
    resolution inside `valid` (FOV, padding excluded), pooled. Every rank evaluates the whole set.

    Native-resolution sliding-window evaluation is a later issue; these numbers are on resized images.
    """
    if not cfg.data.val:
        return {}
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    per_image = []
    for batch in seg_batches(cfg, "val"):
        logits = model(batch["image"].to(p.device, p.dtype)).float().cpu()
        pred = (logits.sigmoid() > threshold).numpy()
        for pr, m, v in zip(pred, batch["mask"].numpy(), batch["valid"].numpy()):
            per_image.append(segmentation_metrics(pr[0], m[0], v[0]))
    model.train(was_training)
    if not per_image:
        return {}
    pooled = pool_metrics(per_image)
    out = {f"val/{k}": float(pooled[f"mean_{k}"])
           for k in ("dice", "cldice", "iou", "precision", "recall", "betti0_error", "betti1_error", "hd95")}
    out["val/global_dice"] = float(pooled["global_dice"])
    out["val/n_images"] = float(pooled["n_images"])
    return out


# ---------------------------------------------------------------------------------------------------
# The task


class TopoLoraSamTask(Task):
    name = "topolora_sam"
    config_class = TopoLoraRunConfig

    def __init__(self) -> None:
        self.seg_loss = SegLoss()
        self._reported = False

    def build_model(self, cfg: TopoLoraRunConfig, load_pretrained: bool = True) -> torch.nn.Module:
        model = build_topolora_sam(cfg.model, load_pretrained)
        lc = cfg.loss
        self.seg_loss = SegLoss(lc.bce, lc.dice, lc.cldice, lc.cldice_iters)
        if load_pretrained and not self._reported and mmdist.rank() == 0:
            print(f"topolora_sam: {format_parameter_report(trainable_parameter_report(model))}", flush=True)
            self._reported = True
        return model

    def batches(self, cfg: TopoLoraRunConfig, split: str, rank: int = 0, world_size: int = 1,
                state: dict | None = None) -> Loader:
        return seg_batches(cfg, split, rank, world_size, state)

    def losses(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        logits = model(batch["image"])
        return self.seg_loss(logits, batch["mask"], batch["valid"])

    def evaluate(self, model: torch.nn.Module, cfg: TopoLoraRunConfig) -> dict[str, float]:
        return evaluate_segmentation(model, cfg)
