"""Readers for the public thin-structure / binary segmentation datasets, and shards from them.

Each reader takes the dataset's root folder as distributed and returns a list of SegSample(image, mask,
fov): paths, or boolean arrays where the dataset has no such file (derived fields of view). The layouts:

  DRIVE       root/{training,test}/images/21_training.tif, .../1st_manual/21_manual1.gif (annotator 2:
              2nd_manual/21_manual2.gif, test set only), .../mask/21_training_mask.gif (field of view).
              split: "train" (= training), "test" or "all".
  STARE       root/stare-images/im0001.ppm, root/labels-ah/im0001.ah.ppm (annotator "ah", the usual
              ground truth) or root/labels-vk/im0001.vk.ppm; the files may stay gzipped (.ppm.gz) as
              downloaded. Only the 20 labelled images are listed. No FOV masks: derived (see below).
  CHASE_DB1   root/Image_01L.jpg with root/Image_01L_1stHO.png (annotator 1) / _2ndHO.png (2), all in
              one folder. No FOV masks: derived (see below).
  Kvasir-SEG  root/images/*.jpg + root/masks/*.jpg (same stem). JPEG masks are thresholded at > 127.
  SL-SSDD     root/images/* (grey SAR chips: 8-bit PNG/JPEG or 16-bit / float TIFF) + root/masks/*.png
              (same stem), 0 = land, 255 = sea. The foreground is the sea (foreground="land" inverts).

Splits: DRIVE has official training/test folders. The others have none; if root/<split>/ exists (a
user's own split, e.g. Kvasir-SEG/train/images) that folder is read, otherwise the images sorted by name
are split deterministically: the last `test_count` are "test", the rest "train", "all" is everything.
Defaults follow common practice: STARE 10 of 20, CHASE_DB1 8 of 28 (the last 4 subjects), Kvasir-SEG 120
of 1000, SL-SSDD the last 20 %.

Derived field of view (STARE, CHASE_DB1): the fundus is bright in the red channel and the background is
near black, so FOV = red channel > fov_threshold (20 of 255), then the largest connected region with its
holes filled (dark vessels or lesions inside the disc stay in). Pass derive_fov=False to write no FOV.

write_dataset_shards writes the segmentation sample layout of mm/data/shards.py: key.png (image, 8-bit;
16-bit and float images are stretched from their 1st to 99th percentile by the same code as mm-shards),
key.mask.png and key.fov.png (0/255). Masks are binarised at > 127 (a 0/1 mask counts 1 as foreground).
"""

from __future__ import annotations

import gzip
import io
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from mm.data.shards import (
    _HIGH_BIT_MODES,
    IMAGE_SUFFIXES,
    ShardReport,
    _finish,
    _mode_for,
    fit_size,
    make_key,
    png_bytes,
    write_samples,
)
from mm.errors import DataError, UserError

Field = Path | np.ndarray


class SegSample(NamedTuple):
    image: Path
    mask: Field  # a label file, or a boolean array (True = foreground)
    fov: Field | None  # a field-of-view file, a derived boolean array, or None


Skipped = list[tuple[str, str]]


# ---------------------------------------------------------------------------------------------------
# Files


def _stem(path: Path) -> str:
    """The name without its image suffix, and without .gz first (STARE's im0001.ah.ppm.gz -> im0001.ah)."""
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    return Path(name).stem


def _is_image(path: Path) -> bool:
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    return path.is_file() and not path.name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def _images_by_stem(directory: Path) -> dict[str, Path]:
    table: dict[str, Path] = {}
    for p in sorted(directory.iterdir()):
        if _is_image(p):
            table.setdefault(_stem(p), p)
    return table


def _folder(root: Path, *names: str, what: str) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise UserError(f"{root} has no {what} folder (expected {' or '.join(names)})")


def _root(root: str | os.PathLike) -> Path:
    p = Path(root)
    if not p.is_dir():
        raise UserError(f"dataset root {p} does not exist" if not p.exists()
                        else f"dataset root {p} is not a directory")
    return p


def load_image(path: Path) -> Image.Image:
    """A fully decoded PIL image (gzipped files too); DataError(reason) if missing or corrupt."""
    try:
        data = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            data = gzip.decompress(data)
    except FileNotFoundError:
        raise DataError("missing file") from None
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read file: {e}") from None
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # noqa: BLE001 -- PIL raises many exception types for corrupt files
        raise DataError(f"cannot decode image: {e}") from None
    return image


