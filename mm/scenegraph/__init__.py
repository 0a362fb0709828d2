"""Scene graphs for Structure-CLIP: the graph type, caption parsers, in-caption hard negatives and the
reasons a caption has none."""

from mm.scenegraph.captions import CaptionAnalysis, analyse_caption, caption_problem
from mm.scenegraph.graph import MAX_TRIPLES, Relation, SceneGraph, SGObject
from mm.scenegraph.negatives import attribute_swap, caption_swaps, hard_negative, relation_swap
from mm.scenegraph.parse import parse_caption, parse_doc, parse_simple, parse_simple_complete

__all__ = ["MAX_TRIPLES", "CaptionAnalysis", "Relation", "SGObject", "SceneGraph", "analyse_caption",
           "attribute_swap", "caption_problem", "caption_swaps", "hard_negative", "parse_caption", "parse_doc",
           "parse_simple", "parse_simple_complete", "relation_swap"]
