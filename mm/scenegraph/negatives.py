"""Semantic hard negatives (Structure-CLIP): swaps inside the caption's own text.

The scene graph decides which words move; the caption's text is where they move:

* relation swap: the subject's and the object's noun phrases (each with the attributes written before
  its noun) exchange places in the caption: "the man is holding a tennis racket" -> "the tennis racket
  is holding a man";
* attribute swap: the attribute words of two objects exchange places: "a black dog chasing a white
  cat" -> "a white dog chasing a black cat". When one of the two objects has no attribute, the other's
  attribute words (written before its noun) move to the front of its noun: "a red car next to a bus"
  -> "a car next to a red bus".

Every other word, article, number, tense and punctuation mark stays as written, so the negative's
words are a permutation of the caption's. A graph is aligned to its caption word by word (objects in
order of mention, attributes next to their noun); a swap whose words cannot be found in the caption is
not made. A negative whose text equals the caption (two identical noun phrases) is dropped, and
symmetric predicates ("next to", "near") are not swapped: the swapped caption would still be true.

The graph-level swaps (relation_swap, attribute_swap) are kept: they say which swaps exist.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mm.scenegraph.graph import Relation, SceneGraph

KINDS = ("relation", "attribute")
SYMMETRIC_PREDICATES = {"next to", "near", "beside", "close to", "by", "and", "with each other"}
# A verb before one of these keeps the relation symmetric: "standing next to", "parked near".
_SYMMETRIC_ENDINGS = ("next to", "near", "beside", "close to")


def is_symmetric(predicate: str) -> bool:
    return predicate in SYMMETRIC_PREDICATES or any(predicate.endswith(" " + p) for p in _SYMMETRIC_ENDINGS)
# Words allowed between two attributes of one noun ("black and white", "red, white").
_ATTRIBUTE_JOINERS = {"and", ",", "-", "&", "or"}
_TOKEN = re.compile(r"\w+|[^\w\s]")

# Why a kind has no negative (the values of `swap_reasons`).
NO_RELATION = "no_relation"  # the graph has no relation
SYMMETRIC_ONLY = "symmetric_only"  # only symmetric relations, or an object related to itself
NO_ATTRIBUTES = "no_attributes"  # no two objects with different attributes
NOT_IN_CAPTION = "not_in_caption"  # the graph's words are not found where a swap needs them
SAME_TEXT = "same_text"  # every swap gives the caption back (identical noun phrases)


def relation_swap(graph: SceneGraph) -> list[SceneGraph]:
    """One graph per relation (not symmetric, not an object with itself) with its subject and object
    exchanged."""
    out = []
    for k, r in enumerate(graph.relations):
        if r.subject == r.object or is_symmetric(r.predicate):
            continue
        g = copy.deepcopy(graph)
        g.relations[k] = Relation(r.object, r.predicate, r.subject)
        out.append(g)
    return out


def attribute_swap(graph: SceneGraph) -> list[SceneGraph]:
    """One graph per pair of objects with different attribute lists, the two lists exchanged."""
    out = []
    for i, j in _attribute_pairs(graph):
        g = copy.deepcopy(graph)
        g.objects[i].attributes, g.objects[j].attributes = g.objects[j].attributes, g.objects[i].attributes
        out.append(g)
    return out


def _attribute_pairs(graph: SceneGraph) -> list[tuple[int, int]]:
    n = len(graph.objects)
    return [(i, j) for i in range(n) for j in range(i + 1, n)
            if graph.objects[i].attributes != graph.objects[j].attributes]


# ---------------------------------------------------------------------------------------------------
# Aligning a graph to its caption
# ---------------------------------------------------------------------------------------------------


def caption_words(text: str) -> list[str]:
    """The caption's words and punctuation marks as written: what a negative permutes."""
    return _TOKEN.findall(text)


@dataclass
class _Token:
    word: str  # lower-cased
    start: int  # character offsets in the caption
    end: int


