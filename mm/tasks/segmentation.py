"""Segmentation shared by the trainers on segmentation shards (topolora_sam, unet): the data section,
the samples (`key.png|jpg` + `key.mask.png` + optional `key.fov.png`, augmented on the training split),
the loader, the loss weights (BCE + soft Dice + soft clDice, mm.losses.segmentation) and validation
(mm.metrics.segmentation at the model input resolution, inside the field of view).

Two geometries (data.crop_mode):
- scale (default): images are resized (longest side to model.image_size) and padded as SAM does
  (mm.models.sam.prepare_image), after a random crop of random size; validation on resized images.
- patch: native resolution. Training samples are model.image_size squares cut out of the full-size
  image (no resize), redrawn until at least data.min_fov of the square is field of view, with flips and
  90-degree rotations; validation tiles each full-size image with mm.models.tiling.tile_logits, the code
  `mm segment` runs, and the export records training scale 1, so `mm segment --mode auto` tiles too.
The normalisation is SAM's pixel mean/std unless a task passes its own (`mean`/`std` in 0..1 units, as
timm's pretrained configs give them)."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mm.config import DataConfig
from mm.data.image_text import decode_image
from mm.data.loader import Loader, SampleError
from mm.data.streams import stream_from_config
from mm.engine.task import ONE_RANK, World
from mm.errors import ConfigError, UserError
from mm.metrics.segmentation import pool_metrics, segmentation_metrics
from mm.models.sam import PIXEL_MEAN, PIXEL_STD, prepare_image, prepare_mask
from mm.models.tiling import blend_weights, tile_logits
from mm.tasks.base import TaskBase, share_rank0_buffers

CROP_MODES = ("scale", "patch")
# Image fields of a segmentation sample; `mask.png` and `fov.png` are separate fields of the same key.
SEG_IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


@dataclass
class SegDataConfig(DataConfig):
    """The shared data section plus the segmentation augmentation (training split only); images go to
    the model at model.image_size."""

    augment: bool = True  # random scale/crop (or patch) and flips on the training split
    crop_mode: str = "scale"  # scale: random crop resized to the input | patch: native-resolution squares
    crop_min: float = 0.6  # scale: smallest crop side, as a fraction of the image side (1.0 = no crop)
    min_fov: float = 0.5  # patch: least field-of-view fraction of a training square (redrawn until then)
    crop_tries: int = 20  # patch: draws before the square with the most field of view is taken
    rot90: bool = True  # patch: random 90-degree rotations (squares keep their shape)
    hflip: bool = True
    vflip: bool = True
    color_jitter: float = 0.0  # brightness/contrast factors drawn from [1 - j, 1 + j]; 0 = off (SAR)
    val_overlap: float = 0.25  # patch: tile overlap of the native-resolution validation (mm segment's default)


def check_seg_data(data: SegDataConfig) -> None:
    if data.crop_mode not in CROP_MODES:
        raise ConfigError(f"data.crop_mode must be one of {', '.join(CROP_MODES)}, got {data.crop_mode!r}")
    if not 0 <= data.min_fov <= 1:
        raise ConfigError(f"data.min_fov must be in [0, 1], got {data.min_fov}")
    if data.crop_tries < 1:
        raise ConfigError(f"data.crop_tries must be at least 1, got {data.crop_tries}")
    if not 0 <= data.val_overlap < 1:
        raise ConfigError(f"data.val_overlap must be in [0, 1), got {data.val_overlap}")


@dataclass
class SegLossConfig:
    bce: float = 1.0
    dice: float = 1.0
    cldice: float = 0.5
    cldice_iters: int = 10


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
    return _jitter(image, rng, cfg), mask, fov


def _jitter(image: torch.Tensor, rng: random.Random, cfg: SegDataConfig) -> torch.Tensor:
    if cfg.color_jitter <= 0:
        return image
    j = cfg.color_jitter
    brightness, contrast = rng.uniform(1 - j, 1 + j), rng.uniform(1 - j, 1 + j)
    mean = image.mean()
    return ((image - mean) * contrast + mean * brightness).clamp(0, 255)


def patch_crop(image: torch.Tensor, mask: torch.Tensor, fov: torch.Tensor, size: int, rng: random.Random,
               cfg: SegDataConfig, fill: tuple[float, ...] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A size x size square of the native-resolution image (no resize), drawn until at least
    cfg.min_fov of it is field of view (after cfg.crop_tries draws: the one with the most), then flips,
    a random 90-degree rotation and the optional colour jitter, all from `rng`. A side shorter than
    `size` is padded: mask and fov with 0 (padding is never scored), the image with `fill` per channel
    (the normalisation mean, so padding reaches the model as about 0, as tile_logits pads at inference;
    None = 0). Shapes as augment()."""
    h, w = image.shape[-2:]
    if h < size or w < size:
        pad = (0, max(0, size - w), 0, max(0, size - h))
        mask, fov = (torch.nn.functional.pad(t, pad) for t in (mask, fov))
        padded = torch.nn.functional.pad(image, pad)
        if fill is not None:
            inside = torch.nn.functional.pad(torch.ones_like(image[:1]), pad).bool()
            padded = torch.where(inside, padded, torch.tensor(fill, dtype=image.dtype).view(-1, 1, 1))
        image = padded
        h, w = image.shape[-2:]
    best, best_frac = (0, 0), -1.0
    for _ in range(cfg.crop_tries):
        top, left = rng.randint(0, h - size), rng.randint(0, w - size)
        frac = float(fov[..., top:top + size, left:left + size].mean())
        if frac > best_frac:
            best, best_frac = (top, left), frac
        if frac >= cfg.min_fov:
            break
    top, left = best
    image, mask, fov = (t[..., top:top + size, left:left + size] for t in (image, mask, fov))
    if cfg.hflip and rng.random() < 0.5:
        image, mask, fov = (t.flip(-1) for t in (image, mask, fov))
    if cfg.vflip and rng.random() < 0.5:
        image, mask, fov = (t.flip(-2) for t in (image, mask, fov))
    if cfg.rot90:
        k = rng.randrange(4)
        image, mask, fov = (torch.rot90(t, k, (-2, -1)) for t in (image, mask, fov))
    return _jitter(image, rng, cfg), mask, fov