def binary_mask(image: Image.Image) -> np.ndarray:
    """Foreground of a label image: > 127 (JPEG masks, 0/255 GIF/PNG/PPM), or == 1 for a 0/1 label map."""
    values = np.asarray(image, dtype=np.float64) if image.mode in ("I", "I;16", "I;16B", "I;16L", "F") \
        else np.asarray(image.convert("L"))
    return values == 1 if values.max(initial=0) == 1 else values > 127


def derive_fov(image: Image.Image | np.ndarray, threshold: float = 20) -> np.ndarray:
    """Field of view of a fundus photograph: red channel > threshold, largest connected region, holes
    filled (see the module docstring)."""
    from scipy import ndimage

    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    red = arr[..., 0] if arr.ndim == 3 else arr
    fov = red > threshold
    labels, count = ndimage.label(fov)
    if count > 1:
        sizes = ndimage.sum_labels(fov, labels, index=np.arange(1, count + 1))
        fov = labels == 1 + int(np.argmax(sizes))
    return ndimage.binary_fill_holes(fov)


# ---------------------------------------------------------------------------------------------------
# Splits


def _split_dir(root: Path, split: str) -> Path:
    """root/<split> when the user keeps their own split folders, else root."""
    if split not in ("train", "test", "all"):
        raise UserError(f"split must be train, test or all, got {split!r}")
    return root / split if split != "all" and (root / split).is_dir() else root


def _take_split(samples: list[SegSample], root: Path, split: str, test_count: int) -> list[SegSample]:
    """Samples sorted by image name; the last test_count are the test split (unless root/<split>/ exists)."""
    samples = sorted(samples, key=lambda s: s.image.name)
    if split == "all" or (root / split).is_dir():
        return samples
    if not 0 <= test_count <= len(samples):
        raise UserError(f"test_count {test_count} is outside 0..{len(samples)} (the images in {root})")
    cut = len(samples) - test_count
    return samples[:cut] if split == "train" else samples[cut:]


# ---------------------------------------------------------------------------------------------------
# Readers


def read_drive(root: str | os.PathLike, split: str = "train", annotator: int = 1,
               skipped: Skipped | None = None) -> list[SegSample]:
    """DRIVE: {training,test}/images/NN_<set>.tif, 1st_manual/NN_manual1.gif, mask/NN_<set>_mask.gif."""
    root = _root(root)
    if annotator not in (1, 2):
        raise UserError(f"DRIVE annotator must be 1 or 2, got {annotator}")
    sets = {"train": ["training"], "training": ["training"], "test": ["test"], "all": ["training", "test"]}
    if split not in sets:
        raise UserError(f"DRIVE split must be train, test or all, got {split!r}")
    skipped = skipped if skipped is not None else []
    samples: list[SegSample] = []
    for name in sets[split]:
        base = _folder(root, name, what=f"DRIVE '{name}'")
        images = _images_by_stem(_folder(base, "images", what="images"))
        manual_dir = _folder(base, f"{'1st' if annotator == 1 else '2nd'}_manual",
                             what=f"annotator-{annotator} label")
        manuals = _images_by_stem(manual_dir)
        fov_dir = base / "mask"
        fovs = _images_by_stem(fov_dir) if fov_dir.is_dir() else None  # no mask/ folder: no FOV at all
        for stem, path in images.items():
            number = stem.split("_")[0]
            manual = manuals.get(f"{number}_manual{annotator}")
            if manual is None:
                skipped.append((str(path), f"no label {number}_manual{annotator}.gif in {manual_dir}"))
                continue
            fov = fovs.get(f"{stem}_mask") if fovs is not None else None
            if fovs is not None and fov is None:
                skipped.append((str(path), f"no field-of-view mask {stem}_mask.gif in {fov_dir}"))
                continue
            samples.append(SegSample(path, manual, fov))
    return samples


