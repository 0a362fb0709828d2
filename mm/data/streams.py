"""Loaders built from a run config's `data` section: the one place a config becomes a StreamSpec.

`train`: endless, shuffled, each rank reading its own share of data.train (weighted and resampled if
so configured), resumable from a Loader state. `val`: one pass over data.val in order, every rank
reading the whole set (evaluation under ZeRO-3 runs the same batches on all ranks), no sample dropped.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from mm.data.image_text import decode_image, decode_json
from mm.data.loader import Loader, SampleError, StreamSpec, default_collate
from mm.errors import DataError, UserError

SPLITS = ("train", "val")


def stream_from_config(data: Any, split: str, sample_map: Callable, *, seed: int = 0, rank: int = 0,
                       world_size: int = 1, eval_batch_size: int | None = None,
                       state: dict | None = None) -> Loader:
    """The loader of `split` over `data` (a mm.config.DataConfig); see the module docstring.

    `eval_batch_size` sizes val batches (data.batch_size when None)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    train = split == "train"
    urls = data.train if train else data.val
    if not urls:
        raise UserError(f"data.{split}: no shards given")
    if train:
        spec = StreamSpec(urls=urls, sample_map=sample_map, collate=default_collate,
                          batch_size=data.batch_size, seed=seed, rank=rank, world_size=world_size,
                          num_workers=data.num_workers, shuffle_buffer=data.shuffle_buffer, repeat=True,
                          resampled=data.resampled, weights=list(data.train_weights), retries=data.retries)
    else:
        spec = StreamSpec(urls=urls, sample_map=sample_map, collate=default_collate,
                          batch_size=eval_batch_size or data.batch_size, seed=seed, num_workers=0,
                          shuffle_buffer=0, repeat=False, drop_last=False, retries=data.retries)
    return Loader(spec, state=state, max_bad_fraction=data.max_bad_fraction)


def labelled_map(image_map: Callable, n_classes: int) -> Callable:
    """Wrap an image sample map so samples carry an int `label` from their json, checked against
    the class list (a label outside it is a DataError naming the shard)."""

    def sample_map(raw: dict, rng: random.Random) -> dict:
        sample = image_map(raw, rng)
        label = sample["meta"].get("label")
        if label is None:
            raise SampleError("missing_label", raw.get("__key__", "?"))
        if not isinstance(label, int) or not 0 <= label < n_classes:
            raise DataError(f"{raw.get('__url__', '?')}: sample {raw.get('__key__')} has label {label!r}, "
                            f"outside the {n_classes} class names")
        sample["label"] = torch.tensor(label)
        return sample

    return sample_map


def labelled_shard_batches(preprocess: Callable, tokenizer: Callable | None, urls: str, n_classes: int,
                           batch_size: int = 64, num_workers: int = 0) -> Loader:
    """One pass over labelled shards through the shared loader: batches with `image` and `label`.
    (`tokenizer` is unused: captions are not needed, so they are not tokenised per sample.)"""

    def image_map(raw: dict, rng: random.Random) -> dict:
        return {"image": preprocess(decode_image(raw)), "key": raw["__key__"], "meta": decode_json(raw)}

    spec = StreamSpec(urls=urls, sample_map=labelled_map(image_map, n_classes), collate=default_collate,
                      batch_size=batch_size, num_workers=num_workers, shuffle_buffer=0, repeat=False,
                      drop_last=False)
    return Loader(spec)