def seg_sample_map(image_size: int, data: SegDataConfig | None = None, train: bool = False,
                   mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
                   ) -> Callable[[dict, random.Random], dict[str, Any]]:
    """Sample map for segmentation shards: {image (3,S,S) normalised, mask (1,S,S) 0/1, valid (1,S,S) 0/1,
    key}. `valid` is the field of view (all ones without one) and 0 on the padding. Augmented when
    `train` and data.augment. `mean`/`std` (0..1 units, None = SAM's pixel statistics) normalise the image."""
    data = data or SegDataConfig()
    norm = {} if mean is None else {"mean": tuple(255.0 * m for m in mean), "std": tuple(255.0 * s for s in std)}

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
        if train and data.crop_mode == "patch":
            # Squares must be cut either way; augment: false only drops the flips, rotations and jitter.
            img, m, v = patch_crop(img, m, v, image_size, rng, data if data.augment else replace(
                data, hflip=False, vflip=False, rot90=False, color_jitter=0.0), norm.get("mean", PIXEL_MEAN))
        elif train and data.augment:
            img, m, v = augment(img, m, v, rng, data)
        x, _ = prepare_image(img, image_size, **norm)
        return {"image": x[0], "mask": prepare_mask(m, image_size)[0], "valid": prepare_mask(v, image_size)[0],
                "key": key}

    return sample_map


def seg_normalisation(cfg: Any) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """(mean, std) in 0..1 units from cfg.model.mean/std when the model config has them and they are set;
    (None, None) = SAM's pixel statistics."""
    mean, std = getattr(cfg.model, "mean", None), getattr(cfg.model, "std", None)
    return (tuple(mean), tuple(std)) if mean and std else (None, None)


def seg_batches(cfg: Any, split: str, world: World = ONE_RANK, state: dict | None = None) -> Loader:
    """The shared loader over segmentation shards (mm.data.streams): endless and shuffled for 'train',
    one pass otherwise (each rank its own shards of it)."""
    mean, std = seg_normalisation(cfg)
    sample_map = seg_sample_map(cfg.model.image_size, cfg.data, split == "train", mean, std)
    return stream_from_config(cfg.data, split, sample_map, seed=cfg.train.seed, rank=world.rank,
                              world_size=world.size, eval_batch_size=cfg.eval.batch_size, state=state)


# ---------------------------------------------------------------------------------------------------
# Evaluation


