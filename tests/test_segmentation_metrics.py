"""Segmentation metrics on tiny masks whose expected values are worked out by hand."""

import math

import numpy as np
import pytest

from mm.metrics.segmentation import betti_numbers, hd95, pool_metrics, segmentation_metrics

PRED = np.array(
    [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 1],
    ]
)
TARGET = np.array(
    [
        [1, 0, 0, 0],
        [1, 1, 1, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
    ]
)
# By hand: TP = (0,0) (1,0) (1,1) = 3; FP = (0,1) (3,3) = 2; FN = (1,2) = 1; TN = 16 - 6 = 10.


def _ring(size: int = 15, r_in: float = 3, r_out: float = 5) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size // 2, xx - size // 2)
    return (r >= r_in) & (r <= r_out)


def _two_blobs() -> np.ndarray:
    m = np.zeros((15, 15), bool)
    m[2:6, 2:6] = True
    m[9:13, 8:13] = True
    return m


def test_counts_and_ratios():
    m = segmentation_metrics(PRED, TARGET)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 2, 1, 10)
    assert m["dice"] == pytest.approx(6 / 9)
    assert m["iou"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)


def test_fov_restricts_evaluation():
    fov = np.ones((4, 4), np.uint8)
    fov[3] = 0  # drops the false positive at (3,3) and 4 pixels overall
    m = segmentation_metrics(PRED * 255, TARGET.astype(bool), fov)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 1, 7)
    assert m["dice"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    # The isolated FP component lies outside the FOV, so both masks are one component there.
    assert m["betti0_error"] == 0


def test_empty_mask_conventions():
    empty = np.zeros((5, 5), bool)
    full = np.ones((5, 5), bool)
    both = segmentation_metrics(empty, empty)
    for key in ("dice", "iou", "precision", "recall", "cldice"):
        assert both[key] == 1.0
    assert both["hd95"] == 0.0 and both["betti0_error"] == 0 and both["betti1_error"] == 0
    missed = segmentation_metrics(empty, full)
    for key in ("dice", "iou", "precision", "recall", "cldice"):
        assert missed[key] == 0.0
    assert math.isnan(missed["hd95"])


def test_betti_numbers_of_ring_and_blobs():
    assert betti_numbers(_ring()) == (1, 1)
    assert betti_numbers(_two_blobs()) == (2, 0)
    m = segmentation_metrics(_ring(), _two_blobs())
    assert m["betti0_error"] == 1 and m["betti1_error"] == 1


def test_betti_uses_8_4_connectivity_pairing():
    # A one-pixel diamond: its pixels touch only diagonally, yet it is one closed curve with one hole.
    diamond = np.zeros((5, 5), bool)
    for i, j in [(0, 2), (1, 1), (1, 3), (2, 0), (2, 4), (3, 1), (3, 3), (4, 2)]:
        diamond[i, j] = True
    assert betti_numbers(diamond) == (1, 1)
    # A hole touching the image border is not a hole.
    cup = np.zeros((5, 5), bool)
    cup[1:4, 1] = cup[1:4, 3] = cup[3, 1:4] = True
    assert betti_numbers(cup) == (1, 0)


def test_hd95_identical_and_shifted():
    line = np.zeros((12, 20), bool)
    line[4, 3:17] = True
    assert hd95(line, line) == 0.0
    # Every pixel of the shifted line is exactly 2 rows from the other line.
    assert hd95(np.roll(line, 2, axis=0), line) == pytest.approx(2.0)
    # A 10x10 square shifted 2 columns: no boundary pixel is farther than 2 from the other
    # boundary, and more than 5% (both vertical sides) are exactly 2 away.
    square = np.zeros((20, 20), bool)
    square[5:15, 4:14] = True
    assert hd95(np.roll(square, 2, axis=1), square) == pytest.approx(2.0)
    assert segmentation_metrics(square, square)["hd95"] == 0.0


def test_hard_cldice_of_thin_lines():
    line = np.zeros((11, 20), bool)
    line[5, 2:18] = True  # 16 pixels
    assert segmentation_metrics(line, line)["cldice"] == pytest.approx(1.0)
    gap = line.copy()
    gap[5, 9:11] = False  # 14 pixels, all on the target
    # Tprec = 14/14 = 1, Tsens = 14/16 = 0.875, clDice = 2 * 0.875 / 1.875.
    assert segmentation_metrics(gap, line)["cldice"] == pytest.approx(2 * 0.875 / 1.875)


def test_pool_metrics_mean_and_global():
    first = segmentation_metrics(PRED, TARGET)  # tp 3, fp 2, fn 1, tn 10
    second_target = np.zeros((4, 4), bool)
    second_target[:2, :2] = True
    second = segmentation_metrics(np.zeros((4, 4), bool), second_target)  # tp 0, fp 0, fn 4, tn 12
    pooled = pool_metrics([first, second])
    assert (pooled["tp"], pooled["fp"], pooled["fn"], pooled["tn"]) == (3, 2, 5, 22)
    assert pooled["global_dice"] == pytest.approx(6 / (6 + 2 + 5))
    assert pooled["global_iou"] == pytest.approx(3 / 10)
    assert pooled["global_precision"] == pytest.approx(3 / 5)
    assert pooled["global_recall"] == pytest.approx(3 / 8)
    assert pooled["mean_dice"] == pytest.approx((6 / 9 + 0.0) / 2)
    # The second hd95 is undefined (nan) and left out of the mean.
    assert pooled["mean_hd95"] == pytest.approx(first["hd95"])
    assert pooled["hd95_undefined"] == 1 and pooled["n_images"] == 2


def test_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        segmentation_metrics(PRED, np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 4\)"):
        segmentation_metrics(PRED, TARGET, fov=np.ones((3, 4)))
    with pytest.raises(ValueError, match="threshold"):
        segmentation_metrics(PRED * 0.4, TARGET)
    with pytest.raises(ValueError):
        pool_metrics([])


# ---------------------------------------------------------------------------------------------------
# hd95 conventions, physical units, boundary F-score, calibration


def _boundary_points(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels by the definition in the docstring, found pixel by pixel (no scipy morphology)."""
    padded = np.pad(mask, 1)
    points = []
    for r, c in zip(*np.nonzero(mask)):
        if not (padded[r, c + 1] and padded[r + 2, c + 1] and padded[r + 1, c] and padded[r + 1, c + 2]):
            points.append((r, c))
    return np.array(points, dtype=np.float64)


def _reference_directed(a: np.ndarray, b: np.ndarray, spacing=(1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    from scipy.spatial.distance import cdist

    pa, pb = _boundary_points(a) * spacing, _boundary_points(b) * spacing
    d = cdist(pa, pb)
    return d.min(axis=1), d.min(axis=0)


def _random_blobs(rng: np.random.Generator, size: int = 40) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(rng.random((size, size)), 3) > 0.5


def test_hd95_follows_monai_and_can_follow_medpy():
    """MONAI: max of the directed 95th percentiles; medpy: one percentile of both directions pooled.
    Brute-force references on random shapes; the two definitions differ on most of them."""
    rng = np.random.default_rng(0)
    differ = 0
    for _ in range(20):
        a, b = _random_blobs(rng), _random_blobs(rng)
        if not a.any() or not b.any():
            continue
        ab, ba = _reference_directed(a, b)
        monai = max(np.percentile(ab, 95), np.percentile(ba, 95))
        medpy = np.percentile(np.concatenate([ab, ba]), 95)
        assert hd95(a, b) == pytest.approx(monai)
        assert hd95(a, b, convention="medpy") == pytest.approx(medpy)
        differ += not math.isclose(monai, medpy)
    assert differ >= 10
    with pytest.raises(ValueError, match="convention"):
        hd95(a, b, convention="scipy")


def test_hd95_in_physical_units():
    rng = np.random.default_rng(1)
    a, b = _random_blobs(rng), _random_blobs(rng)
    spacing = (0.5, 2.0)  # rows 0.5 mm apart, columns 2 mm
    ab, ba = _reference_directed(a, b, spacing)
    assert hd95(a, b, spacing) == pytest.approx(max(np.percentile(ab, 95), np.percentile(ba, 95)))
    assert segmentation_metrics(a, b, spacing=spacing)["hd95"] == pytest.approx(hd95(a, b, spacing))
    line = np.zeros((12, 20), bool)
    line[4, 3:17] = True
    assert hd95(np.roll(line, 2, axis=0), line, spacing=(0.25, 1.0)) == pytest.approx(0.5)


def test_boundary_f_score_with_one_pixel_tolerance():
    from mm.metrics.segmentation import bf_score

    square = np.zeros((20, 20), bool)
    square[5:15, 4:14] = True
    assert bf_score(square, square) == 1.0
    assert bf_score(np.roll(square, 1, axis=1), square) == 1.0  # every boundary pixel within 1 px
    rng = np.random.default_rng(2)
    for _ in range(5):
        a, b = _random_blobs(rng), _random_blobs(rng)
        ab, ba = _reference_directed(a, b)
        p, r = np.mean(ab <= 1), np.mean(ba <= 1)
        assert bf_score(a, b) == pytest.approx(2 * p * r / (p + r))
        assert segmentation_metrics(a, b)["bf_score"] == pytest.approx(bf_score(a, b))
    empty = np.zeros_like(square)
    assert bf_score(empty, empty) == 1.0 and bf_score(square, empty) == 0.0


def test_expected_calibration_error_by_hand():
    from mm.metrics.segmentation import expected_calibration_error

    prob = np.array([[0.1, 0.1], [0.9, 0.9]])
    target = np.array([[0, 1], [1, 1]], bool)
    # Bin (0, 0.1]: mean p 0.1, foreground share 0.5, 2 pixels; bin (0.8, 0.9]: 0.9 vs 1.0, 2 pixels.
    assert expected_calibration_error(prob, target) == pytest.approx((2 * 0.4 + 2 * 0.1) / 4)
    inside = np.array([[True, False], [True, True]])
    assert expected_calibration_error(prob, target, inside) == pytest.approx((0.1 + 2 * 0.1) / 3)
    calibrated = np.full((10, 10), 0.3)
    truth = np.zeros((10, 10), bool)
    truth[:3] = True
    assert expected_calibration_error(calibrated, truth) == pytest.approx(0.0)
    m = segmentation_metrics(prob > 0.5, target, prob=prob)
    assert m["ece"] == pytest.approx(0.25)
    assert math.isnan(segmentation_metrics(prob > 0.5, target)["ece"])
