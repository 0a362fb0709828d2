"""Files of segmentation inference: reading images of any depth, SAR intensity normalisation, matching
masks by name, and outputs written whole or not at all (with a GeoTIFF input's georeferencing).

Reading, normalisation and mask rules live in mm.data.seg_readers, shared with mm-shards so that
training data and inference inputs go through the same code (see Normalisation and MaskRule there).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mm.data.seg_readers import (  # noqa: F401 -- re-exported: mm-segment's reading API
    MIN_SIDE,
    MaskRule,
    Normalisation,
    files_by_stem,
    image_stem,
    is_image_file,
    match,
    match_name,
    percentile_stretch,
    read_geotags,
    read_label,
    read_mask,
    read_pixels,
    to_rgb8,
)

read_image = read_pixels


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
    commit(), so an error or interrupt leaves no half-written file; discard() removes the temporaries.
    Targets are names inside `folder` or paths."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pending: list[tuple[Path, Path]] = []

    def _temp(self, target: str | Path) -> Path:
        final = self.folder / target if isinstance(target, str) else Path(target)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        self.pending.append((Path(tmp), final))
        return Path(tmp)

    def add_image(self, target: str | Path, image: Image.Image, fmt: str) -> None:
        image.save(self._temp(target), format=fmt)

    def add_tiff(self, target: str | Path, array: np.ndarray,
                 extratags: list[tuple[int, int, int, Any, bool]]) -> None:
        """A TIFF carrying `extratags` (a GeoTIFF input's georeferencing, read_geotags) unchanged."""
        import tifffile

        tifffile.imwrite(self._temp(target), array, extratags=extratags, compression="zlib",
                         photometric="minisblack")

    def add_text(self, target: str | Path, text: str) -> None:
        self._temp(target).write_text(text)

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
