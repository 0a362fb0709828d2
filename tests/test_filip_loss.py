"""FILIP loss: the chunked, distributed version against a plain dense reference written here."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import mm.losses.filip as filip_mod
from mm.losses.filip import (
    filip_loss,
    filip_similarity,
    filip_similarity_chunked,
    select_image_tokens,
    select_text_tokens,
)
from mm.models.filip import text_token_mask


def naive_sims(v, vm, t, tm):
    """Dense reference: the whole (B, B, N_img, N_txt) tensor, masked maxima, masked means."""
    v = v / v.norm(dim=-1, keepdim=True)
    t = t / t.norm(dim=-1, keepdim=True)
    sim = torch.einsum("ikd,jrd->ijkr", v, t)
    best_txt = sim.masked_fill(~tm[None, :, None, :], float("-inf")).max(dim=3).values  # (i, j, k)
    best_img = sim.masked_fill(~vm[:, None, :, None], float("-inf")).max(dim=2).values  # (i, j, r)
    s_i2t = (best_txt * vm[:, None, :]).sum(2) / vm.sum(1)[:, None]
    best_img = torch.where(tm[None], best_img, torch.zeros_like(best_img))
    s_t2i = best_img.sum(2) / tm.sum(1)[None, :]
    return s_i2t, s_t2i


def naive_loss(v, vm, t, tm, scale):
    s_i2t, s_t2i = naive_sims(v, vm, t, tm)
    labels = torch.arange(v.shape[0])
    return (F.cross_entropy(scale * s_i2t, labels) + F.cross_entropy(scale * s_t2i.T, labels)) / 2


def make_inputs(b=5, ni=4, nt=6, d=8, seed=0, pad_images=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(b, ni, d, generator=g, dtype=dtype)
    t = torch.randn(b, nt, d, generator=g, dtype=dtype)
    lengths = torch.randint(1, nt + 1, (b,), generator=g)
    tm = torch.arange(nt)[None] < lengths[:, None]
    vm = torch.ones(b, ni, dtype=torch.bool)
    if pad_images:
        vm = torch.rand(b, ni, generator=g) < 0.7
        vm[:, 0] = True
    scale = torch.tensor(7.0, dtype=dtype)
    return v, vm, t, tm, scale


def loss_and_grads(fn, v, vm, t, tm, scale):
    v, t, scale = (x.detach().clone().requires_grad_() for x in (v, t, scale))
    loss = fn(v, vm, t, tm, scale)
    loss.backward()
    return loss.detach(), v.grad, t.grad, scale.grad


def ours(**kw):
    return lambda v, vm, t, tm, s: filip_loss(v, vm, t, tm, s, **kw)["loss"]


def assert_close(a, b, tol=1e-10):
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a - b).abs().max()


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 7, None])
@pytest.mark.parametrize("store_indices", [True, False])
@pytest.mark.parametrize("pad_images", [False, True])
def test_matches_naive_value_and_grads(chunk_size, store_indices, pad_images):
    inputs = make_inputs(pad_images=pad_images)
    expected = loss_and_grads(naive_loss, *inputs)
    got = loss_and_grads(ours(chunk_size=chunk_size, store_indices=store_indices), *inputs)
    for a, b in zip(got, expected):
        assert_close(a, b)


def test_float32_matches_naive():
    inputs = make_inputs(b=6, ni=9, nt=7, d=16, seed=3, dtype=torch.float32)
    expected = loss_and_grads(naive_loss, *inputs)
    got = loss_and_grads(ours(chunk_size=4), *inputs)
    for a, b in zip(got, expected):
        assert_close(a, b, tol=1e-5)


def test_similarities_match_naive():
    v, vm, t, tm, _ = make_inputs(b=4, seed=1, pad_images=True)
    t = torch.cat([t, t[:2]])  # more texts than images
    tm = torch.cat([tm, tm[:2]])
    ref = naive_sims(v, vm, t, tm)
    dense = filip_similarity(v, vm, t, tm)
    dense_chunked = filip_similarity(v, vm, t, tm, chunk_size=4)
    chunked = filip_similarity_chunked(F.normalize(v, dim=-1), vm, F.normalize(t, dim=-1), tm, chunk_size=2)
    for got in (dense, dense_chunked, chunked):
        assert got[0].shape == (4, 6)
        assert_close(got[0].double(), ref[0], 1e-6 if got is chunked else 1e-12)
        assert_close(got[1].double(), ref[1], 1e-6 if got is chunked else 1e-12)


def test_one_token_each_is_clip_infonce():
    v, vm, t, tm, scale = make_inputs(ni=1, nt=1, seed=2)

    def clip(v, vm, t, tm, s):
        a = F.normalize(v[:, 0], dim=-1)
        b = F.normalize(t[:, 0], dim=-1)
        logits = s * a @ b.T
        labels = torch.arange(len(a))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    for a, b in zip(loss_and_grads(ours(chunk_size=2), v, vm, t, tm, scale),
                    loss_and_grads(clip, v, vm, t, tm, scale)):
        assert_close(a, b)


def test_extra_padding_changes_nothing():
    v, vm, t, tm, scale = make_inputs(seed=4, pad_images=True)
    g = torch.Generator().manual_seed(9)
    v_pad = torch.cat([v, 100 * torch.randn(5, 3, 8, generator=g, dtype=v.dtype)], 1)
    t_pad = torch.cat([t, 100 * torch.randn(5, 4, 8, generator=g, dtype=t.dtype)], 1)
    vm_pad = torch.cat([vm, torch.zeros(5, 3, dtype=torch.bool)], 1)
    tm_pad = torch.cat([tm, torch.zeros(5, 4, dtype=torch.bool)], 1)
    base = loss_and_grads(ours(chunk_size=2), v, vm, t, tm, scale)
    padded = loss_and_grads(ours(chunk_size=2), v_pad, vm_pad, t_pad, tm_pad, scale)
    assert_close(padded[0], base[0])
    assert_close(padded[1][:, :4], base[1])
    assert_close(padded[2][:, :6], base[2])
    assert_close(padded[3], base[3])
    assert padded[1][:, 4:].abs().max() == 0 and padded[2][:, 6:].abs().max() == 0


def test_keep_all_image_tokens_is_no_reduction():
    inputs = make_inputs(seed=5)
    for a, b in zip(loss_and_grads(ours(keep_image_tokens=1.0), *inputs), loss_and_grads(ours(), *inputs)):
        assert_close(a, b)


def test_token_selection_scores_by_best_local_text_token():
    v, vm, t, tm, scale = make_inputs(b=3, ni=8, nt=5, seed=6)
    idx = select_image_tokens(v, vm, t, tm, keep=0.25)
    assert idx.shape == (3, 2)
    sim = torch.einsum("kd,md->km", F.normalize(v.reshape(-1, 8), dim=-1),
                       F.normalize(t[tm], dim=-1)).amax(1).view(3, 8)
    expected = sim.topk(2, dim=1).indices.sort(1).values
    assert torch.equal(idx, expected)
    out = filip_loss(v.requires_grad_(), vm, t, tm, scale, keep_image_tokens=0.25)
    out["loss"].backward()
    # Only the kept tokens receive a gradient.
    touched = v.grad.abs().sum(-1) > 0
    assert torch.equal(touched, torch.zeros_like(touched).scatter_(1, idx, True))


def test_text_selection_scores_by_best_local_image_token():
    v, vm, t, tm, _ = make_inputs(b=3, ni=5, nt=8, seed=7)
    tm[0, 1:] = False  # a one-token caption: its pads are taken last, and stay masked
    idx = select_text_tokens(t, tm, v, vm, keep=0.25)
    assert idx.shape == (3, 2)
    sim = torch.einsum("rd,kd->rk", F.normalize(t.reshape(-1, 8), dim=-1),
                       F.normalize(v[vm], dim=-1)).amax(1).view(3, 8).masked_fill(~tm, float("-inf"))
    assert torch.equal(idx, sim.topk(2, dim=1).indices.sort(1).values)
    assert tm.gather(1, idx)[0].tolist() == [True, False]


def reduced_reference(v, vm, t, tm, keep, rows_per_rank):
    """Each rank's rows reduced on their own (scores against that rank's tokens only), then the dense
    naive loss on the concatenation: what FILIP's reduction before the gather must compute."""
    vs, vms, ts, tms = [], [], [], []
    for r0 in range(0, v.shape[0], rows_per_rank):
        sl = slice(r0, r0 + rows_per_rank)
        # Scores by plain cosine maxima, written out again rather than calling select_tokens.
        sim = torch.einsum("ikd,jrd->ikjr", F.normalize(v[sl], dim=-1), F.normalize(t[sl], dim=-1)).detach()
        img_score = sim.masked_fill(~tm[sl][None, None], float("-inf")).amax((2, 3))
        txt_score = sim.masked_fill(~vm[sl][:, :, None, None], float("-inf")).amax((0, 1))
        img_score = img_score.masked_fill(~vm[sl], float("-inf"))
        txt_score = txt_score.masked_fill(~tm[sl], float("-inf"))
        ki = img_score.topk(math.ceil(v.shape[1] * keep), 1).indices
        kt = txt_score.topk(math.ceil(t.shape[1] * keep), 1).indices
        vs.append(v[sl].gather(1, ki[..., None].expand(-1, -1, v.shape[2])))
        vms.append(vm[sl].gather(1, ki))
        ts.append(t[sl].gather(1, kt[..., None].expand(-1, -1, t.shape[2])))
        tms.append(tm[sl].gather(1, kt))
    return torch.cat(vs), torch.cat(vms), torch.cat(ts), torch.cat(tms)


