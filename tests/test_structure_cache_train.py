"""STRUCTURE's cache and training run directory: each distinct image encoded once (COCO-style data,
several caption rows per image), cache.use_pairs subsets, a refused batch leaving nothing behind, and
-1 resuming a run recorded with the last layer's index."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from mm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/structure/tiny.yaml"
VIT_ARGS = "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 3, num_heads: 2}"


def _cfg(overrides: list[str]):
    from mm.tasks.structure import StructureRunConfig

    return load_config(TINY, [f"model.vision.args={VIT_ARGS}", *overrides], StructureRunConfig)


def _repeated_image_shard(root: Path) -> tuple[str, list[Image.Image], list[str]]:
    """12 distinct images, each in 3 caption rows under its own key; the repeats are spread over the
    shard so that they fall in other batches than their first occurrence."""
    from mm.data.shards import png_bytes, write_samples
    from mm.data.synthetic import render_scene

    rng = random.Random(0)
    images = [render_scene(rng, 32, 0.5).image for _ in range(12)]
    samples, owner = [], []
    for copy in range(3):
        for i, image in enumerate(images):
            key = f"{copy * 12 + i:08d}"
            samples.append({"__key__": key, "png": png_bytes(image), "txt": f"caption {copy} of {i}".encode()})
            owner.append(i)
    shards = write_samples(samples, root, "rep", shard_size=100)
    return shards[0], images, [str(i) for i in owner]


def test_the_cache_encodes_each_distinct_image_once_with_the_per_row_features(tmp_path, monkeypatch):
    import mm.data.feature_cache as fc
    from mm.models.encoders import build_encoder, vision_preprocess

    shard, images, owner = _repeated_image_shard(tmp_path / "shards")
    cfg = _cfg([f"data.train={shard}"])
    calls: list[int] = []
    real_build = fc.build_encoder

    def counting_build(enc_cfg, side):
        encoder = real_build(enc_cfg, side)
        if side == "vision":
            layers = encoder.layers

            def counted(x):
                calls.append(len(x))
                return layers(x)

            encoder.layers = counted
        return encoder

    monkeypatch.setattr(fc, "build_encoder", counting_build)
    meta = fc.build_feature_cache(cfg.model.vision, cfg.model.text, shard, tmp_path / "cache", batch_size=8,
                                  num_workers=0)
    assert meta["n"] == 36 and sum(calls) == 12 and meta["images_encoded"] == 12  # not 36

    cache = fc.FeatureCache(tmp_path / "cache")
    vision = build_encoder(cfg.model.vision, "vision")
    preprocess = vision_preprocess(cfg.model.vision)
    with torch.no_grad():
        reference = vision.layers(torch.stack([preprocess(im) for im in images]))  # one row per image
    for layer, ref in enumerate(reference):
        got = cache.layer("vision", layer)
        expected = ref[[int(owner[int(k)]) for k in cache.keys]]  # the per-row result
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # A memo too small for the repeats: the images are encoded again, the rows hold the same features.
    calls.clear()
    monkeypatch.setattr(fc, "IMAGE_MEMO", 4)
    meta = fc.build_feature_cache(cfg.model.vision, cfg.model.text, shard, tmp_path / "cache", batch_size=8,
                                  num_workers=0, overwrite=True)
    assert sum(calls) == 36
    for layer in range(len(reference)):
        torch.testing.assert_close(fc.FeatureCache(tmp_path / "cache").layer("vision", layer),
                                   cache.layer("vision", layer), rtol=1e-5, atol=1e-5)


def test_use_pairs_subsets_are_nested_and_the_same_for_every_seed():
    from mm.tasks.structure import pair_rows

    small, large = pair_rows(6000, 300), pair_rows(6000, 1000)
    assert len(small) == 300 and len(set(small.tolist())) == 300
    assert set(small.tolist()) <= set(large.tolist())
    assert torch.equal(small, pair_rows(6000, 300))
    assert pair_rows(6000, 0) is None and pair_rows(6000, 6000) is None


@pytest.fixture(scope="module")
def cache(shapes, tmp_path_factory) -> dict:
    from mm.tasks.structure_cli import main

    root = tmp_path_factory.mktemp("structure-run")
    overrides = [f"data.train={shapes['train']}", f"model.vision.args={VIT_ARGS}", "model.embed_dim=32",
                 f"cache.dir={root / 'cache'}", "cache.num_workers=0", "cache.batch_size=64",
                 "data.batch_size=32", "loss.warmup_steps=2", "optim.warmup_steps=1", "train.log_every=1",
                 "eval.zeroshot_data=", "train.deepspeed_config=configs/ds/zero1.json"]
    assert main(["cache", "--config", str(TINY), *[a for o in overrides for a in ("--set", o)]]) == 0
    return {"root": root, "overrides": overrides}


def test_training_batches_come_from_the_use_pairs_subset(cache):
    from mm.data.feature_cache import FeatureCache
    from mm.tasks.structure import StructureTask, pair_rows

    cfg = _cfg([*cache["overrides"], "cache.use_pairs=100"])
    full = FeatureCache(cfg.cache.dir).layer("vision", 2)
    allowed = {tuple(r.tolist()) for r in full[pair_rows(len(full), 100)]}
    batches = iter(StructureTask(cfg).batches("train"))
    seen = {tuple(r.tolist()) for _ in range(9) for r in next(batches)["vision"]}  # 3 epochs of 3 batches
    assert seen == allowed


def _mm_train(cache: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    sets = [a for o in [*cache["overrides"], f"train.out_dir={out}", *extra] for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mm", "train", "structure", "--config", str(TINY), *sets],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_a_batch_larger_than_the_cache_is_refused_before_the_run_directory_is_written(cache):
    out = cache["root"] / "too-big"
    proc = _mm_train(cache, out, "data.batch_size=400", "train.steps=2")  # the cache holds 320 pairs
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and "fewer than one global batch" in err[-1]
    assert not out.exists()  # no config.yaml, no lock, no folder
    proc = _mm_train(cache, out, "cache.use_pairs=20", "train.steps=2")  # 20 pairs < data.batch_size 32
    assert proc.returncode == 2 and "cache.use_pairs=20 of its 320" in proc.stderr and not out.exists()


def test_minus_one_and_the_last_index_are_the_same_layer_on_resume(cache):
    out = cache["root"] / "resume"
    first = _mm_train(cache, out, "model.vision_layer=-1", "model.text_layer=-1", "train.steps=2",
                      "train.ckpt_every=2")
    assert first.returncode == 0, first.stderr[-3000:]
    recorded = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert (recorded["vision_layer"], recorded["text_layer"]) == (2, 3)  # 3 ViT blocks, 4 text blocks
    second = _mm_train(cache, out, "model.vision_layer=2", "model.text_layer=3", "train.steps=4",
                       "train.ckpt_every=2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "another architecture" not in second.stderr and "model." not in second.stderr
    assert "structure: step 4" in second.stdout + second.stderr
    third = _mm_train(cache, out, "model.text_layer=-1", "train.steps=6", "train.ckpt_every=2")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "structure: step 6" in third.stdout + third.stderr
    # A really different layer is still refused.
    fourth = _mm_train(cache, out, "model.text_layer=1", "train.steps=8")
    assert fourth.returncode == 2 and "model.text_layer was 3, now 1" in fourth.stderr
