"""Shard writers and mm-shards: bad samples are skipped and reported, the rest read back as promised."""

import csv
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mm.data.cli import main
from mm.data.seg_readers import write_folder_shards
from mm.data.shards import write_coco_shards, write_image_text_shards
from mm.errors import DataError, UserError


def read_shards(shards):
    return {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}


def save(path, size=(24, 16), colour=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def decoded(data):
    return Image.open(io.BytesIO(data))


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "images"
    save(root / "cat.png")
    save(root / "sub" / "dog.v2.jpg", colour=(30, 200, 30))
    save(root / "scan.tif", size=(40, 20))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return root


ROWS = [("cat.png", "a cat", "3"), ("sub/dog.v2.jpg", "a dog", "5"), ("scan.tif", "a scan", "1"),
        ("broken.jpg", "corrupt", "0"), ("missing.png", "not there", "2")]


def check_folder_report(report, image_dir, out):
    assert report.written == 3
    reasons = dict(report.skipped)
    assert reasons[str(image_dir / "missing.png")] == "missing file"
    assert reasons[str(image_dir / "broken.jpg")].startswith("cannot decode image")
    samples = read_shards(report.shards)
    assert set(samples) == {"cat", "sub_dog_v2", "scan"}  # keys without dots
    for shard in report.shards:  # plain ustar members: a pax header per member would double the parse cost
        with tarfile.open(shard) as tar:
            assert all(not m.pax_headers and isinstance(m.mtime, int) for m in tar.getmembers())
    # Original bytes are kept for shard formats; other formats (TIFF) become PNG.
    assert samples["cat"]["png"] == (image_dir / "cat.png").read_bytes()
    assert samples["sub_dog_v2"]["jpg"] == (image_dir / "sub" / "dog.v2.jpg").read_bytes()
    assert decoded(samples["scan"]["png"]).size == (40, 20)
    assert samples["sub_dog_v2"]["txt"] == b"a dog"
    return samples


def test_folder_csv_skips_corrupt_and_missing_images(tmp_path, image_dir):
    captions = tmp_path / "captions.csv"
    with open(captions, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption", "label", "source"])
        writer.writerows([(p, c, label, "web") for p, c, label in ROWS])
    report = write_image_text_shards(image_dir, captions, tmp_path / "out", shard_size=2)
    samples = check_folder_report(report, image_dir, tmp_path / "out")
    assert len(report.shards) == 2
    assert json.loads(samples["cat"]["json"]) == {"label": 3, "source": "web"}


def test_folder_jsonl_reports_bad_lines(tmp_path, image_dir):
    captions = tmp_path / "captions.jsonl"
    lines = [json.dumps({"image": p, "text": c, "tags": ["x", int(label)]}) for p, c, label in ROWS]
    captions.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    report = write_image_text_shards(image_dir, captions, tmp_path / "out")
    samples = check_folder_report(report, image_dir, tmp_path / "out")
    assert (f"{captions}:3", "not a JSON object") in report.skipped
    assert json.loads(samples["sub_dog_v2"]["json"]) == {"tags": ["x", 5]}


def test_folder_reencodes_and_shrinks_on_request(tmp_path, image_dir):
    captions = tmp_path / "c.csv"
    captions.write_text("image,text\ncat.png,a cat\n")
    report = write_image_text_shards(image_dir, captions, tmp_path / "out", reencode="webp", max_size=12)
    image = decoded(read_shards(report.shards)["cat"]["webp"])
    assert (image.format, image.size) == ("WEBP", (12, 8))


def test_captions_file_without_known_columns_is_a_user_error(tmp_path, image_dir):
    captions = tmp_path / "c.csv"
    captions.write_text("path,description\ncat.png,a cat\n")
    with pytest.raises(UserError, match=r"c\.csv.*filepath or image.*found path, description"):
        write_image_text_shards(image_dir, captions, tmp_path / "out")
    captions.write_text("filepath,caption\nbroken.jpg,x\n")
    with pytest.raises(DataError, match="no usable samples"):
        write_image_text_shards(image_dir, captions, tmp_path / "out")


def test_existing_shards_are_replaced_only_with_overwrite(tmp_path, image_dir):
    captions = tmp_path / "c.csv"
    captions.write_text("filepath,caption\ncat.png,a\nscan.tif,b\nsub/dog.v2.jpg,c\n")
    out = tmp_path / "out"
    assert len(write_image_text_shards(image_dir, captions, out, shard_size=1).shards) == 3
    with pytest.raises(UserError, match="--overwrite"):
        write_image_text_shards(image_dir, captions, out)
    report = write_image_text_shards(image_dir, captions, out, overwrite=True)
    # The stale shards of the first run are gone, not left to be mixed into the new set.
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]
    assert report.shards == [str(out / "shard-000000.tar")]


def test_coco_groups_all_captions_per_image(tmp_path, image_dir):
    annotations = tmp_path / "captions.json"
    annotations.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "cat.png"}, {"id": 2, "file_name": "sub/dog.v2.jpg"},
                   {"id": 3, "file_name": "scan.tif"}],
        "annotations": [{"image_id": 1, "caption": "a cat"}, {"image_id": 2, "caption": "a dog"},
                        {"image_id": 1, "caption": "a red square"}, {"image_id": 1, "caption": "red"}]}))
    report = write_coco_shards(annotations, image_dir, tmp_path / "out")
    samples = read_shards(report.shards)
    assert report.written == 2 and report.skipped == [(str(image_dir / "scan.tif"), "no captions")]
    assert samples["cat"]["txt"] == b"a cat"
    assert json.loads(samples["cat"]["json"]) == {"captions": ["a cat", "a red square", "red"], "image_id": 1}
    assert json.loads(samples["sub_dog_v2"]["json"])["captions"] == ["a dog"]


