"""STRUCTURE's feature cache: one pass over the paired shards through the shared loader, every layer's
pooled features of both frozen encoders stored on disk, so that layer selection and training never
run the encoders.

Layout of a cache directory:
  part-000000.safetensors ...  tensors `vision.<layer>` (n_part, d) and `text.<layer>` (n_part, d)
  meta.json                    written last: sample keys in row order, per-layer widths, the encoder
                               identities (config, weights digest, preprocessing), the shard URLs
Each distinct image is encoded once: rows are keyed by a digest of the encoder's input (the
preprocessed image tensor), so COCO-style data with several caption rows per image costs one vision
forward per image, not per row; the rows still hold one vision feature each (the format is unchanged,
and caches built before this read as they are: their rows hold the same features). Repeats more than
IMAGE_MEMO distinct images apart are encoded again (same features, only slower).
A directory without meta.json is an interrupted build. A cache whose recorded identity differs from
the one the current config gives is stale: opening it is a DataError, never a silent reuse.

Rebuilding (--overwrite) never costs the user a folder: the new cache is built in a hidden sibling
folder and swapped in only when complete (a mistyped shard path or a crash keeps the old cache), and
the folder it replaces must be recognisably a cache (meta.json with MARKER, or nothing but cache
files): a cache.dir pointing at anything else is refused, never deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import sys
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mm.data.image_text import decode_image
from mm.data.loader import Loader, SampleError, StreamSpec, check_local_shards, default_collate
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
MARKER = "mm-feature-cache"  # meta.json["kind"]: what makes a folder safe to replace
_PART = re.compile(r"part-\d{6}\.safetensors")
# What a cache folder may hold: its parts, meta.json (and its temporary name), mm-structure select's
# default output folder.
_CACHE_NAMES = {META, f".{META}.tmp", "select"}
DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Distinct images whose features are kept for reuse while caching (least recently seen dropped first):
# repeated images of caption-per-row data sit close together, and the bound keeps memory flat.
IMAGE_MEMO = 8192


def cache_identity(vision: dict, text: dict, urls: str) -> dict:
    return {"format": FORMAT, "vision": vision, "text": text, "data": urls}


def expected_identity(vision_cfg: EncoderConfig, text_cfg: EncoderConfig, urls: str) -> dict:
    """The identity a cache built now from this config would record (hashes weights, builds nothing
    for encoders with a path)."""
    return cache_identity(encoder_identity(vision_cfg, "vision"), encoder_identity(text_cfg, "text"), urls)


def _pair_map(preprocess: Callable, tokenizer: Callable) -> Callable[[dict, random.Random], dict[str, Any]]:
    def sample_map(raw: dict, rng: random.Random) -> dict[str, Any]:
        caption = raw.get("txt")
        if caption is None:
            raise SampleError("missing_caption", raw.get("__key__", "?"))
        caption = caption.decode("utf-8", "replace").strip()
        image = preprocess(decode_image(raw))
        # The encoder's exact input identifies the image: equal digests, equal features.
        digest = hashlib.blake2b(image.contiguous().numpy().tobytes(), digest_size=16).hexdigest()
        return {"image": image, "text": tokenizer([caption])[0], "key": raw["__key__"], "digest": digest}

    return sample_map


def build_feature_cache(vision_cfg: EncoderConfig, text_cfg: EncoderConfig, urls: str, out_dir: str | Path,
                        batch_size: int = 64, num_workers: int = 2, dtype: str = "float32",
                        part_size: int = 8192, max_samples: int = 0, overwrite: bool = False,
                        device: str = "cpu", max_bad_fraction: float = 0.1,
                        progress: bool = False) -> dict:
    """Extract and store every layer's pooled features of both encoders for each (image, caption) pair
    in `urls` (one pass, shard order, no augmentation). Returns the meta record."""
    final = Path(out_dir)
    if dtype not in DTYPES:
        raise UserError(f"cache.dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if device != "cpu" and not device.startswith(("cuda", "mps", "xpu")):
        raise UserError(f"cache.device must be cpu, cuda or cuda:N, got {device!r}")
    replacing = _check_replaceable(final, overwrite)
    check_local_shards(urls, "data.train")
    out = final.parent / f".{final.name}.building"
    created = [p for p in (final.parent, *final.parent.parents) if not p.exists()]  # removed on failure
    try:
        if out.exists():  # left by a build that was killed: ours by its name
            shutil.rmtree(out)
        out.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"cache.dir {final}: cannot create {out}: {e.strerror or e}") from None
    try:
        meta = _build(vision_cfg, text_cfg, urls, out, batch_size, num_workers, dtype, part_size,
                      max_samples, device, max_bad_fraction, progress)
        _swap(out, final, replacing)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        for folder in created:  # innermost first; only ever empty folders this build made
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    if replacing:
        print(f"replaced the feature cache in {final} ({meta['n']} pairs)", file=sys.stderr)
    return meta


def is_feature_cache(path: Path) -> bool:
    """Whether `path` is a folder this module wrote: meta.json carrying MARKER (or, from before the
    marker, an identity with a format), or a folder holding nothing but cache files (an interrupted
    build, a cache whose meta.json is damaged)."""
    if not path.is_dir():
        return False
    try:
        meta = json.loads((path / META).read_text())
        if isinstance(meta, dict) and (meta.get("kind") == MARKER or
                                       isinstance(meta.get("identity"), dict) and "format" in meta["identity"]):
            return True
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    return all(p.name in _CACHE_NAMES or _PART.fullmatch(p.name) for p in path.iterdir())


def _check_replaceable(final: Path, overwrite: bool) -> bool:
    """True when `final` holds a cache to replace; UserError when it holds anything else."""
    if final.exists() and not final.is_dir():
        raise UserError(f"cache.dir {final} is a file, not a folder")
    if not final.exists() or not any(final.iterdir()):
        return False
    if not is_feature_cache(final):
        raise UserError(f"cache.dir {final} is not empty and is not a feature cache (no {META} written by "
                        "`mm-structure cache`): nothing deleted; choose another cache.dir")
    if not overwrite:
        raise UserError(f"{final}: the cache directory is not empty (pass --overwrite to rebuild it)")
    return True


def _swap(new: Path, final: Path, replacing: bool) -> None:
    """Put the complete cache `new` at `final`; the old cache is deleted only once the new one is there."""
    if not replacing:
        if final.exists():
            final.rmdir()  # an empty folder the user made for it
        os.replace(new, final)
        return
    old = final.parent / f".{final.name}.old"
    if old.exists():
        shutil.rmtree(old)
    os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(old, final)  # put the old cache back where it was
        raise
    shutil.rmtree(old)


def _build(vision_cfg: EncoderConfig, text_cfg: EncoderConfig, urls: str, out: Path, batch_size: int,
           num_workers: int, dtype: str, part_size: int, max_samples: int, device: str,
           max_bad_fraction: float, progress: bool) -> dict:
    """The cache itself, written into `out` (meta.json last)."""
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

    memo: OrderedDict[str, list[torch.Tensor]] = OrderedDict()  # digest -> per-layer vision rows
    encoded = 0  # images through the vision encoder

    def vision_rows(images: torch.Tensor, digests: list[str]) -> list[torch.Tensor]:
        """Per-layer (len(digests), d) vision features; each image not in the memo is encoded once."""
        nonlocal encoded
        new = list(dict.fromkeys(d for d in digests if d not in memo))
        if new:
            first = {d: i for i, d in reversed(list(enumerate(digests)))}
            feats = vision.layers(images[torch.tensor([first[d] for d in new])].to(device))
            encoded += len(new)
            for j, d in enumerate(new):
                memo[d] = [f[j].float().cpu().to(DTYPES[dtype]) for f in feats]
        rows = []
        for d in digests:
            memo.move_to_end(d)
            rows.append(memo[d])
        while len(memo) > IMAGE_MEMO:
            memo.popitem(last=False)
        return [torch.stack([r[layer] for r in rows]) for layer in range(len(rows[0]))]

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
            tokens = batch["text"][idx].to(device)
            buf_v.append(vision_rows(batch["image"][idx], [batch["digest"][i] for i in keep]))
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
    meta = {"kind": MARKER, "identity": identity, "n": len(keys), "keys": keys, "parts": parts, "dtype": dtype,
            "vision_dims": list(vision.dims), "text_dims": list(text.dims),
            "duplicate_keys": duplicates, "images_encoded": encoded, "bad_samples": loader.bad_counts}
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
        self.meta = self._read_meta(meta_path)
        if expected is not None:
            diff = _differences(self.meta["identity"], expected)
            if diff:
                raise DataError(f"{self.path}: stale feature cache, built with a different {', '.join(diff[:3])}"
                                f"; rebuild it with `mm-structure cache --overwrite`")
        self.keys: list[str] = self.meta["keys"]
        self.vision_dims: list[int] = self.meta["vision_dims"]
        self.text_dims: list[int] = self.meta["text_dims"]
        self._check_parts()

    def _damaged(self, what: str) -> DataError:
        return DataError(f"{self.path}: the feature cache is damaged ({what}); rebuild it with "
                         "`mm-structure cache --overwrite`")

    def _read_meta(self, meta_path: Path) -> dict:
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise self._damaged(f"{META} is not valid JSON, e.g. cut short") from None
        need = {"identity": dict, "n": int, "keys": list, "parts": list, "vision_dims": list, "text_dims": list}
        bad = [k for k, tp in need.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), tp)]
        if bad:
            raise self._damaged(f"{META} lacks {', '.join(bad)}")
        if len(meta["keys"]) != meta["n"]:
            raise self._damaged(f"{META} lists {len(meta['keys'])} keys for {meta['n']} rows")
        return meta

    def _check_parts(self) -> None:
        """Every part present, whole (safetensors checks its header covers the file) and holding every
        layer with one row per key: a truncated or missing part fails here, not half-way through a run."""
        rows = 0
        for part in self.meta["parts"]:
            path = self.path / str(part)
            if not path.is_file():
                raise self._damaged(f"{part} is missing")
            try:
                with safe_open(str(path), framework="pt") as f:
                    names = set(f.keys())
                    shapes = {name: f.get_slice(name).get_shape() for name in names}
            except Exception as e:  # noqa: BLE001 -- safetensors raises its own error type for bad files
                raise self._damaged(f"{part}: {e}") from None
            expected = {f"vision.{i}" for i in range(len(self.vision_dims))} | \
                       {f"text.{i}" for i in range(len(self.text_dims))}
            if names != expected:
                raise self._damaged(f"{part} holds other tensors than the layers {META} lists")
            counts = {shape[0] for shape in shapes.values()}
            if len(counts) != 1:
                raise self._damaged(f"{part}: layers with different row counts")
            rows += counts.pop()
        if rows != len(self):
            raise self._damaged(f"{rows} rows in the parts, {len(self)} in {META}")

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
