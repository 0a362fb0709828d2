"""Sliding-window inference: overlapping tiles at the model's input size, batched, blended back.

    weights = blend_weights(512, "gaussian")
    logits = sliding_window(predict, image, tile=512, overlap=0.25, weights=weights, batch_size=4)

`predict` maps a batch of tiles (B, C, T, T) to per-pixel outputs (B, K, T, T). Every pixel's output is
the weighted mean of the outputs of the tiles covering it, with a weight map that is largest at the tile
centre and small (but never zero) at its border, where a model sees the least context. This is how
nnU-Net (Gaussian, sigma = T / 8) and MONAI's sliding_window_inference blend; "linear" is a pyramid that
falls off linearly to the border, "constant" a plain average.

Tiles start every `stride = T - round(overlap * T)` pixels; the last tile of a row or column is moved
back so it ends at the image border (no tile sticks out, every pixel is covered). An image side shorter
than T is padded by the caller (see pad_to_tile); tile_logits does it, and is the one entry point both
`mm segment` (mm.evaluate.segment.Segmenter) and the segmentation trainers' native-resolution validation
(mm.tasks.segmentation, data.crop_mode = patch) call, so the two give the same logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

BLEND_MODES = ("gaussian", "linear", "constant")
# The smallest weight relative to the centre: tiles whose border is the only cover of a pixel (the image
# border) still count, and the weighted mean never divides by zero.
MIN_WEIGHT = 1e-3


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of size `tile` covering 0..length, consecutive tiles sharing about
    `overlap` x tile pixels; the last one ends at `length`. length must be >= tile."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if length < tile:
        raise ValueError(f"length {length} is shorter than the tile {tile}: pad first")
    stride = max(1, tile - round(overlap * tile))
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def tile_grid(height: int, width: int, tile: int, overlap: float) -> list[tuple[int, int]]:
    """(top, left) of every tile, row by row."""
    return [(top, left) for top in tile_starts(height, tile, overlap) for left in tile_starts(width, tile, overlap)]


def blend_weights(tile: int, mode: str = "gaussian", sigma_scale: float = 0.125) -> torch.Tensor:
    """(tile, tile) float32 weights, 1 at the centre, at least MIN_WEIGHT everywhere."""
    if mode not in BLEND_MODES:
        raise ValueError(f"blend mode must be one of {', '.join(BLEND_MODES)}, got {mode!r}")
    centre = (tile - 1) / 2
    pos = torch.arange(tile, dtype=torch.float64)
    if mode == "constant":
        w = torch.ones(tile, tile, dtype=torch.float64)
    elif mode == "gaussian":
        g = torch.exp(-0.5 * ((pos - centre) / (sigma_scale * tile)) ** 2)
        w = g[:, None] * g[None, :]
    else:
        # A pyramid: 1 - distance to the centre in the max norm, scaled so the border pixels get 1 / (T/2).
        ramp = 1 - (pos - centre).abs() / (centre + 1)
        w = torch.minimum(ramp[:, None], ramp[None, :])
    w = w / w.max()
    return w.clamp_min(MIN_WEIGHT).float()


def pad_to_tile(image: torch.Tensor, tile: int, value: float = 0.0) -> torch.Tensor:
    """(C, H, W) padded at the bottom/right so both sides are at least `tile` (SAM pads that way)."""
    h, w = image.shape[-2:]
    return F.pad(image, (0, max(0, tile - w), 0, max(0, tile - h)), value=value)


def _batches(items: list[tuple[int, int]], size: int) -> Iterator[list[tuple[int, int]]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def sliding_window(predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, tile: int,
                   overlap: float = 0.25, weights: torch.Tensor | None = None, batch_size: int = 4,
                   on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Blended outputs (K, H, W), float32 on the image's device, of `predict` over tiles of `image`
    (C, H, W) with H, W >= tile (pad_to_tile first). `on_batch(n)` is told after each batch of n tiles
    (a progress bar)."""
    if image.dim() != 3:
        raise ValueError(f"sliding_window takes one (C, H, W) image, got shape {tuple(image.shape)}")
    _, height, width = image.shape
    if weights is None:
        weights = blend_weights(tile)
    weights = weights.to(image.device, torch.float32)
    total: torch.Tensor | None = None
    norm = torch.zeros(height, width, dtype=torch.float32, device=image.device)
    for batch in _batches(tile_grid(height, width, tile, overlap), batch_size):
        tiles = torch.stack([image[:, t:t + tile, x:x + tile] for t, x in batch])
        out = predict(tiles).float()
        if total is None:
            total = torch.zeros(out.shape[1], height, width, dtype=torch.float32, device=image.device)
        for (t, x), o in zip(batch, out):
            total[:, t:t + tile, x:x + tile] += o * weights
            norm[t:t + tile, x:x + tile] += weights
        if on_batch is not None:
            on_batch(len(batch))
    assert total is not None  # tile_grid always yields at least one tile
    return total / norm


def tile_logits(predict: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, tile: int,
                mean: torch.Tensor, std: torch.Tensor, overlap: float = 0.25, weights: torch.Tensor | None = None,
                batch_size: int = 4) -> torch.Tensor:
    """Blended (K, H, W) outputs of `predict` (normalised tiles (B, 3, T, T) -> (B, K, T, T)) over a
    (3, H, W) image of 0..255 pixels at its own resolution; mean/std (1, 3, 1, 1) in 0..255 units."""
    height, width = image.shape[-2:]
    if height < tile or width < tile:
        # Zero padding after normalisation, as SAM pads (and as the model saw in training).
        x = pad_to_tile(((image[None].float() - mean) / std)[0], tile)
        run = predict
    else:
        # Large images stay uint8 and are normalised tile by tile: a float copy of a 12000 x 12000
        # RGB image alone would take 1.7 GB.
        x = image

        def run(tiles: torch.Tensor) -> torch.Tensor:
            return predict((tiles.float() - mean) / std)
    out = sliding_window(run, x, tile, overlap, weights, batch_size)
    return out[:, :height, :width]