def native_sample_map(raw: dict, rng: random.Random) -> dict[str, Any]:
    """A validation sample at native resolution: image (3, H, W) uint8, mask and valid (H, W) bool."""
    key = raw.get("__key__", "?")
    if "mask.png" not in raw:
        raise SampleError("missing_mask", key)
    image = decode_image(raw, SEG_IMAGE_KEYS, "RGB")
    mask = np.asarray(_decode_extra(raw, "mask.png", "mask")) > 127
    fov = np.asarray(_decode_extra(raw, "fov.png", "fov")) > 127 if "fov.png" in raw else np.ones_like(mask)
    if mask.shape != fov.shape or mask.shape != (image.height, image.width):
        raise SampleError("mask_size_mismatch", f"{key}: image {image.size}, mask/fov {mask.shape[::-1]}")
    return {"image": torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1), "mask": torch.from_numpy(mask),
            "valid": torch.from_numpy(fov), "key": key}


def pixel_normalisation(cfg: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The model input's (mean, std) in 0..255 units, as `mm segment` normalises for this config."""
    mean, std = seg_normalisation(cfg)
    if mean is None:
        return PIXEL_MEAN, PIXEL_STD
    return tuple(255.0 * m for m in mean), tuple(255.0 * s for s in std)


def _pooled(per_image: list[dict]) -> dict[str, float]:
    if not per_image:
        return {}
    pooled = pool_metrics(per_image)
    out = {f"val/{k}": float(pooled[f"mean_{k}"])
           for k in ("dice", "cldice", "iou", "precision", "recall", "betti0_error", "betti1_error", "hd95")}
    out["val/global_dice"] = float(pooled["global_dice"])
    out["val/n_images"] = float(pooled["n_images"])
    return out


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, cfg: Any, threshold: float = 0.5, world: World | None = None
                          ) -> dict[str, float]:
    """Dice, clDice, IoU... of sigmoid(logits) > threshold on cfg.data.val, per image inside `valid`
    (FOV, padding excluded), pooled, the same on every rank. With data.crop_mode scale each rank of
    `world` (by default the torch.distributed group) segments its own shards in lockstep with the others
    (mm.data.streams.lockstep) and the per-image results of all ranks are pooled.

    data.crop_mode scale: at the model input resolution (resized images; `mm segment` measures at native
    resolution). patch: at native resolution, tiled (evaluate_native), as `mm segment --mode auto` does.
    """
    if not cfg.data.val:
        return {}
    from mm import dist
    from mm.data.streams import lockstep

    world = world or World(dist.rank(), dist.world_size())
    if world.size > 1:
        share_rank0_buffers(model)
    if cfg.data.crop_mode == "patch":
        return evaluate_native(model, cfg, threshold, world)
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    per_image = []
    batches = seg_batches(cfg, "val", world)
    for batch in lockstep(batches) if world.size > 1 else batches:
        logits = model(batch["image"].to(p.device, p.dtype)).float().cpu()
        if batch.get("pad"):
            continue
        pred = (logits.sigmoid() > threshold).numpy()
        for pr, m, v in zip(pred, batch["mask"].numpy(), batch["valid"].numpy()):
            per_image.append(segmentation_metrics(pr[0], m[0], v[0]))
    model.train(was_training)
    if world.size > 1:  # a few numbers per image: all of them, in rank order
        import torch.distributed as tdist

        everyone: list[Any] = [None] * world.size
        tdist.all_gather_object(everyone, per_image)
        per_image = [m for part in everyone for m in part]
    return _pooled(per_image)


