"""The scene graph of a dataset sample: the one its json carries, else its caption parsed."""

from __future__ import annotations

from collections.abc import Callable

from mm.scenegraph.graph import SceneGraph
from mm.scenegraph.parse import parse_simple


def sample_graph(meta: dict, caption: str, parse: Callable[[str], SceneGraph] = parse_simple) -> SceneGraph:
    """The json `scene_graph` if present and valid, else the caption parsed by `parse`."""
    data = meta.get("scene_graph")
    if isinstance(data, dict):
        try:
            graph = SceneGraph.from_dict(data)
            if graph:
                return graph
        except (KeyError, TypeError, ValueError):
            pass
    return parse(caption)
