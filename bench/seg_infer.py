"""Tiles per second of mm-segment's batched sliding-window inference against segment_anything's
SamPredictor run tile by tile, on the same model and the same tiles.

    python bench/seg_infer.py                                   # vit_b at 512 px, 6 tiles, CPU
    python bench/seg_infer.py --image-size 1024 --height 1792 --width 2560 --device cuda --precision bf16

Model: a TopoLoRA-SAM (vit_b encoder by default, LoRA r=8 on the MLP linears, the adapter, SAM's mask
decoder) built at --image-size with random weights: speed does not depend on the weights and no
checkpoint is downloaded. Image: random RGB of --height x --width, cut into --image-size tiles with
--overlap as mm-segment cuts it.

  ours:      mm.evaluate.segment.Segmenter in tile mode: tiles normalised once, --batch-size tiles per
             encoder call, outputs blended (Gaussian) back into one image, as `mm-segment` runs.
  predictor: segment_anything.SamPredictor over a segment_anything Sam made of the same modules (the
             adapter wrapped after the image encoder): set_image(tile) + predict(no prompt,
             multimask_output=False, return_logits=True) per tile, one tile per encoder call. No
             blending on this side (it would only add to its time).

Both sides run under torch.no_grad (SamPredictor's own) and the same autocast (--precision). Passes
alternate the two sides (--repeats each; the table gives the median) so load from other processes on a
shared machine falls on both. Reported: tiles/s from wall-clock time, and CPU seconds per tile of the
process (all threads; steadier on a shared machine). The maximum difference of the two sides' logits on
the first tile checks that they compute the same thing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class EncoderWithAdapter:
    """Built lazily (torch imported in main): SAM's image encoder followed by the TopoLoRA adapter, with
    the img_size attribute SamPredictor reads."""

    @staticmethod
    def build(model):
        import torch

        class _Encoder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.encoder = model.image_encoder
                self.adapter = model.adapter
                self.img_size = model.image_encoder.img_size

            def forward(self, x):
                return self.adapter(self.encoder(x))

        return _Encoder()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    p.add_argument("--image-size", type=int, default=512, help="model input = tile side")
    p.add_argument("--height", type=int, default=896)
    p.add_argument("--width", type=int, default=1152)
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()

    import numpy as np
    import torch
    from segment_anything import SamPredictor
    from segment_anything.modeling import Sam

    from mm.evaluate.segment import InferenceOptions, Segmenter
    from mm.evaluate.tiling import tile_grid
    from mm.models.sam import PIXEL_MEAN, PIXEL_STD, SamModelConfig, build_topolora_sam

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_topolora_sam(SamModelConfig(variant=args.variant, image_size=args.image_size)).eval().to(device)
    image = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    size = args.image_size
    tiles = [image[t:t + size, x:x + size] for t, x in tile_grid(args.height, args.width, size, args.overlap)]

    segmenter = Segmenter(model, size, InferenceOptions(mode="tile", overlap=args.overlap,
                                                        batch_size=args.batch_size, precision=args.precision),
                          device)
    sam = Sam(image_encoder=EncoderWithAdapter.build(model), prompt_encoder=model.prompt_encoder,
              mask_decoder=model.mask_decoder, pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD)).eval()
    predictor = SamPredictor(sam)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def predictor_tile(tile: np.ndarray) -> np.ndarray:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            predictor.set_image(tile)
            logits, _, _ = predictor.predict(multimask_output=False, return_logits=True)
        return logits

    # Same computation: the first tile's logits from both sides (ours without blending).
    x = (torch.from_numpy(tiles[0].copy()).permute(2, 0, 1).float().to(device)
         - torch.tensor(PIXEL_MEAN, device=device).view(3, 1, 1)) / torch.tensor(PIXEL_STD, device=device).view(3, 1, 1)
    ours_first = segmenter._predict(x[None])[0, 0].cpu().numpy()
    diff = float(np.abs(ours_first - predictor_tile(tiles[0])[0]).max())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[tuple[float, float]]] = {"ours": [], "predictor": []}
    for _ in range(args.repeats):
        for side in ("ours", "predictor"):
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            if side == "ours":
                segmenter.logits(image)
            else:
                for tile in tiles:
                    predictor_tile(tile)
            sync()
            times[side].append((time.perf_counter() - wall, time.process_time() - cpu))

    n = len(tiles)
    rate = {s: n / statistics.median(w for w, _ in v) for s, v in times.items()}
    cpu = {s: statistics.median(c for _, c in v) / n for s, v in times.items()}
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                    f"{torch.get_num_threads()} torch threads")
    print(f"# bench/seg_infer.py {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine}")
    print(f"# {args.variant} TopoLoRA-SAM at {size} px, {args.precision}, {n} tiles of a {args.height}x{args.width} "
          f"image (overlap {args.overlap}), batch {args.batch_size}, median of {args.repeats} alternating passes; "
          f"max |logit difference| on tile 0: {diff:.2e}")
    print("| side | tiles/s (wall) | CPU s / tile | speed-up (wall) |")
    print("|---|---|---|---|")
    for side, label in (("ours", "mm-segment (batched tiles + blending)"),
                        ("predictor", "SamPredictor set_image + predict per tile")):
        print(f"| {label} | {rate[side]:.3f} | {cpu[side]:.2f} | {rate[side] / rate['predictor']:.2f}x |")


if __name__ == "__main__":
    main()
