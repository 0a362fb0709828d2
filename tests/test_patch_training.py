"""Native-resolution patch training (data.crop_mode: patch) for the segmentation trainers: squares of
the model input size cut from the full image on the field of view, flips and rotations that keep image,
mask and FOV aligned, validation through mm segment's own tiling, and the old scale path unchanged."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mm.config import config_json
from mm.data.seg_readers import write_folder_shards
from mm.errors import ConfigError
from mm.evaluate.segment import main as segment_main
from mm.exports import read_export_metadata, save_export
from mm.models.sam import prepare_image, prepare_mask
from mm.tasks import get_task
from mm.tasks.segmentation import SegDataConfig, augment, data_provenance, patch_crop, seg_sample_map

H, W, S = 150, 170, 48
CHASE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chase_db1"


def coded_image(h: int = H, w: int = W) -> torch.Tensor:
    """(3, h, w) 0..255 whose pixels name their position: R = row, G = column, B = a checkerboard."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([rows % 256, cols % 256, ((rows // 8 + cols // 8) % 2) * 255]).float()


def disc(h: int = H, w: int = W, radius: float = 60) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (((rows - h / 2) ** 2 + (cols - w / 2) ** 2) <= radius ** 2).float()[None]


def checker_mask(image: torch.Tensor) -> torch.Tensor:
    return (image[2:3] > 127).float()


def test_crops_have_the_input_size_and_lie_on_the_field_of_view():
    image, fov = coded_image(), disc()
    cfg = SegDataConfig(crop_mode="patch", min_fov=0.9, hflip=False, vflip=False, rot90=False)
    for seed in range(40):
        img, m, v = patch_crop(image, checker_mask(image), fov, S, random.Random(seed), cfg)
        assert img.shape == (3, S, S) and m.shape == v.shape == (1, S, S)
        assert v.mean() >= 0.9
        # Native resolution: the square is the image's own pixels at their own spacing, not a rescale.
        top, left = int(img[0, 0, 0]), int(img[1, 0, 0])
        torch.testing.assert_close(img, image[:, top:top + S, left:left + S], rtol=0, atol=0)
        torch.testing.assert_close(v, fov[:, top:top + S, left:left + S], rtol=0, atol=0)
    # Without the FOV threshold the same draws land off the disc: the threshold is what keeps them on it.
    loose = [float(patch_crop(image, checker_mask(image), fov, S, random.Random(s),
                              SegDataConfig(crop_mode="patch", min_fov=0.0))[2].mean()) for s in range(40)]
    assert min(loose) < 0.9


def test_flips_and_rotations_keep_image_mask_and_fov_aligned():
    image, fov = coded_image(), disc()
    cfg = SegDataConfig(crop_mode="patch", min_fov=0.5, color_jitter=0.0)
    turns = set()
    for seed in range(60):
        img, m, v = patch_crop(image, checker_mask(image), fov, S, random.Random(seed), cfg)
        torch.testing.assert_close(m, checker_mask(img), rtol=0, atol=0)
        # Recover each pixel's source position from its code: the FOV there must be the disc's.
        rows, cols = img[0].long(), img[1].long()
        torch.testing.assert_close(v[0], fov[0, rows, cols], rtol=0, atol=0)
        # The square is a rigid transform of a window: neighbours stay neighbours.
        step_r = (rows[1:, :] - rows[:-1, :]).abs() + (cols[1:, :] - cols[:-1, :]).abs()
        assert (step_r == 1).all()
        turns.add((int(rows[0, 1] - rows[0, 0]), int(cols[0, 1] - cols[0, 0]),
                   int(rows[1, 0] - rows[0, 0]), int(cols[1, 0] - cols[0, 0])))
    assert len(turns) == 8  # all eight symmetries of the square are drawn


def test_patch_samples_are_normalised_squares_without_rescale():
    image, fov = coded_image(), disc()
    raw = {"__key__": "a", "png": _png(image.permute(1, 2, 0).byte().numpy()),
           "mask.png": _png((checker_mask(image)[0] * 255).byte().numpy()),
           "fov.png": _png((fov[0] * 255).byte().numpy())}
    data = SegDataConfig(crop_mode="patch", min_fov=0.8, color_jitter=0.0)
    out = seg_sample_map(S, data, train=True)(raw, random.Random(3))
    assert out["image"].shape == (3, S, S) and out["mask"].shape == out["valid"].shape == (1, S, S)
    expected = patch_crop(image, checker_mask(image), fov, S, random.Random(3), data)
    torch.testing.assert_close(out["image"], prepare_image(expected[0], S)[0][0])
    torch.testing.assert_close(out["mask"], expected[1])
    assert out["valid"].mean() >= 0.8


