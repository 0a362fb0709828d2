"""The vessels world: deterministic thin curves whose masks are exactly the curve pixels, readable by
the TopoLoRA-SAM task and written by `mm-shards synthetic --world vessels`."""

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from scipy import ndimage
from skimage.morphology import skeletonize

from mm.config import load_config
from mm.data import cli
from mm.data.synthetic import render_scene, render_vessels, write_vessels
from mm.errors import UserError
from mm.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("__key__", "png", "mask.png", "json")


def read_shards(shards):
    return list(wds.WebDataset(shards, shardshuffle=False))


def thinness(mask: np.ndarray) -> tuple[float, float]:
    """(skeleton pixels / mask pixels, mean distance to the background over the mask)."""
    return skeletonize(mask).sum() / mask.sum(), ndimage.distance_transform_edt(mask)[mask].mean()


def test_same_seed_gives_same_samples_whatever_the_shard_size(tmp_path):
    a = read_shards(write_vessels(tmp_path / "a", 12, image_size=32, seed=3, shard_size=5))
    b = read_shards(write_vessels(tmp_path / "b", 12, image_size=32, seed=3, shard_size=12))
    c = read_shards(write_vessels(tmp_path / "c", 12, image_size=32, seed=4, shard_size=12))
    assert len(a) == 12 and [[s[f] for f in FIELDS] for s in a] == [[s[f] for f in FIELDS] for s in b]
    assert [s["png"] for s in a] != [s["png"] for s in c] and [s["mask.png"] for s in a] != [s["mask.png"] for s in c]


@pytest.mark.parametrize("size", [32, 64])
def test_masks_are_thin_curves_and_exactly_the_bright_pixels(size):
    shares = []
    for i in range(60):
        image, mask, curves = render_vessels(random.Random(i), size)
        assert image.mode == "RGB" and mask.mode == "L" and image.size == mask.size == (size, size)
        assert 2 <= curves <= 5
        m = np.asarray(mask)
        assert set(np.unique(m)) == {0, 255}
        m = m > 0
        assert 0 < m.mean() < 0.3
        share, depth = thinness(m)
        assert share > 0.2 and depth < 1.7, (i, share, depth)  # lines at most ~3 px wide, no blobs
        shares.append(share)
        # The mask is exactly the curve pixels: every one of them brighter than any background pixel,
        # on a reddish background.
        px = np.asarray(image).astype(float)
        assert px[m].mean(-1).min() > px[~m].mean(-1).max() + 10
        r, g, b = px[~m].mean(0)
        assert r > g > b
    assert np.mean(shares) > 0.35
    # The same measure tells filled shapes apart.
    blob = np.asarray(render_scene(random.Random(0), size, single_fraction=1.0).mask) > 0
    assert thinness(blob)[0] < 0.2


def test_task_batches_read_vessel_shards(tmp_path):
    train = write_vessels(tmp_path / "train", 16, image_size=32, seed=0, shard_size=8)
    val = write_vessels(tmp_path / "val", 5, image_size=64, seed=1)
    task = get_task("topolora_sam")
    cfg = load_config(ROOT / "configs/topolora_sam/tiny.yaml",
                      [f"data.train={tmp_path}/train/vessels-{{000000..{len(train) - 1:06d}}}.tar",
                       f"data.val={val[0]}", "data.num_workers=0", "data.shuffle_buffer=4", "eval.batch_size=4"],
                      task.config_class)
    batch = next(iter(get_task(task.name, cfg).batches("train")))
    assert batch["image"].shape == (8, 3, 64, 64) and batch["mask"].shape == batch["valid"].shape == (8, 1, 64, 64)
    assert set(batch["mask"].unique().tolist()) == {0.0, 1.0}
    loader = get_task(task.name, cfg).batches("val")
    batches = list(loader)
    assert [len(b["key"]) for b in batches] == [4, 1] and loader.bad_counts.get("total", 0) == 0
    # Square images, no augmentation on validation: no padding, every pixel counts.
    assert all(b["valid"].eq(1).all() and b["mask"].sum() > 0 for b in batches)


def test_cli_writes_vessels_and_rejects_shapes_only_options(tmp_path, capsys):
    assert cli.main(["synthetic", "--world", "vessels", "--out", str(tmp_path / "v"), "--num-samples", "3",
                     "--image-size", "40", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["written"] == 3 and result["shards"] == [str(tmp_path / "v" / "vessels-000000.tar")]
    sample = read_shards(result["shards"])[0]
    assert Image.open(io.BytesIO(sample["png"])).size == (40, 40) and json.loads(sample["json"])["curves"] >= 2
    # The default world is still the shapes world, with its own prefix.
    assert cli.main(["synthetic", "--out", str(tmp_path / "s"), "--num-samples", "2", "--image-size", "32"]) == 0
    assert (tmp_path / "s" / "shapes-000000.tar").exists()
    for option in (["--balanced"], ["--single-fraction", "0.3"]):
        with pytest.raises(UserError, match="shapes only"):
            cli._run(cli.build_parser().parse_args(["synthetic", "--world", "vessels", "--out",
                                                    str(tmp_path / "x"), *option]))