def read_stare(root: str | os.PathLike, split: str = "all", annotator: str = "ah",
               derive_fov_mask: bool = True, fov_threshold: float = 20, test_count: int = 10,
               skipped: Skipped | None = None) -> list[SegSample]:
    """STARE: stare-images/imNNNN.ppm[.gz] with labels-<annotator>/imNNNN.<annotator>.ppm[.gz]."""
    root = _root(root)
    if annotator not in ("ah", "vk"):
        raise UserError(f"STARE annotator must be 'ah' or 'vk', got {annotator!r}")
    base = _split_dir(root, split)
    images = _images_by_stem(_folder(base, "stare-images", "images", what="STARE image"))
    labels = _images_by_stem(_folder(base, f"labels-{annotator}", what=f"STARE labels-{annotator}"))
    skipped = skipped if skipped is not None else []
    samples = []
    for stem, label in labels.items():
        image_stem = stem.removesuffix(f".{annotator}")
        if image_stem not in images:
            skipped.append((str(label), f"no image {image_stem}.ppm in {base}"))
            continue
        fov = _derived_fov(images[image_stem], fov_threshold, skipped) if derive_fov_mask else None
        if derive_fov_mask and fov is None:
            continue
        samples.append(SegSample(images[image_stem], label, fov))
    return _take_split(samples, root, split, test_count)


def read_chase_db1(root: str | os.PathLike, split: str = "all", annotator: int = 1,
                   derive_fov_mask: bool = True, fov_threshold: float = 20, test_count: int = 8,
                   skipped: Skipped | None = None) -> list[SegSample]:
    """CHASE_DB1: Image_NNX.jpg with Image_NNX_1stHO.png (annotator 1) or _2ndHO.png (2) beside it."""
    root = _root(root)
    if annotator not in (1, 2):
        raise UserError(f"CHASE_DB1 annotator must be 1 or 2, got {annotator}")
    suffix = "_1stHO" if annotator == 1 else "_2ndHO"
    base = _split_dir(root, split)
    files = _images_by_stem(base)
    skipped = skipped if skipped is not None else []
    samples = []
    for stem, path in files.items():
        if stem.endswith(("_1stHO", "_2ndHO")):
            continue
        label = files.get(stem + suffix)
        if label is None:
            skipped.append((str(path), f"no label {stem}{suffix}.png"))
            continue
        fov = _derived_fov(path, fov_threshold, skipped) if derive_fov_mask else None
        if derive_fov_mask and fov is None:
            continue
        samples.append(SegSample(path, label, fov))
    return _take_split(samples, root, split, test_count)


def read_kvasir_seg(root: str | os.PathLike, split: str = "all", test_count: int = 120,
                    skipped: Skipped | None = None) -> list[SegSample]:
    """Kvasir-SEG: images/*.jpg + masks/*.jpg with the same stem."""
    return _paired_folders(_root(root), split, test_count, "Kvasir-SEG", skipped)


def read_sl_ssdd(root: str | os.PathLike, split: str = "all", test_count: int | None = None,
                 foreground: str = "sea", skipped: Skipped | None = None) -> list[SegSample]:
    """SL-SSDD: images/* (grey SAR, 8/16-bit or float) + masks/*.png, 0 land / 255 sea. With
    foreground="land" the masks are returned inverted, as boolean arrays."""
    root = _root(root)
    if foreground not in ("sea", "land"):
        raise UserError(f"SL-SSDD foreground must be 'sea' or 'land', got {foreground!r}")
    base = _split_dir(root, split)
    count = test_count if test_count is not None else \
        round(0.2 * len(_images_by_stem(_folder(base, "images", what="SL-SSDD images"))))
    samples = _paired_folders(root, split, count, "SL-SSDD", skipped)
    if foreground == "land":
        out = []
        for s in samples:
            try:
                out.append(SegSample(s.image, ~binary_mask(load_image(s.mask)), s.fov))
            except DataError as e:
                (skipped if skipped is not None else []).append((str(s.image), f"mask {s.mask.name}: {e}"))
        samples = out
    return samples


def _paired_folders(root: Path, split: str, test_count: int, what: str,
                    skipped: Skipped | None) -> list[SegSample]:
    base = _split_dir(root, split)
    images = _images_by_stem(_folder(base, "images", what=f"{what} images"))
    masks = _images_by_stem(_folder(base, "masks", what=f"{what} masks"))
    skipped = skipped if skipped is not None else []
    samples = []
    for stem, path in images.items():
        if stem not in masks:
            skipped.append((str(path), f"no mask {stem}.* in {base / 'masks'}"))
            continue
        samples.append(SegSample(path, masks[stem], None))
    return _take_split(samples, root, split, test_count)


