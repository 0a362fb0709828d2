"""Sliding-window tiling lives in mm.models.tiling (the parts floor), so the trainers' native-resolution
validation and mm segment run the same code; this name stays for existing imports."""

from mm.models.tiling import (  # noqa: F401 -- re-exported
    BLEND_MODES,
    MIN_WEIGHT,
    blend_weights,
    pad_to_tile,
    sliding_window,
    tile_grid,
    tile_logits,
    tile_starts,
)
