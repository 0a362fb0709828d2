"""STRUCTURE loss pieces against plain-loop references written here."""

from __future__ import annotations

import math

import pytest
import torch

from mm.losses.structure import info_nce, lambda_warmup, structure_loss, structure_regulariser

# ---- plain references: python floats and loops only ----

def _ref_rows(feats: torch.Tensor) -> list[list[float]]:
    rows = feats.double().tolist()
    rows = [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in rows]
    mean = [sum(r[j] for r in rows) / len(rows) for j in range(len(rows[0]))]
    return [[r[j] - mean[j] for j in range(len(r))] for r in rows]


def _ref_softmax_sim(feats: torch.Tensor, tau: float) -> list[list[float]]:
    z = _ref_rows(feats)
    out = []
    for zi in z:
        logits = [sum(a * b for a, b in zip(zi, zj)) / tau for zj in z]
        top = max(logits)
        e = [math.exp(v - top) for v in logits]
        out.append([v / sum(e) for v in e])
    return out


def _ref_matmul(p: list[list[float]], q: list[list[float]]) -> list[list[float]]:
    n = len(p)
    return [[sum(p[i][k] * q[k][j] for k in range(n)) for j in range(n)] for i in range(n)]


def _ref_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _ref_regulariser(x, a, tau, levels, divergence) -> float:
    px1, pa1 = _ref_softmax_sim(x, tau), _ref_softmax_sim(a, tau)
    px, pa = px1, pa1
    total = 0.0
    for level in range(1, levels + 1):
        if level > 1:
            px, pa = _ref_matmul(px, px1), _ref_matmul(pa, pa1)
        row_div = []
        for p, q in zip(px, pa):
            m = [(u + v) / 2 for u, v in zip(p, q)]
            if divergence == "js":
                row_div.append(0.5 * (_ref_kl(p, m) + _ref_kl(q, m)))
            else:
                row_div.append(0.5 * (_ref_kl(m, q) + _ref_kl(m, p)))
        total += sum(row_div) / len(row_div) / level
    return total / levels


# ---- regulariser ----

def _random_orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q


@pytest.mark.parametrize("divergence", ["js", "js_release"])
def test_regulariser_zero_for_rotation_and_scaling(divergence):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    rotated = x @ _random_orthogonal(16, gen)
    scaled = 3.7 * x
    for a in (rotated, scaled):
        for levels in (1, 3):
            r = structure_regulariser(x, a, levels=levels, divergence=divergence)
            assert abs(r.item()) < 1e-10


@pytest.mark.parametrize("divergence", ["js", "js_release"])
def test_regulariser_positive_for_unrelated(divergence):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, generator=gen)
    a = torch.randn(32, 8, generator=gen)
    r = structure_regulariser(x, a, divergence=divergence)
    # Self-similarity dominates each row at tau = 0.05, so even unrelated batches score small:
    # check against a near-copy of x rather than a fixed scale.
    close = structure_regulariser(x, x + 0.05 * torch.randn(32, 16, generator=gen), divergence=divergence)
    assert r.item() > 1e-3 and r.item() > 10 * close.item()
    if divergence == "js":
        assert r.item() <= math.log(2) + 1e-6  # JS is bounded by log 2


@pytest.mark.parametrize("divergence", ["js", "js_release"])
@pytest.mark.parametrize("levels", [1, 3])
def test_regulariser_matches_loop_reference(divergence, levels):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    a = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    # tau = 0.5 keeps every probability well above 0 so the reference's plain logs are exact.
    for tau in (0.5, 0.05):
        got = structure_regulariser(x, a, tau=tau, levels=levels, divergence=divergence).item()
        want = _ref_regulariser(x, a, tau, levels, divergence)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_regulariser_gradient_only_to_head_output():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 12, generator=gen, requires_grad=True)
    a = torch.randn(16, 6, generator=gen, requires_grad=True)
    for divergence in ("js", "js_release"):
        x.grad, a.grad = None, None
        structure_regulariser(x, a, levels=2, divergence=divergence).backward()
        assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
        assert x.grad is None or (x.grad == 0).all()


def test_regulariser_finite_when_probabilities_underflow():
    # Tight clusters at tau = 0.05 push many float32 softmax entries to exactly 0.
    gen = torch.Generator().manual_seed(4)
    centres = torch.randn(4, 8, generator=gen) * 10
    x = centres.repeat_interleave(8, dim=0) + 1e-3 * torch.randn(32, 8, generator=gen)
    a = torch.randn(32, 8, generator=gen, requires_grad=True)
    for divergence in ("js", "js_release"):
        a.grad = None
        r = structure_regulariser(x, a, levels=3, divergence=divergence)
        r.backward()
        assert torch.isfinite(r) and torch.isfinite(a.grad).all()


# ---- warm-up, InfoNCE, total ----

def test_lambda_warmup():
    assert lambda_warmup(0, 10.0, 1000) == 0.0
    assert lambda_warmup(500, 10.0, 1000) == pytest.approx(5.0)
    assert lambda_warmup(1000, 10.0, 1000) == 10.0
    assert lambda_warmup(5000, 10.0, 1000) == 10.0
    assert lambda_warmup(0, 10.0, 0) == 10.0


def _ref_info_nce(img: torch.Tensor, txt: torch.Tensor, tau: float) -> float:
    def unit(rows):
        return [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in rows]

    im, tx = unit(img.double().tolist()), unit(txt.double().tolist())
    n = len(im)
    logits = [[sum(a * b for a, b in zip(im[i], tx[j])) / tau for j in range(n)] for i in range(n)]

    def ce(row_of, i):
        row = row_of(i)
        return -row[i] + math.log(sum(math.exp(v) for v in row))

    i2t = sum(ce(lambda i: logits[i], i) for i in range(n)) / n
    t2i = sum(ce(lambda j: [logits[i][j] for i in range(n)], j) for j in range(n)) / n
    return (i2t + t2i) / 2


def test_info_nce_matches_reference():
    gen = torch.Generator().manual_seed(5)
    img = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    txt = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    for tau in (0.05, 1.0):
        assert info_nce(img, txt, tau).item() == pytest.approx(_ref_info_nce(img, txt, tau), rel=1e-10)


def test_structure_loss_combines_terms():
    gen = torch.Generator().manual_seed(6)
    img_x, txt_x = torch.randn(8, 10, generator=gen), torch.randn(8, 12, generator=gen)
    img_a = torch.randn(8, 4, generator=gen, requires_grad=True)
    txt_a = torch.randn(8, 4, generator=gen, requires_grad=True)
    out = structure_loss(img_x, txt_x, img_a, txt_a, step=250, warmup_steps=1000)
    assert set(out) == {"loss", "info_nce", "reg_image", "reg_text", "lambda"}
    assert out["lambda"].item() == pytest.approx(2.5) and not out["lambda"].requires_grad
    want = out["info_nce"] + 2.5 * (out["reg_image"] + out["reg_text"]) / 2
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    assert out["reg_image"].item() == pytest.approx(structure_regulariser(img_x, img_a).item(), rel=1e-6)
    out["loss"].backward()
    assert torch.isfinite(img_a.grad).all() and torch.isfinite(txt_a.grad).all()