def _derived_fov(path: Path, threshold: float, skipped: Skipped) -> np.ndarray | None:
    try:
        return derive_fov(load_image(path), threshold)
    except DataError as e:
        skipped.append((str(path), str(e)))
        return None


READERS: dict[str, Callable[..., list[SegSample]]] = {
    "drive": read_drive, "stare": read_stare, "chase_db1": read_chase_db1, "kvasir_seg": read_kvasir_seg,
    "sl_ssdd": read_sl_ssdd,
}


def dataset_name(name: str) -> str:
    """The READERS key for a user's spelling: DRIVE, CHASE_DB1, chase, Kvasir-SEG, kvasir, SL-SSDD..."""
    flat = re.sub(r"[^a-z0-9]", "", name.lower())
    aliases = {"drive": "drive", "stare": "stare", "chasedb1": "chase_db1", "chase": "chase_db1",
               "kvasirseg": "kvasir_seg", "kvasir": "kvasir_seg", "slssdd": "sl_ssdd"}
    if flat not in aliases:
        raise UserError(f"unknown segmentation dataset {name!r} (known: {', '.join(READERS)})")
    return aliases[flat]


def read_dataset(name: str, root: str | os.PathLike, split: str = "train", skipped: Skipped | None = None,
                 **options: Any) -> list[SegSample]:
    key = dataset_name(name)
    try:
        return READERS[key](root, split=split, skipped=skipped, **options)
    except TypeError as e:  # an option this reader does not take
        if "keyword argument" not in str(e):
            raise
        raise UserError(f"{key}: {e}") from None


# ---------------------------------------------------------------------------------------------------
# Shards


def write_dataset_shards(name: str, root: str | os.PathLike, out_dir: str | os.PathLike, split: str = "train",
                         shard_size: int = 1000, max_size: int | None = None, prefix: str | None = None,
                         overwrite: bool = False, progress: bool = False, **options: Any) -> ShardReport:
    """Segmentation shards (`{prefix}-%06d.tar`, prefix defaults to '<dataset>-<split>') of one split of
    a dataset; `options` go to its reader (annotator, test_count, derive_fov_mask, foreground...).

    Samples with a missing label, an unreadable file or a mask of another size than the image are
    skipped and reported; a dataset that yields nothing raises a DataError naming the root.
    """
    key = dataset_name(name)
    if max_size is not None and max_size < 1:
        raise UserError(f"max size must be at least 1 pixel, got {max_size}")
    report = ShardReport()
    samples = read_dataset(key, root, split=split, skipped=report.skipped, **options)

    def encoded() -> Iterator[dict[str, bytes]]:
        used: set[str] = set()
        for sample in tqdm(samples, desc=key, unit="img", disable=not progress):
            fields = _encode_sample(sample, max_size, report.skipped)
            if fields is not None:
                report.written += 1
                report.stretched += fields.pop("__stretched__")
                yield {"__key__": make_key(_stem(sample.image), used), **fields}

    report.shards = write_samples(encoded(), out_dir, prefix or f"{key}-{split}", shard_size, overwrite)
    return _finish(report, Path(root))


def _encode_sample(sample: SegSample, max_size: int | None, skipped: Skipped) -> dict[str, bytes] | None:
    try:
        image = load_image(sample.image)
        # _mode_for: 16-bit / float images stretched to 8 bits (1st..99th percentile), as mm-shards does
        converted = _mode_for(image, "png")
    except DataError as e:
        skipped.append((str(sample.image), str(e)))
        return None
    source = image.size
    size = fit_size(source, max_size)
    if size != source:
        converted = converted.resize(size, Image.Resampling.LANCZOS)
    fields = {"png": png_bytes(converted), "__stretched__": image.mode in _HIGH_BIT_MODES}
    for what, value in (("mask", sample.mask), ("fov", sample.fov)):
        if value is None:
            continue
        try:
            mask = value if isinstance(value, np.ndarray) else binary_mask(load_image(value))
        except DataError as e:
            skipped.append((str(sample.image), f"{what} {value.name}: {e}"))
            return None
        if mask.shape != (source[1], source[0]):
            reason = f"{what} is {mask.shape[1]}x{mask.shape[0]} but the image is {source[0]}x{source[1]}"
            skipped.append((str(sample.image), reason))
            return None
        out = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))
        if size != source:
            out = out.resize(size, Image.Resampling.NEAREST)
        fields[f"{what}.png"] = png_bytes(out)
    return fields
