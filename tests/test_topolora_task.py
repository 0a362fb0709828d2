"""The TopoLoRA-SAM trainer task: sample map, augmentation, batches, losses, and 2-rank training."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mm.config import load_config
from mm.data.loader import Loader, StreamSpec, default_collate
from mm.data.shards import png_bytes, write_samples
from mm.data.synthetic import write_vessels
from mm.tasks import get_task
from mm.tasks.topolora_sam import SegDataConfig, augment, export_kind, seg_sample_map

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.encoder_embed_dim=32", "model.encoder_depth=2", "model.encoder_num_heads=2",
        "model.encoder_global_attn_indexes=[1]", "model.image_size=64", "data.num_workers=0",
        "data.shuffle_buffer=10"]


def tiny_cfg(shapes, *extra):
    task = get_task("topolora_sam")
    return task, load_config(ROOT / "configs/topolora_sam/tiny.yaml",
                             TINY + [f"data.train={shapes['train']}", f"data.val={shapes['val']}", *extra],
                             task.config_class)


def _sample(key: str, size=(20, 16), mask_size=None, mask=True, fov=False) -> dict:
    rng = np.random.default_rng(len(key))
    image = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8))
    out = {"__key__": key, "png": png_bytes(image)}
    if mask:
        m = np.zeros((mask_size or size)[::-1], dtype=np.uint8)
        m[2:8, 3:9] = 255
        out["mask.png"] = png_bytes(Image.fromarray(m))
    if fov:
        out["fov.png"] = png_bytes(Image.fromarray(np.full(size[::-1], 255, dtype=np.uint8)))
    return out


def test_bad_masks_are_counted_and_skipped(tmp_path):
    samples = [_sample("a"), _sample("b", mask_size=(10, 10)), _sample("c", mask=False), _sample("d", fov=True)]
    shards = write_samples(iter(samples), tmp_path, "seg", shard_size=10)
    spec = StreamSpec(urls=shards[0], sample_map=seg_sample_map(32), collate=default_collate, batch_size=8,
                      num_workers=0, shuffle_buffer=0, repeat=False, drop_last=False)
    loader = Loader(spec)
    batches = list(loader)
    assert len(batches) == 1 and batches[0]["key"] == ["a", "d"]
    assert loader.bad_counts == {"mask_size_mismatch": 1, "missing_mask": 1, "total": 2}
    b = batches[0]
    assert b["image"].shape == (2, 3, 32, 32) and b["mask"].shape == b["valid"].shape == (2, 1, 32, 32)
    # 20 wide x 16 high resized to 32 x 26 (longest side), padded at the bottom: padding is not valid
    assert b["valid"][:, :, :26].eq(1).all() and b["valid"][:, :, 26:].eq(0).all()
    assert set(b["mask"].unique().tolist()) == {0.0, 1.0}


def test_augmentation_is_deterministic_for_the_same_rng():
    image = torch.rand(3, 40, 30) * 255
    mask = (torch.rand(1, 40, 30) > 0.5).float()
    fov = torch.ones(1, 40, 30)
    cfg = SegDataConfig(crop_min=0.5, color_jitter=0.2)
    a = augment(image, mask, fov, random.Random(7), cfg)
    b = augment(image, mask, fov, random.Random(7), cfg)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    draws = [augment(image, mask, fov, random.Random(s), cfg)[1] for s in range(6)]
    assert any(d.shape != draws[0].shape or not torch.equal(d, draws[0]) for d in draws[1:])
    # mask and image are cropped and flipped together
    off = augment(image, mask, fov, random.Random(3), SegDataConfig(crop_min=1.0, hflip=False, vflip=False))
    assert torch.equal(off[0], image) and torch.equal(off[1], mask)


def test_train_batches_and_losses(shapes):
    task, cfg = tiny_cfg(shapes)
    batch = next(iter(get_task(task.name, cfg).batches("train")))
    assert batch["image"].shape == (8, 3, 64, 64)
    assert batch["mask"].shape == batch["valid"].shape == (8, 1, 64, 64)
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0} and batch["mask"].sum() > 0
    torch.manual_seed(0)
    model = get_task(task.name, cfg).build_model()
    losses = get_task(task.name, cfg).losses(model, batch, 0)
    assert set(losses) == {"loss", "bce", "dice", "cldice"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert model.adapter.out.weight.grad is not None


def test_evaluate_reports_dice(shapes):
    task, cfg = tiny_cfg(shapes)
    torch.manual_seed(0)
    metrics = get_task(task.name, cfg).evaluate(get_task(task.name, cfg).build_model())
    assert {"val/dice", "val/cldice", "val/iou"} <= set(metrics)
    assert metrics["val/n_images"] == 24 and 0 <= metrics["val/dice"] <= 1


def test_configs_load(shapes):
    task = get_task("topolora_sam")
    drive = load_config(ROOT / "configs/topolora_sam/vit_b_drive.yaml", [], task.config_class)
    assert drive.model.variant == "vit_b" and drive.model.image_size == 1024 and drive.train.grad_accum == 4
    tiny = load_config(ROOT / "configs/topolora_sam/tiny.yaml", [], task.config_class)
    assert tiny.model.variant == "custom"
    # The paper config exports only what trains (it has a base checkpoint); the random tiny SAM all of it.
    assert export_kind(drive) == "trainable" and export_kind(tiny) == "full"


@pytest.fixture(scope="module")
def dist_results(torchrun, tmp_path_factory):
    out = tmp_path_factory.mktemp("topolora")
    # Thin vessel-like curves, 1-3 px wide at 32 px (2-6 px at the model's 64 px input): what clDice is for.
    train = write_vessels(out / "train", 320, image_size=32, seed=0, shard_size=40)
    val = write_vessels(out / "val", 24, image_size=32, seed=1)
    # ZeRO-1 from a random SAM (full export); ZeRO-2 and 3 from a base checkpoint (trainable-only export).
    proc = torchrun(ROOT / "tests/dist/topolora_check.py", f"{out}/train/vessels-{{000000..{len(train) - 1:06d}}}.tar",
                    val[0], str(out), "1,2,3", "30", "2,3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_two_ranks_train_and_validation_dice_rises(dist_results, stage):
    r = dist_results[stage]
    assert r["step"] == 30 and r["bad_samples"] == 0
    assert r["losses"][-1] < r["losses"][0] - 0.3
    before, after = r["before"], r["after"]
    # Measured: Dice about 0.15-0.2 -> 0.54-0.55, clDice 0.15-0.2 -> 0.59-0.62 at every stage.
    for metric in ("val/dice", "val/cldice"):
        assert after[metric] > before[metric] + 0.2 and after[metric] > 0.4, (metric, before, after)


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_export_loads_with_the_trained_outputs(dist_results, stage):
    assert dist_results[stage]["export_output_diff"] < 1e-5


def test_export_kinds_under_zero(dist_results):
    full = dist_results["1"]
    assert full["export_kind"] == "full" and full["export_has_frozen"]
    for stage in ("2", "3"):
        r = dist_results[stage]
        assert r["export_kind"] == "trainable", stage
        assert r["export_has_all_trainable"] and not r["export_has_frozen"], stage
        assert r["merged_output_diff"] < 1e-5, stage  # mm-merge-lora keeps the trained outputs


def test_mm_segment_on_the_trainers_exports(dist_results, tmp_path, capsys):
    """mm-segment on what the trainer wrote: a full export (ZeRO-1) and a trainable-only one (ZeRO-2),
    whose base SAM checkpoint is given with --base-checkpoint after being moved; masks come out at the
    images' size and the pooled Dice is the trained model's, not chance."""
    import shutil
    import tarfile

    from mm.evaluate.segment import main

    root = Path(dist_results["2"]["export"]).parents[2]
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    with tarfile.open(root / "val" / "vessels-000000.tar") as tar:
        for m in tar.getmembers():
            target = masks / m.name.replace(".mask.png", ".png") if m.name.endswith(".mask.png") else images / m.name
            if m.name.endswith(".png"):
                target.write_bytes(tar.extractfile(m).read())
    moved = tmp_path / "elsewhere.pth"
    shutil.copy(root / "sam_tiny_base.pth", moved)
    for stage, extra in (("1", []), ("2", ["--base-checkpoint", str(moved)])):
        out = tmp_path / f"out{stage}"
        assert main(["--checkpoint", dist_results[stage]["export"], *extra, "--input", str(images),
                     "--masks", str(masks), "--output", str(out)]) == 0, capsys.readouterr().err
        record = json.loads((out / "metrics.json").read_text())
        assert len(record["per_image"]) == 24
        assert record["pooled"]["mean_dice"] > 0.3, (stage, record["pooled"])
        first = sorted(images.iterdir())[0]
        assert Image.open(out / f"{first.stem}_mask.png").size == Image.open(first).size
