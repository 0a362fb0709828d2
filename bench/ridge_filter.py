"""A training-free vessel segmenter as the floor any trained model must clear on CHASE_DB1.

    python bench/ridge_filter.py --root CHASEDB1 [--json out.json]

Green channel (vessels are darkest there), CLAHE, Sato's ridge filter for dark tubes at a few scales,
then one global threshold: the one maximising mean Dice on the 20 training images (children 01-10),
applied unchanged to the 8 test images (11-14). First observer's labels; field of view derived as mm's
reader derives it (mm.data.seg_readers.read_chase_db1). Metrics: mm.metrics.segmentation, inside the FOV.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from skimage import exposure, filters

from mm.data.seg_readers import read_chase_db1, read_mask, read_pixels
from mm.metrics.segmentation import pool_metrics, segmentation_metrics

SIGMAS = (1, 2, 3)


def ridge_response(rgb: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """Sato vesselness of the CLAHE'd green channel, scaled to 0..1 inside the FOV (0 outside)."""
    green = exposure.equalize_adapthist(rgb[..., 1], clip_limit=0.01)
    # black_ridges: vessels are darker than the retina around them.
    r = filters.sato(green, sigmas=SIGMAS, black_ridges=True)
    r = np.where(fov, r, 0.0)
    return r / max(float(r[fov].max()), 1e-12)


def load(root: str, split: str) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    out = []
    for s in read_chase_db1(root, split=split):
        fov = np.asarray(s.fov, bool)
        out.append((s.image.name, ridge_response(read_pixels(s.image), fov), read_mask(s.mask), fov))
    return out


def mean_dice(items: list, t: float) -> float:
    dice = []
    for _, r, m, f in items:
        p = (r > t) & f
        dice.append(2 * np.count_nonzero(p & m) / max(np.count_nonzero(p) + np.count_nonzero(m & f), 1))
    return float(np.mean(dice))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="CHASE_DB1 folder (flat layout, as distributed)")
    ap.add_argument("--json", help="also write the pooled and per-image test metrics here")
    args = ap.parse_args()
    start = time.perf_counter()
    train, test = load(args.root, "train"), load(args.root, "test")
    grid = np.round(np.arange(0.02, 0.60, 0.01), 3)
    fits = [mean_dice(train, t) for t in grid]
    best = float(grid[int(np.argmax(fits))])
    per_image = [segmentation_metrics((r > best) & f, m, f) for _, r, m, f in test]
    pooled = pool_metrics(per_image)
    print(f"ridge filter (green, CLAHE, Sato sigmas {SIGMAS}): threshold {best} (train mean Dice "
          f"{max(fits):.4f} on {len(train)} images)")
    print(f"test ({len(test)} images): " + ", ".join(
        f"{k} {pooled['mean_' + k]:.4f}" for k in ("dice", "cldice", "betti0_error", "betti1_error", "hd95")))
    print(f"time {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threshold": best, "pooled": {k: float(v) for k, v in pooled.items()},
                       "per_image": [{"image": n, **{k: float(v) for k, v in m.items()}}
                                     for (n, *_), m in zip(test, per_image)]}, f, indent=1)


if __name__ == "__main__":
    main()
