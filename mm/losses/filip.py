"""FILIP's token-wise late-interaction contrastive loss, computed chunk by chunk so memory stays bounded.

Definitions (docs/methods.md §1, the paper's version). Tokens are L2-normalised per token, then
    S_ij[k, r]  = <v_ik, t_jr>                                     image i token k, text j token r
    s^I_ij      = mean over valid k of (max over valid r of S_ij[k, r])     image -> text
    s^T_ij      = mean over valid r of (max over valid k of S_ij[k, r])     text -> image
    loss        = 1/2 [CE(scale * s^I, diag) + CE(scale * (s^T)^T, diag)]
Masks (True = real token) exclude padding from both the max and the mean; the loss sees nothing but
the masks, so which special tokens count is decided by the model (mm.models.filip.text_token_mask) and by the model
handing over patch tokens only (no image CLS).

Memory. The full S has B_img x B_txt x N_img x N_txt entries (ViT-B/16 at B=256: ~1e9). The autograd
Function below walks over chunks of text candidates, takes both maxima from the same chunk of S, and
keeps only the B x B similarities plus the argmax indices (uint8/int16, B_img x B_txt x (N_img + N_txt)
bytes) for backward; `store_indices=False` recomputes each chunk in backward instead, so nothing of
size B x B x N is kept. Peak working memory is two chunk blocks of B_img x chunk x N_img x N_txt.

Distributed (see `filip_loss`). Only text tokens are all-gathered: each rank computes its local images
against all texts, which yields s^I for its image rows and s^T for the same (image, text) pairs. The
text->image rows of a local text need s^T against every rank's images, so the small B_local x B_global
s^T block is all-gathered (with gradient) instead of gathering image tokens and computing a second
B_local x B_global x N_img x N_txt block. Every rank must hold the same B_local and the same padded
token counts (the data layer pads captions to a fixed context length and images have a fixed patch grid).

Token reduction (FILIP's, optional): each rank keeps the top fraction of its image tokens and of its
text tokens, chosen BEFORE the gather, so the gathered text tensor is (B, ceil(keep * N_txt), d).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mm.dist import all_gather_no_grad, all_gather_with_grad, rank, world_size

# Default size of one chunk of S in elements (128 MiB in fp32); the chunk over text candidates is
# chosen so that B_img x chunk x N_img x N_txt stays under it.
DEFAULT_CHUNK_ELEMENTS = 2**25

def _default_mask(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    return mask.bool()


# ----------------------------------------------------------------------------------------------------
# Plain dense similarity (scoring, zero-shot, small references)


def filip_similarity(img: torch.Tensor, img_mask: torch.Tensor | None, txt: torch.Tensor,
                     txt_mask: torch.Tensor | None, normalize: bool = True,
                     chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-wise similarities (s_i2t, s_t2i), both (B_img, B_txt) and indexed [image, text].

    Plain differentiable torch ops on the dense S; `chunk_size` only splits the text candidates to cap
    memory when scoring many pairs under no_grad (zero-shot against class prompts).
    """
    img_mask, txt_mask = _default_mask(img, img_mask), _default_mask(txt, txt_mask)
    if normalize:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    acc = torch.promote_types(img.dtype, torch.float32)  # bf16 cannot even count past 256 exactly
    n_img = img_mask.sum(1).clamp(min=1).to(acc)
    n_txt = txt_mask.sum(1).clamp(min=1).to(acc)
    step = chunk_size or txt.shape[0]
    i2t, t2i = [], []
    for j0 in range(0, txt.shape[0], step):
        t, tm = txt[j0:j0 + step], txt_mask[j0:j0 + step]
        sim = torch.einsum("ikd,jrd->ijkr", img, t)
        best_txt = sim.masked_fill(~tm[None, :, None, :], float("-inf")).amax(3)  # (i, j, k)
        best_img = sim.masked_fill(~img_mask[:, None, :, None], float("-inf")).amax(2)  # (i, j, r)
        i2t.append(torch.where(img_mask[:, None, :], best_txt, 0).sum(2, dtype=acc) / n_img[:, None])
        t2i.append(torch.where(tm[None], best_img, 0).sum(2, dtype=acc) / n_txt[None, j0:j0 + step])
    return torch.cat(i2t, 1), torch.cat(t2i, 1)


