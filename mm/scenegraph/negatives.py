"""Semantic hard negatives from a caption's scene graph (Structure-CLIP).

* relation swap: exchange subject and object of one relation ("a red circle to the left of a blue
  square" -> "a blue square to the left of a red circle");
* attribute swap: exchange the attributes of two objects ("a red cube and a blue ball" -> "a blue cube
  and a red ball").

A negative whose caption is the positive's is no negative and is dropped (two objects with the same
attributes, a relation between two identical objects). Symmetric predicates ("next to", "near") are
not swapped: the swapped caption would still be true.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence

from mm.scenegraph.graph import Relation, SceneGraph

KINDS = ("relation", "attribute")
SYMMETRIC_PREDICATES = {"next to", "near", "beside", "close to", "by", "and", "with each other"}


def relation_swap(graph: SceneGraph) -> list[SceneGraph]:
    """One graph per relation (not symmetric, not an object with itself) with its subject and object
    exchanged."""
    out = []
    for k, r in enumerate(graph.relations):
        if r.subject == r.object or r.predicate in SYMMETRIC_PREDICATES:
            continue
        g = copy.deepcopy(graph)
        g.relations[k] = Relation(r.object, r.predicate, r.subject)
        out.append(g)
    return out


def attribute_swap(graph: SceneGraph) -> list[SceneGraph]:
    """One graph per pair of objects with different attribute lists, the two lists exchanged."""
    out = []
    n = len(graph.objects)
    for i in range(n):
        for j in range(i + 1, n):
            if graph.objects[i].attributes == graph.objects[j].attributes:
                continue
            g = copy.deepcopy(graph)
            g.objects[i].attributes, g.objects[j].attributes = g.objects[j].attributes, g.objects[i].attributes
            out.append(g)
    return out


_SWAPS = {"relation": relation_swap, "attribute": attribute_swap}


def negative_captions(graph: SceneGraph, kinds: Sequence[str] = KINDS) -> dict[str, list[str]]:
    """Rendered negatives per kind, without duplicates and without any equal to the positive's
    rendering (compared case- and whitespace-insensitively)."""
    unknown = [k for k in kinds if k not in _SWAPS]
    if unknown:
        raise ValueError(f"unknown hard-negative kind(s) {unknown}; choose from {list(KINDS)}")
    positive = _norm(graph.render())
    out: dict[str, list[str]] = {}
    for kind in kinds:
        texts: list[str] = []
        for g in _SWAPS[kind](graph):
            text = g.render()
            if _norm(text) != positive and text not in texts:
                texts.append(text)
        out[kind] = texts
    return out


def hard_negative(graph: SceneGraph, rng: random.Random,
                  kinds: Sequence[str] = KINDS) -> str | None:
    """One negative caption: a kind drawn uniformly among those with a usable negative, then one of
    its negatives; None when there is none (single object, identical attributes, ...)."""
    candidates = {k: v for k, v in negative_captions(graph, kinds).items() if v}
    if not candidates:
        return None
    kind = rng.choice(sorted(candidates))
    return rng.choice(candidates[kind])


def _norm(text: str) -> str:
    return " ".join(text.lower().split())
