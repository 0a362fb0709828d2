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


# --- 1: mm-structure cache --overwrite deletes only a cache, and only once the new one is complete


def _cache_args(shapes, cache, train=None):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sets = [f"data.train={train or shapes['train'].replace('000007', '000001')}", f"cache.dir={cache}",
            "cache.num_workers=0", "cache.batch_size=40",
            "model.vision.args={img_size: 32, patch_size: 16, embed_dim: 16, depth: 1, num_heads: 2}",
            "model.text.args.text_cfg={context_length: 16, vocab_size: 49408, width: 16, heads: 2, layers: 1}"]
    return ["cache", "--config", str(root / "configs/structure/tiny.yaml")] + [a for s in sets for a in ("--set", s)]


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cache_overwrite_refuses_a_folder_that_is_not_a_cache(shapes, tmp_path, capsys, monkeypatch):
    from mm.tasks.structure_cli import main

    notes = tmp_path / "notes"
    (notes / "photos").mkdir(parents=True)
    (notes / "todo.txt").write_text("buy milk")
    Image.new("RGB", (4, 4)).save(notes / "photos" / "a.png")
    before = _tree(notes)
    code, cap = _run(main, _cache_args(shapes, notes) + ["--overwrite"], capsys, monkeypatch)
    assert code == 2 and "is not a feature cache" in cap.err and "nothing deleted" in cap.err
    assert _tree(notes) == before
    assert _listing(tmp_path) == ["notes"]


def test_cache_rebuild_keeps_the_old_cache_until_the_new_one_is_complete(shapes, tmp_path, capsys, monkeypatch):
    from mm.data import feature_cache
    from mm.data.feature_cache import FeatureCache
    from mm.tasks.structure_cli import main

    cache = tmp_path / "cache"
    assert _run(main, _cache_args(shapes, cache), capsys, monkeypatch)[0] == 0
    built = _tree(cache)
    assert len(FeatureCache(cache)) == 80

    # A mistyped shard path: refused before anything is touched.
    code, cap = _run(main, _cache_args(shapes, cache, train=str(tmp_path / "typo-{000000..000001}.tar"))
                     + ["--overwrite"], capsys, monkeypatch)
    assert code == 2 and "typo-000000.tar" in cap.err
    assert _tree(cache) == built

    # A failure in the middle of the rebuild (a full disk while writing a part): old cache intact.
    def full_disk(tensors, path):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(feature_cache, "save_file", full_disk)
    code, cap = _run(main, _cache_args(shapes, cache) + ["--overwrite"], capsys, monkeypatch)
    assert code == 2 and "No space left" in cap.err
    assert _tree(cache) == built and _listing(tmp_path) == ["cache"]
    # A first build that fails leaves none of the folders it made.
    code, cap = _run(main, _cache_args(shapes, tmp_path / "new" / "deep" / "cache"), capsys, monkeypatch)
    assert code == 2 and _listing(tmp_path) == ["cache"]
    monkeypatch.undo()

    # Without --overwrite: refused; with it: rebuilt, and said so.
    code, cap = _run(main, _cache_args(shapes, cache), capsys, monkeypatch)
    assert code == 2 and "--overwrite" in cap.err
    code, cap = _run(main, _cache_args(shapes, cache) + ["--overwrite"], capsys, monkeypatch)
    assert code == 0 and f"replaced the feature cache in {cache} (80 pairs)" in cap.err
    assert len(FeatureCache(cache)) == 80 and _listing(tmp_path) == ["cache"]


@pytest.mark.parametrize("damage", ["part-cut-short", "part-missing", "meta-cut-short", "meta-wrong-rows"])
def test_a_damaged_cache_is_a_one_line_error(shapes, tmp_path, capsys, monkeypatch, damage):
    import json

    from mm.data.feature_cache import FeatureCache
    from mm.errors import DataError
    from mm.tasks.structure_cli import main

    cache = tmp_path / "cache"
    assert _run(main, _cache_args(shapes, cache), capsys, monkeypatch)[0] == 0
    part, meta = cache / "part-000000.safetensors", cache / "meta.json"
    if damage == "part-cut-short":
        part.write_bytes(part.read_bytes()[:-100])
    elif damage == "part-missing":
        part.unlink()
    elif damage == "meta-cut-short":
        meta.write_text(meta.read_text()[:200])
    else:
        record = json.loads(meta.read_text())
        record["n"], record["keys"] = 79, record["keys"][:79]
        meta.write_text(json.dumps(record))
    with pytest.raises(DataError, match="damaged.*--overwrite"):
        FeatureCache(cache)
    # ... and a damaged cache is still recognisably ours: --overwrite rebuilds it.
    assert _run(main, _cache_args(shapes, cache) + ["--overwrite"], capsys, monkeypatch)[0] == 0
    assert len(FeatureCache(cache)) == 80


# --- 14: small writers and one-pass readers


def test_atomic_writer_leaves_no_tmp_when_the_write_fails(tmp_path, monkeypatch):
    import os

    from mm.errors import write_text_atomic

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_text_atomic(tmp_path / "result.json", "{}")
    assert _listing(tmp_path) == []


def test_atomic_writer_says_when_it_replaces_a_result(tmp_path, capsys):
    from mm.errors import write_text_atomic

    write_text_atomic(tmp_path / "r.json", "1", announce="--output")
    assert capsys.readouterr().err == ""
    write_text_atomic(tmp_path / "r.json", "2", announce="--output")
    assert f"--output: replacing {tmp_path / 'r.json'}" in capsys.readouterr().err
    assert (tmp_path / "r.json").read_text() == "2"


def test_a_one_pass_over_nothing_usable_is_an_error(tmp_path):
    from mm.data.loader import Loader, StreamSpec, default_collate
    from mm.errors import DataError

    (tmp_path / "notes.tar").write_text("not a tar archive")
    spec = StreamSpec(urls=str(tmp_path / "notes.tar"), sample_map=lambda raw, rng: raw, collate=default_collate,
                      batch_size=4, num_workers=0, shuffle_buffer=0, repeat=False, drop_last=False)
    with pytest.raises(DataError, match="no usable samples"):
        list(Loader(spec))
