"""Peak memory of mm-segment's tiled inference on one large image (a stand-in model: 1x1 convolutions,
so the measurement is the pipeline's own memory, not a network's activations).

    python bench/seg_memory.py --side 12000 --tile 1024
prints the peak resident set size (ru_maxrss) before and after segmenting, and the image's own size.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from mm.evaluate.segment import InferenceOptions, Segmenter


class Pointwise(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Conv2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", type=int, default=12000)
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--mode", default="tile")
    p.add_argument("--train-scale", type=float)
    args = p.parse_args()
    torch.set_num_threads(1)
    rgb = np.random.default_rng(0).integers(0, 256, (args.side, args.side, 3), dtype=np.uint8)
    before = peak_mib()
    seg = Segmenter(Pointwise(), args.tile, InferenceOptions(args.mode, batch_size=4, train_scale=args.train_scale))
    start = time.perf_counter()
    prob = seg.logits(rgb).sigmoid_().numpy()
    pred = prob > 0.5
    print(f"side {args.side}, tile {args.tile}, mode {args.mode}: {seg.tiles_run} tiles in "
          f"{time.perf_counter() - start:.0f} s; image {rgb.nbytes / 2**20:.0f} MiB, peak RSS {before:.0f} -> "
          f"{peak_mib():.0f} MiB (+{peak_mib() - before:.0f} MiB = "
          f"{(peak_mib() - before) * 2**20 / (args.side ** 2):.1f} "
          f"bytes per pixel); mask {pred.shape}")


if __name__ == "__main__":
    main()
