"""A training-free vessel segmenter as the floor any trained model must clear on CHASE_DB1.

    python bench/ridge_filter.py --root CHASEDB1 [--json out.json] [--cache DIR] [variant flags]

Green channel (vessels are darkest there), CLAHE, Sato's ridge filter for dark tubes at a few scales,
then one global threshold: the one maximising mean Dice on the 20 training images (children 01-10),
applied unchanged to the 8 test images (11-14). First observer's labels; field of view derived as mm's
reader derives it (mm.data.seg_readers.read_chase_db1). Metrics: mm.metrics.segmentation, inside the FOV.

Variant flags (the default is the plain recipe above; docs/segmentation.md section 8 lists what each
measured): --norm (how responses are scaled before the one global threshold), --fill (paint the
outside of the FOV with the retina's mean green before filtering, so the FOV rim is not a ridge),
--min-size (drop predicted components smaller than N pixels, also while fitting), --sigmas.
--cache keeps each image's Sato response per scale, so variants after the first run skip the filter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from skimage import exposure, filters, morphology

from mm.data.seg_readers import read_chase_db1, read_mask, read_pixels
from mm.errors import UserError
from mm.metrics.segmentation import pool_metrics, segmentation_metrics

SIGMAS = (1, 2, 3)


def sato_scale(rgb: np.ndarray, fov: np.ndarray, sigma: float, fill: bool) -> np.ndarray:
    """Sato vesselness of the CLAHE'd green channel at one scale (0 outside the FOV)."""
    green = rgb[..., 1].astype(np.float64) / 255.0
    if fill:
        # The dark surround next to the bright retina reads as a dark ridge along the whole rim.
        green = np.where(fov, green, green[fov].mean())
    green = exposure.equalize_adapthist(green, clip_limit=0.01)
    # black_ridges: vessels are darker than the retina around them.
    return np.where(fov, filters.sato(green, sigmas=[sigma], black_ridges=True), 0.0)


def ridge_response(rgb: np.ndarray, fov: np.ndarray, sigmas=SIGMAS, fill: bool = False,
                   norm: str = "max", cache: Path | None = None, name: str = "") -> np.ndarray:
    """Max over scales of the Sato response (skimage's multi-scale rule), then normalised by `norm`:
    'max' divides by the image's maximum inside the FOV, 'none' keeps the filter's own units (one
    threshold for every image), 'p99' divides by the image's 99th percentile inside the FOV."""
    per_scale = []
    for s in sigmas:
        f = cache / f"{name}-s{s:g}-fill{int(fill)}.npy" if cache else None
        if f is not None and f.exists():
            per_scale.append(np.load(f))
            continue
        r = sato_scale(rgb, fov, s, fill).astype(np.float32)
        if f is not None:
            np.save(f, r)
        per_scale.append(r)
    r = np.max(per_scale, axis=0).astype(np.float64)
    if norm == "none":
        return r
    scale = float(r[fov].max()) if norm == "max" else float(np.percentile(r[fov], 99))
    return r / max(scale, 1e-12)


def load(root: str, split: str, **kw) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    out = []
    for s in read_chase_db1(root, split=split):
        fov = np.asarray(s.fov, bool)
        r = ridge_response(read_pixels(s.image), fov, name=s.image.stem, **kw)
        out.append((s.image.name, r, read_mask(s.mask), fov))
    return out


def predict(r: np.ndarray, fov: np.ndarray, t: float, min_size: int) -> np.ndarray:
    p = (r > t) & fov
    if min_size <= 0:
        return p
    try:  # scikit-image >= 0.26: max_size removes components of at most that many pixels
        return morphology.remove_small_objects(p, max_size=min_size - 1)
    except TypeError:  # older releases: min_size removes those smaller than it
        return morphology.remove_small_objects(p, min_size=min_size)


def mean_dice(items: list, t: float, min_size: int = 0) -> float:
    dice = []
    for _, r, m, f in items:
        p = predict(r, f, t, min_size)
        dice.append(2 * np.count_nonzero(p & m) / max(np.count_nonzero(p) + np.count_nonzero(m & f), 1))
    return float(np.mean(dice))


def threshold_grid(items: list, norm: str) -> np.ndarray:
    if norm == "max":
        return np.round(np.arange(0.02, 0.60, 0.01), 3)
    # Other scalings have no fixed range: candidates at quantiles of the pooled training responses
    # (vessels cover roughly 5-15% of a CHASE_DB1 field of view).
    pooled = np.concatenate([r[f] for _, r, _, f in items])
    return np.unique(np.quantile(pooled, np.arange(0.70, 0.99, 0.005)))


def _sigmas(text: str) -> tuple[float, ...]:
    try:
        out = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"scales must be positive, got {text!r}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="CHASE_DB1 folder (flat layout, as distributed)")
    ap.add_argument("--json", help="also write the pooled and per-image test metrics here")
    ap.add_argument("--cache", help="folder for per-image, per-scale Sato responses (reused when present)")
    ap.add_argument("--sigmas", type=_sigmas, default=SIGMAS, help="Sato scales, comma-separated (default 1,2,3)")
    ap.add_argument("--norm", choices=("max", "none", "p99"), default="max")
    ap.add_argument("--fill", action="store_true", help="fill outside the FOV before filtering")
    ap.add_argument("--min-size", type=int, default=0, help="remove predicted components under N px")
    args = ap.parse_args()
    sigmas = args.sigmas
    cache = Path(args.cache) if args.cache else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    kw = dict(sigmas=sigmas, fill=args.fill, norm=args.norm, cache=cache)
    start = time.perf_counter()
    train, test = load(args.root, "train", **kw), load(args.root, "test", **kw)
    grid = threshold_grid(train, args.norm)
    fits = [mean_dice(train, t, args.min_size) for t in grid]
    best = float(grid[int(np.argmax(fits))])
    per_image = [segmentation_metrics(predict(r, f, best, args.min_size), m, f) for _, r, m, f in test]
    pooled = pool_metrics(per_image)
    variant = f"sigmas {sigmas}, norm {args.norm}, fill {args.fill}, min-size {args.min_size}"
    print(f"ridge filter (green, CLAHE, Sato; {variant}): threshold {best:.4g} (train mean Dice "
          f"{max(fits):.4f} on {len(train)} images)")
    print(f"test ({len(test)} images): " + ", ".join(
        f"{k} {pooled['mean_' + k]:.4f}" for k in ("dice", "cldice", "betti0_error", "betti1_error", "hd95")))
    print(f"time {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threshold": best, "variant": variant,
                       "pooled": {k: float(v) for k, v in pooled.items()},
                       "per_image": [{"image": n, **{k: float(v) for k, v in m.items()}}
                                     for (n, *_), m in zip(test, per_image)]}, f, indent=1)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a missing or malformed dataset folder: one line, as mm's commands say it
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
