"""Structure-CLIP loss against plain references written here, in one process and over 2 gloo ranks."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mm.losses.structure_clip import structure_clip_loss


def reference(v, t, n, has, scale, base, margin=0.2, weight=5.0, neg_margin=0.1, p=None):
    """p: the positive features the hard-negative hinge compares with n (default t)."""
    p = t if p is None else p
    v, t, n, p = (x / x.norm(dim=-1, keepdim=True) for x in (v, t, n, p))
    b = v.shape[0]
    s = v @ t.T
    if base == "infonce":
        labels = torch.arange(b)
        base_loss = (F.cross_entropy(scale * s, labels) + F.cross_entropy(scale * s.T, labels)) / 2
    else:
        terms = []
        for i in range(b):
            worst_text = max(max(0.0 * s[i, i], margin + s[i, j] - s[i, i]) for j in range(b) if j != i)
            worst_image = max(max(0.0 * s[i, i], margin + s[j, i] - s[i, i]) for j in range(b) if j != i)
            terms.append(worst_text + worst_image)
        base_loss = torch.stack(terms).mean()
    hinges = [torch.relu(neg_margin - (v[i] @ p[i] - v[i] @ n[i])) for i in range(b) if has[i]]
    neg = torch.stack(hinges).mean() if hinges else torch.zeros(())
    return base_loss + weight * neg, base_loss, neg


def inputs(b=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    v, t, n = (torch.randn(b, d, generator=g) for _ in range(3))
    # Make some negatives close to the positives so the hinge is active for some samples, not all.
    n[::2] = t[::2] + 0.05 * torch.randn(b // 2 + b % 2, d, generator=g)
    has = torch.tensor([True, True, False, True, False, True][:b])
    return v, t, n, has


@pytest.mark.parametrize("base", ["infonce", "hinge"])
def test_matches_reference_value_and_grads(base):
    v, t, n, has = inputs()
    scale = torch.tensor(10.0)
    leaves = [x.clone().requires_grad_() for x in (v, t, n)]
    out = structure_clip_loss(*leaves, has, scale, base=base)
    out["loss"].backward()
    ref_leaves = [x.clone().requires_grad_() for x in (v, t, n)]
    ref, ref_base, ref_neg = reference(*ref_leaves, has, scale, base)
    ref.backward()
    assert torch.allclose(out["loss"], ref, atol=1e-5)
    assert torch.allclose(out["base"], ref_base, atol=1e-5) and torch.allclose(out["neg_hinge"], ref_neg, atol=1e-6)
    assert out["neg_hinge"] > 0  # the test exercises an active negative term
    assert out["neg_share"].item() == pytest.approx(4 / 6)
    for a, b in zip(leaves, ref_leaves):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


@pytest.mark.parametrize("base", ["infonce", "hinge"])
def test_options_are_used(base):
    v, t, n, has = inputs(seed=1)
    scale = torch.tensor(5.0)
    out = structure_clip_loss(v, t, n, has, scale, base=base, margin=0.5, neg_weight=2.0, neg_margin=0.3)
    ref, _, _ = reference(v, t, n, has, scale, base, margin=0.5, weight=2.0, neg_margin=0.3)
    assert torch.allclose(out["loss"], ref, atol=1e-5)


@pytest.mark.parametrize("base", ["infonce", "hinge"])
def test_no_negatives_gives_zero_term(base):
    v, t, n, _ = inputs()
    has = torch.zeros(6, dtype=torch.bool)
    out = structure_clip_loss(v, t, n, has, torch.tensor(10.0), base=base)
    assert out["neg_hinge"].item() == 0.0 and out["neg_share"].item() == 0.0
    assert torch.equal(out["loss"], out["base"])
    ref, _, _ = reference(v, t, n, has, torch.tensor(10.0), base)
    assert torch.allclose(out["loss"], ref, atol=1e-5)


def test_hinge_on_other_text_features():
    """Structure-CLIP: the base loss scores the KEE-fused text, the hinge the plain tower's (hinge_text);
    the hinge's gradient reaches hinge_text and neg_text, never the fused text."""
    v, t, n, has = inputs()
    g = torch.Generator().manual_seed(5)
    p = n + 0.02 * torch.randn(n.shape, generator=g)  # close to the negatives: the hinge is active
    scale = torch.tensor(10.0)
    leaves = [x.clone().requires_grad_() for x in (v, t, n, p)]
    out = structure_clip_loss(*leaves[:3], has, scale, hinge_text=leaves[3])
    out["loss"].backward()
    ref_leaves = [x.clone().requires_grad_() for x in (v, t, n, p)]
    ref, _, ref_neg = reference(*ref_leaves[:3], has, scale, "infonce", p=ref_leaves[3])
    ref.backward()
    assert torch.allclose(out["loss"], ref, atol=1e-5) and torch.allclose(out["neg_hinge"], ref_neg, atol=1e-6)
    assert out["neg_hinge"] > 0
    for a, b in zip(leaves, ref_leaves):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)
    only_base = [x.clone().requires_grad_() for x in (v, t)]
    structure_clip_loss(*only_base, n, has, scale, neg_weight=0.0, hinge_text=p)["loss"].backward()
    assert torch.allclose(leaves[1].grad, only_base[1].grad, atol=1e-6)  # t gets the base loss only


def test_unknown_base():
    v, t, n, has = inputs()
    with pytest.raises(ValueError, match="base"):
        structure_clip_loss(v, t, n, has, torch.tensor(1.0), base="triplet")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BASES = ("infonce", "hinge")


def _rank_main(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        v, t, n, _ = inputs(b=6, seed=2)
        has = torch.tensor([True, False, False, False, True, True])  # 1 negative on rank 0, 2 on rank 1
        part = slice(rank * 3, rank * 3 + 3)
        for base in BASES:
            leaves = [x[part].clone().requires_grad_() for x in (v, t, n)]
            out = structure_clip_loss(*leaves, has[part], torch.tensor(10.0), base=base)
            out["loss"].backward()
            # DeepSpeed averages parameter gradients over ranks: the equivalent for these leaves is each
            # rank's gradient of its own rows (all_gather's backward sums it over ranks) / world.
            grads = torch.cat([x.grad for x in leaves], 1) / world
            loss = out["loss"].detach().clone()
            dist.all_reduce(loss)
            torch.save({"grads": grads, "loss": loss / world, "share": out["neg_share"]},
                       os.path.join(result_dir, f"{base}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_single_process(tmp_path):
    """Rows split over 2 gloo ranks: the mean of the ranks' losses and their gradients equal the
    single-process ones on the global batch, for both bases (uneven negatives per rank included)."""
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    v, t, n, _ = inputs(b=6, seed=2)
    has = torch.tensor([True, False, False, False, True, True])
    for base in BASES:
        leaves = [x.clone().requires_grad_() for x in (v, t, n)]
        ref, _, _ = reference(*leaves, has, torch.tensor(10.0), base)
        ref.backward()
        ref_grads = torch.cat([x.grad for x in leaves], 1)
        got = [torch.load(tmp_path / f"{base}-{r}.pt") for r in range(2)]
        assert torch.allclose(torch.cat([g["grads"] for g in got], 0), ref_grads, atol=1e-5), base
        assert torch.allclose(got[0]["loss"], ref, atol=1e-5), base
        assert got[0]["share"].item() == pytest.approx(0.5)
