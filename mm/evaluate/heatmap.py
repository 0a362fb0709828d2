"""mm filip-heatmap: where FILIP's token-wise matching lands in an image, as a picture.

    mm filip-heatmap --checkpoint runs/clutter-filip/export/model.safetensors --image scene.png \
        --caption "a red circle at the top left" --out heat.png

For each patch the heat is the part of the caption's text->image score that lands there: every valid
caption token picks its most similar patch (the max inside FILIP's s^T), and a patch's heat is the sum
of the similarities of the tokens that picked it, divided by the number of tokens (the heat map sums
to s^T). `--direction image` shows the other half instead: each patch's best similarity to any caption
token (the max inside s^I, whose mean over patches is s^I). The PNG has the input image's size: the
image, darkened, under the heat in a colour map; the patch grid is mapped back through the model's
resize-shortest-side-and-centre-crop preprocessing.

    mm filip-heatmap --checkpoint EXPORT --data 'data/clutter/retrieval/clutter-000000.tar'

measures instead, over image-text shards whose json names the caption's objects (`named` and `boxes`,
as the clutter world writes them), how often a caption token's best patch overlaps the box of the
object it names, against the share of patches that overlap that box (where a token landing on a
random patch would hit). Captions naming one object only.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mm.cliargs import add_debug, command_prog
from mm.errors import UserError, check_output_file, cli_main

DIRECTIONS = ("text", "image")


@dataclass
class TokenMap:
    """Token-wise similarities of one image and one caption, and where each patch sits in the image."""

    sim: torch.Tensor  # (N_patches, N_valid_text) cosine similarities
    grid: int  # patches per side
    crop: tuple[float, float, float]  # (x0, y0, side) of the model's square view, in image pixels
    token_ids: list[int]  # the valid caption tokens, in order

    def heat(self, direction: str = "text") -> torch.Tensor:
        """(grid, grid) heat; see the module docstring for the two directions."""
        if direction == "image":
            per_patch = self.sim.amax(1)
        elif direction == "text":
            best, where = self.sim.max(0)
            per_patch = torch.zeros(self.sim.shape[0]).index_add_(0, where, best) / self.sim.shape[1]
        else:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        return per_patch.view(self.grid, self.grid)

    def patch_box(self, index: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in image pixels of patch `index` (row-major)."""
        x0, y0, side = self.crop
        cell = side / self.grid
        row, col = divmod(index, self.grid)
        return x0 + col * cell, y0 + row * cell, x0 + (col + 1) * cell, y0 + (row + 1) * cell

    def best_patches(self) -> list[int]:
        """Each valid caption token's most similar patch (row-major index)."""
        return self.sim.argmax(0).tolist()


def box_overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """True when the two (x0, y0, x1, y1) boxes share some area (x1, y1 exclusive)."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def centre_crop(width: int, height: int) -> tuple[float, float, float]:
    """The square an open_clip eval transform (resize the shortest side, centre crop) keeps."""
    side = min(width, height)
    return (width - side) / 2, (height - side) / 2, float(side)


@torch.no_grad()
def token_map(model: torch.nn.Module, tokenizer: Any, preprocess: Any, image: Image.Image,
              caption: str) -> TokenMap:
    """The FILIP model's normalised patch-by-token similarities for one image and caption."""
    pixels = preprocess(image.convert("RGB"))[None]
    ids = tokenizer([caption])
    img, img_mask = model.encode_image_tokens(pixels)
    txt, txt_mask = model.encode_text_tokens(ids)
    img = F.normalize(img[0][img_mask[0]].float(), dim=-1)
    txt = F.normalize(txt[0][txt_mask[0]].float(), dim=-1)
    grid = math.isqrt(img.shape[0])
    if grid * grid != img.shape[0]:
        raise UserError(f"the image tower gives {img.shape[0]} patch tokens, not a square grid")
    return TokenMap(sim=img @ txt.T, grid=grid, crop=centre_crop(*image.size),
                    token_ids=ids[0][txt_mask[0]].tolist())


def render(image: Image.Image, tmap: TokenMap, heat: torch.Tensor) -> Image.Image:
    """The heat over the image, at the image's size (outside the model's square view: the image, dimmed)."""
    from matplotlib import colormaps

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    h, w = rgb.shape[:2]
    values = heat.numpy()
    lo, hi = float(values.min()), float(values.max())
    norm = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    x0, y0, side = tmap.crop
    ys = np.floor((np.arange(h) + 0.5 - y0) * tmap.grid / side).astype(int)
    xs = np.floor((np.arange(w) + 0.5 - x0) * tmap.grid / side).astype(int)
    inside = (ys[:, None] >= 0) & (ys[:, None] < tmap.grid) & (xs[None] >= 0) & (xs[None] < tmap.grid)
    cells = norm[ys.clip(0, tmap.grid - 1)[:, None], xs.clip(0, tmap.grid - 1)[None]]
    colour = colormaps["inferno"](cells)[..., :3]
    out = np.where(inside[..., None], 0.35 * rgb + 0.65 * colour, 0.35 * rgb)
    return Image.fromarray((out * 255).round().clip(0, 255).astype(np.uint8))