# ----------------------------------------------------------------------------------------------------
# Memory-bounded similarity


def _index_dtype(n: int) -> torch.dtype:
    # Indices are kept for backward at B_img x B_txt x N each, so the narrowest type that holds them.
    return torch.uint8 if n <= 256 else torch.int16 if n <= 32768 else torch.int32


def _auto_chunk(n_img_rows: int, n_img_tokens: int, n_txt_tokens: int) -> int:
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, n_img_rows * n_img_tokens * n_txt_tokens))


def _chunk_maxima(img: torch.Tensor, img_mask: torch.Tensor, img_all_valid: bool, txt: torch.Tensor,
                  txt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For all images vs one chunk of texts: best values and argmax indices in both directions.

    Returns best_txt (Bi, Ni, c) = max over valid r, arg_r (Bi, Ni, c), best_img (Bi, c, Nt) = max over
    valid k, arg_k (Bi, c, Nt). One S block serves both maxima; it is masked in place to save a copy.
    """
    bi, ni, d = img.shape
    c, nt, _ = txt.shape
    # (Bi*Ni, c*Nt) matmul viewed as (Bi, Ni, c, Nt): no permuted copy of S is ever made.
    sim = (img.reshape(bi * ni, d) @ txt.reshape(c * nt, d).T).view(bi, ni, c, nt)
    sim.masked_fill_(~txt_mask.view(1, 1, c, nt), float("-inf"))
    best_txt, arg_r = sim.max(dim=3)
    # Pad text columns are now -inf for every k; their max over k is dropped by the mean below.
    if not img_all_valid:
        sim.masked_fill_(~img_mask.view(bi, ni, 1, 1), float("-inf"))
    best_img, arg_k = sim.max(dim=1)
    return best_txt, arg_r, best_img, arg_k


class _FilipSimilarity(torch.autograd.Function):
    """(s_i2t, s_t2i) of normalised tokens, each (B_img, B_txt) in >= fp32, computed over text chunks.

    The gradient of each max is the one-hot at torch.max's argmax, as autograd gives through
    torch.max(dim); both directions' gradients land in one (Bi, Ni, c, Nt) weight block G, so
    d img = G @ txt and d txt = G^T @ img are two plain matmuls per chunk.
    """

    @staticmethod
    def forward(ctx: Any, img: torch.Tensor, img_mask: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor,
                chunk_size: int | None, store_indices: bool) -> tuple[torch.Tensor, torch.Tensor]:
        img, txt = img.contiguous(), txt.contiguous()
        bi, ni, _ = img.shape
        bt, nt, _ = txt.shape
        chunk = chunk_size or _auto_chunk(bi, ni, nt)
        img_all_valid = bool(img_mask.all())
        # Sums at least in fp32 so bf16 tokens still give well-resolved logits.
        acc = torch.promote_types(img.dtype, torch.float32)
        n_img = img_mask.sum(1).clamp(min=1).to(acc)
        n_txt = txt_mask.sum(1).clamp(min=1).to(acc)
        s_i2t = torch.empty(bi, bt, dtype=acc, device=img.device)
        s_t2i = torch.empty_like(s_i2t)
        arg_r_all = torch.empty(bi, ni, bt, dtype=_index_dtype(nt), device=img.device) if store_indices else None
        arg_k_all = torch.empty(bi, bt, nt, dtype=_index_dtype(ni), device=img.device) if store_indices else None
        for j0 in range(0, bt, chunk):
            j1 = min(j0 + chunk, bt)
            tm = txt_mask[j0:j1]
            best_txt, arg_r, best_img, arg_k = _chunk_maxima(img, img_mask, img_all_valid, txt[j0:j1], tm)
            s_i2t[:, j0:j1] = torch.where(img_mask[:, :, None], best_txt, 0).sum(1, dtype=acc) / n_img[:, None]
            s_t2i[:, j0:j1] = torch.where(tm[None], best_img, 0).sum(2, dtype=acc) / n_txt[None, j0:j1]
            if store_indices:
                arg_r_all[:, :, j0:j1] = arg_r
                arg_k_all[:, j0:j1] = arg_k
        ctx.save_for_backward(img, img_mask, txt, txt_mask, n_img, n_txt,
                              *((arg_r_all, arg_k_all) if store_indices else ()))
        ctx.chunk, ctx.store_indices, ctx.img_all_valid = chunk, store_indices, img_all_valid
        return s_i2t, s_t2i

    @staticmethod
    def backward(ctx: Any, grad_i2t: torch.Tensor | None, grad_t2i: torch.Tensor | None) -> tuple:
        img, img_mask, txt, txt_mask, n_img, n_txt, *saved_args = ctx.saved_tensors
        need_img, need_txt = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if not (need_img or need_txt):
            return None, None, None, None, None, None
        bi, ni, d = img.shape
        bt, nt, _ = txt.shape
        if grad_i2t is None:
            grad_i2t = torch.zeros(bi, bt, device=img.device)
        if grad_t2i is None:
            grad_t2i = torch.zeros(bi, bt, device=img.device)
        acc = n_img.dtype
        # d s^I_ij / d S_ij[k, r*] = 1/n_img_i at valid k; d s^T_ij / d S_ij[k*, r] = 1/n_txt_j at valid r.
        # Spread over tokens per chunk below: whole (Bi, Ni, Bt) weights would cost more than S's chunk.
        w_i2t = grad_i2t.to(acc) / n_img[:, None]
        w_t2i = grad_t2i.to(acc) / n_txt[None, :]
        grad_img = torch.zeros(bi, ni, d, dtype=acc, device=img.device) if need_img else None
        grad_txt = torch.empty(bt, nt, d, dtype=txt.dtype, device=txt.device) if need_txt else None
        img_flat = img.reshape(bi * ni, d)
        for j0 in range(0, bt, ctx.chunk):
            j1 = min(j0 + ctx.chunk, bt)
            c = j1 - j0
            t = txt[j0:j1]
            if ctx.store_indices:
                arg_r, arg_k = saved_args[0][:, :, j0:j1].long(), saved_args[1][:, j0:j1].long()
            else:
                _, arg_r, _, arg_k = _chunk_maxima(img, img_mask, ctx.img_all_valid, t, txt_mask[j0:j1])
            src_i2t = (w_i2t[:, None, j0:j1] * img_mask[:, :, None]).to(img.dtype)  # (Bi, Ni, c)
            src_t2i = (w_t2i[:, j0:j1, None] * txt_mask[None, j0:j1]).to(img.dtype)  # (Bi, c, Nt)
            weights = torch.zeros(bi, ni, c, nt, dtype=img.dtype, device=img.device)
            weights.scatter_(3, arg_r.unsqueeze(3), src_i2t.unsqueeze(3))
            # scatter_add: a (k, r) pair can be the argmax in both directions.
            weights.scatter_add_(1, arg_k.unsqueeze(1), src_t2i.unsqueeze(1))
            weights = weights.view(bi * ni, c * nt)
            if need_img:
                grad_img += (weights @ t.reshape(c * nt, d)).view(bi, ni, d)
            if need_txt:
                grad_txt[j0:j1] = (weights.T @ img_flat).view(c, nt, d)
        grad_img = grad_img.to(img.dtype) if need_img else None
        return grad_img, None, grad_txt, None, None, None


def filip_similarity_chunked(img: torch.Tensor, img_mask: torch.Tensor, txt: torch.Tensor,
                             txt_mask: torch.Tensor, chunk_size: int | None = None,
                             store_indices: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory-bounded (s_i2t, s_t2i), each (B_img, B_txt) in >= fp32, of ALREADY normalised tokens.

    `chunk_size` is the number of text candidates per chunk (None: sized to DEFAULT_CHUNK_ELEMENTS).
    Differentiable w.r.t. `img` and `txt`; every image and text needs at least one valid token.
    """
    if img.shape[-1] != txt.shape[-1]:
        raise ValueError(f"token widths differ: image {img.shape[-1]}, text {txt.shape[-1]}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _FilipSimilarity.apply(img, img_mask.bool(), txt, txt_mask.bool(), chunk_size, store_indices)


# ----------------------------------------------------------------------------------------------------
# Token reduction


def _n_keep(keep: float, n: int, what: str) -> int:
    if not 0 < keep <= 1:
        raise ValueError(f"{what} must be in (0, 1], got {keep}")
    return min(n, max(1, math.ceil(keep * n - 1e-9)))


@torch.no_grad()
def select_tokens(tokens: torch.Tensor, mask: torch.Tensor, other: torch.Tensor, other_mask: torch.Tensor,
                  keep: float) -> torch.Tensor:
    """Indices (B, n_keep), in original order, of each row's top `keep` fraction of tokens.

    FILIP's token reduction: a token's score is its best cosine similarity to any valid LOCAL token
    of the other modality (all of this rank's rows, not only its own pair). n_keep = ceil(keep * N)
    is the same for every row so the result stays a dense tensor; pad tokens score -inf and are taken
    last, so a row keeps min(n_valid, n_keep) real tokens and the kept pads stay masked.
    """
    b, n, d = tokens.shape
    n_keep = _n_keep(keep, n, "keep fraction")
    tok = F.normalize(tokens.float(), dim=-1).reshape(b * n, d)
    ref = F.normalize(other.float()[other_mask.bool()], dim=-1)  # (M, d): valid local tokens
    score = torch.full((b * n,), float("-inf"), device=tokens.device)
    step = max(1, DEFAULT_CHUNK_ELEMENTS // max(1, b * n))
    for m0 in range(0, ref.shape[0], step):
        score = torch.maximum(score, (tok @ ref[m0:m0 + step].T).amax(1))
    score = score.view(b, n).masked_fill(~mask.bool(), float("-inf"))
    return score.topk(n_keep, dim=1).indices.sort(dim=1).values


def select_image_tokens(img: torch.Tensor, img_mask: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor,
                        keep: float) -> torch.Tensor:
    """`select_tokens` for image tokens, scored against the local text tokens."""
    _n_keep(keep, img.shape[1], "keep_image_tokens")
    return select_tokens(img, img_mask, txt, txt_mask, keep)


def select_text_tokens(txt: torch.Tensor, txt_mask: torch.Tensor, img: torch.Tensor, img_mask: torch.Tensor,
                       keep: float) -> torch.Tensor:
    """`select_tokens` for text tokens, scored against the local image tokens."""
    _n_keep(keep, txt.shape[1], "keep_text_tokens")
    return select_tokens(txt, txt_mask, img, img_mask, keep)


def _take(tokens: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tokens.gather(1, idx[..., None].expand(-1, -1, tokens.shape[-1])), mask.gather(1, idx)


# ----------------------------------------------------------------------------------------------------
# Loss


def _gather_rows(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """All-gather with gradient, optionally sent in a narrower dtype; own rows stay at full precision.

    With a cast, the backward all_reduce also runs in `dtype` (the cast's gradient casts back).
    """
    sent = x if dtype is None else x.to(dtype)
    full = all_gather_with_grad(sent).to(x.dtype)
    r, n = rank(), x.shape[0]
    # Own rows get their local gradient directly and other ranks' contributions through the gather.
    return torch.cat([full[: r * n], x, full[(r + 1) * n:]])


def filip_loss(img_tokens: torch.Tensor, img_mask: torch.Tensor | None, txt_tokens: torch.Tensor,
               txt_mask: torch.Tensor | None, scale: torch.Tensor, chunk_size: int | None = None,
               gather: bool = True, gather_dtype: torch.dtype | None = None,
               keep_image_tokens: float | None = None, store_indices: bool = True,
               keep_text_tokens: float | None = None) -> dict[str, torch.Tensor]:
    """FILIP loss of this rank's rows against the candidates of all ranks.

    img_tokens (B, N_img, d) projected patch tokens (no CLS); txt_tokens (B, N_txt, d) projected text
    tokens; masks (B, N) bool, True = real token (None = all real; see `text_token_mask`). `scale` is
    exp(logit_scale), already clamped by the caller; it gets a gradient. Tokens are L2-normalised here.

    With gather and several ranks, every rank must have the same B and N (the data layer pads captions
    to a fixed context length). Labels are rank * B + arange(B). The returned loss is the mean over
    local rows; averaging gradients over ranks (DeepSpeed/DDP) gives the global-batch gradient.
    `gather_dtype` (e.g. torch.bfloat16) narrows what is sent; None sends tokens as they are.
    `keep_image_tokens` and `keep_text_tokens` (FILIP: 0.25 each; default off) apply FILIP's token
    reduction (`select_tokens`): each rank keeps that fraction of its own tokens, both modalities
    scored against the other's full local tokens, BEFORE anything is gathered, so the gathered text
    tokens shrink by `keep_text_tokens`. Image tokens are never sent (see the module docstring):
    reducing them saves compute and memory, not bandwidth. The selection carries no gradient, the
    kept tokens do.
    """
    b = img_tokens.shape[0]
    if txt_tokens.shape[0] != b:
        raise ValueError(f"{b} images but {txt_tokens.shape[0]} texts")
    img_mask, txt_mask = _default_mask(img_tokens, img_mask), _default_mask(txt_tokens, txt_mask)
    # Both selections score against the other modality's unreduced local tokens, as the paper does.
    img_keep = None if keep_image_tokens is None else select_image_tokens(
        img_tokens, img_mask, txt_tokens, txt_mask, keep_image_tokens)
    txt_keep = None if keep_text_tokens is None else select_text_tokens(
        txt_tokens, txt_mask, img_tokens, img_mask, keep_text_tokens)
    if img_keep is not None:
        img_tokens, img_mask = _take(img_tokens, img_mask, img_keep)
    if txt_keep is not None:
        txt_tokens, txt_mask = _take(txt_tokens, txt_mask, txt_keep)
    img = F.normalize(img_tokens, dim=-1)
    txt = F.normalize(txt_tokens, dim=-1)

    distributed = gather and world_size() > 1
    offset = rank() * b if distributed else 0
    if distributed:
        txt_all = _gather_rows(txt, gather_dtype)
        # Gloo has no bool collectives, hence the uint8 round trip.
        txt_mask_all = all_gather_no_grad(txt_mask.to(torch.uint8)).bool()
    else:
        txt_all, txt_mask_all = txt, txt_mask

    s_i2t, s_t2i = filip_similarity_chunked(img, img_mask, txt_all, txt_mask_all, chunk_size, store_indices)
    # s_t2i here is (local images, all texts); a local text's row needs all images: gather the rows.
    s_t2i_cols = all_gather_with_grad(s_t2i)[:, offset:offset + b] if distributed else s_t2i
    logits_i2t = scale * s_i2t
    logits_t2i = scale * s_t2i_cols.T
    labels = torch.arange(b, device=img_tokens.device) + offset
    loss_i2t = F.cross_entropy(logits_i2t, labels)
    loss_t2i = F.cross_entropy(logits_t2i, labels)
    return {
        "loss": (loss_i2t + loss_t2i) / 2,
        "loss_i2t": loss_i2t,
        "loss_t2i": loss_t2i,
        "logits_i2t": logits_i2t.detach(),
        "logits_t2i": logits_t2i.detach(),
        "logit_scale": scale.detach(),
    }


class FilipLoss(nn.Module):
    """`filip_loss` with its options fixed at construction (the FILIP trainer's loss module); the
    `logits_*` entries are dropped: the engine logs every entry as a float."""

    def __init__(self, chunk_size: int | None = None, gather: bool = True,
                 gather_dtype: torch.dtype | None = None, keep_image_tokens: float | None = None,
                 store_indices: bool = True, keep_text_tokens: float | None = None) -> None:
        super().__init__()
        self.chunk_size, self.gather, self.gather_dtype = chunk_size, gather, gather_dtype
        self.keep_image_tokens, self.store_indices = keep_image_tokens, store_indices
        self.keep_text_tokens = keep_text_tokens

    def forward(self, img_tokens: torch.Tensor, img_mask: torch.Tensor | None, txt_tokens: torch.Tensor,
                txt_mask: torch.Tensor | None, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        out = filip_loss(img_tokens, img_mask, txt_tokens, txt_mask, scale, chunk_size=self.chunk_size,
                         gather=self.gather, gather_dtype=self.gather_dtype,
                         keep_image_tokens=self.keep_image_tokens, store_indices=self.store_indices,
                         keep_text_tokens=self.keep_text_tokens)
        return {k: v for k, v in out.items() if not k.startswith("logits_")}
