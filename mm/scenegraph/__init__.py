"""Scene graphs for Structure-CLIP: the graph type, caption parsers and graph-based hard negatives."""

from mm.scenegraph.graph import MAX_TRIPLES, Relation, SceneGraph, SGObject
from mm.scenegraph.negatives import attribute_swap, hard_negative, relation_swap
from mm.scenegraph.parse import parse_caption, parse_doc, parse_simple

__all__ = ["MAX_TRIPLES", "Relation", "SGObject", "SceneGraph", "attribute_swap", "hard_negative",
           "parse_caption", "parse_doc", "parse_simple", "relation_swap"]
