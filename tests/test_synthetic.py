"""The shapes world: deterministic, captions true to the picture, labels usable for zero-shot."""

import io
import json
import random
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mm.data.synthetic import CLASSNAMES, COLOUR_RGB, RELATION_PHRASES, render_scene, write_shapes_world
from mm.errors import UserError


def read_shards(shards):
    return list(wds.WebDataset(shards, shardshuffle=False))


def centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def test_same_seed_gives_same_samples_whatever_the_shard_size(tmp_path):
    a = read_shards(write_shapes_world(tmp_path / "a", 30, image_size=32, seed=3, shard_size=7))
    b = read_shards(write_shapes_world(tmp_path / "b", 30, image_size=32, seed=3, shard_size=30))
    c = read_shards(write_shapes_world(tmp_path / "c", 30, image_size=32, seed=4, shard_size=30))
    fields = ("__key__", "png", "mask.png", "txt", "json")
    assert [[s[f] for f in fields] for s in a] == [[s[f] for f in fields] for s in b]
    assert [s["png"] for s in a] != [s["png"] for s in c]


def test_captions_match_scene_graph_and_pixels():
    for i in range(300):
        scene = render_scene(random.Random(i), 64, single_fraction=0.3)
        objects, relations = scene.scene_graph["objects"], scene.scene_graph["relations"]
        phrases = [f"a {o['attributes'][0]} {o['name']}" for o in objects]
        if relations:
            rel = relations[0]
            assert (rel["subject"], rel["object"]) == (0, 1)
            expected = f"{phrases[0]} {RELATION_PHRASES[rel['predicate']]} {phrases[1]}"
        else:
            expected = phrases[0]
        assert scene.caption == expected

        # The colour named for each object is the colour drawn at its centre.
        pixels = np.asarray(scene.image)
        for obj, box in zip(objects, scene.boxes):
            cx, cy = (int(v) for v in centre(box))
            assert tuple(pixels[cy, cx]) == COLOUR_RGB[obj["attributes"][0]]

        # The mask is exactly the union of the shapes: 0/255, nothing outside the boxes.
        mask = np.asarray(scene.mask)
        assert set(np.unique(mask)) <= {0, 255}
        inside = np.zeros_like(mask, dtype=bool)
        for x0, y0, x1, y1 in scene.boxes:
            assert mask[y0:y1, x0:x1].any()
            inside[y0:y1, x0:x1] = True
        assert not mask[~inside].any()

        if relations:
            s, o = scene.boxes
            (sx, sy), (ox, oy) = centre(s), centre(o)
            # Boxes never overlap, and the named axis dominates so the relation reads unambiguously.
            assert s[2] <= o[0] or o[2] <= s[0] or s[3] <= o[1] or o[3] <= s[1]
            predicate = relations[0]["predicate"]
            if predicate == "left of":
                assert sx < ox and abs(sy - oy) < ox - sx
            elif predicate == "right of":
                assert sx > ox and abs(sy - oy) < sx - ox
            elif predicate == "above":
                assert sy < oy and abs(sx - ox) < oy - sy
            else:
                assert sy > oy and abs(sx - ox) < sy - oy


def test_labels_index_classnames():
    kinds = Counter()
    for i in range(100):
        scene = render_scene(random.Random(i), 48, single_fraction=0.5)
        objects = scene.scene_graph["objects"]
        if len(objects) == 1:
            named = f"{objects[0]['attributes'][0]} {objects[0]['name']}"
            assert scene.classname == CLASSNAMES[scene.label] == named
            assert scene.metadata()["label"] == scene.label
        else:
            assert scene.label is None and "label" not in scene.metadata()
        kinds[len(objects)] += 1
    assert kinds[1] > 20 and kinds[2] > 20


def test_balanced_eval_set_has_every_class_equally_often(tmp_path):
    samples = read_shards(write_shapes_world(tmp_path, 2 * len(CLASSNAMES), image_size=32, balanced=True))
    metas = [json.loads(s["json"]) for s in samples]
    assert all(len(m["scene_graph"]["objects"]) == 1 for m in metas)
    assert Counter(m["classname"] for m in metas) == {name: 2 for name in CLASSNAMES}
    with pytest.raises(UserError, match="multiple of"):
        write_shapes_world(tmp_path / "odd", len(CLASSNAMES) + 1, balanced=True)


def test_shards_read_back_with_the_contract_fields(tmp_path):
    shards = write_shapes_world(tmp_path, 25, image_size=40, shard_size=10, prefix="demo")
    assert [p.rsplit("/", 1)[1] for p in shards] == ["demo-000000.tar", "demo-000001.tar", "demo-000002.tar"]
    samples = read_shards(shards)
    assert len(samples) == 25
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == 25 and not any("." in k for k in keys)
    for s in samples:
        assert {"png", "mask.png", "txt", "json"} <= set(s)
        image, mask = Image.open(io.BytesIO(s["png"])), Image.open(io.BytesIO(s["mask.png"]))
        assert (image.mode, image.size, mask.mode, mask.size) == ("RGB", (40, 40), "L", (40, 40))
        meta = json.loads(s["json"])
        assert s["txt"].decode().startswith("a ") and "scene_graph" in meta
