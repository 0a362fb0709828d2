"""Image-text retrieval recall@k as CLIP_benchmark counts it: several captions per image, each image once
in the gallery, every caption of an image a correct answer for it."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


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
    if t2i.shape != (n_txt,) or (n_txt and (t2i.min() < 0 or t2i.max() >= n_img)):
        raise ValueError(f"text_to_image must hold one image index in [0, {n_img}) per text ({n_txt} texts)")
    # image -> text: rank of the best-scoring correct caption among the wrong ones
    i2t_ranks = []
    for start in range(0, n_img, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, n_img), device=img.device)
        scores = img[rows] @ txt.T  # (chunk, n_txt)
        positive = t2i[None, :] == rows[:, None]
        best = scores.masked_fill(~positive, float("-inf")).max(1).values
        has = positive.any(1)
        wrong_above = ((scores >= best[:, None]) & ~positive).sum(1)
        i2t_ranks.append(wrong_above[has])
    # text -> image: rank of the caption's own image among the other images
    t2i_ranks = []
    for start in range(0, n_txt, chunk_size):
        cols = torch.arange(start, min(start + chunk_size, n_txt), device=img.device)
        scores = txt[cols] @ img.T  # (chunk, n_img)
        own = scores.gather(1, t2i[cols, None])
        t2i_ranks.append((scores >= own).sum(1) - 1)
    i2t = torch.cat(i2t_ranks) if i2t_ranks else torch.zeros(0, dtype=torch.long)
    t2i_r = torch.cat(t2i_ranks) if t2i_ranks else torch.zeros(0, dtype=torch.long)
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_to_text_recall@{k}"] = (i2t < k).float().mean().item() if len(i2t) else float("nan")
        out[f"text_to_image_recall@{k}"] = (t2i_r < k).float().mean().item() if len(t2i_r) else float("nan")
    for k in ks:
        out[f"text_retrieval_recall@{k}"] = out[f"image_to_text_recall@{k}"]
        out[f"image_retrieval_recall@{k}"] = out[f"text_to_image_recall@{k}"]
    out["n_images"] = float(n_img)
    out["n_texts"] = float(n_txt)
    return out
