"""Segmentation I/O on real-world files: codecs, label conventions, output safety and naming,
GeoTIFF, the training scale and normalisation an export records (mm-segment and mm-shards)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mm.data.cli import main as shards_main
from mm.data.seg_readers import (
    MaskRule,
    Normalisation,
    derive_fov,
    load_image,
    read_mask,
    read_pixels,
    to_rgb8,
    write_folder_shards,
)
from mm.errors import DataError
from mm.evaluate.segment import InferenceOptions, Segmenter
from tests.test_segment import PointwiseStub, rgb, run_main, write_tiny_export

CHASE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chase_db1"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return write_tiny_export(tmp_path_factory.mktemp("export") / "model.safetensors")


def with_data_record(export: Path, out: Path, record: dict) -> Path:
    """A copy of an export whose metadata carries mm_data, as the trainer writes it."""
    from mm.exports import read_export_metadata

    meta = {**read_export_metadata(export), "mm_data": json.dumps(record)}
    save_file(load_file(str(export)), str(out), metadata=meta)
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Reading: codecs, sizes, messages


def test_lzw_two_channel_16bit_tiff_gives_a_mask_of_the_image_size(tmp_path, export, capsys):
    vv_vh = np.random.default_rng(0).integers(0, 4000, (2, 355, 418), dtype=np.uint16)  # Sentinel-1 VV, VH
    tifffile.imwrite(tmp_path / "s1.tif", vv_vh, compression="lzw", photometric="minisblack", planarconfig="separate")
    pixels = read_pixels(tmp_path / "s1.tif")
    assert pixels.shape == (355, 418, 2) and pixels.dtype == np.uint16
    np.testing.assert_array_equal(pixels[..., 1], vv_vh[1])
    code, _, err = run_main(capsys, "--checkpoint", str(export), "-i", str(tmp_path / "s1.tif"), "-o",
                            str(tmp_path / "out"), "--mode", "resize")
    assert code == 0, err
    assert np.asarray(Image.open(tmp_path / "out" / "s1_mask.png")).shape == (355, 418)


def test_lzw_16bit_rgb_tiff_is_read_at_16_bits_and_stretched(tmp_path):
    image = (np.random.default_rng(1).random((40, 50, 3)) * 60000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "rgb16.tif", image, compression="lzw", photometric="rgb")
    pixels = read_pixels(tmp_path / "rgb16.tif")
    assert pixels.dtype == np.uint16
    np.testing.assert_array_equal(pixels, image)
    out = to_rgb8(pixels)
    assert out.min() == 0 and out.max() == 255  # stretched per channel, not cut to the low byte


def test_undecodable_tiff_is_refused_in_one_line(tmp_path, export, capsys):
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, np.zeros((32, 32), np.uint16))
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["Compression"].overwrite(50999)  # a codec nobody implements
    with pytest.raises(DataError, match="cannot decode TIFF"):
        read_pixels(path)
    code, _, err = run_main(capsys, "--checkpoint", str(export), "-i", str(path), "-o", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {path}: cannot decode TIFF")
    assert not (tmp_path / "out").exists()


def test_tiny_image_is_refused_and_messages_name_no_internal_objects(tmp_path, export, capsys):
    Image.fromarray(rgb(1, 1)).save(tmp_path / "dot.png")
    code, _, err = run_main(capsys, "--checkpoint", str(export), "-i", str(tmp_path / "dot.png"), "-o",
                            str(tmp_path / "out"))
    assert code == 2 and "dot.png: image is 1x1 pixels" in err and err.count("\n") == 1
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError) as info:
        load_image(tmp_path / "junk.png")
    assert "BytesIO" not in str(info.value) and "0x" not in str(info.value)


def test_image_smaller_than_one_tile_is_padded_not_refused(tmp_path, export, capsys):
    Image.fromarray(rgb(9, 20)).save(tmp_path / "small.png")
    code, _, err = run_main(capsys, "--checkpoint", str(export), "-i", str(tmp_path / "small.png"), "-o",
                            str(tmp_path / "out"), "--mode", "tile")
    assert code == 0, err
    assert Image.open(tmp_path / "out" / "small_mask.png").size == (20, 9)


# ---------------------------------------------------------------------------------------------------
# Labels


def test_colour_and_instance_masks_keep_every_labelled_pixel(tmp_path):
    ids = np.zeros((20, 30), np.uint16)
    ids[2:5, 2:5], ids[10:15, 20:28] = 7, 312  # instance ids, HRSID-like
    tifffile.imwrite(tmp_path / "ids.tif", ids)
    colour = np.zeros((20, 30, 3), np.uint8)
    colour[:5, :5] = (0, 0, 255)  # blue: grey 29, lost by a > 127 rule after grey conversion
    colour[10:, 10:] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    rule = MaskRule()
    assert np.array_equal(read_mask(tmp_path / "ids.tif", rule), ids > 0)
    assert np.array_equal(read_mask(tmp_path / "colour.png", rule), colour.any(axis=-1))
    soft = np.zeros((20, 30), np.uint8)
    soft[5:10], soft[4], soft[10] = 255, 60, 200  # an anti-aliased edge
    Image.fromarray(soft).save(tmp_path / "soft.png")
    assert read_mask(tmp_path / "soft.png", rule).sum() == 7 * 30
    assert read_mask(tmp_path / "soft.png", MaskRule("127")).sum() == 6 * 30
    Image.fromarray(soft).save(tmp_path / "soft.jpg", quality=95)
    jpeg = read_mask(tmp_path / "soft.jpg", rule)  # lossy: > 127, not every non-zero pixel
    assert 5 * 30 <= jpeg.sum() <= 7 * 30
    text = rule.describe()
    assert text.startswith("masks: 4 read:") and "colour" in text and "several non-zero values" in text
    assert "> 127 (lossy format)" in text


def test_segment_reports_the_mask_rule_and_rejects_an_empty_fov(tmp_path, export, capsys):
    for d in ("img", "gt", "fov"):
        (tmp_path / d).mkdir()
    for name in ("a", "b"):
        Image.fromarray(rgb(24, 24)).save(tmp_path / "img" / f"{name}.png")
        Image.fromarray(np.eye(24, dtype=np.uint8)).save(tmp_path / "gt" / f"{name}.png")  # a 0/1 map
    Image.fromarray(np.full((24, 24), 255, np.uint8)).save(tmp_path / "fov" / "a.png")
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(tmp_path / "fov" / "b.png")
    code, out, err = run_main(capsys, "--checkpoint", str(export), "-i", str(tmp_path / "img"), "-o",
                              str(tmp_path / "out"), "--masks", str(tmp_path / "gt"), "--fov", str(tmp_path / "fov"))
    assert code == 1
    assert f"skipped: {tmp_path / 'img' / 'b.png'}: field-of-view mask" in err and "is empty (all zero)" in err
    assert "masks: 4 read: 4 binary (foreground = non-zero)" in out  # labels and FOVs
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert record["per_image"][0]["tp"] + record["per_image"][0]["fn"] == 24  # the diagonal of ones


# ---------------------------------------------------------------------------------------------------
# Output safety and naming


def test_output_in_the_input_folder_never_replaces_ground_truth(tmp_path, export, capsys):
    folder = tmp_path / "cases"  # images and `<name>_mask.png` ground truth in one folder
    folder.mkdir()
    for name in ("c1", "c2"):
        Image.fromarray(rgb(20, 30)).save(folder / f"{name}.png")
        Image.fromarray(np.zeros((20, 30), np.uint8)).save(folder / f"{name}_mask.png")
    before = {p.name: digest(p) for p in folder.iterdir()}
    code, _, err = run_main(capsys, "--checkpoint", str(export), "-i", str(folder / "c?.png"), "-o", str(folder),
                            "--masks", str(folder), "--mask-suffix", "_mask")
    assert code == 2 and err.startswith(f"error: output {folder / 'c1_mask.png'} would replace the input")
    assert {p.name: digest(p) for p in folder.iterdir()} == before
    # --keep-names writes c1.png over the input c1.png: refused too.
    code, _, err = run_main(capsys, "--checkpoint", str(export), "-i", str(folder / "c?.png"), "-o", str(folder),
                            "--keep-names")
    assert code == 2 and "would replace the input" in err
    assert {p.name: digest(p) for p in folder.iterdir()} == before


def test_replacing_is_announced_and_skip_existing_keeps(tmp_path, export, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "gt").mkdir()
    for name in ("a", "b"):
        Image.fromarray(rgb(20, 30, seed=3)).save(tmp_path / "in" / f"{name}.png")
        Image.fromarray((rgb(20, 30)[..., 0] > 128).astype(np.uint8) * 255).save(tmp_path / "gt" / f"{name}.png")
    args = ["--checkpoint", str(export), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--masks",
            str(tmp_path / "gt")]
    code, _, err = run_main(capsys, *args)
    assert code == 0 and "replacing" not in err
    first = json.loads((tmp_path / "out" / "metrics.json").read_text())
    code, _, err = run_main(capsys, *args)
    assert code == 0 and "note: replacing 6 existing file(s)" in err
    stamp = (tmp_path / "out" / "a_mask.png").stat().st_mtime_ns
    (tmp_path / "out" / "b_mask.png").unlink()
    code, out, err = run_main(capsys, *args, "--skip-existing")
    assert code == 0 and "segmented 1 image(s)" in out and "kept 1 existing" in out
    assert (tmp_path / "out" / "a_mask.png").stat().st_mtime_ns == stamp
    again = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert again["per_image"][0]["dice"] == pytest.approx(first["per_image"][0]["dice"])  # read from the file
    assert again["n_images"] == 2


def test_keep_names_pairs_outputs_with_labels_by_name(tmp_path, export, capsys):
    (tmp_path / "in").mkdir()
    Image.fromarray(rgb(20, 30)).save(tmp_path / "in" / "case_007.jpg")
    code, _, err = run_main(capsys, "--checkpoint", str(export), "-i", str(tmp_path / "in"), "-o",
                            str(tmp_path / "out"), "--keep-names", "--save-prob", "png")
    assert code == 0, err
    names = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert names == ["case_007.png", "overlay/case_007.png", "prob/case_007.png"]


def test_every_image_failing_leaves_no_output_folder(tmp_path, export, capsys):
    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        (tmp_path / "in" / f"{name}.png").write_bytes(b"broken")
    code, _, err = run_main(capsys, "--checkpoint", str(export), "-i", str(tmp_path / "in"), "-o",
                            str(tmp_path / "new" / "out"))
    assert code == 2 and "none of the 2 images" in err
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not CHASE.is_dir(), reason="CHASE_DB1 not present")
def test_chase_db1_flat_folder(tmp_path, export, capsys):
    """CHASE_DB1 keeps images and labels in one folder: output there is safe, labels are untouched."""
    folder = tmp_path / "chase"
    folder.mkdir()
    for name in ("Image_01L", "Image_01R"):
        for suffix in (".jpg", "_1stHO.png", "_2ndHO.png"):
            shutil.copy(CHASE / f"{name}{suffix}", folder)
    labels = {p.name: digest(p) for p in folder.glob("*HO.png")}
    # The second annotator's labels are images too unless the input names the photographs only.
    code, _, err = run_main(capsys, "--checkpoint", str(export), "-i", str(folder / "*.jpg"), "-o", str(folder),
                            "--masks", str(folder), "--mask-suffix", "_1stHO", "--no-overlay", "--mode", "resize")
    assert code == 0, err
    assert {p.name: digest(p) for p in folder.glob("*HO.png")} == labels
    record = json.loads((folder / "metrics.json").read_text())
    assert [Path(r["image"]).name for r in record["per_image"]] == ["Image_01L.jpg", "Image_01R.jpg"]
    assert np.asarray(Image.open(folder / "Image_01L_mask.png")).shape == (960, 999)


# ---------------------------------------------------------------------------------------------------
# GeoTIFF


def test_geotiff_georeferencing_is_copied_to_mask_and_probability(tmp_path, export, capsys):
    geo = [(33550, "d", 3, (10.0, 10.0, 0.0), True),  # ModelPixelScale
           (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 4600000.0, 0.0), True),  # ModelTiepoint
           (34735, "H", 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633), True),
           (34737, "s", 0, "WGS 84 / UTM zone 33N|", True),
           (42113, "s", 0, "-9999", True)]
    image = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    tifffile.imwrite(tmp_path / "scene.tif", image, extratags=geo)
    code, _, err = run_main(capsys, "--checkpoint", str(export), "-i", str(tmp_path / "scene.tif"), "-o",
                            str(tmp_path / "out"), "--save-prob", "tif")
    assert code == 0, err

    def tags(path: Path) -> dict:
        with tifffile.TiffFile(path) as tif:
            return {code: tif.pages[0].tags[code].value for code in (33550, 33922, 34735, 34737, 42113)}

    want = tags(tmp_path / "scene.tif")
    for name in ("scene_mask.tif", "scene_prob.tif"):
        got = tags(tmp_path / "out" / name)
        assert {k: np.asarray(v).tolist() if not isinstance(v, str) else v for k, v in got.items()} == \
            {k: np.asarray(v).tolist() if not isinstance(v, str) else v for k, v in want.items()}
    assert tifffile.imread(tmp_path / "out" / "scene_mask.tif").shape == (40, 50)


# ---------------------------------------------------------------------------------------------------
# Training scale and normalisation recorded in the export


class SizeRecorder(PointwiseStub):
    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape))
        return super().forward(x)


@pytest.mark.parametrize("scale,calls", [(0.25, 1), (0.5, 4), (1.0, 16), (None, 25)])
def test_auto_mode_follows_the_training_scale(scale, calls):
    model = SizeRecorder()
    seg = Segmenter(model, 32, InferenceOptions("auto", overlap=0.0, batch_size=1, train_scale=scale))
    out = seg.logits(rgb(128, 128))
    assert out.shape == (128, 128)
    # 0.25: the 128 px image becomes 32 px, one forward pass; 0.5: 64 px, 2 x 2 tiles; 1.0: native,
    # 4 x 4 tiles; unknown scale: native tiles as before (overlap 0 on 128 px: 4 x 4... plus none).
    assert len(model.sizes) == (calls if scale is not None else 16)


def test_export_normalisation_is_the_default_and_an_override_is_noted(tmp_path, export, capsys):
    record = {"train_scale": 0.5, "normalisation": Normalisation("always", (2.0, 98.0)).to_dict()}
    tagged = with_data_record(export, tmp_path / "tagged.safetensors", record)
    (tmp_path / "gt").mkdir()
    Image.fromarray(rgb(40, 40)).save(tmp_path / "x.png")
    Image.fromarray(np.eye(40, dtype=np.uint8)).save(tmp_path / "gt" / "x.png")
    args = ["--checkpoint", str(tagged), "-i", str(tmp_path / "x.png"), "-o", str(tmp_path / "out"),
            "--masks", str(tmp_path / "gt")]
    code, _, err = run_main(capsys, *args)
    assert code == 0 and "note: normalising" not in err and "records no training scale" not in err
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["normalisation"]["stretch"] == "always" and saved["normalisation"]["percentiles"] == [2.0, 98.0]
    assert saved["train_scale"] == 0.5
    code, _, err = run_main(capsys, *args, "--stretch", "auto")
    assert code == 0 and "note: normalising with stretch auto (2..98 percentiles); the training shards used " \
                         "stretch always (2..98 percentiles)" in err


# ---------------------------------------------------------------------------------------------------
# mm-shards: the same reader, suffixes, json, shard count


def shard_members(shards: list[str]) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, field = m.name.split(".", 1)
                out.setdefault(key, {})[field] = tar.extractfile(m).read()
    return out


def test_shards_use_the_inference_reader_and_record_the_normalisation(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    sar = np.random.default_rng(0).gamma(1.0, 100.0, (2, 30, 40)).astype(np.float32)
    tifffile.imwrite(tmp_path / "img" / "s1.tif", sar, compression="lzw", planarconfig="separate",
                     photometric="minisblack")
    Image.fromarray((sar[0] > 100).astype(np.uint8)).save(tmp_path / "gt" / "s1.png")
    norm = Normalisation(db=True, percentiles=(2.0, 98.0))
    report = write_folder_shards(tmp_path / "img", tmp_path / "gt", tmp_path / "out", normalisation=norm)
    sample = shard_members(report.shards)["s1"]
    stored = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
    np.testing.assert_array_equal(stored, norm.apply(read_pixels(tmp_path / "img" / "s1.tif")))
    meta = json.loads(sample["json"])
    assert meta["normalisation"] == norm.to_dict() and meta["source_size"] == [40, 30]
    assert meta["source_dtype"] == "float32" and meta["source_channels"] == 2


def test_cvc_and_drive_suffixes_and_one_shard_per_image(tmp_path, capsys):
    cvc = tmp_path / "CVC-612"
    (cvc / "Original").mkdir(parents=True)
    (cvc / "Ground Truth").mkdir()
    for i in (1, 2, 3):
        Image.fromarray(rgb(20, 24, seed=i)).save(cvc / "Original" / f"{i}_fram.png")
        Image.fromarray(np.eye(20, 24, dtype=np.uint8) * 255).save(cvc / "Ground Truth" / f"{i}_mask.png")
    code = shards_main(["seg", "--images", str(cvc / "Original"), "--masks", str(cvc / "Ground Truth"),
                        "--image-suffix", "_fram", "--mask-suffix", "_mask", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert f"wrote 3 samples in 3 shards to {tmp_path / 'out'} ({tmp_path / 'out'}/seg-{{000000..000002}}.tar)" in out
    drive = tmp_path / "DRIVE" / "training"
    for d in ("images", "1st_manual", "mask"):
        (drive / d).mkdir(parents=True)
    for n in (21, 22):
        Image.fromarray(rgb(20, 24, seed=n)).save(drive / "images" / f"{n}_training.tif")
        Image.fromarray(np.eye(20, 24, dtype=np.uint8) * 255).save(drive / "1st_manual" / f"{n}_manual1.gif")
        Image.fromarray(np.full((20, 24), 255, np.uint8)).save(drive / "mask" / f"{n}_training_mask.gif")
    code = shards_main(["seg", "--images", str(drive / "images"), "--masks", str(drive / "1st_manual"),
                        "--image-suffix", "_training", "--mask-suffix", "_manual1", "--fov", str(drive / "mask"),
                        "--fov-suffix", "_training_mask", "--out", str(tmp_path / "drive")])
    assert code == 0
    samples = shard_members(sorted(str(p) for p in (tmp_path / "drive").glob("*.tar")))
    assert set(samples) == {"21_training", "22_training"} and set(samples["21_training"]) == {
        "png", "mask.png", "fov.png", "json"}


def test_task_records_the_shards_scale_and_normalisation(tmp_path):
    from mm.tasks import get_task
    from mm.tasks.segmentation import data_provenance

    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    for i, side in enumerate((100, 200, 300)):
        Image.fromarray(rgb(side // 2, side, seed=i)).save(tmp_path / "img" / f"{i}.png")
        Image.fromarray(np.zeros((side // 2, side), np.uint8)).save(tmp_path / "gt" / f"{i}.png")
    report = write_folder_shards(tmp_path / "img", tmp_path / "gt", tmp_path / "out", max_size=64,
                                 normalisation=Normalisation("always"))
    cfg = get_task("topolora_sam").config_class()
    cfg.model.image_size = 64
    cfg.data.train = str(tmp_path / "out" / "seg-{000000..000002}.tar")
    assert len(report.shards) == 3
    record = data_provenance(cfg)
    assert record["train_scale"] == pytest.approx(64 / 200)  # median of 64/100, 64/200, 64/300
    assert record["normalisation"] == Normalisation("always").to_dict() and record["samples_read"] == 3


# ---------------------------------------------------------------------------------------------------
# Derived field of view


def fundus_on(background: np.ndarray, size: int = 120) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    disc = np.hypot(yy - size / 2, xx - size / 2) < size * 0.42
    image = background.copy()
    image[disc] = (150, 70, 30)
    return image, disc


def test_derived_fov_does_not_spill_into_a_grey_background():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    size = 120
    background = np.zeros((size, size, 3), np.uint8)
    background[..., 0] = rng.integers(15, 35, (size, size))  # a grey, noisy frame around the old level 20
    background[59:61, :] = (60, 20, 10)  # a thin bright reflection from the disc to the frame's edges
    image, disc = fundus_on(background, size)
    labels, _ = ndimage.label(image[..., 0] > 20)  # the old rule: red > 20, largest region
    old = labels == np.bincount(labels.ravel())[1:].argmax() + 1
    assert old.sum() > 1.5 * disc.sum()  # it spilled into the frame
    fov = derive_fov(image)
    iou = (fov & disc).sum() / (fov | disc).sum()
    assert iou > 0.97
    flat = np.full((size, size, 3), 90, np.uint8)
    with pytest.raises(DataError, match="covers"):
        derive_fov(flat)


# ---------------------------------------------------------------------------------------------------
# Memory


def test_tiling_a_large_image_keeps_memory_near_its_size():
    """Peak RSS growth while tiling a 4000 x 4000 image (bench/seg_memory.py, a 1x1-conv stand-in
    model): the pipeline keeps the uint8 image, one float32 sum and weight per pixel, the probability
    map and the mask, about 13 bytes per pixel; a float copy of the image alone would add 12."""
    import os
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "bench/seg_memory.py", "--side", "4000", "--tile", "512"], cwd=root,
                          capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    per_pixel = float(re.search(r"= ([\d.]+) bytes per pixel", proc.stdout).group(1))
    assert per_pixel < 20, proc.stdout
