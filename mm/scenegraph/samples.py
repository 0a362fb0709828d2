"""The scene graph of a dataset sample: the one its json carries, else its caption parsed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def sample_graph_json(meta: dict, index: int) -> Any:
    """The json scene graph of the sample's caption number `index`: `scene_graphs[index]` (mm-shards
    coco writes one per caption), else `scene_graph` for the txt caption (index 0); None when the
    sample has no graph for it (the caption is then parsed)."""
    graphs = meta.get("scene_graphs")
    if isinstance(graphs, list) and index < len(graphs) and graphs[index] is not None:
        return graphs[index]
    if index == 0 and "scene_graph" in meta:
        return meta["scene_graph"]
    return None