def test_reduction_of_both_modalities_matches_naive_on_the_kept_tokens():
    v, vm, t, tm, scale = make_inputs(b=4, ni=8, nt=8, seed=8, pad_images=True)

    def reference(v, vm, t, tm, s):
        return naive_loss(*reduced_reference(v, vm, t, tm, 0.25, 4), s)

    for a, b in zip(loss_and_grads(ours(keep_image_tokens=0.25, keep_text_tokens=0.25), v, vm, t, tm, scale),
                    loss_and_grads(reference, v, vm, t, tm, scale)):
        assert_close(a, b)


def test_text_token_mask_open_clip_conventions():
    sot, eot = 49406, 49407
    ids = torch.tensor([[sot, 320, 0, 1929, eot, 0, 0],  # 0 inside the caption is the BPE id of "!"
                        [sot, eot, 0, 0, 0, 0, 0]])
    assert text_token_mask(ids).tolist() == [[False, True, True, True, True, False, False],
                                             [False, True, False, False, False, False, False]]
    assert text_token_mask(ids, keep_special="both")[0].tolist() == [True] * 5 + [False] * 2
    assert text_token_mask(ids, keep_special="none").tolist() == [
        [False, True, True, True, False, False, False],
        [False, True, False, False, False, False, False]]  # an empty caption keeps its EOT
    no_eot = torch.tensor([[5, 6, 0, 0]])
    assert text_token_mask(no_eot).tolist() == [[True, True, False, False]]


