"""mm-segment: binary segmentation of image files, folders or globs with an exported TopoLoRA-SAM.

    mm-segment --checkpoint runs/x/export/model.safetensors -i DRIVE/test/images -o out/ \
        --masks DRIVE/test/1st_manual --image-suffix _test --mask-suffix _manual1 \
        --fov DRIVE/test/mask --fov-suffix _test_mask

Per image: <key>_mask.png (0/255), <key>_overlay.png (predicted outline red, ground truth green), with
--save-prob <key>_prob.png (8-bit) or <key>_prob.tif (float32); with --keep-names the mask is named
as the input (<key>.png, nnU-Net style, so evaluation tools pair it with its label by name) and the
overlays and probabilities go to overlay/ and prob/. A GeoTIFF input gives TIFF masks and
probabilities carrying its georeferencing. With --masks: metrics.json and metrics.csv (per image
and pooled, mm/metrics/segmentation.py). Everything is at the input's native size.

Geometry (--mode): 'resize' feeds the whole image resized so its longest side is the model's input size
S (SAM's ResizeLongestSide + padding), then resizes the logits back; 'tile' slides S x S windows over
the image at native resolution (overlap --overlap, blended --blend, --batch-size tiles per encoder
call; a side shorter than S is padded as SAM pads); 'auto' (default) follows the scale the model was
trained at, which the export records (model pixels per source pixel of the training images): the
image is resized by that scale, then fed whole when it fits in S x S and tiled otherwise, and the
logits are resized back. An export without that record (older exports, shards without json) resizes
images that fit in S x S and tiles larger ones at native resolution. With a field-of-view mask,
predictions outside it are set to background and the metrics count only pixels inside it.

Safety: output paths are checked against every input image, the mask and field-of-view files the
inputs pair with, and the checkpoint, before any work (an --output inside the input folder never writes over
ground truth); existing outputs are
replaced with a note (--skip-existing keeps them and segments only the other images).

Exit codes: 0 every image done; 1 some images failed (each named on a `skipped:` line, the others
written); 2 nothing done (bad argument, checkpoint of another model, no images, output folder not
writable, an output that would replace an input, or the only / every image failed), with one `error:`
line, and an output folder created by the run is removed again.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mm.cliargs import add_debug, command_prog
from mm.errors import DataError, UserError, cli_main
from mm.evaluate.runtime import add_runtime_arguments, autocast, pick_device, pick_precision
from mm.evaluate.seg_io import (
    MaskRule,
    Normalisation,
    OutputSet,
    files_by_stem,
    image_stem,
    is_image_file,
    match,
    match_name,
    overlay,
    read_geotags,
    read_mask,
    read_pixels,
)
from mm.models.tiling import BLEND_MODES, blend_weights, tile_logits

EXIT_SOME_FAILED = 1
MODES = ("auto", "tile", "resize")


# ---------------------------------------------------------------------------------------------------
# Inference


@dataclass
class InferenceOptions:
    mode: str = "auto"
    overlap: float = 0.25
    blend: str = "gaussian"
    batch_size: int = 4
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    # Model pixels per source pixel of the training images (the export's mm_data); None: unknown.
    train_scale: float | None = None


class Segmenter:
    """Logits at native resolution of one (H, W, 3) uint8 image with a model taking SAM inputs
    (B, 3, S, S), normalised and padded, to logits (B, 1, S, S)."""

    def __init__(self, model: torch.nn.Module, image_size: int, options: InferenceOptions,
                 device: torch.device | str = "cpu", mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None) -> None:
        if options.mode not in MODES:
            raise UserError(f"--mode must be one of {', '.join(MODES)}, got {options.mode!r}")
        if options.blend not in BLEND_MODES:
            raise UserError(f"--blend must be one of {', '.join(BLEND_MODES)}, got {options.blend!r}")
        if not 0 <= options.overlap < 1:
            raise UserError(f"--overlap must be in [0, 1), got {options.overlap}")
        if options.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {options.batch_size}")
        if options.train_scale is not None and not options.train_scale > 0:
            raise UserError(f"training scale must be positive, got {options.train_scale}")
        self.device = torch.device(device)
        if options.precision == "fp16" and self.device.type != "cuda":
            raise UserError("--precision fp16 needs a GPU (--device cuda); use fp32 or bf16 on the CPU")
        self.model = model.to(self.device).eval()
        self.image_size = image_size
        self.options = options
        self.weights = blend_weights(image_size, options.blend).to(self.device)
        self.tiles_run = 0
        self.noted = False
        from mm.models.sam import PIXEL_MEAN, PIXEL_STD

        # The model's input normalisation, 0..255 units (None: SAM's pixel statistics; a unet export's own).
        self.norm = (tuple(mean or PIXEL_MEAN), tuple(std or PIXEL_STD))
        self.mean = torch.tensor(self.norm[0], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.norm[1], device=self.device).view(1, 3, 1, 1)

    def _predict(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(self.device, self.options.precision):
            batch = batch.to(self.device)
            out = self.model(batch).float()
        self.tiles_run += batch.shape[0]
        return out

    def scaled_shape(self, height: int, width: int) -> tuple[int, int] | None:
        """The size auto mode resizes the image to (the training scale), None when unknown."""
        s = self.options.train_scale
        if s is None:
            return None
        return max(1, round(height * s)), max(1, round(width * s))

    def mode_for(self, height: int, width: int) -> str:
        """'resize', 'tile' or (auto with a known training scale) 'scaled'."""
        if self.options.mode != "auto":
            return self.options.mode
        if self.options.train_scale is not None:
            return "scaled"
        return "resize" if max(height, width) <= self.image_size else "tile"

    def _tile(self, image: torch.Tensor) -> torch.Tensor:
        """(H, W) logits of a (3, H, W) 0..255 image at its own resolution."""
        return tile_logits(self._predict, image, self.image_size, self.mean, self.std, self.options.overlap,
                           self.weights, self.options.batch_size)[0]

    def logits(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W) float32 logits on the CPU."""
        from mm.models.sam import prepare_image, resize_like_sam, restore_logits

        height, width = rgb.shape[:2]
        image = torch.from_numpy(np.require(rgb, np.uint8, ['C', 'W'])).permute(2, 0, 1).to(self.device)
        size = self.image_size
        mode = self.mode_for(height, width)
        if mode == "resize":
            x, resized = prepare_image(image[None], size, *self.norm)
            return restore_logits(self._predict(x), resized, (height, width))[0, 0].cpu()
        if mode == "tile":
            if self.options.mode == "auto" and not self.noted:
                self.noted = True
                print(f"note: the export records no training scale (shards without json, or an older export): "
                      f"images larger than {size} px are tiled at native resolution; --mode resize feeds them "
                      f"whole", file=sys.stderr)
            return self._tile(image).cpu()
        h, w = self.scaled_shape(height, width)
        scaled = image if (h, w) == (height, width) else resize_like_sam(image[None], (h, w))[0]
        out = self._tile(scaled)
        if (h, w) != (height, width):
            out = F.interpolate(out[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        return out.cpu()


def load_model(checkpoint: str, base_checkpoint: str | None = None
               ) -> tuple[Any, torch.nn.Module, dict[str, Any]]:
    """(config, model, data record) of a TopoLoRA-SAM export; another model's export is a UserError
    naming the file. base_checkpoint is the SAM checkpoint a trainable-only export was trained from.
    The data record is the export's mm_data (normalisation, training scale), {} when absent."""
    from mm.exports import read_export_metadata
    from mm.tasks import load_exported

    # A unet export (mm/tasks/unet.py) segments the same way; any other task is refused by load_exported.
    task = "unet" if read_export_metadata(checkpoint).get("mm_task") == "unet" else "topolora_sam"
    _, cfg, model = load_exported(checkpoint, expect_task=task, base_checkpoint=base_checkpoint)
    try:
        data = json.loads(read_export_metadata(checkpoint).get("mm_data") or "{}")
    except ValueError:
        data = {}
    return cfg, model, data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------------
# Inputs and outputs


def list_inputs(specs: list[str]) -> tuple[list[Path], bool]:
    """(image paths, whether the input is one named file). Folders are listed (not recursively), globs
    expanded; an input that matches nothing, or no image at all, is a UserError."""
    paths: list[Path] = []
    seen: set[Path] = set()
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if is_image_file(q))
            if not found:
                raise UserError(f"{p}: no images in this folder")
        elif p.is_file():
            found = [p]
        elif glob.has_magic(spec):
            found = sorted(Path(q) for q in glob.glob(spec, recursive=True) if is_image_file(Path(q)))
            if not found:
                raise UserError(f"{spec}: no image files match this pattern")
        else:
            raise UserError(f"{p}: no such file or folder")
        paths.extend(q for q in found if q not in seen)
        seen.update(found)
    single = len(specs) == 1 and Path(specs[0]).is_file()
    return paths, single


def prepare_output(folder: Path) -> list[Path]:
    """Create the output folder (and parents); returns the folders created, which a run that writes
    nothing removes again. UserError when it cannot be created or written."""
    created = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise UserError(f"output folder {folder} is not writable ({e.strerror or e})") from None
    return created


def remove_created(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()  # only if empty
        except OSError:
            return


def unique_key(path: Path, used: set[str]) -> str:
    key, n = image_stem(path), 1
    while key in used:
        n += 1
        key = f"{image_stem(path)}_{n}"
    used.add(key)
    return key


@dataclass
class Planned:
    """The files one image will produce (by role: mask, prob, overlay)."""

    path: Path
    key: str
    geo: list = field(default_factory=list)  # read_geotags of the input: TIFF outputs carry them
    files: dict[str, Path] = field(default_factory=dict)


def plan(paths: list[Path], out: Path, args: argparse.Namespace) -> list[Planned]:
    used: set[str] = set()
    plans = []
    for path in paths:
        key = unique_key(path, used)
        geo = read_geotags(path)
        mask_ext = ".tif" if geo else ".png"
        prob_ext = {"png": ".png", "tif": ".tif"}.get(args.save_prob or "", "")
        if args.keep_names:
            files = {"mask": out / f"{key}{mask_ext}", "prob": out / "prob" / f"{key}{prob_ext}",
                     "overlay": out / "overlay" / f"{key}.png"}
        else:
            files = {"mask": out / f"{key}_mask{mask_ext}", "prob": out / f"{key}_prob{prob_ext}",
                     "overlay": out / f"{key}_overlay.png"}
        if not args.save_prob:
            del files["prob"]
        if args.no_overlay:
            del files["overlay"]
        plans.append(Planned(path, key, geo, files))
    return plans


def check_outputs(plans: list[Planned], protected: list[Path], extra: list[Path]) -> list[Path]:
    """UserError if any output would replace an input (image, mask, FOV, checkpoint); else the
    outputs that already exist (to be replaced, or kept with --skip-existing)."""
    inputs = {os.path.realpath(p): p for p in protected}
    outputs = [f for p in plans for f in p.files.values()] + extra
    for f in outputs:
        hit = inputs.get(os.path.realpath(f))
        if hit is not None:
            raise UserError(f"output {f} would replace the input {hit}; choose another --output (or --keep-names "
                            f"off)")
    return [f for f in outputs if f.exists()]


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


METRIC_COLUMNS = ("dice", "iou", "precision", "recall", "cldice", "betti0_error", "betti1_error", "hd95",
                  "bf_score", "ece", "tp", "fp", "fn", "tn")
_RATIO_COLUMNS = METRIC_COLUMNS[:-4]


def metrics_csv(images: list[str], per_image: list[dict[str, Any]], pooled: dict[str, Any]) -> str:
    """One row per image, then 'mean' (macro: mean over images; hd95 and ece over those where they
    are defined) and 'global' (micro: from the summed counts) rows."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", *METRIC_COLUMNS])
    for image, row in zip(images, per_image):
        writer.writerow([image, *("" if isinstance(row[k], float) and math.isnan(row[k]) else row[k]
                                  for k in METRIC_COLUMNS)])
    mean = [pooled.get(f"mean_{k}", "") for k in _RATIO_COLUMNS]
    writer.writerow(["mean", *("" if isinstance(v, float) and math.isnan(v) else v for v in mean), "", "", "", ""])
    writer.writerow(["global", *(pooled.get(f"global_{k}", "") for k in METRIC_COLUMNS[:4]),
                     *([""] * (len(_RATIO_COLUMNS) - 4)), *(pooled[k] for k in METRIC_COLUMNS[-4:])])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# The command


def _channels(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected channel numbers like 0,1,0, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=command_prog("segment"),
        description="Binary segmentation of images with an exported TopoLoRA-SAM, at native resolution "
                    "(sliding window for images larger than the model input). Exit code 0: all images "
                    "done; 1: some failed and were skipped (named on stderr), the rest written; 2: "
                    "nothing done.")
    p.add_argument("--checkpoint", required=True, help="TopoLoRA-SAM export (runs/<name>/export/model.safetensors)")
    p.add_argument("--base-checkpoint", help="SAM checkpoint a trainable-only export was trained from")
    p.add_argument("-i", "--input", required=True, nargs="+",
                   help="image files, folders (not recursive) or quoted globs ('scans/**/*.tif'); PNG, "
                        "JPEG, TIFF (8/16-bit, float, multi-channel, LZW/Deflate/ZSTD), PPM, GIF, BMP, WebP")
    p.add_argument("-o", "--output", required=True, help="folder for the masks, overlays and metrics")
    p.add_argument("--keep-names", action="store_true",
                   help="name each mask as its input (<name>.png, nnU-Net style) and put overlays and "
                        "probabilities in overlay/ and prob/, so evaluation tools pair files by name")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave images whose mask is already in --output alone (their metrics are read "
                        "from that mask); default: replace existing outputs, with a note")
    p.add_argument("--masks", help="folder of ground-truth masks, matched by name: metrics.json/.csv")
    p.add_argument("--mask-suffix", default="",
                   help="text after the image stem in mask names, e.g. '_manual1' for 21_manual1.gif")
    p.add_argument("--image-suffix", default="",
                   help="text at the end of image stems that mask and FOV names replace by their suffix, "
                        "e.g. '_training' (DRIVE: 21_training.tif -> 21_manual1.gif, 21_training_mask.gif "
                        "with --fov-suffix _training_mask)")
    p.add_argument("--fov", help="folder of field-of-view masks, matched by name like --masks")
    p.add_argument("--fov-suffix", default="", help="text after the image stem in field-of-view names")
    p.add_argument("--mask-threshold", default="auto",
                   help="foreground of a ground-truth label: nonzero, a number T (value > T; 127 for "
                        "anti-aliased drawings) or auto (nonzero; > 127 for JPEG/WebP masks)")
    p.add_argument("--pixel-spacing", type=float, nargs="+", metavar="MM",
                   help="pixel size (one value, or row and column sizes): hd95 in these units")
    p.add_argument("--threshold", type=float, default=0.5, help="foreground where sigmoid(logit) > this")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="resize: whole image at the model input size; tile: sliding window at native "
                        "resolution; auto: at the scale the model was trained at (whole if it fits, else "
                        "tiled), or without that record resize if the image fits the input size, else tile")
    p.add_argument("--overlap", type=float, default=0.25, help="tile overlap, a fraction of the tile side")
    p.add_argument("--blend", choices=BLEND_MODES, default="gaussian", help="weights of overlapping tiles")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass")
    p.add_argument("--stretch", choices=("auto", "always"),
                   help="percentile stretch of 16-bit/float images (auto) or of every image (always, "
                        "e.g. 8-bit SAR); default: as the training shards (the export records it), else auto")
    p.add_argument("--percentiles", type=float, nargs=2, metavar=("LO", "HI"),
                   help="stretch limits (default: as the training shards, else 1 99)")
    p.add_argument("--db", action=argparse.BooleanOptionalAction, default=None,
                   help="SAR: convert intensities to dB (10 log10) before the stretch (default: as the "
                        "training shards)")
    p.add_argument("--channels", type=_channels,
                   help="channels to use as R,G,B, e.g. 0,1,0 (default: as the training shards, else grey "
                        "repeated, two channels as (c0, c1, mean), the first three)")
    p.add_argument("--save-prob", choices=("png", "tif"), help="also write the probability map: 8-bit PNG "
                                                               "(p x 255) or float32 TIFF")
    p.add_argument("--no-overlay", action="store_true", help="do not write overlay PNGs")
    add_runtime_arguments(p)
    add_debug(p)
    return p


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.threshold <= 1:
        raise UserError(f"--threshold must be between 0 and 1, got {args.threshold}")
    if args.percentiles is not None:
        lo, hi = args.percentiles
        if not 0 <= lo < hi <= 100:
            raise UserError(f"--percentiles must satisfy 0 <= LO < HI <= 100, got {lo} {hi}")
    if args.mask_suffix and not args.masks:
        raise UserError("--mask-suffix needs --masks")
    if args.image_suffix and not (args.masks or args.fov):
        raise UserError("--image-suffix needs --masks or --fov")
    if args.fov_suffix and not args.fov:
        raise UserError("--fov-suffix needs --fov")
    if args.pixel_spacing is not None and (len(args.pixel_spacing) > 2 or min(args.pixel_spacing) <= 0):
        raise UserError("--pixel-spacing takes one or two positive sizes (rows, columns)")
    for flag, folder in (("--masks", args.masks), ("--fov", args.fov)):
        if folder and not Path(folder).is_dir():
            raise UserError(f"{flag} {folder}: no such folder")


def pick_normalisation(args: argparse.Namespace, data: dict[str, Any]) -> tuple[Normalisation, str]:
    """The export's normalisation (what training saw) with any option given on the command line on
    top; and a note when the two differ."""
    recorded = Normalisation.from_dict(data["normalisation"]) if isinstance(data.get("normalisation"), dict) \
        else None
    base = recorded or Normalisation()
    norm = Normalisation(args.stretch or base.stretch,
                         tuple(args.percentiles) if args.percentiles else base.percentiles,
                         base.db if args.db is None else args.db,
                         tuple(args.channels) if args.channels else base.channels)
    note = ""
    if recorded is not None and norm != recorded:
        note = (f"note: normalising with {norm.describe()}; the training shards used {recorded.describe()}")
    elif data.get("normalisations"):
        note = "note: the training shards were written with several normalisations; using " + norm.describe()
    return norm, note


def segment_one(item: Planned, segmenter: Segmenter | None, args: argparse.Namespace, norm: Normalisation,
                rule: MaskRule, tables: dict[str, tuple[dict, str, Path]]) -> dict[str, Any] | None:
    """Segment one image and write its files (or, segmenter None, read its existing mask); its
    metrics when there is a ground truth. Raises DataError(reason) for a bad file; nothing of this
    image is written then."""
    from mm.metrics.segmentation import segmentation_metrics

    path = item.path
    if segmenter is None:
        pred = read_mask(item.files["mask"], MaskRule("nonzero"))
        height, width = pred.shape
        rgb, prob = None, None
    else:
        rgb = norm.apply(read_pixels(path))
        height, width = rgb.shape[:2]
    masks: dict[str, np.ndarray] = {}
    for what, (table, suffix, folder) in tables.items():
        mask_path = match(path, table, suffix, what, folder, args.image_suffix)
        try:
            mask = read_mask(mask_path, rule)
        except DataError as e:
            raise DataError(f"{what} {mask_path}: {e}") from None
        if mask.shape != (height, width):
            raise DataError(f"{what} {mask_path} is {mask.shape[1]}x{mask.shape[0]} but the image is "
                            f"{width}x{height}")
        if what == "field-of-view mask" and not mask.any():
            raise DataError(f"{what} {mask_path} is empty (all zero): nothing would be evaluated")
        masks[what] = mask
    fov = masks.get("field-of-view mask")
    truth = masks.get("mask")
    if segmenter is not None:
        prob = segmenter.logits(rgb).sigmoid().numpy()
        if prob.shape != (height, width):  # the promise of this command: outputs at the input's size
            raise RuntimeError(f"output {prob.shape} differs from the input size {(height, width)}")
        if fov is not None:
            prob = np.where(fov, prob, 0.0).astype(np.float32)
        pred = prob > args.threshold
        _write(item, args, pred, prob, rgb, truth)
    if truth is None:
        return None
    spacing = None
    if args.pixel_spacing:
        spacing = tuple(args.pixel_spacing) * (2 // len(args.pixel_spacing))
    return segmentation_metrics(pred, truth, fov, prob=prob, spacing=spacing)


def _write(item: Planned, args: argparse.Namespace, pred: np.ndarray, prob: np.ndarray, rgb: np.ndarray,
           truth: np.ndarray | None) -> None:
    files = OutputSet(Path(args.output))
    mask8 = np.where(pred, 255, 0).astype(np.uint8)
    try:
        for role, target in item.files.items():
            if role == "mask" and target.suffix == ".tif":
                files.add_tiff(target, mask8, item.geo)
            elif role == "mask":
                files.add_image(target, Image.fromarray(mask8), "PNG")
            elif role == "prob" and target.suffix == ".tif":
                files.add_tiff(target, prob.astype(np.float32), item.geo)
            elif role == "prob":
                files.add_image(target, Image.fromarray((prob * 255).round().astype(np.uint8)), "PNG")
            else:
                files.add_image(target, Image.fromarray(overlay(rgb, pred, truth)), "PNG")
        files.commit()
    finally:
        files.discard()


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    rule = MaskRule(args.mask_threshold)
    device = pick_device(args.device)
    precision = pick_precision(args.precision, device)
    paths, single = list_inputs(args.input)
    tables: dict[str, tuple[dict, str, Path]] = {}
    if args.masks:
        tables["mask"] = (files_by_stem(Path(args.masks)), args.mask_suffix, Path(args.masks))
    if args.fov:
        tables["field-of-view mask"] = (files_by_stem(Path(args.fov)), args.fov_suffix, Path(args.fov))
    # A folder may hold images and their masks together (CHASE_DB1): another image's mask is no input.
    if tables:
        taken = {q for table, suffix, _ in tables.values() if suffix
                 for p in paths for q in table.get(match_name(p, suffix, args.image_suffix), [])}
        paths = [p for p in paths if p not in taken] or paths
    out = Path(args.output)
    plans = plan(paths, out, args)
    # Every input, every mask and FOV file an input pairs with (by name, any extension) and the checkpoint.
    protected = [*paths, Path(args.checkpoint), *(q for table, suffix, _ in tables.values() for p in paths
                                                  for q in table.get(match_name(p, suffix, args.image_suffix), []))]
    metric_files = [out / "metrics.json", out / "metrics.csv"] if args.masks else []
    existing = check_outputs(plans, protected, metric_files)
    cfg, model, data = load_model(args.checkpoint, args.base_checkpoint)
    norm, norm_note = pick_normalisation(args, data)
    if norm_note:
        print(norm_note, file=sys.stderr)
    kept = {p.key for p in plans if args.skip_existing and p.files["mask"].exists()}
    kept_files = {f for p in plans if p.key in kept for f in p.files.values()}
    replaced = [f for f in existing if f not in kept_files]
    if replaced:
        print(f"note: replacing {len(replaced)} existing file(s) in {out} (e.g. {replaced[0].name}); "
              f"--skip-existing keeps existing masks", file=sys.stderr)
    created = prepare_output(out)
    for sub in {f.parent for p in plans for f in p.files.values()} - {out}:
        created += prepare_output(sub)
    options = InferenceOptions(args.mode, args.overlap, args.blend, args.batch_size, precision,
                               data.get("train_scale") if isinstance(data.get("train_scale"), (int, float)) else None)
    from mm.tasks.segmentation import seg_normalisation

    mean, std = seg_normalisation(cfg)  # 0..1 units, None = SAM's
    segmenter = Segmenter(model, cfg.model.image_size, options, device,
                          *((tuple(255.0 * v for v in mean), tuple(255.0 * v for v in std)) if mean else ()))
    try:
        return _run(args, plans, segmenter, norm, rule, tables, single, kept, out, device, precision, cfg,
                    options)
    except BaseException:
        remove_created(created)
        raise


def _run(args: argparse.Namespace, plans: list[Planned], segmenter: Segmenter, norm: Normalisation,
         rule: MaskRule, tables: dict, single: bool, kept: set[str], out: Path, device: torch.device,
         precision: str, cfg: Any, options: InferenceOptions) -> int:
    from tqdm import tqdm

    from mm.metrics.segmentation import pool_metrics

    per_image: list[dict[str, Any]] = []
    names: list[dict[str, str]] = []
    failed: list[dict[str, str]] = []
    start = time.perf_counter()
    bar = tqdm(plans, desc="segment", unit="img", file=sys.stderr, disable=not sys.stderr.isatty())
    for item in bar:
        try:
            metrics = segment_one(item, None if item.key in kept else segmenter, args, norm, rule, tables)
        except DataError as e:
            if single:
                raise DataError(f"{item.path}: {e}") from None
            failed.append({"image": str(item.path), "error": str(e)})
            tqdm.write(f"skipped: {item.path}: {e}", file=sys.stderr)
            continue
        if metrics is not None:
            per_image.append(metrics)
            names.append({"image": str(item.path), "key": item.key, "output": str(item.files["mask"])})
        bar.set_postfix(tiles=segmenter.tiles_run)
    done = len(plans) - len(failed)
    if not done:
        raise DataError(f"none of the {len(plans)} images could be segmented (first: {failed[0]['image']}: "
                        f"{failed[0]['error']})")
    summary = f"segmented {done - len(kept)} image(s) with {segmenter.tiles_run} forward tile(s) in " \
              f"{time.perf_counter() - start:.1f} s on {device} ({precision}) -> {out}"
    if kept:
        summary += f"; kept {len(kept)} existing"
    if per_image:
        pooled = pool_metrics(per_image)
        record = {"checkpoint": args.checkpoint, "threshold": args.threshold, "mode": args.mode,
                  "tile": cfg.model.image_size, "train_scale": options.train_scale, "overlap": args.overlap,
                  "blend": args.blend, "normalisation": norm.to_dict(), "mask_rule": args.mask_threshold,
                  "pixel_spacing": args.pixel_spacing, "hd95_unit": "spacing" if args.pixel_spacing else "pixel",
                  "hd95_convention": "monai (max of the directed 95th percentiles)",
                  "bf_tolerance_px": 1, "ece_bins": 10,
                  "fov": bool(args.fov), "n_images": len(per_image), "failed": failed,
                  "pooled": {k: _json_safe(v) for k, v in pooled.items()},
                  "per_image": [{**n, **{k: _json_safe(v) for k, v in m.items()}}
                                for n, m in zip(names, per_image)]}
        files = OutputSet(out)
        try:
            files.add_text("metrics.json", json.dumps(record, indent=1) + "\n")
            files.add_text("metrics.csv", metrics_csv([n["image"] for n in names], per_image, pooled))
            files.commit()
        finally:
            files.discard()
        summary += (f"; mean dice {pooled['mean_dice']:.4f}, cldice {pooled['mean_cldice']:.4f}, "
                    f"bf {pooled['mean_bf_score']:.4f}, global dice {pooled['global_dice']:.4f} over "
                    f"{len(per_image)} image(s)")
    print(summary)
    if rule.describe():
        print(rule.describe())
    if failed:
        print(f"error: {len(failed)} of {len(plans)} images failed (see the skipped: lines); the other "
              f"{done} are written to {out}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