@torch.no_grad()
def evaluate_native(model: torch.nn.Module, cfg: Any, threshold: float = 0.5, world: World = ONE_RANK
                    ) -> dict[str, float]:
    """Validation at native resolution: each cfg.data.val image whole, tiled at model.image_size with
    mm.models.tiling.tile_logits (Gaussian blend, data.val_overlap, eval.batch_size tiles a call), the
    code and defaults `mm segment` runs; prediction outside the field of view is background. Each rank
    of `world` segments its own shards; the per-image results of all ranks are pooled."""
    import torch.distributed as tdist

    was_training = model.training
    model.eval()
    p = next(model.parameters())
    mean, std = (torch.tensor(v, device=p.device).view(1, 3, 1, 1) for v in pixel_normalisation(cfg))
    size = cfg.model.image_size
    weights = blend_weights(size, "gaussian").to(p.device)

    def any_rank_busy(busy: bool) -> bool:
        # ZeRO-3 gathers parameters inside every forward, so every rank must run as many forwards as the
        # busiest one; images differ in tile count, so the ranks agree before each forward.
        flag = torch.tensor([float(busy)], device=p.device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.item())

    def predict(x: torch.Tensor) -> torch.Tensor:
        if world.size > 1:
            any_rank_busy(True)
        return model(x.to(p.device, p.dtype)).float()

    loader = stream_from_config(cfg.data, "val", native_sample_map, seed=cfg.train.seed, rank=world.rank,
                                world_size=world.size, eval_batch_size=1)
    per_image = []
    for batch in loader:
        logits = tile_logits(predict, batch["image"][0].to(p.device), size, mean, std, cfg.data.val_overlap,
                             weights, cfg.eval.batch_size)[0]
        fov = batch["valid"][0].numpy()
        prob = np.where(fov, logits.sigmoid().cpu().numpy(), 0.0)
        per_image.append(segmentation_metrics(prob > threshold, batch["mask"][0].numpy(), fov))
    if world.size > 1:
        while any_rank_busy(False):  # this rank's images are done: padding forwards until every rank's are
            model(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
        everyone: list[Any] = [None] * world.size
        tdist.all_gather_object(everyone, per_image)
        per_image = [m for part in everyone for m in part]
    model.train(was_training)
    return _pooled(per_image)


PROVENANCE_SAMPLES = 256  # training samples whose json is read for the export's data record


def data_provenance(cfg: Any, limit: int = PROVENANCE_SAMPLES) -> dict[str, Any]:
    """What mm-segment needs to see images as training saw them, from the json mm-shards writes with
    each segmentation sample (up to `limit` samples of data.train): the normalisation (pixels were
    normalised when the shards were written, so training applied it; mm-segment applies the same by
    default) and the training scale, model.image_size / longest side of the source image (median;
    random crops zoom in up to 1 / data.crop_min on top), which `mm-segment --mode auto` follows.
    Empty for shards without such json (older shards, the synthetic worlds). With data.crop_mode patch
    the training scale is 1 (native resolution), recorded with or without json."""
    import tarfile

    from mm.data.loader import expand_sources

    norms: dict[str, dict] = {}
    scales: list[float] = []
    try:
        urls = [u for src in expand_sources(cfg.data.train) for u in src]
    except UserError:
        return {}
    for url in urls:
        if len(scales) >= limit or not Path(url).is_file():
            break
        try:
            with tarfile.open(url) as tar:
                for member in tar:
                    if not member.name.endswith(".json") or len(scales) >= limit:
                        continue
                    meta = json.loads(tar.extractfile(member).read())
                    if not isinstance(meta, dict) or "source_size" not in meta:
                        continue
                    norm = meta.get("normalisation") or {}
                    norms[json.dumps(norm, sort_keys=True)] = norm
                    scales.append(cfg.model.image_size / max(meta["source_size"]))
        except (OSError, tarfile.TarError, ValueError):
            continue
    patch = cfg.data.crop_mode == "patch"
    if not scales:
        return {"train_scale": 1.0, "crop_mode": "patch"} if patch else {}
    out: dict[str, Any] = {"train_scale": float(np.median(scales)), "scale_range": [min(scales), max(scales)],
                           "samples_read": len(scales)}
    if patch:
        out.update(train_scale=1.0, scale_range=[1.0, 1.0], crop_mode="patch")
    if len(norms) == 1:
        out["normalisation"] = next(iter(norms.values()))
    else:  # shards written with different options: no single default for inference
        out["normalisations"] = list(norms.values())
    return out


class SegmentationTask(TaskBase):
    """What the segmentation trainers (TopoLoRA-SAM, U-Net) share: the seg shards loader, a loss module
    `self.loss(logits, mask, valid)` and the validation metrics; subclasses build the model."""

    loss: Callable

    def __init__(self, cfg: Any = None) -> None:
        super().__init__(cfg)
        check_seg_data(self.cfg.data)

    def batches(self, split: str, world: World = ONE_RANK, state: dict | None = None) -> Loader:
        return seg_batches(self.cfg, split, world, state)

    def losses(self, model: torch.nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        logits = model(batch["image"])
        return self.loss(logits, batch["mask"], batch["valid"])

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return evaluate_segmentation(model, self.cfg)
