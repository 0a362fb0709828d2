"""Binary segmentation metrics on 2-D masks at native resolution, optionally restricted to a FOV.

Inputs are binary masks (bool, 0/1 or 0/255; nonzero = foreground). Probabilities must be thresholded
first: a float mask with values strictly between 0 and 1 raises ValueError. With a field-of-view mask
(nonzero = inside), pixels outside it are set to background in both masks before anything is computed,
so they count in no TP/FP/FN/TN, skeleton, component or boundary.

Conventions:
- A ratio whose denominator is 0 (dice, iou, precision, recall, and Tprec/Tsens inside clDice) is 1.0
  when prediction and target are both empty (perfect agreement), else 0.0. E.g. an empty prediction
  of a non-empty target has precision 0.0 and recall 0.0.
- Topology uses the (8, 4) pairing of digital topology: foreground components are 8-connected and
  background components 4-connected. Only with such a pair does a closed 8-connected curve (e.g. a
  one-pixel diagonal ring) separate inside from outside, so Betti-0 and Betti-1 are consistent.
  Betti-0 = number of foreground components; Betti-1 = number of holes = background components that do
  not touch the image border. betti*_error = |Betti(pred) - Betti(target)|.
- hd95: boundaries are the foreground pixels with a 4-neighbour in the background or off the image.
  For each boundary pixel of one mask take the Euclidean distance to the nearest boundary pixel of
  the other (in pixels, or in physical units with `spacing` = (row, column) pixel size). hd95 is
  MONAI's convention (compute_hausdorff_distance, percentile=95): the MAXIMUM of the two directed
  95th percentiles (numpy's linear interpolation). medpy's hd95 differs: it takes ONE 95th percentile
  of both directions' distances pooled, which is never larger and differs on most irregular shapes;
  hd95(..., convention="medpy") gives that one. Both masks empty -> 0.0; exactly one empty -> nan
  (undefined; pool_metrics skips nans in its means and reports how many hd95 values were undefined).
- bf_score: the Boundary F1 score (Csurka et al. 2013; MATLAB's bfscore, whose default tolerance is a
  share of the image diagonal, here fixed at 1 pixel as the TopoLoRA-SAM evaluation reports it): boundary
  precision = share of predicted boundary pixels within 1 px (Euclidean) of a target
  boundary pixel, recall likewise, F = 2PR / (P + R); same boundaries as hd95. Both empty -> 1.0,
  one empty -> 0.0.
- ece: expected calibration error of the foreground probability over the pixels (inside the FOV):
  10 equal-width bins of p; ECE = sum over bins of (pixels in bin / pixels) x |mean p - share of
  foreground|. Needs the probabilities (`prob=`); absent -> nan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage.measure import label
from skimage.morphology import skeletonize

RATIO_KEYS = ("dice", "iou", "precision", "recall")
HD95_CONVENTIONS = ("monai", "medpy")
ECE_BINS = 10
BF_TOLERANCE = 1.0
COUNT_KEYS = ("tp", "fp", "fn", "tn")


def _binary(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask, got shape {mask.shape}")
    if np.issubdtype(mask.dtype, np.floating) and np.any((mask > 0) & (mask < 1)):
        raise ValueError(f"{name} holds values strictly between 0 and 1: threshold probabilities first")
    return mask != 0


def _ratio(num: float, den: float, both_empty: bool) -> float:
    if den == 0:
        return 1.0 if both_empty else 0.0
    return float(num) / float(den)


def _ratios(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Dice, IoU, precision and recall from counts, with the empty-mask convention above."""
    both_empty = tp + fp + fn == 0
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "precision": _ratio(tp, tp + fp, both_empty),
        "recall": _ratio(tp, tp + fn, both_empty),
    }