def test_segmentation_binarises_masks_and_skips_mismatches(tmp_path):
    images, masks, fovs = tmp_path / "images", tmp_path / "masks", tmp_path / "fov"
    for name in ("a", "b", "c", "d"):
        save(images / f"{name}.jpg", size=(20, 10))
        save(fovs / f"{name}_fov.gif", size=(20, 10), colour=255, mode="L")
    grey = np.zeros((10, 20), np.uint8)
    grey[:, 5:10], grey[:, 10:15] = 100, 200  # two labels: both are foreground
    masks.mkdir()
    Image.fromarray(grey).save(masks / "a_manual1.png")
    save(masks / "b_manual1.png", size=(10, 10), colour=255, mode="L")
    ones = np.zeros((10, 20), np.uint8)
    ones[:3] = 1  # a 0/1 label map
    Image.fromarray(ones).save(masks / "d_manual1.png")

    report = write_folder_shards(images, masks, tmp_path / "out", fov_dir=fovs,
                                 mask_suffix="_manual1", fov_suffix="_fov")
    reasons = dict(report.skipped)
    assert reasons == {str(images / "b.jpg"): "mask b_manual1.png is 10x10 but the image is 20x10",
                       str(images / "c.jpg"): f"no mask named c_manual1.* in {masks}"}
    samples = read_shards(report.shards)
    assert set(samples) == {"a", "d"}
    mask_a = np.asarray(decoded(samples["a"]["mask.png"]))
    assert decoded(samples["a"]["png"]).format == "PNG"
    assert mask_a.dtype == np.uint8 and set(np.unique(mask_a)) == {0, 255}
    assert (mask_a[:, 5:15] == 255).all() and not mask_a[:, :5].any() and not mask_a[:, 15:].any()
    assert report.notes == [("masks: 5 read: 4 binary (foreground = non-zero); 1 with several non-zero values "
                            "(e.g. a_manual1.png): every non-zero label is foreground (anti-aliased "
                            "drawings: --mask-threshold 127)")]
    assert (np.asarray(decoded(samples["d"]["mask.png"]))[:3] == 255).all()
    assert set(np.unique(np.asarray(decoded(samples["d"]["fov.png"])))) == {255}


def test_cli_missing_input_dir_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mm.data.cli", "seg", "--images", str(tmp_path / "nope"),
         "--masks", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    expected = f"error: image folder {tmp_path / 'nope'} does not exist"
    assert result.stderr.strip().splitlines() == [expected]


def test_cli_prints_summary_and_json(tmp_path, image_dir, capsys):
    captions = tmp_path / "c.csv"
    captions.write_text("filepath,caption\ncat.png,a cat\nbroken.jpg,x\n")
    code = main(["folder", "--images", str(image_dir), "--captions", str(captions), "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    shard = tmp_path / "o" / "shard-000000.tar"
    assert out.startswith(f"wrote 1 samples in 1 shards to {tmp_path / 'o'} ({shard}); skipped 1:")
    assert code == 1  # some inputs skipped, as mm-segment
    assert "broken.jpg: cannot decode image" in out

    main(["folder", "--images", str(image_dir), "--captions", str(captions), "--out", str(tmp_path / "o"),
          "--overwrite", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["written"] == 1 and result["skipped"][0]["path"].endswith("broken.jpg")
    with pytest.raises(SystemExit) as exit_info:
        main(["folder", "--images", str(image_dir), "--captions", str(tmp_path / "none.csv"), "--out", "o"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: captions file")