@torch.no_grad()
def box_hits(model: torch.nn.Module, tokenizer: Any, preprocess: Any, urls: str,
             words: tuple[str, ...] = ()) -> dict[str, float]:
    """Where caption tokens' best patches land, over the one-object captions of `urls` (see the module
    docstring). `words`: token strings counted separately as well (e.g. colour and shape names)."""
    import webdataset as wds

    hits = {"all": [0, 0], "words": [0, 0]}
    chance, captions = 0.0, 0
    decoder = _decoder()
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        if len(meta.get("named", [])) != 1:
            continue
        image = Image.open(io.BytesIO(sample["png"])).convert("RGB")
        box = tuple(meta["boxes"][meta["named"][0]])
        tmap = token_map(model, tokenizer, preprocess, image, sample["txt"].decode("utf-8"))
        on_box = [box_overlap(tmap.patch_box(k), box) for k in range(tmap.grid ** 2)]
        chance += sum(on_box) / len(on_box)
        captions += 1
        for k, token in zip(tmap.best_patches(), tmap.token_ids):
            for key in ("all", "words") if decoder.get(token, "").replace("</w>", "") in words else ("all",):
                hits[key][0] += on_box[k]
                hits[key][1] += 1
    if not captions:
        raise UserError(f"--data {urls}: no caption naming exactly one object (json 'named' and 'boxes')")
    out = {"captions": float(captions), "chance": chance / captions,
           "hit_rate_all_tokens": hits["all"][0] / hits["all"][1], "tokens": float(hits["all"][1])}
    if hits["words"][1]:
        out["hit_rate_words"] = hits["words"][0] / hits["words"][1]
        out["word_tokens"] = float(hits["words"][1])
    return out


def build_parser() -> argparse.ArgumentParser:
    from mm.evaluate.models import add_model_arguments

    p = argparse.ArgumentParser(
        prog=command_prog("filip-heatmap"),
        description="Heat map of a FILIP export's token-wise scores of one caption over one image, written "
                    "as a PNG of the image's size; prints the hottest patch and each caption token's best "
                    "patch as JSON.")
    add_model_arguments(p)
    p.add_argument("--image", help="the image file")
    p.add_argument("--caption", help="the caption to match")
    p.add_argument("--out", help="the PNG to write")
    p.add_argument("--data", help="instead of one picture: image-text shards with json 'named' and 'boxes' "
                                  "(the clutter world); prints how often caption tokens' best patches fall on "
                                  "the named object")
    p.add_argument("--direction", choices=DIRECTIONS, default="text",
                   help="text: each caption token's best patch, weighted by its similarity (the "
                        "text->image half of the score; default); image: each patch's best similarity to "
                        "any caption token (the image->text half)")
    add_debug(p)
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.data:
        if args.image or args.caption or args.out:
            raise UserError("--data measures a whole set: give it without --image, --caption and --out")
        from mm.data.loader import check_local_shards
        from mm.data.synthetic import COLOURS, NEUTRALS, SHAPES

        check_local_shards(args.data, "--data")
        loaded = _load_filip(args)
        result = box_hits(loaded.model, loaded.tokenizer, loaded.preprocess, args.data,
                          words=(*COLOURS, *NEUTRALS, *SHAPES))
        print(json.dumps({"data": args.data, "checkpoint": loaded.source, **result}))
        return 0
    missing = [o for o, v in (("--image", args.image), ("--caption", args.caption), ("--out", args.out)) if v is None]
    if missing:
        raise UserError(f"give --image, --caption and --out (missing {', '.join(missing)}), or --data")
    if not args.caption.strip():
        raise UserError("--caption is empty")
    if not args.out.lower().endswith(".png"):
        raise UserError(f"--out: {args.out} must end in .png")
    check_output_file(args.out, "--out")
    try:
        with Image.open(args.image) as im:
            image = im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"--image: {args.image} does not exist") from None
    except OSError as e:
        raise UserError(f"--image: cannot read {args.image} as an image ({e})") from None
    loaded = _load_filip(args)
    tmap = token_map(loaded.model, loaded.tokenizer, loaded.preprocess, image, args.caption)
    heat = tmap.heat(args.direction)
    picture = render(image, tmap, heat)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.out)
    hottest = int(heat.flatten().argmax())
    words = _token_strings(tmap.token_ids)
    record = {"image": args.image, "caption": args.caption, "out": args.out, "direction": args.direction,
              "grid": tmap.grid, "hottest_patch": [round(v, 2) for v in tmap.patch_box(hottest)],
              "tokens": [{"token": t, "best_patch": [round(v, 2) for v in tmap.patch_box(k)],
                          "similarity": round(float(tmap.sim[k, r]), 4)}
                         for r, (t, k) in enumerate(zip(words, tmap.best_patches()))]}
    print(f"wrote {args.out} ({image.size[0]}x{image.size[1]}); hottest patch {record['hottest_patch']}",
          file=sys.stderr)
    print(json.dumps(record))
    return 0


def _load_filip(args: argparse.Namespace) -> Any:
    from mm.evaluate.models import load_eval_model

    loaded = load_eval_model(args)
    if not hasattr(loaded.model, "encode_image_tokens"):
        raise UserError(f"{loaded.source}: token-wise maps need a FILIP model, this is {loaded.task!r}")
    loaded.model.eval()
    return loaded


def _decoder() -> dict[int, str]:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer().decoder


def _token_strings(ids: list[int]) -> list[str]:
    decoder = _decoder()
    return [decoder.get(i, str(i)).replace("</w>", "") for i in ids]


if __name__ == "__main__":
    raise SystemExit(main())
