"""One caption -> its scene graph, its in-caption negatives, and the reasons when it has none.

Shared by Structure-CLIP training (one negative drawn per sample), `mm-shards --scene-graphs` and
`mm-scenegraph`, so that all three count captions without a negative by the same reasons:

  caption level (no graph, no negative of any kind):
    empty_caption    nothing but spaces
    no_words         no letters at all (only punctuation, digits or emoji)
    too_long         more than MAX_WORDS words (a sentence list, not a caption; CLIP reads 77 tokens)
    not_english      a caption in another language (a heuristic on function words and script)
    not_parsed       the simple parser does not read the caption completely
    bad_scene_graph  the sample's json scene_graph is malformed
    no_objects       the parse found no object
  graph level (per kind, see mm.scenegraph.negatives): no_relation, symmetric_only, no_attributes,
    not_in_caption, same_text; a sample with none of the requested kinds counts as no_swap.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mm.scenegraph.graph import SceneGraph
from mm.scenegraph.negatives import KINDS, caption_swaps

MAX_WORDS = 64
NO_SWAP = "no_swap"
CAPTION_REASONS = ("empty_caption", "no_words", "too_long", "not_english", "not_parsed", "bad_scene_graph",
                   "no_objects")

_LETTER_WORD = re.compile(r"[^\W\d_]+")
# Function words: an English caption of four or more words nearly always has one; captions in other
# languages have theirs instead.
_ENGLISH = {"a", "an", "the", "of", "on", "in", "at", "to", "with", "and", "is", "are", "by", "near", "for",
            "from", "under", "over", "next", "two", "three", "some", "his", "her", "their", "its", "this",
            "that", "there", "while", "into", "onto", "behind", "up", "down", "several", "many", "man", "woman",
            "people", "person", "it", "be", "has", "have", "as", "out", "top", "front", "around", "inside",
            "one", "other", "four", "group", "sitting", "standing", "holding", "white", "black", "red"}
_FOREIGN = {"le", "la", "les", "un", "une", "des", "du", "dans", "sur", "avec", "et", "est", "der", "die",
            "das", "ein", "eine", "und", "mit", "auf", "im", "ist", "el", "los", "las", "una", "con", "en", "y",
            "es", "il", "della", "di", "per", "che", "sul", "nel", "uno", "o", "em", "um", "uma", "de", "da"}


def caption_problem(caption: str) -> str | None:
    """The caption-level reason this caption cannot be parsed for negatives, or None."""
    if not caption.strip():
        return "empty_caption"
    words = _LETTER_WORD.findall(caption)
    if not words:
        return "no_words"
    if len(caption.split()) > MAX_WORDS:
        return "too_long"
    letters = "".join(words)
    if sum(c.isascii() for c in letters) < 0.8 * len(letters):
        return "not_english"
    lower = [w.lower() for w in words]
    if len(lower) >= 3 and not _ENGLISH.intersection(lower) and _FOREIGN.intersection(lower):
        return "not_english"
    return None


@dataclass
class CaptionAnalysis:
    caption: str
    parser: str  # "json" for a graph read from the sample, else the parser's name
    graph: SceneGraph = field(default_factory=SceneGraph)
    negatives: dict[str, list[str]] = field(default_factory=dict)  # per kind, every in-caption swap
    reasons: dict[str, str] = field(default_factory=dict)  # per kind without a negative: why

    @property
    def reason(self) -> str | None:
        """Why the caption has no negative at all (None when it has one): the caption-level reason,
        else NO_SWAP."""
        if any(self.negatives.values()):
            return None
        return self.reasons.get("caption", NO_SWAP)

    def draw(self, rng: random.Random) -> str | None:
        """One negative: a kind drawn uniformly among those with one, then one of its negatives."""
        candidates = {k: v for k, v in self.negatives.items() if v}
        if not candidates:
            return None
        return rng.choice(candidates[rng.choice(sorted(candidates))])

    def to_json(self) -> dict[str, Any]:
        """The mm-scenegraph --json record: the first negative of each kind (or null) and the reasons."""
        return {"caption": self.caption, "parser": self.parser, "graph": self.graph.to_dict(),
                "negatives": {k: (v[0] if v else None) for k, v in self.negatives.items()},
                "reasons": dict(self.reasons)}


_MISSING = object()


def graph_from_json(data: Any) -> SceneGraph | None:
    """A json scene_graph as a SceneGraph, or None when it is malformed."""
    try:
        if not isinstance(data, dict):
            raise TypeError(type(data).__name__)
        return SceneGraph.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def analyse_caption(caption: str, parse: Callable[[str], SceneGraph], parser: str,
                    kinds: Sequence[str] = KINDS, graph_json: Any = _MISSING) -> CaptionAnalysis:
    """Graph (the sample's json `graph_json` when given, else `parse(caption)`), in-caption negatives
    of `kinds`, and the reasons for each kind without one. Never raises on a caption."""
    result = CaptionAnalysis(caption, parser, negatives={k: [] for k in kinds})

    def fail(reason: str) -> CaptionAnalysis:
        result.reasons = {"caption": reason, **{k: reason for k in kinds}}
        return result

    problem = caption_problem(caption)
    if problem:
        return fail(problem)
    if graph_json is not _MISSING:
        result.parser = "json"
        graph = graph_from_json(graph_json)
        if graph is None:
            return fail("bad_scene_graph")
    else:
        graph = parse(caption)
    result.graph = graph
    if not graph:
        return fail("not_parsed" if parser.startswith("simple") and graph_json is _MISSING else "no_objects")
    result.negatives, result.reasons = caption_swaps(caption, graph, kinds)
    return result
