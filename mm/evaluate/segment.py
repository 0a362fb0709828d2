"""mm-segment: binary segmentation of image files, folders or globs with an exported TopoLoRA-SAM.

    mm-segment --checkpoint runs/x/export/model.safetensors --input DRIVE/test/images --output out/ \
        --masks DRIVE/test/1st_manual --mask-suffix _manual1 --fov DRIVE/test/mask --fov-suffix _mask

Per image: <key>_mask.png (0/255), <key>_overlay.png (predicted outline red, ground truth green), with
--save-prob <key>_prob.png (8-bit) or <key>_prob.tif (float32); with --masks metrics.json and
metrics.csv (per image and pooled, mm/metrics/segmentation.py) over all images. Everything is at the
input's native size.

Geometry (--mode): 'resize' feeds the whole image resized so its longest side is the model's input size
S (SAM's ResizeLongestSide + padding), then resizes the logits back; 'tile' slides S x S windows over
the image at native resolution (overlap --overlap, blended --blend, --batch-size tiles per encoder
call; a side shorter than S is padded as SAM pads); 'auto' (default) resizes images that fit in S x S
and tiles larger ones. With a field-of-view mask, predictions outside it are set to background and the
metrics count only pixels inside it.

Exit codes: 0 every image done; 1 some images failed (each named on a `skipped:` line, the others
written); 2 nothing done (bad argument, checkpoint of another model, no images, output folder not
writable, or the only / every image failed), with one `error:` line.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mm.cliargs import add_debug, command_prog
from mm.errors import DataError, UserError, cli_main
from mm.evaluate.seg_io import (
    OutputSet,
    files_by_stem,
    image_stem,
    is_image_file,
    match,
    match_name,
    overlay,
    read_image,
    read_mask,
    to_rgb8,
)
from mm.evaluate.tiling import BLEND_MODES, blend_weights, pad_to_tile, sliding_window

EXIT_SOME_FAILED = 1
MODES = ("auto", "tile", "resize")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# ---------------------------------------------------------------------------------------------------
# Inference


@dataclass
class InferenceOptions:
    mode: str = "auto"
    overlap: float = 0.25
    blend: str = "gaussian"
    batch_size: int = 4
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)


class Segmenter:
    """Logits at native resolution of one (H, W, 3) 0..255 image with a model taking SAM inputs
    (B, 3, S, S), normalised and padded, to logits (B, 1, S, S)."""

    def __init__(self, model: torch.nn.Module, image_size: int, options: InferenceOptions,
                 device: torch.device | str = "cpu") -> None:
        if options.mode not in MODES:
            raise UserError(f"--mode must be one of {', '.join(MODES)}, got {options.mode!r}")
        if options.blend not in BLEND_MODES:
            raise UserError(f"--blend must be one of {', '.join(BLEND_MODES)}, got {options.blend!r}")
        if not 0 <= options.overlap < 1:
            raise UserError(f"--overlap must be in [0, 1), got {options.overlap}")
        if options.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {options.batch_size}")
        self.device = torch.device(device)
        if options.precision == "fp16" and self.device.type != "cuda":
            raise UserError("--precision fp16 needs a GPU (--device cuda); use fp32 or bf16 on the CPU")
        self.model = model.to(self.device).eval()
        self.image_size = image_size
        self.options = options
        self.weights = blend_weights(image_size, options.blend).to(self.device)
        self.tiles_run = 0

    def _predict(self, batch: torch.Tensor) -> torch.Tensor:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.options.precision)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            out = self.model(batch.to(self.device)).float()
        self.tiles_run += batch.shape[0]
        return out

    def mode_for(self, height: int, width: int) -> str:
        if self.options.mode != "auto":
            return self.options.mode
        return "resize" if max(height, width) <= self.image_size else "tile"

    def logits(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W) float32 logits on the CPU."""
        from mm.models.sam import PIXEL_MEAN, PIXEL_STD, prepare_image, restore_logits

        height, width = rgb.shape[:2]
        image = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().to(self.device)
        size = self.image_size
        if self.mode_for(height, width) == "resize":
            x, resized = prepare_image(image[None], size)
            return restore_logits(self._predict(x), resized, (height, width))[0, 0].cpu()
        mean = torch.tensor(PIXEL_MEAN, device=self.device).view(3, 1, 1)
        std = torch.tensor(PIXEL_STD, device=self.device).view(3, 1, 1)
        # Zero padding after normalisation, as SAM pads (and as the model saw in training).
        x = pad_to_tile((image - mean) / std, size)
        out = sliding_window(self._predict, x, size, self.options.overlap, self.weights,
                             self.options.batch_size)
        return out[0, :height, :width].cpu()


