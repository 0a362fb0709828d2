"""Dataset readers: tiny trees in each dataset's own layout and file formats, to shards and back."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mm.data.seg_readers import (
    derive_fov,
    read_chase_db1,
    read_drive,
    read_kvasir_seg,
    read_sl_ssdd,
    read_stare,
    write_dataset_shards,
)
from mm.errors import DataError, UserError

W, H = 40, 32


def read_back(shards: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """{key: {field: decoded array}} from the written tars."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                if field == "json":
                    out.setdefault(key, {})[field] = json.loads(tar.extractfile(member).read())
                    continue
                image = Image.open(io.BytesIO(tar.extractfile(member).read()))
                assert image.format == "PNG"
                out.setdefault(key, {})[field] = np.asarray(image)
    return out


def pattern(seed: int, w: int = W, h: int = H) -> np.ndarray:
    """A 0/255 mask of 8x8 blocks (aligned to JPEG blocks, so JPEG masks threshold back exactly)."""
    blocks = np.random.default_rng(seed).random((h // 8, w // 8)) > 0.5
    return np.kron(blocks, np.ones((8, 8), dtype=bool))


def rgb(seed: int, w: int = W, h: int = H) -> np.ndarray:
    return np.random.default_rng(100 + seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def fundus(w: int = W, h: int = H) -> tuple[np.ndarray, np.ndarray]:
    """A bright reddish disc on black with a dark 'vessel' across it; the disc is the expected FOV."""
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 2 - 2) ** 2
    image = np.zeros((h, w, 3), np.uint8)
    image[disc] = (180, 90, 40)
    image[h // 2, w // 4: 3 * w // 4] = (15, 8, 4)  # a dark 'vessel' inside the disc
    return image, disc


def save(path: Path, array: np.ndarray, fmt: str | None = None, **kw) -> Path:
    """uint8 arrays become L/RGB images, uint16 'I;16', float32 'F' (PIL's modes for 16-bit/float TIFF)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if path.suffix == ".gz":
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        path.write_bytes(gzip.compress(buf.getvalue()))
    else:
        image.save(path, format=fmt, **kw)
    return path


def mask255(m: np.ndarray) -> np.ndarray:
    return np.where(m, 255, 0).astype(np.uint8)


def test_drive(tmp_path):
    root = tmp_path / "DRIVE"
    for split, num in (("training", 21), ("test", 1)):
        base = root / split
        save(base / "images" / f"{num:02d}_{split}.tif", rgb(num), "TIFF")
        save(base / "1st_manual" / f"{num:02d}_manual1.gif", mask255(pattern(num)), "GIF")
        save(base / "mask" / f"{num:02d}_{split}_mask.gif", mask255(pattern(num + 50)), "GIF")
    save(root / "test" / "2nd_manual" / "01_manual2.gif", mask255(pattern(77)), "GIF")
    save(root / "training" / "images" / "22_training.tif", rgb(22), "TIFF")  # no label: skipped

    assert [s.image.name for s in read_drive(root, "all")] == ["21_training.tif", "01_test.tif"]
    report = write_dataset_shards("DRIVE", root, tmp_path / "out", split="train")
    assert report.written == 1 and report.skipped[0][0].endswith("22_training.tif")
    sample = read_back(report.shards)["21_training"]
    assert np.array_equal(sample["png"], rgb(21))
    assert np.array_equal(sample["mask.png"], mask255(pattern(21)))
    assert np.array_equal(sample["fov.png"], mask255(pattern(71)))

    test = write_dataset_shards("drive", root, tmp_path / "out", split="test", annotator=2)
    assert Path(test.shards[0]).name == "drive-test-000000.tar"
    assert np.array_equal(read_back(test.shards)["01_test"]["mask.png"], mask255(pattern(77)))
    with pytest.raises(UserError, match="split"):
        read_drive(root, "val")

    # The same through the command line: `mm-shards dataset`.
    from mm.data.cli import main

    # 1 as mm-segment: one image was skipped (no label), the other written
    assert main(["dataset", "--name", "DRIVE", "--root", str(root), "--out", str(tmp_path / "cli")]) == 1
    assert (tmp_path / "cli" / "drive-train-000000.tar").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["dataset", "--name", "nope", "--root", str(root), "--out", str(tmp_path / "cli")])
    assert exit_info.value.code == 2


def test_stare_ppm_and_gzip_with_derived_fov(tmp_path):
    root = tmp_path / "STARE"
    image, disc = fundus()
    save(root / "stare-images" / "im0001.ppm", image, "PPM")
    save(root / "stare-images" / "im0002.ppm.gz", image, "PPM")
    save(root / "stare-images" / "im0003.ppm", image, "PPM")  # unlabelled, as most STARE images
    save(root / "labels-ah" / "im0001.ah.ppm", mask255(pattern(1)), "PPM")
    save(root / "labels-ah" / "im0002.ah.ppm.gz", mask255(pattern(2)), "PPM")
    save(root / "labels-vk" / "im0001.vk.ppm", mask255(pattern(3)), "PPM")

    samples = read_stare(root, "all")
    assert [s.image.name for s in samples] == ["im0001.ppm", "im0002.ppm.gz"]
    assert np.array_equal(samples[0].fov, disc)  # the dark line inside the disc stays in the FOV
    assert [s.image.name for s in read_stare(root, "test", test_count=1)] == ["im0002.ppm.gz"]

    report = write_dataset_shards("stare", root, tmp_path / "out", split="all")
    back = read_back(report.shards)
    assert set(back) == {"im0001", "im0002"}
    assert np.array_equal(back["im0002"]["png"], image)
    assert np.array_equal(back["im0002"]["mask.png"], mask255(pattern(2)))
    assert np.array_equal(back["im0001"]["fov.png"], mask255(disc))
    vk = write_dataset_shards("stare", root, tmp_path / "vk", split="all", annotator="vk",
                              derive_fov_mask=False)
    assert set(read_back(vk.shards)["im0001"]) == {"png", "mask.png", "json"}
    assert np.array_equal(read_back(vk.shards)["im0001"]["mask.png"], mask255(pattern(3)))


def test_chase_db1_one_folder_two_annotators(tmp_path):
    root = tmp_path / "CHASEDB1"
    image, disc = fundus(48, 40)
    for i, name in enumerate(["Image_01L", "Image_01R", "Image_02L"]):
        save(root / f"{name}.jpg", image, "JPEG", quality=95)
        save(root / f"{name}_1stHO.png", mask255(pattern(i, 48, 40)), "PNG")
        save(root / f"{name}_2ndHO.png", mask255(pattern(10 + i, 48, 40)), "PNG")

    train = read_chase_db1(root, "train", test_count=1)
    assert [s.image.name for s in train] == ["Image_01L.jpg", "Image_01R.jpg"]
    report = write_dataset_shards("CHASE_DB1", root, tmp_path / "out", split="test", test_count=1,
                                  annotator=2)
    back = read_back(report.shards)
    assert list(back) == ["Image_02L"]
    sample = back["Image_02L"]
    assert sample["png"].shape == (40, 48, 3)
    assert np.array_equal(sample["mask.png"], mask255(pattern(12, 48, 40)))
    # JPEG noise on the black background stays below the threshold: the FOV is the disc (JPEG blurs
    # its edge by about a pixel, a lot at this size)
    fov = sample["fov.png"] > 0
    assert (fov & disc).sum() / (fov | disc).sum() > 0.9


def test_kvasir_seg_jpeg_masks_thresholded(tmp_path):
    root = tmp_path / "Kvasir-SEG"
    for i, name in enumerate(["cju0qkwl35piu0993l0dewei2", "cju0roawvklrq0799vmjorwfv"]):
        save(root / "images" / f"{name}.jpg", rgb(i), "JPEG", quality=90)
        save(root / "masks" / f"{name}.jpg", mask255(pattern(i)), "JPEG", quality=75)
    save(root / "images" / "orphan.jpg", rgb(9), "JPEG")

    skipped: list = []
    assert len(read_kvasir_seg(root, "all", skipped=skipped)) == 2 and "orphan.jpg" in skipped[0][0]
    report = write_dataset_shards("kvasir", root, tmp_path / "out", split="all", max_size=20)
    back = read_back(report.shards)
    sample = back["cju0qkwl35piu0993l0dewei2"]
    assert sample["png"].shape == (16, 20, 3) and sample["mask.png"].shape == (16, 20)
    assert set(np.unique(sample["mask.png"])) <= {0, 255}
    full = write_dataset_shards("kvasir", root, tmp_path / "full", split="all")
    mask = read_back(full.shards)["cju0roawvklrq0799vmjorwfv"]["mask.png"]
    assert np.array_equal(mask, mask255(pattern(1)))


def test_sl_ssdd_16bit_and_float_sar(tmp_path):
    root = tmp_path / "SL-SSDD"
    ramp = np.linspace(0, 1, W * H).reshape(H, W)
    save(root / "images" / "chip16.tif", (ramp * 4000 + 100).astype(np.uint16), "TIFF")
    save(root / "images" / "chipf.tif", (ramp * 3.5 - 1).astype(np.float32), "TIFF")
    save(root / "images" / "chip8.png", (ramp * 255).astype(np.uint8), "PNG")
    for i, name in enumerate(["chip16", "chipf", "chip8"]):
        save(root / "masks" / f"{name}.png", mask255(pattern(i)), "PNG")
    assert Image.open(root / "images" / "chip16.tif").mode.startswith("I;16")
    assert Image.open(root / "images" / "chipf.tif").mode == "F"

    report = write_dataset_shards("SL-SSDD", root, tmp_path / "out", split="all")
    back = read_back(report.shards)
    for i, key in enumerate(["chip16", "chipf", "chip8"]):
        image = back[key]["png"]
        assert image.shape == (H, W) and image.dtype == np.uint8
        assert np.array_equal(back[key]["mask.png"], mask255(pattern(i)))  # sea = 255 = foreground
    for key in ("chip16", "chipf"):  # percentile stretch: full 8-bit range, monotone like the input ramp
        image = back[key]["png"].astype(int).ravel()
        assert image.min() == 0 and image.max() == 255 and np.all(np.diff(image) >= 0)

    land = write_dataset_shards("sl_ssdd", root, tmp_path / "land", split="all", foreground="land")
    assert np.array_equal(read_back(land.shards)["chip8"]["mask.png"], mask255(~pattern(2)))
    assert [s.image.name for s in read_sl_ssdd(root, "test")] == ["chipf.tif"]  # last 20 % of 3 -> 1


def test_own_split_folders_and_errors(tmp_path):
    root = tmp_path / "kv"
    for split in ("train", "test"):
        save(root / split / "images" / f"{split}1.jpg", rgb(1), "JPEG")
        save(root / split / "masks" / f"{split}1.jpg", mask255(pattern(1)), "JPEG")
    assert [s.image.name for s in read_kvasir_seg(root, "test")] == ["test1.jpg"]

    bad = tmp_path / "bad"
    save(bad / "images" / "a.jpg", rgb(1), "JPEG")
    save(bad / "masks" / "a.png", mask255(pattern(1, 24, 16)), "PNG")  # another size than the image
    with pytest.raises(DataError, match="no usable samples"):
        write_dataset_shards("kvasir", bad, tmp_path / "out", split="all")
    with pytest.raises(UserError, match="does not exist"):
        read_drive(tmp_path / "missing")
    with pytest.raises(UserError, match="no STARE labels-ah folder"):
        read_stare(bad)
    with pytest.raises(UserError, match="unknown segmentation dataset"):
        write_dataset_shards("isic", bad, tmp_path / "out")


def test_derive_fov_rule():
    image, disc = fundus()
    noisy = image.copy()
    noisy[0, 0] = (60, 60, 60)  # an isolated bright pixel outside the disc is not the largest region
    assert np.array_equal(derive_fov(noisy), disc)
