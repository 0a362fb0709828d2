"""Structure-CLIP's Knowledge-Enhanced Encoder (KEE): scene-graph triples -> a text-embedding offset.

Each (head, relation, tail) triple is embedded with the text tower's own word embeddings (mean over
each string's word pieces), combined as e = h + r - t, and the triple sequence runs through a small
transformer; the mean over the caption's triples is projected to the text embedding width,
L2-normalised and added to the text embedding with a small weight (0.2 in the paper).

Triples are tokenised in the data pipeline (encode_triples, in the sample map), so the model only sees
tensors: ids (B, max_triples, 3, max_tokens) padded with PAD_ID, and a (B, max_triples) mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mm.errors import UserError

PAD_ID = -1  # word-piece padding in triple ids (0 is a real token in CLIP's vocabulary)


def word_piece_ids(tokenizer: Any, text: str) -> list[int]:
    """The word pieces of `text` without start/end tokens or padding.

    Works with open_clip's SimpleTokenizer (its encode), open_clip's HFTokenizer (the wrapped
    transformers tokenizer), a transformers tokenizer, or any callable returning (1, L) ids (special
    ids given as sot_token_id / eot_token_id / pad_token_id attributes and 0 are dropped).
    """
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "encode"):
        return list(inner.encode(text, add_special_tokens=False))
    if hasattr(tokenizer, "encode"):
        try:
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return list(tokenizer.encode(text))
    ids = torch.as_tensor(tokenizer([text]))[0].tolist()
    specials = {getattr(tokenizer, n, None) for n in ("sot_token_id", "eot_token_id", "pad_token_id")} | {0}
    return [i for i in ids if i not in specials]


def encode_triples(triples: Sequence[tuple[str, str, str]], tokenizer: Any, max_triples: int = 6,
                   max_tokens: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise up to max_triples (head, relation, tail) triples for the KEE.

    Returns ids, a LongTensor (max_triples, 3, max_tokens) of word pieces (each string cut to
    max_tokens, padded with PAD_ID), and mask, a BoolTensor (max_triples,), True for real triples.
    Fixed shapes, so samples collate with the default collate function.
    """
    ids = torch.full((max_triples, 3, max_tokens), PAD_ID, dtype=torch.long)
    mask = torch.zeros(max_triples, dtype=torch.bool)
    cache: dict[str, list[int]] = {}
    for k, triple in enumerate(list(triples)[:max_triples]):
        if len(triple) != 3:
            raise ValueError(f"a triple has 3 parts (head, relation, tail), got {triple!r}")
        for part, text in enumerate(triple):
            if text not in cache:
                cache[text] = word_piece_ids(tokenizer, text)[:max_tokens]
            pieces = cache[text]
            if pieces:
                ids[k, part, : len(pieces)] = torch.tensor(pieces, dtype=torch.long)
        mask[k] = bool((ids[k] != PAD_ID).any())
    return ids, mask


def fuse(text_emb: torch.Tensor, triple_emb: torch.Tensor, weight: float = 0.2,
         has_triples: torch.Tensor | None = None, enabled: bool = True) -> torch.Tensor:
    """normalize(text_emb + weight * triple_emb) for the samples with triples (all when has_triples is
    None); the others, and everything when enabled is False, keep text_emb unchanged."""
    if not enabled:
        return text_emb
    fused = F.normalize(text_emb.float() + weight * triple_emb.float(), dim=-1).to(text_emb.dtype)
    if has_triples is None:
        return fused
    return torch.where(has_triples.to(text_emb.device)[:, None], fused, text_emb)


class KnowledgeEnhancedEncoder(nn.Module):
    """Triples -> L2-normalised (B, embed_dim) embeddings, fused into the text embedding.

    token_embedding: the text tower's word embedding (for open_clip's CustomTextCLIP,
    `model.text.token_embedding`). By default it is shared, not registered here, so its weight stays
    a parameter of the text tower only (no duplicate state-dict entries; it trains through both
    paths). Under ZeRO-3 a shared embedding is partitioned outside the text tower's forward: pass
    own_embedding=True there, which registers a trainable copy instead.
    """

    def __init__(self, token_embedding: nn.Embedding, embed_dim: int, layers: int = 2, heads: int = 4,
                 mlp_ratio: float = 2.0, dropout: float = 0.0, weight: float = 0.2, enabled: bool = True,
                 own_embedding: bool = False):
        super().__init__()
        width = token_embedding.embedding_dim
        if width % heads:
            raise UserError(f"kee: the word embedding width {width} is not divisible by heads={heads}")
        self.width, self.embed_dim, self.weight, self.enabled = width, embed_dim, weight, enabled
        if own_embedding:
            self.own_embedding = nn.Embedding.from_pretrained(token_embedding.weight.detach().clone(),
                                                              freeze=False)
            self._shared: tuple[nn.Embedding, ...] = ()
        else:
            self.own_embedding = None
            self._shared = (token_embedding,)  # a tuple: not registered as a submodule
        layer = nn.TransformerEncoderLayer(width, heads, int(mlp_ratio * width), dropout, batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.proj = nn.Linear(width, embed_dim)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.own_embedding if self.own_embedding is not None else self._shared[0]

    def embed_strings(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., max_tokens) word-piece ids -> (..., width): mean of the non-pad pieces (0 if none)."""
        valid = ids != PAD_ID
        emb = self.token_embedding(ids.clamp(min=0)) * valid[..., None].to(self.token_embedding.weight.dtype)
        return emb.sum(-2) / valid.sum(-1, keepdim=True).clamp(min=1)

    def encode(self, triple_ids: torch.Tensor, triple_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, 3, L) ids and (B, T) mask -> ((B, embed_dim) unit vectors, (B,) has_triples).

        Rows without triples get a zero vector (and has_triples False)."""
        device = self.proj.weight.device
        triple_ids, mask = triple_ids.to(device), triple_mask.to(device).bool()
        hrt = self.embed_strings(triple_ids)  # (B, T, 3, W)
        e = hrt[:, :, 0] + hrt[:, :, 1] - hrt[:, :, 2]
        has = mask.any(1)
        # A row with every key masked gives NaN in attention: let it attend to its (ignored) first slot.
        padding = ~mask
        padding[:, 0] &= has
        x = self.transformer(e.to(self.proj.weight.dtype), src_key_padding_mask=padding)
        w = mask.to(x.dtype)[..., None]
        readout = (x * w).sum(1) / w.sum(1).clamp(min=1)
        out = F.normalize(self.proj(readout), dim=-1)
        return out * has[:, None].to(out.dtype), has

    def fuse(self, text_emb: torch.Tensor, triple_emb: torch.Tensor, has_triples: torch.Tensor) -> torch.Tensor:
        return fuse(text_emb, triple_emb, self.weight, has_triples, self.enabled)

    def forward(self, text_emb: torch.Tensor, triple_ids: torch.Tensor, triple_mask: torch.Tensor) -> torch.Tensor:
        """The text embedding with the triples' knowledge added (unchanged when disabled or for
        samples without triples)."""
        if not self.enabled:
            return text_emb
        triple_emb, has = self.encode(triple_ids, triple_mask)
        return self.fuse(text_emb, triple_emb, has)
