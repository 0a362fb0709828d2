"""The data half of "never lose or mislabel a user's work": mm-shards writes whole shard sets or none,
16-bit images are neither stored clipped nor read clipped, the feature cache deletes only itself."""

from __future__ import annotations

import csv
import io
import sys

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mm.data.cli import main as shards_main


def _run(main, argv, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mm"])  # no --debug from pytest's own command line
    monkeypatch.delenv("MM_DEBUG", raising=False)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def _images(root, n):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (8, 8), (10 * i, 20, 30)).save(root / f"im{i}.png")
        rows.append((f"im{i}.png", f"caption {i}"))
    return rows


def _csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        w.writerows(rows)


def _listing(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- 7: a failure half-way leaves no shard under a final name, and keeps the shards it would replace


def test_bad_line_late_in_captions_leaves_no_partial_shards(tmp_path, capsys, monkeypatch):
    rows = _images(tmp_path / "img", 6)
    # A field over csv's limit is a csv.Error raised only when the reader reaches that line.
    _csv(tmp_path / "caps.csv", rows + [("im0.png", "x" * 200_000)])
    out = tmp_path / "out"
    code, cap = _run(shards_main, ["folder", "--images", str(tmp_path / "img"), "--captions",
                                   str(tmp_path / "caps.csv"), "--out", str(out), "--shard-size", "2"],
                     capsys, monkeypatch)
    assert code == 2 and "not valid CSV" in cap.err and "Traceback" not in cap.err
    assert not out.exists()  # created by this run, so removed with the partial shards

    # Same failure over an existing set with --overwrite: the old set is still there, untouched.
    _csv(tmp_path / "good.csv", rows[:3])
    assert shards_main(["folder", "--images", str(tmp_path / "img"), "--captions", str(tmp_path / "good.csv"),
                        "--out", str(out), "--shard-size", "1"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    code, cap = _run(shards_main, ["folder", "--images", str(tmp_path / "img"), "--captions",
                                   str(tmp_path / "caps.csv"), "--out", str(out), "--shard-size", "2",
                                   "--overwrite"], capsys, monkeypatch)
    assert code == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_full_disk_half_way_leaves_no_partial_shards(tmp_path, capsys, monkeypatch):
    rows = _images(tmp_path / "img", 6)
    _csv(tmp_path / "caps.csv", rows)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    real_write, calls = wds.TarWriter.write, []

    def write(self, obj):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(28, "No space left on device", str(out / "x"))
        return real_write(self, obj)

    monkeypatch.setattr(wds.TarWriter, "write", write)
    code, cap = _run(shards_main, ["folder", "--images", str(tmp_path / "img"), "--captions",
                                   str(tmp_path / "caps.csv"), "--out", str(out), "--shard-size", "2"],
                     capsys, monkeypatch)
    assert code == 2 and "No space left" in cap.err and "Traceback" not in cap.err
    assert _listing(out) == ["notes.txt"]  # the folder was the user's: kept, with what they put there


def test_overwrite_replaces_the_whole_set_and_says_so(tmp_path, capsys, monkeypatch):
    rows = _images(tmp_path / "img", 4)
    _csv(tmp_path / "four.csv", rows)
    _csv(tmp_path / "two.csv", rows[:2])
    out = tmp_path / "out"
    args = ["folder", "--images", str(tmp_path / "img"), "--out", str(out), "--shard-size", "1"]
    assert shards_main(args + ["--captions", str(tmp_path / "four.csv")]) == 0
    capsys.readouterr()
    code, cap = _run(shards_main, args + ["--captions", str(tmp_path / "two.csv"), "--overwrite"], capsys,
                     monkeypatch)
    assert code == 0
    assert "replaced 4 existing 'shard-*.tar' shard(s)" in cap.err
    # The stale shards 2 and 3 of the old set are gone: a glob over the folder sees only the new set.
    assert _listing(out) == ["shard-000000.tar", "shard-000001.tar"]
    assert [s["txt"] for s in wds.WebDataset(sorted(map(str, out.iterdir())), shardshuffle=False)] == \
        [b"caption 0", b"caption 1"]


def test_partial_shards_of_a_killed_run_are_cleared(tmp_path):
    rows = _images(tmp_path / "img", 2)
    _csv(tmp_path / "caps.csv", rows)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".shard-000007.tar.partial").write_bytes(b"half a tar")
    assert shards_main(["folder", "--images", str(tmp_path / "img"), "--captions", str(tmp_path / "caps.csv"),
                        "--out", str(out)]) == 0
    assert _listing(out) == ["shard-000000.tar"]


# --- 6: 16-bit images


def _gradient16(path):
    # Values spread over the whole 16-bit range: clipped to 8 bits nearly every pixel is 255.
    arr = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(arr).save(path)
    return arr


def test_16bit_png_is_stretched_and_counted(tmp_path, capsys, monkeypatch):
    (tmp_path / "img").mkdir()
    arr = _gradient16(tmp_path / "img" / "deep.png")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "img" / "plain.png")
    _csv(tmp_path / "caps.csv", [("deep.png", "a gradient"), ("plain.png", "plain")])
    code, cap = _run(shards_main, ["folder", "--images", str(tmp_path / "img"), "--captions",
                                   str(tmp_path / "caps.csv"), "--out", str(tmp_path / "out")], capsys, monkeypatch)
    assert code == 0
    assert "1 image(s) had 16-bit or float pixels: stored as 8 bits" in cap.out
    sample = next(s for s in wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False)
                  if s["__key__"] == "deep")
    stored = np.asarray(Image.open(io.BytesIO(sample["png"])))
    assert stored.dtype == np.uint8
    # Independent reference: the 1st..99th percentile stretch of the source, computed here with numpy.
    lo, hi = np.percentile(arr.astype(np.float64), [1, 99])
    expected = np.clip((arr - lo) / (hi - lo) * 255, 0, 255).round()
    assert np.abs(stored.astype(float) - expected).max() <= 1
    assert (stored == 255).mean() < 0.05  # clipped, 99.6% would be


def test_loader_does_not_clip_a_16bit_png_already_in_a_shard(tmp_path):
    from mm.data.image_text import decode_image

    arr = _gradient16(tmp_path / "deep.png")
    image = np.asarray(decode_image({"png": (tmp_path / "deep.png").read_bytes(), "__key__": "deep"}))
    assert image.shape == (64, 64, 3)
    assert (image == 255).mean() < 0.05
    # Order is kept: a brighter source pixel is never darker after decoding.
    flat = image[..., 0].ravel()[np.argsort(arr.ravel(), kind="stable")]
    assert (np.diff(flat.astype(int)) >= 0).all()
