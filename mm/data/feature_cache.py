"""STRUCTURE's feature cache: one pass over the paired shards through the shared loader, every layer's
pooled features of both frozen encoders stored on disk, so that layer selection and training never
run the encoders.

Layout of a cache directory:
  part-000000.safetensors ...  tensors `vision.<layer>` (n_part, d) and `text.<layer>` (n_part, d)
  meta.json                    written last: sample keys in row order, per-layer widths, the encoder
                               identities (config, weights digest, preprocessing), the shard URLs
A directory without meta.json is an interrupted build. A cache whose recorded identity differs from
the one the current config gives is stale: opening it is a DataError, never a silent reuse.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mm.data.image_text import decode_image
from mm.data.loader import Loader, SampleError, StreamSpec, default_collate
from mm.errors import DataError, UserError, write_text_atomic
from mm.models.encoders import (
    EncoderConfig,
    build_encoder,
    encoder_identity,
    text_tokenizer,
    vision_preprocess,
)

META = "meta.json"
FORMAT = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def cache_identity(vision: dict, text: dict, urls: str) -> dict:
    return {"format": FORMAT, "vision": vision, "text": text, "data": urls}


def expected_identity(vision_cfg: EncoderConfig, text_cfg: EncoderConfig, urls: str) -> dict:
    """The identity a cache built now from this config would record (hashes weights, builds nothing
    for encoders with a path)."""
    return cache_identity(encoder_identity(vision_cfg, "vision"), encoder_identity(text_cfg, "text"), urls)


def _pair_map(preprocess, tokenizer):
    def sample_map(raw: dict, rng: random.Random) -> dict[str, Any]:
        caption = raw.get("txt")
        if caption is None:
            raise SampleError("missing_caption", raw.get("__key__", "?"))
        caption = caption.decode("utf-8", "replace").strip()
        return {"image": preprocess(decode_image(raw)), "text": tokenizer([caption])[0], "key": raw["__key__"]}

    return sample_map


def build_feature_cache(vision_cfg: EncoderConfig, text_cfg: EncoderConfig, urls: str, out_dir: str | Path,
                        batch_size: int = 64, num_workers: int = 2, dtype: str = "float32",
                        part_size: int = 8192, max_samples: int = 0, overwrite: bool = False,
                        device: str = "cpu", max_bad_fraction: float = 0.1,
                        progress: bool = False) -> dict:
    """Extract and store every layer's pooled features of both encoders for each (image, caption) pair
    in `urls` (one pass, shard order, no augmentation). Returns the meta record."""
    out = Path(out_dir)
    if dtype not in DTYPES:
        raise UserError(f"cache.dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: the cache directory is not empty (pass --overwrite to rebuild it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    vision = build_encoder(vision_cfg, "vision").to(device)
    text = build_encoder(text_cfg, "text").to(device)
    identity = cache_identity(encoder_identity(vision_cfg, "vision", vision),
                              encoder_identity(text_cfg, "text", text), urls)
    spec = StreamSpec(urls=urls, sample_map=_pair_map(vision_preprocess(vision_cfg), text_tokenizer(text_cfg)),
                      collate=default_collate, batch_size=batch_size, num_workers=num_workers,
                      shuffle_buffer=0, repeat=False, drop_last=False)
    loader = Loader(spec, max_bad_fraction=max_bad_fraction)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="cache", unit="sample")

    keys: list[str] = []
    seen: set[str] = set()
    duplicates = 0
    buf_v: list[list[torch.Tensor]] = []
    buf_t: list[list[torch.Tensor]] = []
    parts: list[str] = []

    def flush() -> None:
        if not buf_v:
            return
        tensors = {}
        for side, buf in (("vision", buf_v), ("text", buf_t)):
            for layer in range(len(buf[0])):
                tensors[f"{side}.{layer}"] = torch.cat([b[layer] for b in buf]).contiguous()
        name = f"part-{len(parts):06d}.safetensors"
        save_file(tensors, str(out / name))
        parts.append(name)
        buf_v.clear()
        buf_t.clear()

    buffered = 0
    with torch.no_grad():
        for batch in loader:
            keep = []
            for i, key in enumerate(batch["key"]):
                if key in seen:  # the same key in two shards: the first occurrence wins
                    duplicates += 1
                    continue
                seen.add(key)
                keep.append(i)
            if max_samples:
                keep = keep[:max(0, max_samples - len(keys))]
            if not keep:
                if max_samples and len(keys) >= max_samples:
                    break
                continue
            idx = torch.tensor(keep)
            images = batch["image"][idx].to(device)
            tokens = batch["text"][idx].to(device)
            buf_v.append([f.float().cpu().to(DTYPES[dtype]) for f in vision.layers(images)])
            # Captions repeat (templated or multi-image data): each distinct one is encoded once per batch.
            unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)
            buf_t.append([f[inverse].float().cpu().to(DTYPES[dtype]) for f in text.layers(unique)])
            keys.extend(batch["key"][i] for i in keep)
            buffered += len(keep)
            if bar:
                bar.update(len(keep))
            if buffered >= part_size:
                flush()
                buffered = 0
            if max_samples and len(keys) >= max_samples:
                break
    flush()
    if bar:
        bar.close()
    if not keys:
        raise DataError(f"{urls}: no usable image-caption pairs")
    meta = {"identity": identity, "n": len(keys), "keys": keys, "parts": parts, "dtype": dtype,
            "vision_dims": list(vision.dims), "text_dims": list(text.dims),
            "duplicate_keys": duplicates, "bad_samples": loader.bad_counts}
    write_text_atomic(out / META, json.dumps(meta))
    return meta


def _differences(recorded: Any, expected: Any, prefix: str = "") -> list[str]:
    if isinstance(recorded, dict) and isinstance(expected, dict):
        out = []
        for k in sorted(set(recorded) | set(expected)):
            out += _differences(recorded.get(k), expected.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if recorded == expected else [prefix]


class FeatureCache:
    """A built cache, checked against the identity the current config expects."""

    def __init__(self, path: str | Path, expected: dict | None = None):
        self.path = Path(path)
        meta_path = self.path / META
        if not meta_path.is_file():
            what = "an interrupted build (no meta.json)" if self.path.is_dir() else "missing"
            raise DataError(f"{self.path}: the feature cache is {what}; build it with `mm-structure cache`")
        self.meta = json.loads(meta_path.read_text())
        if expected is not None:
            diff = _differences(self.meta["identity"], expected)
            if diff:
                raise DataError(f"{self.path}: stale feature cache, built with a different {', '.join(diff[:3])}"
                                f"; rebuild it with `mm-structure cache --overwrite`")
        self.keys: list[str] = self.meta["keys"]
        self.vision_dims: list[int] = self.meta["vision_dims"]
        self.text_dims: list[int] = self.meta["text_dims"]

    def __len__(self) -> int:
        return int(self.meta["n"])

    def layer(self, side: str, index: int) -> torch.Tensor:
        """(n, d) float32 features of one layer, rows in `keys` order."""
        chunks = []
        for part in self.meta["parts"]:
            with safe_open(str(self.path / part), framework="pt") as f:
                chunks.append(f.get_tensor(f"{side}.{index}"))
        return torch.cat(chunks).float()

    def layers(self, side: str, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        dims = self.vision_dims if side == "vision" else self.text_dims
        out = []
        for i in range(len(dims)):
            t = self.layer(side, i)
            out.append(t if rows is None else t[rows])
        return out