def load_model(checkpoint: str, base_checkpoint: str | None = None) -> tuple[Any, torch.nn.Module]:
    """(config, model) of a TopoLoRA-SAM export; another model's export is a UserError naming the file.
    base_checkpoint is the SAM checkpoint a trainable-only export was trained from."""
    from mm.tasks import load_exported

    _, cfg, model = load_exported(checkpoint, expect_task="topolora_sam", base_checkpoint=base_checkpoint)
    return cfg, model


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device {name!r} (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here")
    return device


def pick_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


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


def prepare_output(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"output folder {folder} is not writable ({e.strerror or e})") from None


def unique_key(path: Path, used: set[str]) -> str:
    key, n = image_stem(path), 1
    while key in used:
        n += 1
        key = f"{image_stem(path)}_{n}"
    used.add(key)
    return key


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


METRIC_COLUMNS = ("dice", "iou", "precision", "recall", "cldice", "betti0_error", "betti1_error", "hd95",
                  "tp", "fp", "fn", "tn")


def metrics_csv(images: list[str], per_image: list[dict[str, Any]], pooled: dict[str, Any]) -> str:
    """One row per image, then 'mean' (macro: mean over images, hd95 over those where it is defined)
    and 'global' (micro: from the summed counts) rows."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", *METRIC_COLUMNS])
    for image, row in zip(images, per_image):
        writer.writerow([image, *(row[k] for k in METRIC_COLUMNS)])
    writer.writerow(["mean", *(pooled.get(f"mean_{k}", "") for k in METRIC_COLUMNS[:8]), "", "", "", ""])
    writer.writerow(["global", *(pooled.get(f"global_{k}", "") for k in METRIC_COLUMNS[:4]), "", "", "", "",
                     *(pooled[k] for k in METRIC_COLUMNS[8:])])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# The command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=command_prog("segment"),
        description="Binary segmentation of images with an exported TopoLoRA-SAM, at native resolution "
                    "(sliding window for images larger than the model input). Exit code 0: all images "
                    "done; 1: some failed and were skipped (named on stderr), the rest written; 2: "
                    "nothing done.")
    p.add_argument("--checkpoint", required=True, help="TopoLoRA-SAM export (runs/<name>/export/model.safetensors)")
    p.add_argument("--base-checkpoint", help="SAM checkpoint a trainable-only export was trained from")
    p.add_argument("--input", required=True, nargs="+",
                   help="image files, folders (not recursive) or quoted globs ('scans/**/*.tif'); PNG, "
                        "JPEG, TIFF (8/16-bit, float, multi-channel), PPM, GIF, BMP, WebP")
    p.add_argument("--output", required=True, help="folder for the masks, overlays and metrics")
    p.add_argument("--masks", help="folder of ground-truth masks, matched by name: metrics.json/.csv")
    p.add_argument("--mask-suffix", default="",
                   help="text after the image stem in mask names, e.g. '_manual1' for 21_manual1.gif")
    p.add_argument("--image-suffix", default="",
                   help="text at the end of image stems that mask and FOV names replace by their suffix, "
                        "e.g. '_training' (DRIVE: 21_training.tif -> 21_manual1.gif, 21_training_mask.gif "
                        "with --fov-suffix _training_mask)")
    p.add_argument("--fov", help="folder of field-of-view masks, matched by name like --masks")
    p.add_argument("--fov-suffix", default="", help="text after the image stem in field-of-view names")
    p.add_argument("--threshold", type=float, default=0.5, help="foreground where sigmoid(logit) > this")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="resize: whole image at the model input size; tile: sliding window at native "
                        "resolution; auto: resize if the image fits the input size, else tile")
    p.add_argument("--overlap", type=float, default=0.25, help="tile overlap, a fraction of the tile side")
    p.add_argument("--blend", choices=BLEND_MODES, default="gaussian", help="weights of overlapping tiles")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass")
    p.add_argument("--stretch", choices=("auto", "always"), default="auto",
                   help="percentile stretch of 16-bit/float images (auto) or of every image (always, "
                        "e.g. 8-bit SAR)")
    p.add_argument("--percentiles", type=float, nargs=2, default=(1.0, 99.0), metavar=("LO", "HI"),
                   help="stretch limits (default 1 99)")
    p.add_argument("--db", action="store_true",
                   help="SAR: convert intensities to dB (10 log10) before the stretch")
    p.add_argument("--channels", type=lambda s: [int(c) for c in s.split(",")],
                   help="channels to use as R,G,B, e.g. 0,1,0 (default: see the README)")
    p.add_argument("--save-prob", choices=("png", "tif"), help="also write the probability map: 8-bit PNG "
                                                               "(p x 255) or float32 TIFF")
    p.add_argument("--no-overlay", action="store_true", help="do not write overlay PNGs")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype; auto = bf16 (fp16 without bf16 support) on a GPU, fp32 on the CPU")
    add_debug(p)
    return p


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.threshold <= 1:
        raise UserError(f"--threshold must be between 0 and 1, got {args.threshold}")
    lo, hi = args.percentiles
    if not 0 <= lo < hi <= 100:
        raise UserError(f"--percentiles must satisfy 0 <= LO < HI <= 100, got {lo} {hi}")
    if args.mask_suffix and not args.masks:
        raise UserError("--mask-suffix needs --masks")
    if args.image_suffix and not (args.masks or args.fov):
        raise UserError("--image-suffix needs --masks or --fov")
    if args.fov_suffix and not args.fov:
        raise UserError("--fov-suffix needs --fov")
    for flag, folder in (("--masks", args.masks), ("--fov", args.fov)):
        if folder and not Path(folder).is_dir():
            raise UserError(f"{flag} {folder}: no such folder")


def segment_one(path: Path, key: str, segmenter: Segmenter, args: argparse.Namespace, out: Path,
                tables: dict[str, tuple[dict, str, Path]]) -> dict[str, Any] | None:
    """Segment one image and write its files; its metrics when there is a ground truth. Raises
    DataError(reason) for a bad file; nothing of this image is written then."""
    from mm.metrics.segmentation import segmentation_metrics

    rgb = to_rgb8(read_image(path), args.stretch, tuple(args.percentiles), args.db, args.channels)
    height, width = rgb.shape[:2]
    masks: dict[str, np.ndarray] = {}
    for what, (table, suffix, folder) in tables.items():
        mask_path = match(path, table, suffix, what, folder, args.image_suffix)
        try:
            mask = read_mask(mask_path)
        except DataError as e:
            raise DataError(f"{what} {mask_path}: {e}") from None
        if mask.shape != (height, width):
            raise DataError(f"{what} {mask_path} is {mask.shape[1]}x{mask.shape[0]} but the image is "
                            f"{width}x{height}")
        masks[what] = mask
    prob = segmenter.logits(rgb).sigmoid().numpy()
    fov = masks.get("field-of-view mask")
    if fov is not None:
        prob = np.where(fov, prob, 0.0).astype(np.float32)
    pred = prob > args.threshold
    truth = masks.get("mask")

    files = OutputSet(out)
    try:
        files.add_image(f"{key}_mask.png", Image.fromarray(np.where(pred, 255, 0).astype(np.uint8)), "PNG")
        if args.save_prob == "png":
            files.add_image(f"{key}_prob.png", Image.fromarray((prob * 255).round().astype(np.uint8)), "PNG")
        elif args.save_prob == "tif":
            files.add_image(f"{key}_prob.tif", Image.fromarray(prob.astype(np.float32), mode="F"), "TIFF")
        if not args.no_overlay:
            files.add_image(f"{key}_overlay.png", Image.fromarray(overlay(rgb, pred, truth)), "PNG")
        files.commit()
    finally:
        files.discard()
    if truth is None:
        return None
    return segmentation_metrics(pred, truth, fov)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    from tqdm import tqdm

    from mm.metrics.segmentation import pool_metrics

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
    cfg, model = load_model(args.checkpoint, args.base_checkpoint)
    out = Path(args.output)
    prepare_output(out)
    options = InferenceOptions(args.mode, args.overlap, args.blend, args.batch_size, precision)
    segmenter = Segmenter(model, cfg.model.image_size, options, device)

    per_image: list[dict[str, Any]] = []
    names: list[dict[str, str]] = []
    failed: list[dict[str, str]] = []
    used: set[str] = set()
    start = time.perf_counter()
    bar = tqdm(paths, desc="segment", unit="img", file=sys.stderr, disable=not sys.stderr.isatty())
    for path in bar:
        key = unique_key(path, used)
        try:
            metrics = segment_one(path, key, segmenter, args, out, tables)
        except DataError as e:
            if single:
                raise DataError(f"{path}: {e}") from None
            failed.append({"image": str(path), "error": str(e)})
            tqdm.write(f"skipped: {path}: {e}", file=sys.stderr)
            continue
        if metrics is not None:
            per_image.append(metrics)
            names.append({"image": str(path), "key": key})
        bar.set_postfix(tiles=segmenter.tiles_run)
    done = len(paths) - len(failed)
    if not done:
        raise DataError(f"none of the {len(paths)} images could be segmented (first: {failed[0]['image']}: "
                        f"{failed[0]['error']})")
    summary = f"segmented {done} image(s) with {segmenter.tiles_run} forward tile(s) in " \
              f"{time.perf_counter() - start:.1f} s on {device} ({precision}) -> {out}"
    if per_image:
        pooled = pool_metrics(per_image)
        record = {"checkpoint": args.checkpoint, "threshold": args.threshold, "mode": args.mode,
                  "tile": cfg.model.image_size, "overlap": args.overlap, "blend": args.blend,
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
                    f"global dice {pooled['global_dice']:.4f} over {len(per_image)} image(s)")
    print(summary)
    if failed:
        print(f"error: {len(failed)} of {len(paths)} images failed (see the skipped: lines); the other "
              f"{done} are written to {out}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
