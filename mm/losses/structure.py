"""STRUCTURE's loss: InfoNCE on the trained heads plus a regulariser that keeps each head's
batch neighbourhood structure close to that of the frozen encoder it sits on (docs/methods.md §3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("js", "js_release")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # A softmax at tau = 0.05 spans ~e^160 between entries: half precision would saturate.
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _centred_unit_rows(t: torch.Tensor) -> torch.Tensor:
    t = F.normalize(t, dim=-1)
    return t - t.mean(dim=0, keepdim=True)


def _level_distributions(feats: torch.Tensor, tau: float, levels: int
                         ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(P^l, log P^l) for l = 1..levels, P the row-softmax of the centred similarity / tau."""
    z = _centred_unit_rows(feats)
    # The log floor keeps 0 * log 0 terms at 0 instead of NaN, and their gradients finite.
    log_floor = math.log(torch.finfo(z.dtype).tiny)
    log_p = torch.log_softmax(z @ z.T / tau, dim=-1)  # self-similarity kept on purpose
    p = log_p.exp()
    out = [(p, log_p.clamp_min(log_floor))]
    p_l = p
    for _ in range(1, levels):
        # Products of row-stochastic matrices stay row-stochastic: P^l is a distribution per row.
        p_l = p_l @ p
        out.append((p_l, p_l.clamp_min(torch.finfo(z.dtype).tiny).log()))
    return out


def _kl_rows(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) for each row, given p and both logs (already floored)."""
    return (p * (log_p - log_q)).sum(dim=-1)


def _row_divergence(p: torch.Tensor, log_p: torch.Tensor, q: torch.Tensor, log_q: torch.Tensor,
                    divergence: str) -> torch.Tensor:
    # log M computed from the logs so it is exact where one of p, q underflows to 0.
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    if divergence == "js":
        return 0.5 * (_kl_rows(p, log_p, log_m) + _kl_rows(q, log_q, log_m))
    # "js_release": 1/2[KL(M||P_A) + KL(M||P_X)], the reverse of textbook JS (KL arguments
    # swapped). It is what the released STRUCTURE code computes, offered so its numbers can be
    # reproduced. Unlike JS it is unbounded: where P_A is ~0 but P_X is not, the log floor caps it.
    m = 0.5 * (p + q)
    return 0.5 * (_kl_rows(m, log_m, log_q) + _kl_rows(m, log_m, log_p))


def structure_regulariser(x: torch.Tensor, a: torch.Tensor, tau: float = 0.05, levels: int = 1,
                          divergence: str = "js") -> torch.Tensor:
    """R_S for one modality: divergence between the batch-similarity random walks of the frozen
    features `x` (B, d_x) and the head output `a` (B, d_a), averaged over rows and levels,
    level l weighted 1/l. Gradient flows to `a` only."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    if x.shape[0] != a.shape[0]:
        raise ValueError(f"x and a must have the same batch size, got {x.shape[0]} and {a.shape[0]}")
    dtype = _compute_dtype(a)
    px = _level_distributions(x.detach().to(dtype), tau, levels)
    pa = _level_distributions(a.to(dtype), tau, levels)
    total = a.new_zeros((), dtype=dtype)
    for level, ((p, log_p), (q, log_q)) in enumerate(zip(px, pa), start=1):
        total = total + _row_divergence(p, log_p, q, log_q, divergence).mean() / level
    return total / levels


def info_nce(img: torch.Tensor, txt: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric CLIP InfoNCE with a fixed temperature: mean of image->text and text->image CE."""
    logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T / tau
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def lambda_warmup(step: int, lam: float, warmup_steps: int) -> float:
    """Regulariser weight: linear from 0 at step 0 to `lam` at `warmup_steps`, constant after."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return float(lam)
    return float(lam) * max(step, 0) / warmup_steps


def structure_loss(img_feat_frozen: torch.Tensor, txt_feat_frozen: torch.Tensor,
                   img_emb: torch.Tensor, txt_emb: torch.Tensor, step: int, tau: float = 0.05,
                   lam: float = 10.0, warmup_steps: int = 1000, levels: int = 1,
                   divergence: str = "js") -> dict[str, torch.Tensor]:
    """InfoNCE(tau) + lambda_t * (R_S(image) + R_S(text)) / 2, with lambda_t warmed up linearly.

    Returns the total under "loss" and each part (detached lambda included) for logging.
    """
    contrastive = info_nce(img_emb, txt_emb, tau)
    reg_image = structure_regulariser(img_feat_frozen, img_emb, tau, levels, divergence)
    reg_text = structure_regulariser(txt_feat_frozen, txt_emb, tau, levels, divergence)
    lam_t = lambda_warmup(step, lam, warmup_steps)
    loss = contrastive + lam_t * 0.5 * (reg_image + reg_text)
    return {
        "loss": loss,
        "info_nce": contrastive,
        "reg_image": reg_image,
        "reg_text": reg_text,
        "lambda": torch.tensor(lam_t, dtype=loss.dtype, device=loss.device),
    }
