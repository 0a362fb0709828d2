"""Turning raw image-text shard samples into model inputs (decode, transform, tokenise)."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from mm.data.loader import SampleError
from mm.errors import UserError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def decode_image(raw: dict, keys: tuple[str, ...] = IMAGE_KEYS, mode: str = "RGB") -> Image.Image:
    """The first image field of a raw sample as a PIL image; SampleError if missing or corrupt."""
    data = next((raw[k] for k in keys if k in raw), None)
    if data is None:
        raise SampleError("missing_image", raw.get("__key__", "?"))
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        if image.mode in HIGH_BIT_MODES:
            # PIL's convert() saturates 16-bit values at 255 (a 16-bit PNG turns almost white); shards
            # written before mm-shards stretched such images, or by other tools, still hold them.
            from mm.data.shards import to_8bit

            image = to_8bit(image)
        return image.convert(mode)
    except Exception as e:  # PIL raises many types for corrupt files
        raise SampleError("undecodable_image", f"{raw.get('__key__', '?')}: {e}") from None


def decode_json(raw: dict) -> dict:
    if "json" not in raw:
        return {}
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError):
        raise SampleError("bad_json", raw.get("__key__", "?")) from None
    if not isinstance(meta, dict):
        raise SampleError("bad_json", raw.get("__key__", "?"))
    return meta


CAPTION_CHOICES = ("draw", "first")


def sample_captions(meta: dict, txt: str) -> list[str]:
    """Every caption of a sample: the json `captions` list (mm-shards coco keeps all five there) when
    it holds two or more non-empty strings, else the txt caption alone."""
    captions = meta.get("captions")
    if isinstance(captions, list):
        texts = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        if len(texts) >= 2:
            return texts
    return [txt]


def image_text_map(preprocess: Callable[[Image.Image], torch.Tensor],
                   tokenizer: Callable[[list[str]], torch.Tensor],
                   require_caption: bool = True, captions: str = "draw",
                   ) -> Callable[[dict, random.Random], dict[str, Any]]:
    """Sample map for image-text shards: {image, text (token ids), caption, caption_index, key, meta}.

    `captions`: "draw" picks one of the sample's captions (sample_captions) with the sample's rng,
    which the loader seeds from the run seed, epoch and position, so each epoch sees a different
    caption of an image and a resumed run draws the same ones; "first" always takes txt.
    `caption_index` is the drawn caption's index in json `captions` (0 for txt when there is no list).
    """
    if captions not in CAPTION_CHOICES:
        raise UserError(f"data.captions must be one of {', '.join(CAPTION_CHOICES)}; got {captions!r}")

    def sample_map(raw: dict, rng: random.Random) -> dict[str, Any]:
        caption = raw.get("txt")
        if caption is None and require_caption:
            raise SampleError("missing_caption", raw.get("__key__", "?"))
        caption = caption.decode("utf-8", "replace").strip() if caption is not None else ""
        meta = decode_json(raw)
        index = 0
        if captions == "draw":
            texts = sample_captions(meta, caption)
            if len(texts) > 1:  # one caption: no draw, so the rng stream is the same as without a list
                index = rng.randrange(len(texts))
                caption = texts[index]
        image = preprocess(decode_image(raw))
        return {"image": image, "text": tokenizer([caption])[0], "caption": caption, "caption_index": index,
                "key": raw["__key__"], "meta": meta}

    return sample_map
