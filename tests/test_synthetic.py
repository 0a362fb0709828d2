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


# ---------------------------------------------------------------------------------------------------
# The clutter world


def test_clutter_captions_name_objects_truly_and_uniquely():
    from mm.data.synthetic import CLUTTER_RGB, COLOURS, POSITION_PHRASES, position_of, render_clutter

    for i in range(200):
        scene = render_clutter(random.Random(i), 64)
        objects, boxes, named = scene.scene_graph["objects"], scene.boxes, scene.named
        assert 4 <= len(objects) <= 6 and 1 <= len(named) <= 2 and len(set(named)) == len(named)
        assert any(o["attributes"][0] in COLOURS for o in objects)
        phrases = [f"a {o['attributes'][0]} {o['name']} {POSITION_PHRASES[position_of(b, 64)]}"
                   for o, b in zip(objects, boxes)]
        assert scene.caption == " and ".join(phrases[j] for j in named)
        for j in named:
            assert phrases.count(phrases[j]) == 1  # the phrase picks out this object alone
        pixels = np.asarray(scene.image)
        for o, b in zip(objects, boxes):
            assert max(b[2] - b[0], b[3] - b[1]) <= 0.2 * 64 + 1
            x, y = centre(b)
            assert tuple(pixels[int(y), int(x)]) == CLUTTER_RGB[o["attributes"][0]]
        for a in range(len(boxes)):  # objects never overlap
            for c in range(a):
                p, q = boxes[a], boxes[c]
                assert p[2] <= q[0] or q[2] <= p[0] or p[3] <= q[1] or q[3] <= p[1]


def test_clutter_labelled_set_has_one_class_object_among_neutral_distractors(tmp_path):
    from mm.data.synthetic import NEUTRALS, write_clutter

    samples = read_shards(write_clutter(tmp_path, 2 * len(CLASSNAMES), seed=1, balanced=True))
    assert Counter(json.loads(s["json"])["label"] for s in samples) == {k: 2 for k in range(len(CLASSNAMES))}
    for s in samples:
        meta = json.loads(s["json"])
        objects = meta["scene_graph"]["objects"]
        target = objects[meta["named"][0]]
        assert f"{target['attributes'][0]} {target['name']}" == CLASSNAMES[meta["label"]] == meta["classname"]
        others = [o for k, o in enumerate(objects) if k != meta["named"][0]]
        assert all(o["attributes"][0] in NEUTRALS for o in others)
        # The class's shape also appears on a distractor: shape alone does not give the class away.
        assert any(o["name"] == target["name"] for o in others)
        assert s["txt"].decode().startswith(f"a {CLASSNAMES[meta['label']]} ")


def test_clutter_cli_is_deterministic_and_refuses_shapes_options(tmp_path, capsys):
    from mm.data.cli import main

    assert main(["synthetic", "--world", "clutter", "--out", str(tmp_path / "a"), "--num-samples", "6"]) == 0
    assert main(["synthetic", "--world", "clutter", "--out", str(tmp_path / "b"), "--num-samples", "6",
                 "--shard-size", "4"]) == 0
    a, b = read_shards(str(tmp_path / "a/clutter-000000.tar")), read_shards(
        [str(tmp_path / "b/clutter-000000.tar"), str(tmp_path / "b/clutter-000001.tar")])
    assert [s["png"] for s in a] == [s["png"] for s in b] and [s["txt"] for s in a] == [s["txt"] for s in b]
    for bad in (["--single-fraction", "0.3"], ["--image-size", "40"]):
        with pytest.raises(SystemExit) as e:
            main(["synthetic", "--world", "clutter", "--out", str(tmp_path / "c"), "--num-samples", "6", *bad])
        assert e.value.code == 2
    assert not (tmp_path / "c").exists()
