"""Files of segmentation inference: reading images of any depth, SAR intensity normalisation, matching
masks by name, and outputs written whole or not at all.

Intensity: 8-bit images (PNG, JPEG, GIF, PPM, 8-bit TIFF) go to the model as they are (grey repeated to
RGB, alpha dropped). 16-bit, 32-bit integer and float images (SAR, some microscopes) are stretched per
image and per channel from their `lo`th to their `hi`th percentile (default 1..99) to 0..255 and rounded,
the same stretch mm-shards applies when it writes such images as 8-bit training shards, so inference
sees what training saw. With `db=True` values are first converted to decibels, 10 log10(x), with
non-positive values set to the smallest positive one (speckled SAR amplitudes span orders of magnitude;
the log makes dark water and bright ships both visible). log and dB differ only by a constant factor,
which the stretch removes, so there is one option. Non-finite values (NaN no-data) are set to the
stretch limits.

Channels: TIFFs are read with tifffile, so multi-channel 16-bit/float stacks (e.g. Sentinel-1 VV + VH)
work; one channel is repeated to RGB, two become (c0, c1, mean of both), three are used as they are,
more than three: the first three. `channels` picks others (e.g. [1, 1, 1] for VH alone).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mm.data.seg_readers import binary_mask, load_image
from mm.data.shards import IMAGE_SUFFIXES
from mm.errors import DataError

HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


# ---------------------------------------------------------------------------------------------------
# Reading


def _name_without_gz(path: Path) -> str:
    return path.name[:-3] if path.name.lower().endswith(".gz") else path.name


def image_stem(path: Path) -> str:
    """The file name without its image suffix (and without .gz: STARE's im0001.ppm.gz -> im0001)."""
    return Path(_name_without_gz(path)).stem


def is_image_file(path: Path) -> bool:
    return (path.is_file() and not path.name.startswith(".")
            and Path(_name_without_gz(path)).suffix.lower() in IMAGE_SUFFIXES)


def _read_tiff(path: Path) -> np.ndarray | None:
    """(H, W, C) array of a TIFF in its own dtype, or None to let PIL try (palette images, or a file
    tifffile cannot parse: PIL then reports why it is unreadable)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if tif.pages[0].photometric == tifffile.PHOTOMETRIC.PALETTE:
                return None
            series = tif.series[0]
            arr, axes = series.asarray(), series.axes
    except Exception:  # noqa: BLE001 -- tifffile raises many types for files it cannot parse
        return None
    # Keep Y and X; any other axis of length > 1 (samples S, channels C, pages Q/I) holds the channels.
    keep = [i for i, a in enumerate(axes) if a in "YX" or arr.shape[i] > 1]
    arr = arr.reshape([arr.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if axes == "YX":
        return arr[..., None]
    if len(axes) != 3 or "Y" not in axes or "X" not in axes:
        raise DataError(f"unsupported TIFF layout (axes {series.axes}, shape {series.shape})")
    return np.moveaxis(arr, [axes.index("Y"), axes.index("X")], [0, 1])


def read_image(path: Path) -> np.ndarray:
    """(H, W, C) pixel values as stored: uint8 RGB for 8-bit files, the file's own dtype for 16-bit,
    float and multi-channel ones. DataError(reason) if the file is missing or cannot be decoded."""
    if _name_without_gz(path).lower().endswith((".tif", ".tiff")) and not path.name.lower().endswith(".gz"):
        arr = _read_tiff(path)
        if arr is not None:
            if arr.shape[0] == 0 or arr.shape[1] == 0:
                raise DataError("empty image")
            return arr
    image = load_image(path)
    if image.mode in HIGH_BIT_MODES:
        return np.asarray(image)[..., None]
    return np.asarray(image.convert("RGB"))


def read_mask(path: Path) -> np.ndarray:
    """Boolean (H, W) foreground of a label image (> 127, or == 1 for 0/1 label maps)."""
    return binary_mask(load_image(path))


# ---------------------------------------------------------------------------------------------------
# Intensity


def percentile_stretch(channel: np.ndarray, lo: float = 1.0, hi: float = 99.0, db: bool = False) -> np.ndarray:
    """One channel stretched from its lo..hi percentile to 0..255, rounded to uint8 (see the module
    docstring; without db this is mm-shards' 16-bit/float conversion)."""
    arr = np.asarray(channel, dtype=np.float64)
    if db:
        positive = arr[np.isfinite(arr) & (arr > 0)]
        if not positive.size:
            raise DataError("no positive values to convert to dB")
        arr = 10 * np.log10(np.where(np.isfinite(arr) & (arr <= 0), positive.min(), arr))
    finite = arr[np.isfinite(arr)]
    low, high = np.percentile(finite, [lo, hi]) if finite.size else (0.0, 0.0)
    scaled = (np.nan_to_num(arr, nan=low, posinf=high, neginf=low) - low) / max(high - low, 1e-12) * 255
    return np.clip(scaled, 0, 255).round().astype(np.uint8)


def to_rgb8(pixels: np.ndarray, stretch: str = "auto", percentiles: tuple[float, float] = (1.0, 99.0),
            db: bool = False, channels: Sequence[int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 model input of read_image's pixels. stretch: 'auto' (16-bit/float only, or
    every image when db), 'always' (8-bit images too, e.g. 8-bit SAR)."""
    arr = pixels if pixels.ndim == 3 else pixels[..., None]
    n = arr.shape[-1]
    if channels:
        bad = [c for c in channels if not 0 <= c < n]
        if bad:
            raise DataError(f"has {n} channel(s), --channels asks for {bad}")
        arr = arr[..., list(channels)]
    elif n == 4:
        arr = arr[..., :3]  # RGBA / CMYK-like 8-bit TIFFs: drop the alpha
    elif n > 4:
        arr = arr[..., :3]
    if stretch == "always" or db or arr.dtype != np.uint8:
        arr = np.stack([percentile_stretch(arr[..., c], *percentiles, db=db) for c in range(arr.shape[-1])], -1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 2:
        mean = ((arr[..., 0].astype(np.uint16) + arr[..., 1]) / 2).round().astype(np.uint8)
        arr = np.concatenate([arr, mean[..., None]], axis=-1)
    return np.ascontiguousarray(arr[..., :3])


# ---------------------------------------------------------------------------------------------------
# Matching masks by name


def files_by_stem(directory: Path) -> dict[str, list[Path]]:
    table: dict[str, list[Path]] = {}
    for p in sorted(directory.iterdir()):
        if is_image_file(p):
            table.setdefault(image_stem(p), []).append(p)
    return table


def match_name(image: Path, suffix: str, strip: str = "") -> str:
    """<image stem without `strip` at its end><suffix>: DRIVE's 21_training.tif with strip '_training'
    and suffix '_manual1' -> 21_manual1."""
    return image_stem(image).removesuffix(strip) + suffix if strip else image_stem(image) + suffix


def match(image: Path, table: dict[str, list[Path]], suffix: str, what: str, folder: Path,
          strip: str = "") -> Path:
    """The one file of `table` named match_name(image, suffix, strip).*; DataError otherwise."""
    name = match_name(image, suffix, strip)
    found = table.get(name, [])
    if len(found) != 1:
        raise DataError(f"no {what} named {name}.* in {folder}" if not found else
                        f"several {what}s match in {folder}: {', '.join(p.name for p in found)}")
    return found[0]


# ---------------------------------------------------------------------------------------------------
# Outputs


def overlay(rgb: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
    """The image with the predicted mask's outline in red (and the ground truth's in green, drawn first,
    so where they agree the outline is red)."""
    from skimage.segmentation import find_boundaries

    out = rgb.copy()
    # Outlines two pixels thick (inner + outer boundary) stay visible on large images.
    if truth is not None:
        out[find_boundaries(truth, mode="thick")] = (0, 255, 0)
    out[find_boundaries(pred, mode="thick")] = (255, 0, 0)
    return out


class OutputSet:
    """Files of one image, written to hidden temporary names and renamed into place together by
    commit(), so an error or interrupt leaves no half-written file; discard() removes the temporaries."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pending: list[tuple[Path, Path]] = []

    def _temp(self, name: str) -> Path:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.folder)
        os.close(fd)
        return Path(tmp)

    def add_image(self, name: str, image: Image.Image, fmt: str) -> None:
        tmp = self._temp(name)
        self.pending.append((tmp, self.folder / name))
        image.save(tmp, format=fmt)

    def add_text(self, name: str, text: str) -> None:
        tmp = self._temp(name)
        self.pending.append((tmp, self.folder / name))
        tmp.write_text(text)

    def commit(self) -> list[Path]:
        for tmp, final in self.pending:
            os.replace(tmp, final)
        done = [final for _, final in self.pending]
        self.pending = []
        return done

    def discard(self) -> None:
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)
        self.pending = []