def hard_cldice(pred: np.ndarray, target: np.ndarray) -> float:
    """Centre-line Dice of two boolean masks using skimage's (hard) skeleton."""
    both_empty = not pred.any() and not target.any()
    skel_pred = skeletonize(pred)
    skel_true = skeletonize(target)
    tprec = _ratio(np.count_nonzero(skel_pred & target), np.count_nonzero(skel_pred), both_empty)
    tsens = _ratio(np.count_nonzero(skel_true & pred), np.count_nonzero(skel_true), both_empty)
    if tprec + tsens == 0:
        return 0.0
    return 2.0 * tprec * tsens / (tprec + tsens)


def betti_numbers(mask: np.ndarray) -> tuple[int, int]:
    """(Betti-0, Betti-1) of a boolean 2-D mask: 8-connected components, 4-connected holes."""
    betti0 = int(label(mask, connectivity=2).max())
    # A one-pixel background frame joins every border-touching background region into one
    # component, so all the others are holes.
    background = np.pad(~mask, 1, constant_values=True)
    betti1 = int(label(background, connectivity=1).max()) - 1
    return betti0, betti1


def _boundary(mask: np.ndarray) -> np.ndarray:
    # binary_erosion's default structure is the 4-neighbour cross and border_value=0 treats pixels
    # off the image as background, so an object touching the border has a boundary there.
    return mask & ~ndimage.binary_erosion(mask)


def _directed_distances(pred: np.ndarray, target: np.ndarray,
                        spacing: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each boundary pixel of pred to target's boundary, and back."""
    edge_pred, edge_true = _boundary(pred), _boundary(target)
    # Distance from every pixel to the nearest boundary pixel of the other mask (edt measures the
    # distance to the nearest zero, hence the negation).
    to_true = ndimage.distance_transform_edt(~edge_true, sampling=spacing)[edge_pred]
    to_pred = ndimage.distance_transform_edt(~edge_pred, sampling=spacing)[edge_true]
    return to_true, to_pred


def hd95(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] | None = None,
         convention: str = "monai") -> float:
    """95th-percentile Hausdorff distance between the masks' boundaries, in pixels or in the units of
    `spacing` (row, column). convention "monai" (default): max of the two directed 95th percentiles;
    "medpy": the 95th percentile of both directions pooled (see the module docstring)."""
    if convention not in HD95_CONVENTIONS:
        raise ValueError(f"hd95 convention must be one of {HD95_CONVENTIONS}, got {convention!r}")
    has_pred, has_true = bool(pred.any()), bool(target.any())
    if not has_pred and not has_true:
        return 0.0
    if has_pred != has_true:
        return math.nan
    to_true, to_pred = _directed_distances(pred, target, spacing)
    if convention == "medpy":
        return float(np.percentile(np.concatenate([to_true, to_pred]), 95))
    return float(max(np.percentile(to_true, 95), np.percentile(to_pred, 95)))


def bf_score(pred: np.ndarray, target: np.ndarray, tolerance: float = BF_TOLERANCE) -> float:
    """Boundary F1 score with `tolerance` pixels (see the module docstring)."""
    has_pred, has_true = bool(pred.any()), bool(target.any())
    if not has_pred and not has_true:
        return 1.0
    if has_pred != has_true:
        return 0.0
    to_true, to_pred = _directed_distances(pred, target, None)
    precision = float(np.mean(to_true <= tolerance))
    recall = float(np.mean(to_pred <= tolerance))
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def expected_calibration_error(prob: np.ndarray, target: np.ndarray, inside: np.ndarray | None = None,
                               bins: int = ECE_BINS) -> float:
    """ECE of foreground probabilities against a boolean target (see the module docstring)."""
    p = np.asarray(prob, dtype=np.float64)
    t = np.asarray(target, dtype=bool)
    if inside is not None:
        p, t = p[inside], t[inside]
    p, t = p.ravel(), t.ravel()
    if not p.size:
        return math.nan
    if p.min() < 0 or p.max() > 1:
        raise ValueError("prob must hold probabilities in [0, 1]")
    # Bin b holds (b/bins, (b+1)/bins]; p = 0 goes to the first bin.
    index = np.clip(np.ceil(p * bins).astype(int) - 1, 0, bins - 1)
    conf = np.bincount(index, weights=p, minlength=bins)
    acc = np.bincount(index, weights=t.astype(np.float64), minlength=bins)
    return float(np.abs(conf - acc).sum() / p.size)


