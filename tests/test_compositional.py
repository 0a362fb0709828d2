"""mm-compositional: accuracies on hand-made SugarCrepe / ARO files with a stub model of known scores."""

import json
import math
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from mm.evaluate.compositional import evaluate

# caption -> (image id, cosine with that image); every caption belongs to one image.
SCORES = {"t0": (0, 0.9), "f0": (0, 0.1), "t1": (1, 0.2), "f1": (1, 0.5), "t2": (2, 0.4), "f2": (2, 0.4),
          "t3": (3, 0.8), "f3": (3, 0.3)}
VOCAB = {c: i for i, c in enumerate(SCORES)}


def tokenizer(texts):
    return torch.tensor([[VOCAB[t]] for t in texts])


def preprocess(image):
    return torch.tensor([float(image.getpixel((0, 0))[0])])  # the image id is its red value


class Stub(nn.Module):
    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        rows = []
        for _, (img, s) in SCORES.items():
            v = torch.zeros(5)
            v[img], v[4] = s, math.sqrt(1 - s * s)  # unit vector: cos with image img is s
            rows.append(v)
        self.text = torch.stack(rows)

    def encode_image(self, image):
        return nn.functional.one_hot(image[:, 0].long(), 5).float()

    def encode_text(self, tokens):
        return self.text[tokens[:, 0]]


def _images(tmp_path):
    for i in range(4):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / f"{i}.png")


def test_sugarcrepe_accuracy_by_hand(tmp_path):
    _images(tmp_path)
    data = {str(i): {"filename": f"{i}.png", "caption": f"t{i}", "negative_caption": f"f{i}"} for i in range(4)}
    (tmp_path / "swap_att.json").write_text(json.dumps(data))
    res = evaluate(Stub(), tokenizer, preprocess, sugarcrepe=[str(tmp_path / "swap_att.json")],
                   images=str(tmp_path))
    # item 0: .9 > .1 right; 1: .2 < .5 wrong; 2: tie -> wrong; 3: .8 > .3 right
    assert res["sugarcrepe"]["swap_att"] == {"acc": 0.5, "n": 4, "n_items": 4, "skipped": 0, "missing_images": 0,
                                             "unreadable_images": 0}


def test_aro_relation_macro_average_by_hand(tmp_path):
    _images(tmp_path)
    items = [("on", 0), ("on", 1), ("on", 3), ("under", 2), ("under", 3)]
    data = [{"image_path": f"{i}.png", "true_caption": f"t{i}", "false_caption": f"f{i}", "relation": r}
            for r, i in items]
    (tmp_path / "rel.json").write_text(json.dumps(data))
    (tmp_path / "att.json").write_text(json.dumps(
        [{**d, "attributes": ["red", "blue"] if d["relation"] == "on" else ["big", "small"]} for d in data]))
    res = evaluate(Stub(), tokenizer, preprocess, aro_relation=str(tmp_path / "rel.json"),
                   aro_attribute=str(tmp_path / "att.json"), images=str(tmp_path), min_pair_items=3)
    # on: 2/3 right, under: 1/2 -> macro 7/12; micro 3/5
    assert abs(res["vg_relation"]["acc"] - (2 / 3 + 1 / 2) / 2) < 1e-6
    assert abs(res["vg_relation"]["micro_acc"] - 0.6) < 1e-6
    # only the red|blue pair has >= 3 items
    assert res["vg_attribution"]["n_groups"] == 1 and abs(res["vg_attribution"]["acc"] - 2 / 3) < 1e-6


def test_missing_and_corrupt_images_are_skipped_and_counted(tmp_path):
    """Part of the images present: the items of the others are left out of every accuracy and counted
    per file; the per-relation macro average is over the scored items."""
    _images(tmp_path)
    (tmp_path / "1.png").unlink()
    (tmp_path / "3.png").write_bytes(b"not a png")
    items = [("on", 0), ("on", 1), ("on", 3), ("under", 2), ("under", 3)]
    data = [{"image_path": f"{i}.png", "true_caption": f"t{i}", "false_caption": f"f{i}", "relation": r}
            for r, i in items]
    (tmp_path / "rel.json").write_text(json.dumps(data))
    skipped = []
    res = evaluate(Stub(), tokenizer, preprocess, aro_relation=str(tmp_path / "rel.json"), images=str(tmp_path),
                   skipped_images=skipped)["vg_relation"]
    # scored: item 0 (on, right) and item 3 (under, tie -> wrong)
    counts = (res["n"], res["n_items"], res["skipped"], res["missing_images"], res["unreadable_images"])
    assert counts == (2, 5, 3, 1, 2)
    assert res["per_relation"] == {"on": {"acc": 1.0, "n": 1}, "under": {"acc": 0.0, "n": 1}}
    assert res["acc"] == 0.5 and res["micro_acc"] == 0.5
    assert sorted((Path(s["image"]).name, s["reason"]) for s in skipped) == \
        [("1.png", "missing"), ("3.png", "unreadable"), ("3.png", "unreadable")]
