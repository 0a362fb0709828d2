"""Alignment scores and layer selection against brute-force references written here."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mm.metrics.alignment import (
    default_k,
    layer_alignment_matrix,
    linear_cka,
    mutual_knn,
    save_alignment_heatmap,
    save_alignment_json,
    select_layers,
)


def _brute_knn_sets(feats: torch.Tensor, k: int) -> list[set[int]]:
    rows = feats.double().tolist()
    rows = [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in rows]
    sets = []
    for i, ri in enumerate(rows):
        sims = [(sum(a * b for a, b in zip(ri, rj)), j) for j, rj in enumerate(rows) if j != i]
        sims.sort(reverse=True)
        sets.append({j for _, j in sims[:k]})
    return sets


def test_default_k():
    for n in (8, 27, 200, 1000, 5000):
        want = math.ceil(2 * n ** (1 / 3))
        # Perfect cubes: the float cube root is an ulp low, the exact answer is 2 * cube root.
        exact_root = round(n ** (1 / 3))
        if exact_root ** 3 == n:
            want = 2 * exact_root
        assert default_k(n) == want
    assert default_k(200) == 12 and default_k(5000) == 35


def test_mutual_knn_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(40, 6, generator=gen)
    b = a[:, :3] + 0.5 * torch.randn(40, 3, generator=gen)  # partly shared structure
    for k in (3, 7):
        sa, sb = _brute_knn_sets(a, k), _brute_knn_sets(b, k)
        want = sum(len(x & y) for x, y in zip(sa, sb)) / (k * len(sa))
        assert mutual_knn(a, b, k) == pytest.approx(want, abs=1e-12)


def test_mutual_knn_identical_and_random():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(100, 8, generator=gen)
    assert mutual_knn(a, a) == 1.0
    assert mutual_knn(a, 2.0 * a) == 1.0  # cosine ignores scale
    n, k = 300, default_k(300)
    scores = [mutual_knn(torch.randn(n, 16, generator=gen), torch.randn(n, 16, generator=gen))
              for _ in range(4)]
    # Independent spaces: overlap is hypergeometric with mean k / (n - 1).
    assert sum(scores) / len(scores) == pytest.approx(k / (n - 1), abs=0.02)


def _ref_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = a.double(), b.double()
    x, y = x - x.mean(0), y - y.mean(0)
    hsic_xy = ((x @ x.T) * (y @ y.T)).sum()  # tr(K L) with K, L the centred Gram matrices
    hsic_xx, hsic_yy = ((x @ x.T) ** 2).sum(), ((y @ y.T) ** 2).sum()
    return (hsic_xy / (hsic_xx * hsic_yy).sqrt()).item()


def test_linear_cka():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(50, 10, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64))
    assert linear_cka(a, a) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(a, a @ q) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(a, 5.0 * a + 3.0) == pytest.approx(1.0, abs=1e-12)
    b = torch.randn(50, 7, generator=gen, dtype=torch.float64)
    assert linear_cka(a, b) == pytest.approx(_ref_cka(a, b), rel=1e-10)
    assert linear_cka(a, b) < 0.5


def _planted_layers(seed: int = 3, n: int = 200):
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 8, generator=gen)
    vision = [torch.randn(n, 32, generator=gen) for _ in range(4)]
    text = [torch.randn(n, 24, generator=gen) for _ in range(3)]
    vision[2] = latent @ torch.randn(8, 32, generator=gen) + 0.1 * torch.randn(n, 32, generator=gen)
    text[1] = latent @ torch.randn(8, 24, generator=gen) + 0.1 * torch.randn(n, 24, generator=gen)
    return vision, text


@pytest.mark.parametrize("metric", ["mutual_knn", "cka"])
def test_select_layers_finds_planted_pair(metric):
    vision, text = _planted_layers()
    m = layer_alignment_matrix(vision, text, metric=metric)
    assert m.shape == (4, 3)
    assert select_layers(m) == (2, 1)
    if metric == "mutual_knn":
        assert m[2, 1] == pytest.approx(mutual_knn(vision[2], text[1]), abs=1e-12)


def test_select_layers_ties_go_to_later_pair():
    m = torch.tensor([[0.1, 0.9, 0.2], [0.9, 0.3, 0.9], [0.0, 0.1, 0.2]])
    assert select_layers(m) == (1, 2)


def test_saves_json_and_heatmap(tmp_path):
    vision, text = _planted_layers(n=60)
    m = layer_alignment_matrix(vision, text, metric="mutual_knn", k=5)
    sel = select_layers(m)
    jpath = save_alignment_json(m, tmp_path / "align.json", sel, "mutual_knn", 5, 60)
    record = json.loads(jpath.read_text())
    assert record["matrix"] == m.tolist()  # JSON round-trips floats exactly
    assert (record["selected"]["vision_layer"], record["selected"]["text_layer"]) == sel
    assert record["metric"] == "mutual_knn" and record["k"] == 5 and record["n"] == 60
    pytest.importorskip("matplotlib")
    ppath = save_alignment_heatmap(m, tmp_path / "align.png", "mutual_knn")
    assert ppath is not None and ppath.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
