"""Representation-alignment scores between two feature spaces of the same samples, used by
STRUCTURE to choose which (vision layer, text layer) pair to align (docs/methods.md §3)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

METRICS = ("mutual_knn", "cka")

# Rows per block when ranking neighbours: bounds memory at (block x n) float64.
_KNN_BLOCK = 2048


def default_k(n: int) -> int:
    """ceil(2 n^(1/3)), computed exactly: the smallest k with k^3 >= 8 n."""
    k = max(1, math.ceil(2 * n ** (1 / 3)))
    # Float cube roots are off by an ulp for perfect cubes (1000 ** (1/3) < 10): fix up in integers.
    while (k - 1) ** 3 >= 8 * n and k > 1:
        k -= 1
    while k ** 3 < 8 * n:
        k += 1
    return k


def _resolve_k(n: int, k: int | None) -> int:
    if n < 2:
        raise ValueError(f"need at least 2 samples, got {n}")
    k = default_k(n) if k is None else k
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, n-1] = [1, {n - 1}], got {k}")
    return k


def knn_indices(feats: torch.Tensor, k: int) -> torch.Tensor:
    """(n, k) indices of each sample's k nearest other samples by cosine similarity."""
    # float64 so that the ranking does not depend on rounding of near-equal similarities.
    z = F.normalize(feats.detach().to(torch.float64).flatten(1), dim=-1)
    n = z.shape[0]
    out = []
    for start in range(0, n, _KNN_BLOCK):
        sim = z[start:start + _KNN_BLOCK] @ z.T
        rows = torch.arange(sim.shape[0], device=sim.device)
        sim[rows, rows + start] = -math.inf  # self is never its own neighbour
        out.append(sim.topk(k, dim=-1).indices)
    return torch.cat(out)


def _knn_overlap(idx_a: torch.Tensor, idx_b: torch.Tensor) -> float:
    # Indices within a row are distinct, so counting equal pairs counts the set intersection.
    k = idx_a.shape[1]
    shared = (idx_a[:, :, None] == idx_b[:, None, :]).sum(dim=(1, 2))
    return shared.double().mean().item() / k


def mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int | None = None) -> float:
    """Mean over samples of |kNN_A(i) & kNN_B(i)| / k (cosine, self excluded).

    `a` (n, d_a) and `b` (n, d_b) hold the same n samples. k defaults to ceil(2 n^(1/3)).
    Independent spaces score about k / (n - 1); identical neighbourhoods score 1.
    """
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must hold the same samples, got {a.shape[0]} and {b.shape[0]} rows")
    k = _resolve_k(a.shape[0], k)
    return _knn_overlap(knn_indices(a, k), knn_indices(b.to(a.device), k))


def _centred(feats: torch.Tensor) -> torch.Tensor:
    x = feats.detach().to(torch.float64).flatten(1)
    return x - x.mean(dim=0, keepdim=True)


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Centred linear CKA: ||B^T A||_F^2 / (||A^T A||_F ||B^T B||_F) on column-centred features."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must hold the same samples, got {a.shape[0]} and {b.shape[0]} rows")
    x, y = _centred(a), _centred(b.to(a.device))
    return _cka_from_centred(x, y, torch.linalg.norm(x.T @ x), torch.linalg.norm(y.T @ y))


def _cka_from_centred(x: torch.Tensor, y: torch.Tensor, norm_xx: torch.Tensor,
                      norm_yy: torch.Tensor) -> float:
    denom = (norm_xx * norm_yy).item()
    if denom == 0.0:
        return 0.0  # a constant feature space has no structure to share
    return (torch.linalg.norm(y.T @ x) ** 2).item() / denom