def test_the_scale_path_is_the_default_and_unchanged():
    assert SegDataConfig().crop_mode == "scale"
    for task in ("topolora_sam", "unet"):
        assert get_task(task).config_class().data.crop_mode == "scale"
    image = coded_image()
    raw = {"__key__": "a", "png": _png(image.permute(1, 2, 0).byte().numpy()),
           "mask.png": _png((checker_mask(image)[0] * 255).byte().numpy())}
    data = SegDataConfig(crop_min=0.6, color_jitter=0.2)
    out = seg_sample_map(64, data, train=True)(raw, random.Random(5))
    # The former path, written out: random-size crop and flips (augment), then SAM's resize to the input.
    img, m, _ = augment(image, checker_mask(image), torch.ones(1, H, W), random.Random(5), data)
    torch.testing.assert_close(out["image"], prepare_image(img, 64)[0][0])
    torch.testing.assert_close(out["mask"], prepare_mask(m, 64)[0])


def test_a_bad_crop_mode_is_a_config_error():
    cfg = get_task("unet").config_class()
    cfg.data.crop_mode = "tiles"
    with pytest.raises(ConfigError, match="data.crop_mode must be one of scale, patch"):
        get_task("unet", cfg)
    cfg.data.crop_mode, cfg.data.min_fov = "patch", 1.5
    with pytest.raises(ConfigError, match="data.min_fov"):
        get_task("unet", cfg)