@dataclass
class _Placed:
    name: tuple[int, int] | None  # token range of the object's name; None: not found
    attributes: list[int] | None  # token indices of its attribute words; None: one was not found


def _tokens(text: str) -> list[_Token]:
    return [_Token(m.group().lower(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


def _find(words: list[str], target: list[str], lo: int, hi: int, used: set[int], reverse: bool) -> int | None:
    starts = range(hi - len(target), lo - 1, -1) if reverse else range(lo, hi - len(target) + 1)
    for i in starts:
        if words[i:i + len(target)] == target and not used.intersection(range(i, i + len(target))):
            return i
    return None


def _align(tokens: list[_Token], graph: SceneGraph) -> list[_Placed]:
    """Where each object's name and attribute words are in the caption.

    Names are matched in the graph's object order (both parsers list objects in order of mention);
    an attribute is looked for first before its noun (back to the previous object's name), then after
    it (up to the next object's name: "the cat is black").
    """
    words = [t.word for t in tokens]
    names: list[tuple[int, int] | None] = []
    pos = 0
    for o in graph.objects:
        target = [t.word for t in _tokens(o.name)]
        i = _find(words, target, pos, len(words), set(), reverse=False) if target else None
        names.append(None if i is None else (i, i + len(target)))
        if i is not None:
            pos = i + len(target)
    used = {i for span in names if span for i in range(*span)}
    placed = []
    for k, o in enumerate(graph.objects):
        span = names[k]
        if span is None:
            placed.append(_Placed(None, None))
            continue
        lo = max((s[1] for s in names[:k] if s), default=0)
        hi = min((s[0] for s in names[k + 1:] if s), default=len(words))
        found: list[int] | None = []
        for a in o.attributes:
            target = [t.word for t in _tokens(a)]
            i = None
            if target:
                i = _find(words, target, lo, span[0], used, reverse=True)
                if i is None:
                    i = _find(words, target, span[1], hi, used, reverse=False)
            if i is None:
                found = None
                break
            found += range(i, i + len(target))
            used.update(range(i, i + len(target)))
        placed.append(_Placed(span, sorted(found) if found is not None else None))
    return placed


def _block(tokens: list[_Token], indices: list[int]) -> tuple[int, int] | None:
    """The token range covering `indices` when only attribute joiners lie between them, else None."""
    lo, hi = min(indices), max(indices) + 1
    if any(i not in indices and tokens[i].word not in _ATTRIBUTE_JOINERS for i in range(lo, hi)):
        return None
    return lo, hi


def _noun_phrase(tokens: list[_Token], p: _Placed) -> tuple[int, int] | None:
    """The object's name with the attribute words written right before it ("a [big brown dog]")."""
    if p.name is None:
        return None
    before = [i for i in (p.attributes or []) if i < p.name[0]]
    if before:
        block = _block(tokens, before)
        if block is not None and all(tokens[i].word in _ATTRIBUTE_JOINERS for i in range(block[1], p.name[0])):
            return block[0], p.name[1]
    return p.name


def _chars(tokens: list[_Token], span: tuple[int, int]) -> tuple[int, int]:
    return tokens[span[0]].start, tokens[span[1] - 1].end


def _exchange(text: str, a: tuple[int, int], b: tuple[int, int]) -> str | None:
    """`text` with the character ranges a and b exchanged; None when they overlap."""
    if a > b:
        a, b = b, a
    if a[1] > b[0]:
        return None
    return text[:a[0]] + text[b[0]:b[1]] + text[a[1]:b[0]] + text[a[0]:a[1]] + text[b[1]:]


def _move(text: str, a: tuple[int, int], at: int) -> str | None:
    """`text` with the character range a (and the spaces after it) moved to position `at`."""
    if a[0] <= at <= a[1]:
        return None
    end = a[1]
    while end < len(text) and text[end] == " ":
        end += 1
    piece = text[a[0]:a[1]] + " "
    if at < a[0]:
        return text[:at] + piece + text[at:a[0]] + text[end:]
    return text[:a[0]] + text[end:at] + piece + text[at:]


def _relation_texts(caption: str, tokens: list[_Token], placed: list[_Placed], graph: SceneGraph
                    ) -> tuple[list[str], str | None]:
    if not graph.relations:
        return [], NO_RELATION
    texts, reason = [], SYMMETRIC_ONLY
    for r in graph.relations:
        if r.subject == r.object or is_symmetric(r.predicate):
            continue
        s, o = _noun_phrase(tokens, placed[r.subject]), _noun_phrase(tokens, placed[r.object])
        text = _exchange(caption, _chars(tokens, s), _chars(tokens, o)) if s and o else None
        if text is None:
            reason = NOT_IN_CAPTION
        elif _norm(text) == _norm(caption):
            reason = SAME_TEXT if reason == SYMMETRIC_ONLY else reason
        elif text not in texts:
            texts.append(text)
    return texts, None if texts else reason


def _attribute_texts(caption: str, tokens: list[_Token], placed: list[_Placed], graph: SceneGraph
                     ) -> tuple[list[str], str | None]:
    pairs = _attribute_pairs(graph)
    if not pairs:
        return [], NO_ATTRIBUTES
    texts, reason = [], NOT_IN_CAPTION
    for i, j in pairs:
        a, b = placed[i], placed[j]
        if a.name is None or b.name is None or a.attributes is None or b.attributes is None:
            continue
        text = None
        if a.attributes and b.attributes:
            x, y = _block(tokens, a.attributes), _block(tokens, b.attributes)
            if x and y:
                text = _exchange(caption, _chars(tokens, x), _chars(tokens, y))
        else:
            source, target = (a, b) if a.attributes else (b, a)
            x = _block(tokens, source.attributes)
            # Only attributes written before their noun move ("a red car"); "the car is red" has none
            # that could stand before the other noun without breaking the sentence.
            if x and x[1] == source.name[0]:
                text = _move(caption, _chars(tokens, x), tokens[_noun_phrase(tokens, target)[0]].start)
        if text is None:
            continue
        if _norm(text) == _norm(caption):
            reason = SAME_TEXT
        elif text not in texts:
            texts.append(text)
    return texts, None if texts else reason


def caption_swaps(caption: str, graph: SceneGraph, kinds: Sequence[str] = KINDS
                  ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(negatives, reasons): for each kind, the in-caption swaps without duplicates and without any
    equal to the caption (case- and space-insensitively); for each kind without one, why (NO_RELATION,
    SYMMETRIC_ONLY, NO_ATTRIBUTES, NOT_IN_CAPTION, SAME_TEXT)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown hard-negative kind(s) {unknown}; choose from {list(KINDS)}")
    tokens = _tokens(caption)
    placed = _align(tokens, graph)
    out: dict[str, list[str]] = {}
    reasons: dict[str, str] = {}
    for kind in kinds:
        make = _relation_texts if kind == "relation" else _attribute_texts
        texts, reason = make(caption, tokens, placed, graph)
        out[kind] = texts
        if reason:
            reasons[kind] = reason
    return out, reasons


def negative_captions(graph: SceneGraph, kinds: Sequence[str] = KINDS, caption: str | None = None
                      ) -> dict[str, list[str]]:
    """In-caption negatives per kind (caption_swaps); `caption` defaults to the graph's rendering."""
    return caption_swaps(graph.render() if caption is None else caption, graph, kinds)[0]


def hard_negative(graph: SceneGraph, rng: random.Random, kinds: Sequence[str] = KINDS,
                  caption: str | None = None) -> str | None:
    """One negative caption: a kind drawn uniformly among those with a usable negative, then one of
    its negatives; None when there is none (single object, identical attributes, ...)."""
    candidates = {k: v for k, v in negative_captions(graph, kinds, caption).items() if v}
    if not candidates:
        return None
    kind = rng.choice(sorted(candidates))
    return rng.choice(candidates[kind])


def _norm(text: str) -> str:
    return " ".join(text.lower().split())
