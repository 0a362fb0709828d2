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
  Kvasir-SEG  root/images/*.jpg + root/masks/*.jpg (same stem). JPEG masks are thresholded at > 127
              (their compression noise is non-zero).
  SL-SSDD     root/images/* (grey SAR chips: 8-bit PNG/JPEG or 16-bit / float TIFF) + root/masks/*.png
              (same stem), 0 = land, 255 = sea. The foreground is the sea (foreground="land" inverts).

Splits: DRIVE has official training/test folders. The others have none; if root/<split>/ exists (a
user's own split, e.g. Kvasir-SEG/train/images) that folder is read, otherwise the images sorted by name
are split deterministically: the last `test_count` are "test", the rest "train", "all" is everything.
Defaults follow common practice: STARE 10 of 20, CHASE_DB1 8 of 28 (the last 4 subjects), Kvasir-SEG 120
of 1000, SL-SSDD the last 20 %.

Derived field of view (STARE, CHASE_DB1): the fundus is bright in the red channel and the background
dark, so FOV = red channel above the brightest background (99th percentile of the four corners + 10,
at least fov_threshold = 20; a fixed 20 let grey or flared STARE backgrounds join the disc), an
opening that cuts thin bright bridges, the largest connected region, holes filled (dark vessels or
lesions inside the disc stay in). A result covering under 5% or over 97% of the frame is refused for
that image. Pass derive_fov_mask=False to write no FOV.

Reading (read_pixels, read_label) and normalisation (Normalisation) are shared with mm-segment; the
shard writers store key.png (the normalised 8-bit image), key.mask.png and key.fov.png (0/255) and
key.json (source name and size, dtype, channels, normalisation). Label foreground follows MaskRule:
any non-zero value, > 127 for lossy (JPEG/WebP) masks, or a given threshold.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from mm.data.shards import (
    IMAGE_SUFFIXES,
    ShardReport,
    _finish,
    fit_size,
    make_key,
    png_bytes,
    write_samples,
)
from mm.errors import DataError, UserError

Field = Path | np.ndarray

HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# A side shorter than this holds almost no structure to segment (a 1x1 "image" is a mistake, e.g. a
# thumbnail or an empty export): refused with a reason rather than upsampled into a confident mask.
MIN_SIDE = 8
# GeoTIFF georeferencing: ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory,
# GeoDoubleParams, GeoAsciiParams, GDAL_NODATA.
GEO_TAGS = (33550, 33922, 34264, 34735, 34736, 34737, 42113)
# A derived field of view outside this share of the frame is not a fundus disc.
FOV_SHARE = (0.05, 0.97)
CORNER_MARGIN = 10  # red levels above the brightest corner pixel that count as inside the disc


class SegSample(NamedTuple):
    image: Path
    mask: Field  # a label file, or a boolean array (True = foreground)
    fov: Field | None  # a field-of-view file, a derived boolean array, or None


Skipped = list[tuple[str, str]]


# ---------------------------------------------------------------------------------------------------
# Files


def _name_without_gz(path: Path) -> str:
    return path.name[:-3] if path.name.lower().endswith(".gz") else path.name


def image_stem(path: Path) -> str:
    """The name without its image suffix, and without .gz first (STARE's im0001.ah.ppm.gz -> im0001.ah)."""
    return Path(_name_without_gz(path)).stem


def is_image_file(path: Path) -> bool:
    """A visible file with an image suffix (.gz-compressed images included)."""
    return path.is_file() and not path.name.startswith(".") and \
        Path(_name_without_gz(path)).suffix.lower() in IMAGE_SUFFIXES


def _images_by_stem(directory: Path) -> dict[str, Path]:
    table: dict[str, Path] = {}
    for p in sorted(directory.iterdir()):
        if is_image_file(p):
            table.setdefault(image_stem(p), p)
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


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            data = gzip.decompress(data)
    except FileNotFoundError:
        raise DataError("missing file") from None
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read file: {getattr(e, 'strerror', None) or e}") from None
    return data


def _decode_reason(e: Exception) -> str:
    """PIL's own message without the in-memory file object it names (`<_io.BytesIO object at 0x...>`)."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image file in a format this reader knows (PNG, JPEG, TIFF, GIF, BMP, PPM, WebP)"
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e).splitlines()[0] if str(e) else "")
    return text or type(e).__name__


def load_image(path: Path) -> Image.Image:
    """A fully decoded PIL image (gzipped files too); DataError(reason) if missing or corrupt."""
    data = _read_bytes(path)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # noqa: BLE001 -- PIL raises many exception types for corrupt files
        raise DataError(f"cannot decode image: {_decode_reason(e)}") from None
    return image


def _is_tiff(data: bytes) -> bool:
    return data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _tiff_pixels(data: bytes) -> np.ndarray | None:
    """(H, W, C) array of a TIFF in its own dtype, or None for a palette TIFF (PIL applies the palette).

    tifffile reads what PIL gets wrong (several 16-bit samples, float, LZW/Deflate/ZSTD through
    imagecodecs); a TIFF it cannot decode is refused with its reason rather than handed to PIL, which
    reads such files with the wrong shape or depth without complaint.
    """
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if tif.pages[0].photometric == tifffile.PHOTOMETRIC.PALETTE:
                return None
            series = tif.series[0]
            arr, axes = series.asarray(), series.axes
    except Exception as e:  # noqa: BLE001 -- tifffile raises many types for files it cannot parse
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "imagecodecs" in reason:
            reason += " (pip install imagecodecs)"
        raise DataError(f"cannot decode TIFF: {reason}") from None
    # Keep Y and X; any other axis of length > 1 (samples S, channels C, pages Q/I) holds the channels.
    keep = [i for i, a in enumerate(axes) if a in "YX" or arr.shape[i] > 1]
    arr = arr.reshape([arr.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if axes == "YX":
        return arr[..., None]
    if len(axes) != 3 or "Y" not in axes or "X" not in axes:
        raise DataError(f"unsupported TIFF layout (axes {series.axes}, shape {series.shape})")
    return np.moveaxis(arr, [axes.index("Y"), axes.index("X")], [0, 1])


def _check_size(arr: np.ndarray) -> np.ndarray:
    h, w = arr.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise DataError(f"image is {w}x{h} pixels; segmentation needs at least {MIN_SIDE}x{MIN_SIDE}")
    return arr


def read_pixels(path: Path) -> np.ndarray:
    """(H, W, C) pixel values as stored: uint8 RGB for 8-bit files, the file's own dtype and channels
    for 16-bit, float and multi-channel ones (TIFFs through tifffile). DataError(reason) for a missing,
    undecodable or too small (< MIN_SIDE) file."""
    data = _read_bytes(path)
    if _is_tiff(data):
        arr = _tiff_pixels(data)
        if arr is not None:
            return _check_size(arr)
    image = load_image_bytes(data)
    if image.mode in HIGH_BIT_MODES:
        return _check_size(np.asarray(image)[..., None])
    return _check_size(np.asarray(image.convert("RGB")))


def load_image_bytes(data: bytes) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # noqa: BLE001 -- PIL raises many exception types for corrupt files
        raise DataError(f"cannot decode image: {_decode_reason(e)}") from None
    return image


def read_label(path: Path) -> np.ndarray:
    """(H, W) or (H, W, C) values of a label image as stored: palettes applied (a GIF's index 0 need
    not be black), alpha dropped, 16-bit and float kept."""
    data = _read_bytes(path)
    if _is_tiff(data):
        arr = _tiff_pixels(data)
        if arr is not None:
            return arr[..., 0] if arr.shape[-1] == 1 else arr
    image = load_image_bytes(data)
    if image.mode in HIGH_BIT_MODES:
        return np.asarray(image)
    if image.mode in ("1", "L", "LA", "I;16"):
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))


def read_geotags(path: Path) -> list[tuple[int, int, int, Any, bool]]:
    """The georeferencing tags of a (Geo)TIFF as tifffile `extratags` (code, dtype, count, value,
    writeonce): ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory, GeoDoubleParams,
    GeoAsciiParams and GDAL_NODATA. Empty for other files (only the tags are read, not the pixels)."""
    if not _name_without_gz(path).lower().endswith((".tif", ".tiff")) or path.name.lower().endswith(".gz"):
        return []
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            out = []
            for code in GEO_TAGS:
                tag = tags.get(code)
                if tag is None:
                    continue
                value = tag.value
                if isinstance(value, np.ndarray):
                    value = value.tolist()
                if isinstance(value, str):
                    count = len(value.encode("ascii", "replace")) + 1
                elif isinstance(value, (tuple, list)):
                    count = len(value)
                else:
                    count = 1
                out.append((code, int(tag.dtype), count, value, True))
            return out
    except Exception:  # noqa: BLE001 -- no readable tags: nothing to copy (reading the pixels reports why)
        return []


# ---------------------------------------------------------------------------------------------------
# Masks: which labelled pixels are foreground


MASK_RULES = ("auto", "nonzero")
LOSSY_SUFFIXES = (".jpg", ".jpeg", ".webp")


@dataclass
class MaskRule:
    """Foreground of a label image. 'nonzero' (default for lossless files): any non-zero value in any
    colour channel, so 0/1 maps, 0/255 masks, colour labels and instance ids all keep every labelled
    pixel. A number T: value > T in any channel (127 for anti-aliased drawings). 'auto' is 'nonzero'
    except for lossy files (JPEG, WebP), where compression noise around the edges makes most of the
    background non-zero: there the rule is > 127. `seen` counts what was found, for `describe()`."""

    rule: str = "auto"
    seen: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rule not in MASK_RULES:
            try:
                float(self.rule)
            except ValueError:
                raise UserError(f"mask threshold must be auto, nonzero or a number, got {self.rule!r}") from None

    def threshold_for(self, path: Path | None) -> float | None:
        """None for 'non-zero', else the value foreground must exceed."""
        if self.rule == "nonzero":
            return None
        if self.rule == "auto":
            lossy = path is not None and _name_without_gz(path).lower().endswith(LOSSY_SUFFIXES)
            return 127.0 if lossy else None
        return float(self.rule)

    def apply(self, values: np.ndarray, path: Path | None = None) -> np.ndarray:
        values = np.asarray(values)
        threshold = self.threshold_for(path)
        fg = values != 0 if threshold is None else values > threshold
        if fg.ndim == 3:
            fg = fg.any(axis=-1)
        kind = self._kind(values, threshold)
        self.seen[kind] += 1
        if path is not None:
            self.examples.setdefault(kind, path.name)
        return fg

    @staticmethod
    def _kind(values: np.ndarray, threshold: float | None) -> str:
        if threshold is not None:
            return f"> {threshold:g}"
        if values.ndim == 3 and not (values == values[..., :1]).all():
            return "colour"
        distinct = np.unique(values)
        if set(distinct.tolist()) <= {0, 255} or set(distinct.tolist()) <= {0, 1}:
            return "binary"
        return "multi-valued"

    def describe(self) -> str:
        """One line on what was done, e.g. for a run's summary."""
        n = sum(self.seen.values())
        if not n:
            return ""
        parts = []
        for kind, count in sorted(self.seen.items()):
            example = f" (e.g. {self.examples[kind]})" if kind in self.examples else ""
            if kind == "binary":
                parts.append(f"{count} binary (foreground = non-zero)")
            elif kind == "colour":
                parts.append(f"{count} colour{example}: foreground = non-zero in any channel")
            elif kind == "multi-valued":
                parts.append(f"{count} with several non-zero values{example}: every non-zero label is "
                             f"foreground (anti-aliased drawings: --mask-threshold 127)")
            else:
                parts.append(f"{count}{example}: foreground = value {kind}"
                             + (" (lossy format)" if self.rule == "auto" else ""))
        return f"masks: {n} read: " + "; ".join(parts)


def binary_mask(image: Image.Image | np.ndarray, rule: MaskRule | None = None,
                path: Path | None = None) -> np.ndarray:
    """Foreground of a label image under `rule` (default: any non-zero value, see MaskRule)."""
    if isinstance(image, Image.Image):
        if image.mode in HIGH_BIT_MODES:
            values = np.asarray(image)
        elif image.mode in ("1", "L", "LA"):
            values = np.asarray(image.convert("L"))
        else:
            values = np.asarray(image.convert("RGB"))
    else:
        values = image
    return (rule or MaskRule()).apply(values, path)


def read_mask(path: Path, rule: MaskRule | None = None) -> np.ndarray:
    """Boolean (H, W) foreground of a label file under `rule` (see MaskRule)."""
    return (rule or MaskRule()).apply(read_label(path), path)


# ---------------------------------------------------------------------------------------------------
# Intensity: what the model sees


@dataclass(frozen=True)
class Normalisation:
    """How stored pixels become the model's 8-bit RGB: the same for mm-shards (training data) and
    mm-segment (inference), recorded in each shard sample's json and in the export.

    stretch 'auto': 16-bit, 32-bit and float images are stretched per channel from their `lo`th to
    their `hi`th percentile to 0..255; 8-bit images are used as they are. 'always': 8-bit images too
    (8-bit SAR). db: 10 log10 first (SAR intensities; non-positive values set to the smallest positive
    one). channels: which stored channels become R, G, B (default: grey repeated; two channels become
    (c0, c1, mean); three as they are; more: the first three).
    """

    stretch: str = "auto"
    percentiles: tuple[float, float] = (1.0, 99.0)
    db: bool = False
    channels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.stretch not in ("auto", "always"):
            raise UserError(f"stretch must be auto or always, got {self.stretch!r}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise UserError(f"percentiles must satisfy 0 <= LO < HI <= 100, got {lo} {hi}")

    def to_dict(self) -> dict[str, Any]:
        return {"stretch": self.stretch, "percentiles": list(self.percentiles), "db": self.db,
                "channels": list(self.channels) if self.channels else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalisation:
        return cls(d.get("stretch", "auto"), tuple(d.get("percentiles", (1.0, 99.0))), bool(d.get("db", False)),
                   tuple(d["channels"]) if d.get("channels") else None)

    def describe(self) -> str:
        lo, hi = self.percentiles
        text = f"stretch {self.stretch} ({lo:g}..{hi:g} percentiles)"
        if self.db:
            text += ", dB"
        if self.channels:
            text += f", channels {','.join(map(str, self.channels))}"
        return text

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        return to_rgb8(pixels, self.stretch, self.percentiles, self.db, self.channels)


def percentile_stretch(channel: np.ndarray, lo: float = 1.0, hi: float = 99.0, db: bool = False) -> np.ndarray:
    """One channel stretched from its lo..hi percentile to 0..255, rounded to uint8. Non-finite values
    (NaN no-data) go to the stretch limits."""
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
    """(H, W, 3) uint8 model input of read_pixels' values (see Normalisation)."""
    arr = pixels if pixels.ndim == 3 else pixels[..., None]
    n = arr.shape[-1]
    if channels:
        bad = [c for c in channels if not 0 <= c < n]
        if bad:
            raise DataError(f"has {n} channel(s), --channels asks for {bad}")
        arr = arr[..., list(channels)]
    elif n >= 4:
        arr = arr[..., :3]  # RGBA: drop the alpha; more channels: the first three
    if stretch == "always" or db or arr.dtype != np.uint8:
        arr = np.stack([percentile_stretch(arr[..., c], *percentiles, db=db) for c in range(arr.shape[-1])], -1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 2:
        mean = ((arr[..., 0].astype(np.uint16) + arr[..., 1]) / 2).round().astype(np.uint8)
        arr = np.concatenate([arr, mean[..., None]], axis=-1)
    return np.ascontiguousarray(arr[..., :3])


# ---------------------------------------------------------------------------------------------------
# Derived field of view


def derive_fov(image: Image.Image | np.ndarray, threshold: float = 20) -> np.ndarray:
    """Field of view of a fundus photograph (see the module docstring). DataError when no plausible
    disc is found (nearly empty or nearly the whole frame): such a mask would silently change what the
    metrics count."""
    from scipy import ndimage

    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    red = (arr[..., 0] if arr.ndim == 3 else arr).astype(np.float64)
    # A fixed threshold lets a grey or flared background join the disc (STARE): the level is raised
    # above the brightest background, measured in the four corners, which a fundus disc never reaches.
    c = max(2, min(red.shape) // 20)
    corners = np.concatenate([red[:c, :c].ravel(), red[:c, -c:].ravel(), red[-c:, :c].ravel(),
                              red[-c:, -c:].ravel()])
    level = max(threshold, float(np.percentile(corners, 99)) + CORNER_MARGIN)
    # A disc wide enough to reach the corners must not raise the level into the fundus itself.
    h, w = red.shape
    centre = float(np.median(red[h // 4:h - h // 4, w // 4:w - w // 4]))
    level = max(threshold, min(level, 0.5 * centre))
    fov = red > level
    # An opening cuts thin bright bridges (reflections, text) between the disc and the frame's edge.
    radius = max(1, round(min(red.shape) / 100))
    disk = np.hypot(*np.mgrid[-radius:radius + 1, -radius:radius + 1]) <= radius
    opened = ndimage.binary_opening(fov, structure=disk)
    fov = opened if opened.any() else fov
    labels, count = ndimage.label(fov)
    if count > 1:
        sizes = ndimage.sum_labels(fov, labels, index=np.arange(1, count + 1))
        fov = labels == 1 + int(np.argmax(sizes))
    fov = ndimage.binary_fill_holes(fov)
    share = fov.mean()
    if not FOV_SHARE[0] <= share <= FOV_SHARE[1]:
        raise DataError(f"derived field of view covers {share:.0%} of the frame, not a fundus disc; give "
                        "field-of-view masks or turn the derivation off")
    return fov


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
                out.append(SegSample(s.image, ~read_mask(s.mask), s.fov))
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
        return derive_fov(read_pixels(path), threshold)
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


AUTO_SHARDS = 64  # default shard count: enough for 8 ranks x 8 loader workers each to get shards


def auto_shard_size(n_samples: int) -> int:
    """Samples per shard so that there are min(n, AUTO_SHARDS) shards: the loader gives every rank x
    worker whole shards, so one shard for a 20-image dataset would leave all but one worker idle (and
    the trainer refuses that)."""
    return max(1, -(-n_samples // AUTO_SHARDS))


def write_dataset_shards(name: str, root: str | os.PathLike, out_dir: str | os.PathLike, split: str = "train",
                         shard_size: int | None = None, max_size: int | None = None, prefix: str | None = None,
                         overwrite: bool = False, progress: bool = False,
                         normalisation: Normalisation | None = None, mask_rule: MaskRule | None = None,
                         **options: Any) -> ShardReport:
    """Segmentation shards (`{prefix}-%06d.tar`, prefix defaults to '<dataset>-<split>') of one split of
    a dataset; `options` go to its reader (annotator, test_count, derive_fov_mask, foreground...).
    shard_size None: auto_shard_size.

    Samples with a missing label, an unreadable file or a mask of another size than the image are
    skipped and reported; a dataset that yields nothing raises a DataError naming the root.
    """
    key = dataset_name(name)
    report = ShardReport()
    samples = read_dataset(key, root, split=split, skipped=report.skipped, **options)
    return write_sample_shards(samples, out_dir, prefix or f"{key}-{split}", Path(root), report, shard_size,
                               max_size, overwrite, progress, normalisation, mask_rule)


def folder_samples(image_dir: str | os.PathLike, mask_dir: str | os.PathLike,
                   fov_dir: str | os.PathLike | None = None, mask_suffix: str = "", fov_suffix: str = "",
                   image_suffix: str = "", skipped: Skipped | None = None) -> list[SegSample]:
    """Pairs of an image folder and a mask folder (and a field-of-view folder): the mask of
    `<stem><image_suffix>.*` is `<stem><mask_suffix>.*` (any image extension), so CVC-612's 1_fram.png
    pairs with 1_mask.png (image_suffix '_fram', mask_suffix '_mask') and DRIVE's 21_training.tif with
    21_manual1.gif. Files of the image folder that are another image's mask or FOV (CHASE_DB1 keeps
    them together) are not images; images without a mask are skipped and reported."""
    image_dir, mask_dir = _existing_dir(image_dir, "image"), _existing_dir(mask_dir, "mask")
    tables = [("mask", files_by_stem(mask_dir), mask_suffix, mask_dir)]
    if fov_dir is not None:
        fov_dir = _existing_dir(fov_dir, "field-of-view")
        tables.append(("field-of-view mask", files_by_stem(fov_dir), fov_suffix, fov_dir))
    candidates = sorted(p for paths in files_by_stem(image_dir).values() for p in paths)
    if image_suffix:
        candidates = [p for p in candidates if image_stem(p).endswith(image_suffix)]
    taken = {q for p in candidates for _, table, suffix, _ in tables if suffix or image_suffix
             for q in table.get(match_name(p, suffix, image_suffix), []) if q != p}
    skipped = skipped if skipped is not None else []
    samples = []
    for path in candidates:
        if path in taken:
            continue
        try:
            found = [match(path, table, suffix, what, folder, image_suffix) for what, table, suffix, folder in tables]
        except DataError as e:
            skipped.append((str(path), str(e)))
            continue
        samples.append(SegSample(path, found[0], found[1] if len(found) > 1 else None))
    if not candidates:
        raise UserError(f"{image_dir}: no images" + (f" whose name ends in {image_suffix!r}" if image_suffix else ""))
    return samples


def write_folder_shards(image_dir: str | os.PathLike, mask_dir: str | os.PathLike, out_dir: str | os.PathLike,
                        shard_size: int | None = None, max_size: int | None = None, prefix: str = "seg",
                        fov_dir: str | os.PathLike | None = None, mask_suffix: str = "", fov_suffix: str = "",
                        image_suffix: str = "", overwrite: bool = False, progress: bool = False,
                        normalisation: Normalisation | None = None,
                        mask_rule: MaskRule | None = None) -> ShardReport:
    """Segmentation shards of folder_samples (mm-shards seg)."""
    report = ShardReport()
    samples = folder_samples(image_dir, mask_dir, fov_dir, mask_suffix, fov_suffix, image_suffix, report.skipped)
    return write_sample_shards(samples, out_dir, prefix, Path(image_dir), report, shard_size, max_size,
                               overwrite, progress, normalisation, mask_rule)


def write_sample_shards(samples: list[SegSample], out_dir: str | os.PathLike, prefix: str, source: Path,
                        report: ShardReport, shard_size: int | None = None, max_size: int | None = None,
                        overwrite: bool = False, progress: bool = False,
                        normalisation: Normalisation | None = None,
                        mask_rule: MaskRule | None = None) -> ShardReport:
    """Write SegSamples as shards: key.png (the model's 8-bit input, read and normalised as mm-segment
    does), key.mask.png and key.fov.png (0/255) and key.json (source name and size, normalisation,
    mask rule). report.notes gets the mask rule's one-line account."""
    if max_size is not None and max_size < 1:
        raise UserError(f"max size must be at least 1 pixel, got {max_size}")
    norm = normalisation or Normalisation()
    rule = mask_rule or MaskRule()
    size = shard_size if shard_size is not None else auto_shard_size(len(samples))

    def encoded() -> Iterator[dict[str, bytes]]:
        used: set[str] = set()
        for sample in tqdm(samples, desc=prefix, unit="img", disable=not progress):
            fields = _encode_sample(sample, max_size, report.skipped, norm, rule)
            if fields is not None:
                report.written += 1
                yield {"__key__": make_key(image_stem(sample.image), used), **fields}

    report.shards = write_samples(encoded(), out_dir, prefix, size, overwrite)
    if rule.describe():
        report.notes.append(rule.describe())
    return _finish(report, source)


def _existing_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{what} folder {p} does not exist" if not p.exists() else f"{what} folder {p} is not a folder")
    return p


def _encode_sample(sample: SegSample, max_size: int | None, skipped: Skipped, norm: Normalisation,
                   rule: MaskRule) -> dict[str, bytes] | None:
    try:
        pixels = read_pixels(sample.image)
        rgb = norm.apply(pixels)
    except DataError as e:
        skipped.append((str(sample.image), str(e)))
        return None
    height, width = rgb.shape[:2]
    grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    image = Image.fromarray(rgb[..., 0] if grey else rgb)
    size = fit_size((width, height), max_size)
    if size != (width, height):
        image = image.resize(size, Image.Resampling.LANCZOS)
    fields = {"png": png_bytes(image)}
    for what, value in (("mask", sample.mask), ("fov", sample.fov)):
        if value is None:
            continue
        try:
            mask = value if isinstance(value, np.ndarray) else read_mask(value, rule)
        except DataError as e:
            skipped.append((str(sample.image), f"{what} {value.name}: {e}"))
            return None
        if mask.shape != (height, width):
            name = f"{what} {value.name}" if isinstance(value, Path) else f"derived {what}"
            reason = f"{name} is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}"
            skipped.append((str(sample.image), reason))
            return None
        if what == "fov" and not mask.any():
            skipped.append((str(sample.image), "field-of-view mask is empty (all zero)"))
            return None
        out = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))
        if size != (width, height):
            out = out.resize(size, Image.Resampling.NEAREST)
        fields[f"{what}.png"] = png_bytes(out)
    meta = {"source": sample.image.name, "source_size": [width, height], "size": list(size),
            "source_dtype": str(pixels.dtype), "source_channels": int(pixels.shape[-1]),
            "normalisation": norm.to_dict()}
    fields["json"] = json.dumps(meta).encode("utf-8")
    return fields


# ---------------------------------------------------------------------------------------------------
# Matching files by name


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
