"""Turning raw image-text shard samples into model inputs (decode, transform, tokenise)."""

from __future__ import annotations

import io
import json
import random
from typing import Any, Callable

import torch
from PIL import Image

from mm.data.loader import SampleError

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


def image_text_map(preprocess: Callable[[Image.Image], torch.Tensor],
                   tokenizer: Callable[[list[str]], torch.Tensor],
                   require_caption: bool = True) -> Callable[[dict, random.Random], dict[str, Any]]:
    """Sample map for image-text shards: {image, text (token ids), caption, key, meta}."""

    def sample_map(raw: dict, rng: random.Random) -> dict[str, Any]:
        caption = raw.get("txt")
        if caption is None and require_caption:
            raise SampleError("missing_caption", raw.get("__key__", "?"))
        caption = caption.decode("utf-8", "replace").strip() if caption is not None else ""
        meta = decode_json(raw)
        image = preprocess(decode_image(raw))
        return {"image": image, "text": tokenizer([caption])[0], "caption": caption,
                "key": raw["__key__"], "meta": meta}

    return sample_map