def _png(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("task_name", ["unet", "topolora_sam"])
def test_validation_by_tiling_equals_mm_segment_on_the_export(tmp_path, task_name):
    """The trainer's native validation and `mm segment --mode auto` on its export score the same images
    identically: one tiling code, the export saying 'native scale'."""
    rng = np.random.default_rng(0)
    for sub in ("img", "gt", "fov"):
        (tmp_path / sub).mkdir()
    for i, (h, w) in enumerate(((90, 110), (70, 64))):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pixels[::7] = 30  # dark lines: something for a model to find
        Image.fromarray(pixels).save(tmp_path / "img" / f"{i}.png")
        Image.fromarray(np.where(pixels[..., 0] < 40, 255, 0).astype(np.uint8)).save(tmp_path / "gt" / f"{i}.png")
        Image.fromarray((disc(h, w, radius=min(h, w) / 2.2)[0].numpy() * 255).astype(np.uint8)).save(
            tmp_path / "fov" / f"{i}.png")
    write_folder_shards(tmp_path / "img", tmp_path / "gt", tmp_path / "shards", fov_dir=tmp_path / "fov",
                        shard_size=1)
    cfg = get_task(task_name).config_class()
    if task_name == "unet":
        cfg.model.encoder_depth, cfg.model.decoder_channels, cfg.model.mean, cfg.model.std = \
            3, [16, 8, 8], [0.5] * 3, [0.5] * 3
    else:
        cfg.model.variant, cfg.model.encoder_embed_dim, cfg.model.encoder_depth = "custom", 32, 2
        cfg.model.encoder_num_heads, cfg.model.encoder_global_attn_indexes = 2, [1]
    cfg.model.image_size = 32
    cfg.data.train = cfg.data.val = str(tmp_path / "shards" / "seg-{000000..000001}.tar")
    cfg.data.crop_mode, cfg.data.num_workers, cfg.eval.batch_size = "patch", 0, 4
    task = get_task(task_name, cfg)
    torch.manual_seed(0)
    model = task.build_model().eval()
    with torch.no_grad():  # a non-trivial output: shift the logits so about half the pixels are foreground
        last = [p for p in model.parameters() if p.dim() == 1][-1]
        last.add_(0.05)
    val = task.evaluate(model)
    assert val["val/n_images"] == 2

    plan = task.export_plan(model)
    assert json.loads(plan.metadata["mm_data"])["train_scale"] == 1.0
    meta = {"mm_task": task_name, "mm_config": config_json(cfg), "mm_step": "1", "mm_export": "full",
            **plan.metadata}
    export = tmp_path / "model.safetensors"
    save_export(model.state_dict(), export, meta)
    assert json.loads(read_export_metadata(export)["mm_data"])["crop_mode"] == "patch"
    assert segment_main(["--checkpoint", str(export), "-i", str(tmp_path / "img"), "-o", str(tmp_path / "out"),
                         "--masks", str(tmp_path / "gt"), "--fov", str(tmp_path / "fov"), "--device", "cpu",
                         "--no-overlay"]) == 0
    pooled = json.loads((tmp_path / "out" / "metrics.json").read_text())["pooled"]
    assert 0.05 < pooled["mean_dice"] < 0.95
    for k in ("dice", "cldice", "iou", "betti0_error", "betti1_error"):
        assert val[f"val/{k}"] == pytest.approx(pooled[f"mean_{k}"], abs=1e-9), k
    assert val["val/global_dice"] == pytest.approx(pooled["global_dice"], abs=1e-9)


def test_provenance_records_native_scale_in_patch_mode_only(tmp_path):
    cfg = get_task("unet").config_class()
    cfg.data.train = str(tmp_path / "none-{000000..000001}.tar")
    assert data_provenance(cfg) == {}
    cfg.data.crop_mode = "patch"
    assert data_provenance(cfg) == {"train_scale": 1.0, "crop_mode": "patch"}


@pytest.mark.skipif(not CHASE.is_dir(), reason="no CHASE_DB1 copy beside the repository (shared/data/chase_db1)")
def test_chase_squares_land_on_the_retina():
    """On a real fundus photograph (999 x 960, derived field of view) the squares are native pixels
    and at least half retina, with the vessel labels moving with the image."""
    from mm.data.seg_readers import read_chase_db1, read_mask, read_pixels

    sample = read_chase_db1(CHASE, split="test")[0]
    rgb = torch.from_numpy(read_pixels(sample.image).copy()).permute(2, 0, 1).float()
    mask = torch.from_numpy(read_mask(sample.mask)).float()[None]
    fov = torch.from_numpy(np.asarray(sample.fov)).float()[None]
    assert rgb.shape[1:] == (960, 999) and 0.4 < fov.mean() < 0.9
    cfg = SegDataConfig(crop_mode="patch", min_fov=0.5)
    for seed in range(10):
        stacked = torch.cat([rgb, mask * 1000 + 1, fov * 1000 + 1])  # mark mask/fov to follow them
        img, m, v = patch_crop(rgb, mask, fov, 256, random.Random(seed), cfg)
        assert img.shape == (3, 256, 256) and v.mean() >= 0.5
        ref, _, _ = patch_crop(stacked, mask, fov, 256, random.Random(seed), cfg)
        torch.testing.assert_close(m, (ref[3:4] > 500).float(), rtol=0, atol=0)
        torch.testing.assert_close(v, (ref[4:5] > 500).float(), rtol=0, atol=0)


def test_images_smaller_than_the_square_are_padded_as_inference_pads():
    """Training pads to the normalisation mean, so the model sees about 0 there, as tile_logits' zero
    padding after normalising gives it at inference; padding is outside `valid`."""
    image = coded_image(30, 40)
    raw = {"__key__": "a", "png": _png(image.permute(1, 2, 0).byte().numpy()),
           "mask.png": _png((checker_mask(image)[0] * 255).byte().numpy())}
    data = SegDataConfig(crop_mode="patch", hflip=False, vflip=False, rot90=False)
    out = seg_sample_map(S, data, train=True)(raw, random.Random(0))
    assert out["image"].shape == (3, S, S)
    assert out["image"][:, 30:, :].abs().max() < 0.02 and out["image"][:, :, 40:].abs().max() < 0.02
    assert out["valid"][:, :30, :40].all() and out["valid"].sum() == 30 * 40
    torch.testing.assert_close(out["image"][:, :30, :40], prepare_image(image, 40)[0][0][:, :30, :40])


@pytest.mark.parametrize("path, task_name", [("configs/topolora_sam/chase_cpu.yaml", "topolora_sam"),
                                             ("configs/topolora_sam/chase_vit_b.yaml", "topolora_sam"),
                                             ("configs/unet/chase_effnet.yaml", "unet")])
def test_chase_configs_load_and_train_on_native_squares(path, task_name):
    from mm.config import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / path, [], get_task(task_name).config_class)
    assert cfg.data.crop_mode == "patch" and cfg.data.min_fov == 0.5
    assert cfg.data.train.endswith("chase_db1-train-{000000..000019}.tar")
    assert cfg.data.val.endswith("chase_db1-test-{000000..000007}.tar")
    get_task(task_name, cfg)  # the task's own checks pass
