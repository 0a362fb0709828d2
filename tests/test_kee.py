"""Knowledge-Enhanced Encoder: triple tokenisation, masking, and fusion into the text embedding."""

from __future__ import annotations

import open_clip
import pytest
import torch
from torch import nn

from mm.errors import UserError
from mm.models.kee import PAD_ID, KnowledgeEnhancedEncoder, encode_triples, fuse, word_piece_ids
from mm.scenegraph import SceneGraph

TOKENIZER = open_clip.tokenizer.SimpleTokenizer(context_length=16)
VOCAB = 49408
TRIPLES = SceneGraph.from_dict({
    "objects": [{"name": "circle", "attributes": ["red"]}, {"name": "square", "attributes": ["blue"]}],
    "relations": [{"subject": 0, "predicate": "left of", "object": 1}]}).triples()


def test_encode_triples_layout():
    ids, mask = encode_triples(TRIPLES, TOKENIZER, max_triples=6, max_tokens=4)
    assert ids.shape == (6, 3, 4) and ids.dtype == torch.long and mask.tolist() == [True] * 3 + [False] * 3
    assert (ids[3:] == PAD_ID).all()
    left_of = TOKENIZER.encode("left of")
    assert ids[0, 1, : len(left_of)].tolist() == left_of and (ids[0, 1, len(left_of):] == PAD_ID).all()
    assert ids[1, 2, 0].item() == TOKENIZER.encode("red")[0]
    # Start/end tokens never appear; long strings are cut; extra triples are dropped.
    assert not ((ids == TOKENIZER.sot_token_id) | (ids == TOKENIZER.eot_token_id)).any()
    ids, mask = encode_triples([("a b c d e f", "is", "g")] * 9, TOKENIZER, max_triples=6, max_tokens=3)
    assert mask.all() and (ids[0, 0] != PAD_ID).all()
    ids, mask = encode_triples([], TOKENIZER)
    assert ids.shape == (6, 3, 8) and not mask.any()


def test_word_piece_ids_from_padded_callable():
    def call(texts):  # a tokenizer given only as a callable: start/end/pad stripped
        return TOKENIZER(texts)
    call.sot_token_id, call.eot_token_id = TOKENIZER.sot_token_id, TOKENIZER.eot_token_id
    assert word_piece_ids(call, "red circle") == TOKENIZER.encode("red circle")


def make_batch(b=4, with_triples=(True, False, True, False)):
    ids = torch.full((b, 6, 3, 8), PAD_ID, dtype=torch.long)
    mask = torch.zeros(b, 6, dtype=torch.bool)
    for i, has in enumerate(with_triples):
        if has:
            ids[i], mask[i] = encode_triples(TRIPLES[: i + 1], TOKENIZER)
    return ids, mask


def make_kee(**kw):
    torch.manual_seed(0)
    emb = nn.Embedding(VOCAB, 16)
    return emb, KnowledgeEnhancedEncoder(emb, embed_dim=12, layers=1, heads=4, **kw)


def test_changes_only_samples_with_triples():
    _, kee = make_kee()
    text = nn.functional.normalize(torch.randn(4, 12), dim=-1)
    ids, mask = make_batch()
    out = kee(text, ids, mask)
    assert torch.equal(out[1], text[1]) and torch.equal(out[3], text[3])
    assert not torch.allclose(out[0], text[0]) and not torch.allclose(out[2], text[2])
    assert torch.allclose(out.norm(dim=-1), torch.ones(4))
    triple_emb, has = kee.encode(ids, mask)
    assert has.tolist() == [True, False, True, False]
    assert torch.allclose(triple_emb[has].norm(dim=-1), torch.ones(2)) and (triple_emb[~has] == 0).all()
    assert torch.allclose(out[0], nn.functional.normalize(text[0] + 0.2 * triple_emb[0], dim=-1), atol=1e-6)


def test_disabled_returns_text_unchanged():
    _, kee = make_kee(enabled=False)
    text = torch.randn(4, 12)
    ids, mask = make_batch()
    assert kee(text, ids, mask) is text
    assert fuse(text, torch.randn(4, 12), 0.2, mask.any(1), enabled=False) is text


def test_no_triples_anywhere_no_nan():
    _, kee = make_kee()
    text = torch.randn(3, 12)
    ids, mask = make_batch(3, (False, False, False))
    out = kee(text, ids, mask)
    assert torch.equal(out, text)
    triple_emb, _ = kee.encode(ids, mask)
    assert torch.isfinite(triple_emb).all()


def test_padding_slots_are_ignored():
    _, kee = make_kee()
    kee.eval()
    ids, mask = make_batch()
    noisy = ids.clone()
    noisy[~mask] = torch.randint(0, VOCAB, noisy[~mask].shape)  # garbage in masked triple slots
    a, _ = kee.encode(ids, mask)
    b, _ = kee.encode(noisy, mask)
    assert torch.allclose(a, b, atol=1e-6)


def test_fuse_function():
    text = nn.functional.normalize(torch.randn(3, 5), dim=-1)
    trip = nn.functional.normalize(torch.randn(3, 5), dim=-1)
    expected = nn.functional.normalize(text + 0.5 * trip, dim=-1)
    assert torch.allclose(fuse(text, trip, weight=0.5), expected)
    out = fuse(text, trip, weight=0.5, has_triples=torch.tensor([False, True, False]))
    assert torch.equal(out[0], text[0]) and torch.allclose(out[1], expected[1])


def test_shared_embedding_trains_and_is_not_duplicated():
    emb, kee = make_kee()
    assert not any("token_embedding" in k or "own_embedding" in k for k in kee.state_dict())
    ids, mask = make_batch()
    text = torch.randn(4, 12, requires_grad=True)
    kee(text, ids, mask).sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0
    assert kee.proj.weight.grad is not None
    _, own = make_kee(own_embedding=True)
    assert "own_embedding.weight" in own.state_dict()
    assert own.own_embedding.weight.data_ptr() != emb.weight.data_ptr()


def test_heads_must_divide_width():
    with pytest.raises(UserError, match="divisible"):
        KnowledgeEnhancedEncoder(nn.Embedding(10, 6), embed_dim=4, heads=4)