def segmentation_metrics(
    pred: np.ndarray, target: np.ndarray, fov: np.ndarray | None = None, prob: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
) -> dict[str, float | int]:
    """Per-image metrics of a binary prediction against a binary target, inside an optional FOV.

    Returns the ratios dice, iou, precision, recall, cldice; the topology errors betti0_error and
    betti1_error; hd95 (in the units of `spacing` when given, else pixels); bf_score; ece (of `prob`,
    the foreground probabilities, nan without them); and the integer counts tp, fp, fn, tn that
    pool_metrics sums.
    """
    pred_arr, target_arr = np.asarray(pred), np.asarray(target)
    if pred_arr.shape != target_arr.shape:
        raise ValueError(f"pred shape {pred_arr.shape} does not match target shape {target_arr.shape}")
    p = _binary(pred_arr, "pred")
    t = _binary(target_arr, "target")
    if fov is not None:
        fov_arr = np.asarray(fov)
        if fov_arr.shape != target_arr.shape:
            raise ValueError(f"fov shape {fov_arr.shape} does not match target shape {target_arr.shape}")
        inside = fov_arr != 0
        p, t = p & inside, t & inside
        n_pixels = int(np.count_nonzero(inside))
    else:
        inside = None
        n_pixels = t.size
    if prob is not None and np.shape(prob) != target_arr.shape:
        raise ValueError(f"prob shape {np.shape(prob)} does not match target shape {target_arr.shape}")

    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    tn = n_pixels - tp - fp - fn

    (b0_p, b1_p), (b0_t, b1_t) = betti_numbers(p), betti_numbers(t)
    out: dict[str, float | int] = dict(_ratios(tp, fp, fn))
    out["cldice"] = hard_cldice(p, t)
    out["betti0_error"] = abs(b0_p - b0_t)
    out["betti1_error"] = abs(b1_p - b1_t)
    out["hd95"] = hd95(p, t, spacing)
    out["bf_score"] = bf_score(p, t)
    out["ece"] = expected_calibration_error(prob, t, inside) if prob is not None else math.nan
    out.update(tp=tp, fp=fp, fn=fn, tn=tn)
    return out


def pool_metrics(per_image: Sequence[dict[str, float | int]]) -> dict[str, float | int]:
    """Pool per-image results of segmentation_metrics over a dataset.

    "mean_<key>" is the nan-aware mean over images of every non-count key (macro average);
    "global_dice|iou|precision|recall" come from TP/FP/FN summed over all pixels of all images
    (micro average), with the same empty-mask convention. Also returns the summed counts,
    "n_images" and "hd95_undefined" (images whose hd95 is nan, left out of mean_hd95).
    """
    if not per_image:
        raise ValueError("pool_metrics needs at least one per-image result")
    out: dict[str, float | int] = {"n_images": len(per_image)}
    keys = [k for k in per_image[0] if k not in COUNT_KEYS]
    for key in keys:
        values = np.array([float(m[key]) for m in per_image], dtype=np.float64)
        finite = values[~np.isnan(values)]
        out[f"mean_{key}"] = float(finite.mean()) if finite.size else math.nan
    if "hd95" in keys:
        out["hd95_undefined"] = int(sum(math.isnan(float(m["hd95"])) for m in per_image))
    totals = {k: int(sum(int(m[k]) for m in per_image)) for k in COUNT_KEYS}
    for key, value in _ratios(totals["tp"], totals["fp"], totals["fn"]).items():
        out[f"global_{key}"] = value
    out.update(totals)
    return out
