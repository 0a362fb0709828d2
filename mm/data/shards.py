"""Writing WebDataset shards from an image folder with captions, COCO captions and segmentation folders.

Sample layout (the contract the loaders read):
  image-text:    __key__, jpg|png|webp (image bytes), txt (caption), json (metadata object)
  segmentation:  __key__, png (image), mask.png (8-bit, 0/255), optional fov.png (same)
Shards are `{out_dir}/{prefix}-%06d.tar`.

Image-text writers can store each caption's scene graph as json `scene_graph` (SceneGraph.to_dict,
as the shapes world writes it), so that Structure-CLIP training never parses captions.

A sample that cannot be used (missing or corrupt image, empty caption, mask of the wrong size) is
skipped and reported, never fatal; unusable input as a whole (no directory, no captions column,
nothing usable at all) raises a UserError naming the file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mm.errors import DataError, UserError
from mm.scenegraph.captions import analyse_caption
from mm.scenegraph.parse import caption_parser, resolve_parser

ENCODINGS = ("jpg", "png", "webp")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".gif", ".bmp", ".ppm",
                            ".pgm"})
_EXT_OF_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_FORMAT_OF_EXT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_MODES_FOR = {"jpg": ("L", "RGB"), "png": ("L", "LA", "RGB", "RGBA"), "webp": ("RGB", "RGBA")}
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_PATH_FIELDS = ("filepath", "image")
_CAPTION_FIELDS = ("caption", "text")


@dataclass
class ShardReport:
    """What a writer did: samples written, (path, reason) of each skipped input, shard paths."""

    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    scene_graphs: int | None = None  # samples whose json holds a scene_graph; None: graphs not asked for
    scene_graph_parser: str | None = None  # what --scene-graphs resolved to: spacy | simple | simple-complete
    # Captions without a hard negative, by reason (mm.scenegraph.captions); None: graphs not asked for.
    no_negative: dict[str, int] | None = None
    stretched: int = 0  # 16-bit or float images stored as 8 bits (1st..99th percentile stretch)
    notes: list[str] = field(default_factory=list)  # one-line accounts of what was done (mask rules...)


@dataclass
class EncodedImage:
    data: bytes
    ext: str  # "jpg" | "png" | "webp": the shard field name
    size: tuple[int, int]  # (width, height) as written
    source_size: tuple[int, int]  # (width, height) of the file, before any resize
    stretched: bool = False  # 16-bit or float pixels stretched to 8 bits


# ---------------------------------------------------------------------------------------------------
# Shared pieces: output directory, keys, images, the shard writer


def write_samples(samples: Iterable[dict[str, Any]], out_dir: str | os.PathLike, prefix: str,
                  shard_size: int, overwrite: bool = False) -> list[str]:
    """Write sample dicts (bytes values) to `{out_dir}/{prefix}-%06d.tar`; returns the shard paths.

    Existing shards with the same prefix are an error unless `overwrite`: a loader globbing the
    directory would otherwise mix stale shards into the new set. Shards are written under temporary
    names (`.{prefix}-%06d.tar.partial`) and renamed only once every sample is written, so a run that
    fails half-way (a bad input late in the list, a full disk, Ctrl-C) leaves no shard that looks
    complete and keeps the shards it would have replaced; replaced shards are reported on stderr.
    """
    if shard_size < 1:
        raise UserError(f"shard size must be at least 1, got {shard_size}")
    out = Path(out_dir)
    created = not out.exists()
    pattern = _prepare_out_dir(out, prefix, overwrite)
    partial: list[str] = []
    writer = None
    try:
        for sample in samples:
            if writer is None:  # opened lazily so that no input writes no empty shard
                # A whole-second mtime: webdataset's default (a float) makes tarfile add a pax header to
                # every member, which readers then parse: 2.7x the tar-parsing CPU of plain ustar members.
                writer = wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, post=partial.append,
                                         encoder=False, mtime=int(time.time()))
            writer.write(sample)
        if writer is not None:
            writer.close()
            writer = None
    except BaseException:
        if writer is not None:
            # e.g. the disk is full: the original error is the one to report
            with contextlib.suppress(Exception):
                writer.close()
        for path in _partial_shards(out, prefix):
            path.unlink(missing_ok=True)
        if created:
            _remove_empty_dirs(out)
        raise
    final = [str(Path(tmp).with_name(Path(tmp).name[1:].removesuffix(_PARTIAL))) for tmp in partial]
    old = _final_shards(out, prefix)
    for path in old:  # only now: a run that failed above kept them
        if str(path) not in final:
            path.unlink()
    for tmp, path in zip(partial, final):
        os.replace(tmp, path)
    if old:
        print(f"replaced {len(old)} existing '{prefix}-*.tar' shard(s) in {out}", file=sys.stderr)
    return final


_PARTIAL = ".partial"


def _final_shards(out_dir: Path, prefix: str) -> list[Path]:
    return sorted(p for p in out_dir.iterdir() if re.fullmatch(re.escape(prefix) + r"-\d{6}\.tar", p.name))


def _partial_shards(out_dir: Path, prefix: str) -> list[Path]:
    if not out_dir.is_dir():
        return []
    pattern = r"\." + re.escape(prefix) + r"-\d{6}\.tar" + re.escape(_PARTIAL)
    return sorted(p for p in out_dir.iterdir() if re.fullmatch(pattern, p.name))


def _remove_empty_dirs(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()  # only when empty: never removes anything a user put there meanwhile


def _prepare_out_dir(out_dir: Path, prefix: str, overwrite: bool) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]*", prefix):
        raise UserError(f"shard prefix {prefix!r} may only hold letters, digits, '_' and '-'")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output directory {out_dir} is a file")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out_dir}: {e.strerror or e}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(f"output directory {out_dir} is not writable")
    old = _final_shards(out_dir, prefix)
    if old and not overwrite:
        raise UserError(f"{out_dir} already holds {len(old)} '{prefix}-*.tar' shards; "
                        "pass --overwrite (overwrite=True) to replace them")
    for path in _partial_shards(out_dir, prefix):  # left by a run that was killed (SIGKILL, power loss)
        path.unlink()
    return str(out_dir / ("." + prefix)).replace("%", "%%") + "-%06d.tar" + _PARTIAL


def make_key(name: str, used: set[str]) -> str:
    """A unique shard key from a file name: webdataset splits the extension at the first dot, so
    dots (and anything else unusual) become '_'; a repeat gets a numeric suffix."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "sample"
    key, n = base, 1
    while key in used:
        n += 1
        key = f"{base}_{n}"
    used.add(key)
    return key


