"""Image-text retrieval recall@k as CLIP_benchmark counts it: several captions per image, each image once
in the gallery, every caption of an image a correct answer for it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _check_owners(t2i: torch.Tensor, n_img: int, n_txt: int) -> None:
    if t2i.shape != (n_txt,) or (n_txt and (t2i.min() < 0 or t2i.max() >= n_img)):
        raise ValueError(f"text_to_image must hold one image index in [0, {n_img}) per text ({n_txt} texts)")


def _image_query_ranks(scores: torch.Tensor, rows: torch.Tensor, t2i: torch.Tensor) -> torch.Tensor:
    """Per image query (rows of `scores`, (chunk, n_txt)) with a caption: wrong captions scoring at least
    as high as its best-scoring correct one."""
    positive = t2i[None, :] == rows[:, None]
    best = scores.masked_fill(~positive, float("-inf")).max(1).values
    wrong_above = ((scores >= best[:, None]) & ~positive).sum(1)
    return wrong_above[positive.any(1)]


def _text_query_ranks(scores: torch.Tensor, cols: torch.Tensor, t2i: torch.Tensor) -> torch.Tensor:
    """Per caption query (rows of `scores`, (chunk, n_img)): other images scoring at least as high as its own."""
    own = scores.gather(1, t2i[cols, None])
    return (scores >= own).sum(1) - 1


def _recalls(i2t: list[torch.Tensor], t2i: list[torch.Tensor], ks: Sequence[int], n_img: int,
             n_txt: int) -> dict[str, float]:
    i2t_r = torch.cat(i2t) if i2t else torch.zeros(0, dtype=torch.long)
    t2i_r = torch.cat(t2i) if t2i else torch.zeros(0, dtype=torch.long)
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_to_text_recall@{k}"] = (i2t_r < k).float().mean().item() if len(i2t_r) else float("nan")
        out[f"text_to_image_recall@{k}"] = (t2i_r < k).float().mean().item() if len(t2i_r) else float("nan")
    for k in ks:
        out[f"text_retrieval_recall@{k}"] = out[f"image_to_text_recall@{k}"]
        out[f"image_retrieval_recall@{k}"] = out[f"text_to_image_recall@{k}"]
    out["n_images"] = float(n_img)
    out["n_texts"] = float(n_txt)
    return out


@torch.no_grad()
def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024) -> dict[str, float]:
    """Recall@k in both directions from (n_images, d) and (n_texts, d) embeddings (cosine similarity;
    both are L2-normalised here) and `text_to_image[t]` = the image caption t belongs to.

    image->text: an image query is a hit at k when one of its captions is among the k best-scoring
    texts; text->image: a caption query is a hit at k when its image is among the k best images.
    Ties with a wrong item count against the query (a collapsed model that scores everything equally
    gets no credit): the rank of a query's first correct item is the number of wrong items scoring at
    least as high. Images without captions stay in the gallery but are not image->text queries.

    Keys: image_to_text_recall@k, text_to_image_recall@k, and CLIP_benchmark's names for the same
    numbers (text_retrieval_recall@k = image->text, image_retrieval_recall@k = text->image).
    """
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    t2i = text_to_image.long().to(img.device)
    n_img, n_txt = img.shape[0], txt.shape[0]
    _check_owners(t2i, n_img, n_txt)
    i2t_ranks, t2i_ranks = [], []
    for start in range(0, n_img, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, n_img), device=img.device)
        i2t_ranks.append(_image_query_ranks(img[rows] @ txt.T, rows, t2i))
    for start in range(0, n_txt, chunk_size):
        cols = torch.arange(start, min(start + chunk_size, n_txt), device=img.device)
        t2i_ranks.append(_text_query_ranks(txt[cols] @ img.T, cols, t2i))
    return _recalls(i2t_ranks, t2i_ranks, ks, n_img, n_txt)


@torch.no_grad()
def recall_from_scores(scores_i2t: torch.Tensor, scores_t2i: torch.Tensor, text_to_image: torch.Tensor,
                       ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """retrieval_recall's figures from precomputed (n_images, n_texts) score matrices, one per direction
    (FILIP's token-wise similarity is not symmetric: s^I ranks texts for an image query, s^T ranks
    images for a text query). With both equal to the cosine matrix this is retrieval_recall."""
    if scores_i2t.shape != scores_t2i.shape or scores_i2t.dim() != 2:
        raise ValueError(f"score matrices must both be (n_images, n_texts); got {tuple(scores_i2t.shape)} "
                         f"and {tuple(scores_t2i.shape)}")
    n_img, n_txt = scores_i2t.shape
    t2i = text_to_image.long().to(scores_i2t.device)
    _check_owners(t2i, n_img, n_txt)
    rows = torch.arange(n_img, device=scores_i2t.device)
    cols = torch.arange(n_txt, device=scores_i2t.device)
    return _recalls([_image_query_ranks(scores_i2t.float(), rows, t2i)],
                    [_text_query_ranks(scores_t2i.float().T, cols, t2i)], ks, n_img, n_txt)
