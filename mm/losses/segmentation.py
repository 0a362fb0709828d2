"""Binary segmentation losses for TopoLoRA-SAM: BCE + soft Dice + soft clDice (docs/methods.md §4).

Every function takes logits of shape (B, 1, H, W) or (B, H, W), a float 0/1 target of the same size
and an optional `valid` mask (field of view, nonzero = evaluate) of the same size; (B, H, W) and
(B, 1, H, W) may be mixed. Pixels outside `valid` are removed from every term: BCE averages over
valid pixels only, and probabilities and labels are zeroed outside `valid` before the Dice sums and
before skeletonisation, so predictions there move neither the loss nor its gradient.

Dice and clDice are computed per image and averaged over the batch, so a large image does not drown
a small one; BCE is the mean over all valid pixels of the batch. The sums run in float32 even under
fp16 autocast because the skeleton and the ratio terms lose too much precision in half.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _as_4d(x: Tensor, name: str) -> Tensor:
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() == 4:
        return x
    raise ValueError(f"{name} must have shape (B, 1, H, W) or (B, H, W), got {tuple(x.shape)}")


def _prepare(logits: Tensor, target: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Bring the inputs to float32 (B, C, H, W) and check that their shapes agree."""
    logits4 = _as_4d(logits, "logits").float()
    target4 = _as_4d(target, "target").float()
    if target4.shape != logits4.shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}"
        )
    valid4 = None
    if valid is not None:
        valid4 = (_as_4d(valid, "valid") != 0).float()
        if valid4.shape != logits4.shape:
            raise ValueError(
                f"valid shape {tuple(valid.shape)} does not match logits shape {tuple(logits.shape)}"
            )
    return logits4, target4, valid4


# --- soft morphology -----------------------------------------------------------------------------
# max_pool2d pads with -inf, so pixels outside the image never win a max (or, negated, a min):
# an object touching the image border is not eroded from that side.


def soft_erode(x: Tensor) -> Tensor:
    """Soft erosion: the minimum of a 3x1 and a 1x3 min-pool (a 5-pixel cross), on (B, C, H, W)."""
    vertical = -F.max_pool2d(-x, kernel_size=(3, 1), stride=1, padding=(1, 0))
    horizontal = -F.max_pool2d(-x, kernel_size=(1, 3), stride=1, padding=(0, 1))
    return torch.minimum(vertical, horizontal)


def soft_dilate(x: Tensor) -> Tensor:
    """Soft dilation: a 3x3 max-pool, on (B, C, H, W)."""
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def soft_open(x: Tensor) -> Tensor:
    """Soft opening: dilate(erode(x))."""
    return soft_dilate(soft_erode(x))


def soft_skeleton(x: Tensor, iterations: int = 10) -> Tensor:
    """Differentiable skeleton of a probability map in [0, 1], shape (B, C, H, W) or (B, H, W).

    Each pass peels one layer by erosion and keeps what opening removes; `iterations` should be at
    least half the widest structure (in pixels) whose centre line must be found.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    squeeze = x.dim() == 3
    img = _as_4d(x, "x")
    skel = F.relu(img - soft_open(img))
    for _ in range(iterations):
        img = soft_erode(img)
        delta = F.relu(img - soft_open(img))
        # Add only the part of delta not already in the skeleton, keeping values within [0, 1].
        skel = skel + F.relu(delta - skel * delta)
    return skel.squeeze(1) if squeeze else skel


# --- loss terms ----------------------------------------------------------------------------------


def _masked(probs: Tensor, target: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    if valid is None:
        return probs, target
    return probs * valid, target * valid


def bce_loss(logits: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Binary cross-entropy with logits, averaged over valid pixels (0 when none is valid)."""
    logits, target, valid = _prepare(logits, target, valid)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if valid is None:
        return per_pixel.mean()
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1.0)


def soft_dice_loss(
    logits: Tensor, target: Tensor, valid: Tensor | None = None, smooth: float = 1.0
) -> Tensor:
    """1 - soft Dice of sigmoid(logits) and target, per image then averaged over the batch.

    `smooth` keeps empty images defined: an empty prediction of an empty target scores loss 0.
    """
    logits, target, valid = _prepare(logits, target, valid)
    probs, target = _masked(torch.sigmoid(logits), target, valid)
    dims = (1, 2, 3)
    inter = (probs * target).sum(dims)
    dice = (2.0 * inter + smooth) / (probs.sum(dims) + target.sum(dims) + smooth)
    return 1.0 - dice.mean()


def soft_cldice_loss(
    logits: Tensor,
    target: Tensor,
    valid: Tensor | None = None,
    iterations: int = 10,
    smooth: float = 1.0,
) -> Tensor:
    """1 - soft clDice (centre-line Dice), per image then averaged over the batch.

    Tprec = (sum S_P V_L + s) / (sum S_P + s) and Tsens = (sum S_L V_P + s) / (sum S_L + s), with
    V_P = sigmoid(logits), V_L = target and S_* = soft_skeleton(V_*, iterations).
    """
    logits, target, valid = _prepare(logits, target, valid)
    probs, target = _masked(torch.sigmoid(logits), target, valid)
    skel_pred = soft_skeleton(probs, iterations)
    skel_true = soft_skeleton(target, iterations)
    dims = (1, 2, 3)
    tprec = ((skel_pred * target).sum(dims) + smooth) / (skel_pred.sum(dims) + smooth)
    tsens = ((skel_true * probs).sum(dims) + smooth) / (skel_true.sum(dims) + smooth)
    cldice = 2.0 * tprec * tsens / (tprec + tsens)
    return 1.0 - cldice.mean()


class SegLoss(nn.Module):
    """Weighted BCE + (1 - soft Dice) + (1 - soft clDice); defaults follow the TopoLoRA-SAM release.

    forward() returns a dict of scalar tensors: "loss" (the weighted total, to backpropagate) and the
    unweighted loss terms "bce", "dice" (= 1 - soft Dice) and "cldice" (= 1 - soft clDice).
    A term whose weight is 0 is still reported, computed without gradient.
    """

    def __init__(
        self,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        cldice_weight: float = 0.5,
        cldice_iters: int = 10,
        smooth: float = 1.0,
    ) -> None:
        super().__init__()
        self.weights = {"bce": bce_weight, "dice": dice_weight, "cldice": cldice_weight}
        self.cldice_iters = cldice_iters
        self.smooth = smooth

    def forward(self, logits: Tensor, target: Tensor, valid: Tensor | None = None) -> dict[str, Tensor]:
        terms = {
            "bce": lambda: bce_loss(logits, target, valid),
            "dice": lambda: soft_dice_loss(logits, target, valid, self.smooth),
            "cldice": lambda: soft_cldice_loss(logits, target, valid, self.cldice_iters, self.smooth),
        }
        out: dict[str, Tensor] = {}
        total = logits.new_zeros((), dtype=torch.float32)
        for name, compute in terms.items():
            weight = self.weights[name]
            if weight == 0:
                # Still logged for comparison across runs, but kept off the autograd graph.
                with torch.no_grad():
                    out[name] = compute()
                continue
            out[name] = compute()
            total = total + weight * out[name]
        out["loss"] = total
        return out

    def extra_repr(self) -> str:
        w = self.weights
        return f"bce={w['bce']}, dice={w['dice']}, cldice={w['cldice']}, cldice_iters={self.cldice_iters}"