def layer_alignment_matrix(vision_layers: list[torch.Tensor], text_layers: list[torch.Tensor],
                           metric: str = "mutual_knn", k: int | None = None,
                           normalize: bool = True) -> torch.Tensor:
    """(n_vision, n_text) float64 scores of every layer pair; each layer is (n, d) pooled features.

    Rows are L2-normalised first as in docs/methods.md §3 (a no-op for mutual k-NN, which is cosine;
    it changes CKA). Per-layer work (neighbour lists, Gram norms) is done once, not per pair.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if not vision_layers or not text_layers:
        raise ValueError("need at least one vision layer and one text layer")
    n = vision_layers[0].shape[0]
    if any(t.shape[0] != n for t in [*vision_layers, *text_layers]):
        raise ValueError("every layer must hold the same n samples")
    device = vision_layers[0].device

    def prep(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to(device, torch.float64).flatten(1)
        return F.normalize(t, dim=-1) if normalize else t

    scores = torch.zeros(len(vision_layers), len(text_layers), dtype=torch.float64)
    if metric == "mutual_knn":
        k = _resolve_k(n, k)
        v_idx = [knn_indices(prep(t), k) for t in vision_layers]
        t_idx = [knn_indices(prep(t), k) for t in text_layers]
        for i, a in enumerate(v_idx):
            for j, b in enumerate(t_idx):
                scores[i, j] = _knn_overlap(a, b)
        return scores
    v_c = [_centred(prep(t)) for t in vision_layers]
    t_c = [_centred(prep(t)) for t in text_layers]
    v_norm = [torch.linalg.norm(x.T @ x) for x in v_c]
    t_norm = [torch.linalg.norm(y.T @ y) for y in t_c]
    for i, x in enumerate(v_c):
        for j, y in enumerate(t_c):
            scores[i, j] = _cka_from_centred(x, y, v_norm[i], t_norm[j])
    return scores


def select_layers(matrix: torch.Tensor) -> tuple[int, int]:
    """(vision layer, text layer) with the highest score.

    Ties go to the later pair in row-major order (deepest vision layer, then deepest text layer):
    with no evidence either way, the deeper layers are the closer to the usual last-layer default.
    Mutual k-NN scores are multiples of 1/(n k), so exact ties do happen.
    """
    m = torch.as_tensor(matrix)
    if m.ndim != 2 or m.numel() == 0:
        raise ValueError(f"expected a non-empty 2-D score matrix, got shape {tuple(m.shape)}")
    flat = m.flatten()
    best = flat.max()
    last = int(torch.nonzero(flat == best).max())
    return divmod(last, m.shape[1])


def save_alignment_json(matrix: torch.Tensor, path: str | Path, selected: tuple[int, int],
                        metric_name: str, k: int | None, n: int) -> Path:
    """Write the score matrix, the selected pair and the settings that produced them."""
    m = torch.as_tensor(matrix, dtype=torch.float64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "metric": metric_name,
        "n": int(n),
        "k": None if k is None else int(k),
        "shape": list(m.shape),
        "matrix": m.tolist(),
        "selected": {"vision_layer": int(selected[0]), "text_layer": int(selected[1]),
                     "score": float(m[selected[0], selected[1]])},
    }
    path.write_text(json.dumps(record, indent=2))
    return path


def save_alignment_heatmap(matrix: torch.Tensor, path: str | Path, metric_name: str,
                           selected: tuple[int, int] | None = None) -> Path | None:
    """PNG heat-map (vision layers as rows, text layers as columns), the chosen pair boxed.

    Returns None with a warning when matplotlib is missing: the JSON record still holds the data.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")  # headless training nodes have no display
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError:
        warnings.warn("matplotlib is not installed; skipping the alignment heat-map", stacklevel=2)
        return None
    m = torch.as_tensor(matrix, dtype=torch.float64).cpu().numpy()
    selected = select_layers(torch.from_numpy(m)) if selected is None else selected
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * m.shape[1], 1.0 + 0.45 * m.shape[0]), dpi=100)
    try:
        im = ax.imshow(m, cmap="viridis", aspect="auto", origin="lower")
        fig.colorbar(im, ax=ax, label=metric_name)
        ax.add_patch(Rectangle((selected[1] - 0.5, selected[0] - 0.5), 1, 1,
                               fill=False, edgecolor="red", linewidth=2))
        ax.set_xlabel("text layer")
        ax.set_ylabel("vision layer")
        ax.set_title(f"{metric_name}: best (v={selected[0]}, t={selected[1]})")
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
