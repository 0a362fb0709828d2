"""Segmentation losses: soft skeleton, soft Dice, soft clDice, BCE, FOV masking and the SegLoss total."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mm.losses.segmentation import (
    SegLoss,
    bce_loss,
    soft_cldice_loss,
    soft_dice_loss,
    soft_skeleton,
)


def _confident_logits(target: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    return (target * 2 - 1) * scale


def _bar_image() -> torch.Tensor:
    # A 3-pixel-wide horizontal bar (rows 15-17), centre line on row 16.
    img = torch.zeros(1, 1, 32, 32)
    img[..., 15:18, 4:28] = 1.0
    return img


def _cross_target() -> torch.Tensor:
    target = torch.zeros(2, 1, 24, 24)
    target[0, 0, 10:13, 2:22] = 1.0  # horizontal bar
    target[1, 0, 2:22, 5:8] = 1.0  # vertical bar
    target[1, 0, 15:18, 5:20] = 1.0  # joined to a horizontal one
    return target


# --- independent reference: explicit loops, neighbours off the image ignored -----------------------


def _pool(x: np.ndarray, offsets: list[tuple[int, int]], reduce) -> np.ndarray:
    h, w = x.shape
    out = np.empty_like(x)
    for i in range(h):
        for j in range(w):
            vals = [x[i + di, j + dj] for di, dj in offsets if 0 <= i + di < h and 0 <= j + dj < w]
            out[i, j] = reduce(vals)
    return out


def _ref_erode(x):
    vertical = _pool(x, [(-1, 0), (0, 0), (1, 0)], min)
    horizontal = _pool(x, [(0, -1), (0, 0), (0, 1)], min)
    return np.minimum(vertical, horizontal)


def _ref_dilate(x):
    return _pool(x, [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)], max)


def _ref_skeleton(img: np.ndarray, iterations: int) -> np.ndarray:
    def relu(a):
        return np.maximum(a, 0.0)

    def opened(a):
        return _ref_dilate(_ref_erode(a))

    skel = relu(img - opened(img))
    for _ in range(iterations):
        img = _ref_erode(img)
        delta = relu(img - opened(img))
        skel = skel + relu(delta - skel * delta)
    return skel


def test_soft_skeleton_matches_loop_reference():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 9, 11, dtype=torch.float64)
    got = soft_skeleton(x, iterations=4).numpy()
    for b in range(2):
        want = _ref_skeleton(x[b, 0].numpy(), iterations=4)
        np.testing.assert_allclose(got[b, 0], want, atol=1e-12)


def test_soft_skeleton_of_bar_is_its_centre_line():
    skel = soft_skeleton(_bar_image(), iterations=10)[0, 0]
    total = skel.sum()
    assert total > 0
    assert skel[16].sum() / total > 0.95  # nearly all mass on the central row
    assert (skel[16, 8:24] > 0.9).all()  # and the centre line is (almost) fully present
    assert skel[:15].sum() == 0 and skel[18:].sum() == 0


def test_soft_skeleton_accepts_3d_input():
    img = _bar_image()
    assert torch.equal(soft_skeleton(img[:, 0]), soft_skeleton(img)[:, 0])


def test_perfect_prediction_gives_zero_dice_and_cldice_loss():
    target = _cross_target()
    logits = _confident_logits(target)
    assert soft_dice_loss(logits, target).item() < 1e-4
    assert soft_cldice_loss(logits, target).item() < 1e-4


def test_disjoint_prediction_gives_dice_loss_near_one():
    target = torch.zeros(1, 1, 16, 16)
    target[..., :, :8] = 1.0
    logits = _confident_logits(1.0 - target)
    assert soft_dice_loss(logits, target).item() > 0.99


def test_bce_matches_torch_and_averages_over_valid_pixels():
    torch.manual_seed(1)
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    torch.testing.assert_close(bce_loss(logits, target), F.binary_cross_entropy_with_logits(logits, target))
    valid = torch.rand(2, 1, 8, 8) > 0.3
    want = F.binary_cross_entropy_with_logits(logits[valid], target[valid])
    torch.testing.assert_close(bce_loss(logits, target, valid), want)


def test_fov_mask_excludes_pixels_outside():
    torch.manual_seed(2)
    target = _cross_target()
    valid = torch.zeros_like(target)
    valid[..., :, 12:] = 1.0
    logits = torch.randn_like(target) * 3
    changed = logits.clone()
    changed[..., :, :12] = torch.randn_like(changed[..., :, :12]) * 10
    loss_fn = SegLoss()
    a, b = loss_fn(logits, target, valid), loss_fn(changed, target, valid)
    for key in ("loss", "bce", "dice", "cldice"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7)
    # Without the mask the same change does move the loss.
    assert not torch.allclose(loss_fn(logits, target)["loss"], loss_fn(changed, target)["loss"])


def test_combined_loss_is_weighted_sum_and_gradients_are_finite():
    torch.manual_seed(3)
    target = _cross_target()
    logits = torch.randn_like(target, requires_grad=True)
    out = SegLoss()(logits, target)
    assert set(out) == {"loss", "bce", "dice", "cldice"}
    assert all(v.dim() == 0 for v in out.values())
    torch.testing.assert_close(out["loss"], out["bce"] + out["dice"] + 0.5 * out["cldice"])
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_weights_and_iterations_are_configurable():
    torch.manual_seed(4)
    target = _cross_target()
    logits = torch.randn_like(target)
    out = SegLoss(bce_weight=2.0, dice_weight=0.0, cldice_weight=1.0, cldice_iters=3)(logits, target)
    torch.testing.assert_close(out["loss"], 2.0 * out["bce"] + out["cldice"])
    torch.testing.assert_close(out["cldice"], soft_cldice_loss(logits, target, iterations=3))
    assert not out["dice"].requires_grad


def test_mask_without_channel_and_shape_mismatch():
    target = _cross_target()
    logits = _confident_logits(target)
    out3, out4 = SegLoss()(logits, target[:, 0]), SegLoss()(logits, target)
    torch.testing.assert_close(out3["loss"], out4["loss"])
    with pytest.raises(ValueError, match=r"\(2, 1, 24, 23\).*\(2, 1, 24, 24\)"):
        SegLoss()(logits, target[..., :23])