def fit_size(size: tuple[int, int], max_size: int | None) -> tuple[int, int]:
    """(width, height) scaled down so the longest side is at most max_size; never scaled up."""
    w, h = size
    if max_size is None or max(w, h) <= max_size:
        return size
    scale = max_size / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _open_image(path: Path) -> tuple[bytes, Image.Image]:
    """The file's bytes and its fully decoded image; DataError(reason) if missing or corrupt."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError("missing file") from None
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}") from None
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()  # checks structure (e.g. PNG CRCs) that decoding alone may not
        image = Image.open(io.BytesIO(data))
        image.load()  # verify() decodes no pixels, so truncated data only shows up here
    except Exception as e:  # noqa: BLE001 -- PIL raises many exception types for corrupt files
        raise DataError(f"cannot decode image: {e}") from None
    return data, image


def encode_image(path: str | os.PathLike, reencode: str | None = None,
                 max_size: int | None = None) -> EncodedImage:
    """An image file ready for a shard; DataError(reason) if it is missing or cannot be decoded.

    The original bytes are kept unless `reencode` names a format, `max_size` shrinks the image, the
    file's format is not one a shard holds (TIFF, GIF, BMP, PPM... become PNG) or its pixels have more
    than 8 bits: a 16-bit PNG kept as it is would be clipped to 8 bits by every image loader (PIL's
    convert("RGB") saturates at 255), so it is stretched here (`stretched` says so).
    """
    data, image = _open_image(Path(path))
    size = fit_size(image.size, max_size)
    kept = _EXT_OF_FORMAT.get(image.format or "")
    high_bit = image.mode in _HIGH_BIT_MODES
    if reencode is None and kept is not None and size == image.size and not high_bit:
        return EncodedImage(data, kept, size, image.size)
    fmt = reencode or kept or "png"
    try:
        converted = _mode_for(image, fmt)
        if size != converted.size:
            converted = converted.resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        converted.save(buf, format=_FORMAT_OF_EXT[fmt], **({"quality": 95} if fmt != "png" else {}))
    except Exception as e:  # noqa: BLE001 -- exotic modes or encoder limits: skip the file, not the run
        raise DataError(f"cannot re-encode as {fmt}: {e}") from None
    return EncodedImage(buf.getvalue(), fmt, size, image.size, stretched=high_bit)


def _mode_for(image: Image.Image, fmt: str) -> Image.Image:
    if image.mode in _HIGH_BIT_MODES:
        image = to_8bit(image)
    if image.mode in _MODES_FOR[fmt]:
        return image
    has_alpha = "A" in image.mode or "transparency" in image.info
    return image.convert("RGBA" if has_alpha and fmt != "jpg" else "RGB")


def to_8bit(image: Image.Image) -> Image.Image:
    # 16-bit and float images (SAR, some scanners) would clip when PIL converts them to 8 bits; stretch
    # the 1st..99th percentile instead, which also keeps a few bright outliers from darkening the rest.
    arr = np.asarray(image, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 0.0)
    scaled = (np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo) - lo) / max(hi - lo, 1e-12) * 255
    return Image.fromarray(np.clip(scaled, 0, 255).round().astype(np.uint8))


_to_8bit = to_8bit  # the name tests and older callers use


def _read_mask(path: Path) -> Image.Image:
    """A binary mask as 8-bit L with values 0/255; DataError(reason) if missing or corrupt."""
    _, image = _open_image(path)
    values = np.asarray(image, dtype=np.float64) if image.mode in _HIGH_BIT_MODES else np.asarray(image.convert("L"))
    # Some datasets store label maps as 0/1; a >127 threshold would silently empty them.
    foreground = values == 1 if values.max(initial=0) == 1 else values > 127
    return Image.fromarray(np.where(foreground, 255, 0).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _check_options(reencode: str | None, max_size: int | None) -> None:
    if reencode is not None and reencode not in ENCODINGS:
        raise UserError(f"re-encode format must be one of {', '.join(ENCODINGS)}, got {reencode!r}")
    if max_size is not None and max_size < 1:
        raise UserError(f"max size must be at least 1 pixel, got {max_size}")


def _existing(path: str | os.PathLike, what: str, is_dir: bool) -> Path:
    p = Path(path)
    if not (p.is_dir() if is_dir else p.is_file()):
        raise UserError(f"{what} {p} does not exist" if not p.exists() else
                        f"{what} {p} is not a {'directory' if is_dir else 'file'}")
    return p


def _finish(report: ShardReport, source: Path) -> ShardReport:
    if report.written == 0:
        detail = (f"; first skipped: {report.skipped[0][0]}: {report.skipped[0][1]}" if report.skipped
                  else " (it is empty)")
        raise DataError(f"no usable samples in {source}{detail}")
    return report


def _graph_maker(scene_graphs: str, report: ShardReport) -> Callable[[str], dict[str, Any] | None] | None:
    """A function from a caption to its scene graph's json form (None when it has none), counting in
    `report` the graphs made and the captions without a hard negative by reason; None for "none".

    Resolving the parser here, before any shard exists, makes "spacy" without its model fail with
    nothing written.
    """
    if scene_graphs == "none":
        return None
    report.scene_graph_parser = resolve_parser(scene_graphs, "--scene-graphs")
    parse = caption_parser(report.scene_graph_parser)
    report.scene_graphs = 0
    report.no_negative = {}

    def make(caption: str) -> dict[str, Any] | None:
        analysis = analyse_caption(caption, parse, report.scene_graph_parser)
        if analysis.reason:
            report.no_negative[analysis.reason] = report.no_negative.get(analysis.reason, 0) + 1
        return analysis.graph.to_dict() if analysis.graph else None

    return make


def _graph_adder(scene_graphs: str, report: ShardReport) -> Callable[[dict[str, Any], str], None]:
    """A function that adds the caption's scene graph to a sample's metadata, for --scene-graphs.

    A graph the input already provides is kept; an empty graph is not stored (the trainer would parse
    the caption again anyway).
    """
    make = _graph_maker(scene_graphs, report)
    if make is None:
        return lambda meta, caption: None

    def add(meta: dict[str, Any], caption: str) -> None:
        if not isinstance(meta.get("scene_graph"), dict):
            graph = make(caption)
            if graph is None:
                return
            meta["scene_graph"] = graph
        report.scene_graphs += 1

    return add


# ---------------------------------------------------------------------------------------------------
# Image folder + captions file (CSV or JSONL)


def write_image_text_shards(image_dir: str | os.PathLike, captions_file: str | os.PathLike,
                            out_dir: str | os.PathLike, shard_size: int = 1000,
                            reencode: str | None = None, max_size: int | None = None,
                            prefix: str = "shard", overwrite: bool = False,
                            progress: bool = False, scene_graphs: str = "none") -> ShardReport:
    """Image-text shards from `image_dir` and a CSV (header row) or JSONL captions file.

    Rows name the image (`filepath` or `image`, relative to image_dir or absolute) and its caption
    (`caption` or `text`); every other column goes into the sample's json metadata. `scene_graphs`
    (none | simple | spacy | auto, see mm.scenegraph.parse.resolve_parser) adds each caption's graph.
    """
    image_dir = _existing(image_dir, "image directory", is_dir=True)
    captions_file = _existing(captions_file, "captions file", is_dir=False)
    _check_options(reencode, max_size)
    records = _caption_records(captions_file)
    # Column names come from the first record (the CSV header, or the first JSONL object).
    head = list(itertools.islice(records, 1))
    fields = [k for k in (head[0][1] or {}) if k is not None] if head else []
    path_field = _pick_field(fields, _PATH_FIELDS, "image path", captions_file) if head else ""
    caption_field = _pick_field(fields, _CAPTION_FIELDS, "caption", captions_file) if head else ""
    report = ShardReport()
    add_graph = _graph_adder(scene_graphs, report)

    def samples() -> Iterator[dict[str, Any]]:
        used: set[str] = set()
        rows = tqdm(itertools.chain(head, records), desc="images", unit="img", disable=not progress)
        for lineno, record in rows:
            where = f"{captions_file}:{lineno}"
            if record is None:
                report.skipped.append((where, "not a JSON object"))
                continue
            rel, caption = record.get(path_field), record.get(caption_field)
            if not isinstance(rel, str) or not rel.strip():
                report.skipped.append((where, f"no {path_field}"))
                continue
            image_path = image_dir / rel.strip()
            if not isinstance(caption, str) or not caption.strip():
                report.skipped.append((str(image_path), "empty caption"))
                continue
            meta = {k: v for k, v in record.items() if k not in (None, path_field, caption_field)}
            if "label" in meta:
                label = _as_int(meta["label"])
                if label is None:
                    report.skipped.append((str(image_path), f"label {meta['label']!r} is not an integer"))
                    continue
                meta["label"] = label
            try:
                image = encode_image(image_path, reencode, max_size)
            except DataError as e:
                report.skipped.append((str(image_path), str(e)))
                continue
            report.written += 1
            report.stretched += image.stretched
            add_graph(meta, caption.strip())
            yield {"__key__": make_key(str(Path(rel.strip()).with_suffix("")), used),
                   image.ext: image.data, "txt": caption.strip().encode("utf-8"),
                   "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}

    report.shards = write_samples(samples(), out_dir, prefix, shard_size, overwrite)
    return _finish(report, captions_file)


def _caption_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, record) for each row of a CSV or JSONL file; None for a JSONL line that is not
    a JSON object (reported as skipped rather than failing the run)."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        raise UserError(f"captions file {path} must be .csv or .jsonl")
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark, which would garble the
        # first column name.
        with open(path, encoding="utf-8-sig", newline="") as f:
            if suffix == ".csv":
                reader = csv.DictReader(f)
                for row in reader:
                    yield reader.line_num, row
            else:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield lineno, _json_object(line)
    except UnicodeDecodeError:
        raise UserError(f"captions file {path} is not UTF-8 text") from None
    except csv.Error as e:
        raise UserError(f"captions file {path} is not valid CSV: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read captions file {path}: {e.strerror or e}") from None


def _json_object(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _pick_field(fields: list[str], names: tuple[str, ...], what: str, path: Path) -> str:
    for name in names:
        if name in fields:
            return name
    found = ", ".join(fields) or "no fields in the first record"
    raise UserError(f"{path}: no {what} column (expected {' or '.join(names)}; found {found})")


def _as_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


# ---------------------------------------------------------------------------------------------------
# COCO captions


def write_coco_shards(annotations_json: str | os.PathLike, image_dir: str | os.PathLike,
                      out_dir: str | os.PathLike, shard_size: int = 1000, reencode: str | None = None,
                      max_size: int | None = None, prefix: str = "coco", overwrite: bool = False,
                      progress: bool = False, scene_graphs: str = "none",
                      pair_per_caption: bool = False) -> ShardReport:
    """One image-text sample per COCO image: txt = its first caption, json `captions` = all of them
    (retrieval counts every caption of an image as correct; training draws one per epoch) and
    `image_id`; with `scene_graphs` also `scene_graphs`, one graph (or null) per caption, and
    `scene_graph`, the first caption's (for readers of the txt caption alone).

    pair_per_caption: one sample per caption instead (keys `<image>_<n>`, txt = that caption, json
    `captions` = [it]), for a task that must see every pair each epoch; not for retrieval, which needs
    an image's captions together."""
    annotations_json = _existing(annotations_json, "annotations file", is_dir=False)
    image_dir = _existing(image_dir, "image directory", is_dir=True)
    _check_options(reencode, max_size)
    images, captions = _read_coco(annotations_json)
    report = ShardReport()
    make_graph = _graph_maker(scene_graphs, report)

    def samples() -> Iterator[dict[str, Any]]:
        used: set[str] = set()
        seen_ids: set[Any] = set()
        for entry in tqdm(images, desc="images", unit="img", disable=not progress):
            image_path = image_dir / entry["file_name"]
            if entry["id"] in seen_ids:
                report.skipped.append((str(image_path), f"duplicate image id {entry['id']}"))
                continue
            seen_ids.add(entry["id"])
            texts = captions.get(entry["id"], [])
            if not texts:
                report.skipped.append((str(image_path), "no captions"))
                continue
            try:
                image = encode_image(image_path, reencode, max_size)
            except DataError as e:
                report.skipped.append((str(image_path), str(e)))
                continue
            graphs = [make_graph(t) for t in texts] if make_graph else None
            stem = str(Path(entry["file_name"]).with_suffix(""))
            groups = [([t], [g] if graphs else None, f"{stem}_{n}") for n, (t, g) in
                      enumerate(zip(texts, graphs or [None] * len(texts)))] if pair_per_caption \
                else [(texts, graphs, stem)]
            report.stretched += image.stretched
            for group_texts, group_graphs, key in groups:
                report.written += 1
                meta: dict[str, Any] = {"captions": group_texts, "image_id": entry["id"]}
                if group_graphs is not None:
                    meta["scene_graphs"] = group_graphs
                    if group_graphs[0] is not None:
                        meta["scene_graph"] = group_graphs[0]
                    report.scene_graphs += sum(g is not None for g in group_graphs)
                yield {"__key__": make_key(key, used), image.ext: image.data,
                       "txt": group_texts[0].encode("utf-8"),
                       "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}

    report.shards = write_samples(samples(), out_dir, prefix, shard_size, overwrite)
    return _finish(report, annotations_json)


def _read_coco(path: Path) -> tuple[list[dict[str, Any]], dict[Any, list[str]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"annotations file {path} is not valid JSON: {e}") from None
    images = data.get("images") if isinstance(data, dict) else None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise UserError(f"annotations file {path} lacks COCO 'images' and 'annotations' lists")
    for entry in images:
        if not (isinstance(entry, dict) and "id" in entry and isinstance(entry.get("file_name"), str)):
            raise UserError(f"annotations file {path}: an image entry lacks 'id' or 'file_name': "
                            f"{entry!r:.80}")
    captions: dict[Any, list[str]] = {}
    for ann in annotations:
        if not (isinstance(ann, dict) and "image_id" in ann and isinstance(ann.get("caption"), str)):
            raise UserError(f"annotations file {path}: an annotation lacks 'image_id' or 'caption': "
                            f"{ann!r:.80}")
        if ann["caption"].strip():
            captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    return images, captions