# ----------------------------------------------------------------------------------------------------
# Two real ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int) -> None:
    # Forked from a parent that may have run OpenMP regions: one thread keeps the child out of them.
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b_local = 3
        nt = 8
        v, vm, t, tm, scale = make_inputs(b=b_local * world, ni=8, nt=nt, seed=11, pad_images=True)
        local = slice(rank * b_local, (rank + 1) * b_local)

        def run(**kw):
            leaves = [x.detach().clone().requires_grad_() for x in (v, t, scale)]
            out = filip_loss(leaves[0][local], vm[local], leaves[1][local], tm[local], leaves[2], **kw)
            out["loss"].backward()
            parts = [out["loss"].detach().clone()] + [x.grad.clone() for x in leaves]
            for p in parts:
                dist.all_reduce(p)
                p /= world
            return parts

        single = loss_and_grads(ours(gather=False, chunk_size=2), v, vm, t, tm, scale)
        naive = loss_and_grads(naive_loss, v, vm, t, tm, scale)
        for a, b in zip(single, naive):
            assert_close(a, b)
        for kw in ({"chunk_size": 2}, {"chunk_size": None, "store_indices": False},
                   {"keep_image_tokens": 1.0}):
            for a, b in zip(run(**kw), single):
                assert_close(a, b)
        # Narrow gather: only the other ranks' tokens are rounded, so the loss moves a little.
        for a, b in zip(run(gather_dtype=torch.bfloat16), single):
            assert torch.allclose(a, b, atol=5e-2, rtol=5e-2), (a - b).abs().max()
        # FILIP's reduction before the gather: what is sent shrinks, and the loss is the dense loss
        # on the tokens each rank kept from its own rows.
        sent = []
        real_with, real_no = filip_mod.all_gather_with_grad, filip_mod.all_gather_no_grad
        filip_mod.all_gather_with_grad = lambda x: (sent.append(tuple(x.shape)), real_with(x))[1]
        filip_mod.all_gather_no_grad = lambda x: (sent.append(tuple(x.shape)), real_no(x))[1]
        try:
            full = run(chunk_size=2)
            sent_full, sent[:] = list(sent), []
            reduced = run(keep_image_tokens=0.25, keep_text_tokens=0.25)
        finally:
            filip_mod.all_gather_with_grad, filip_mod.all_gather_no_grad = real_with, real_no
        d = v.shape[-1]
        # Text tokens, their mask, then the (B_local, B_global) text->image score block.
        assert sent_full == [(b_local, nt, d), (b_local, nt), (b_local, b_local * world)]
        assert sent == [(b_local, 2, d), (b_local, 2), (b_local, b_local * world)]
        assert not torch.allclose(full[0], reduced[0])

        def reference(v_, vm_, t_, tm_, s_):
            return naive_loss(*reduced_reference(v_, vm_, t_, tm_, 0.25, b_local), s_)

        for a, b in zip(reduced, loss_and_grads(reference, v, vm, t, tm, scale)):
            assert_close(a, b)
        # gather=False on several ranks: each rank on its own rows only.
        out = filip_loss(v[local], vm[local], t[local], tm[local], scale, gather=False)
        assert out["logits_i2t"].shape == (b_local, b_local)
        assert_close(out["loss"], naive_loss(v[local], vm[local], t[local], tm[local], scale))
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_single_process():
    # fork skips re-importing torch in each child (seconds on a small machine).
    mp.start_processes(_rank_main, args=(2, _free_port()), nprocs=2, join=True, start_method="fork")
