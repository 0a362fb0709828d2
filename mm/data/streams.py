"""Loaders built from a run config's `data` section: the one place a config becomes a StreamSpec.

`train`: endless, shuffled, each rank reading its own share of data.train (weighted and resampled if
so configured), resumable from a Loader state. `val`: one pass over data.val, no sample dropped, each
rank reading its own shards (all of them with world_size 1). Evaluation over ranks runs the ranks'
batches through `lockstep`, so every rank makes the same number of forward passes (ZeRO-3 gathers
parameters collectively in each one), and sums its results over the ranks.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from mm import dist
from mm.data.image_text import decode_image, decode_json
from mm.data.loader import Loader, SampleError, StreamSpec, default_collate
from mm.errors import DataError, UserError

SPLITS = ("train", "val")


def stream_from_config(data: Any, split: str, sample_map: Callable, *, seed: int = 0, rank: int = 0,
                       world_size: int = 1, eval_batch_size: int | None = None,
                       state: dict | None = None) -> Loader:
    """The loader of `split` over `data` (a mm.config.DataConfig); see the module docstring.

    `eval_batch_size` sizes val batches (data.batch_size when None). Both splits are divided over the
    ranks by shards: a rank may get no val shard when there are fewer shards than ranks."""
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
                          batch_size=eval_batch_size or data.batch_size, seed=seed, rank=rank,
                          world_size=world_size, num_workers=0, shuffle_buffer=0, repeat=False, drop_last=False,
                          retries=data.retries)
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
                           batch_size: int = 64, num_workers: int = 0, rank: int = 0,
                           world_size: int = 1) -> Loader:
    """One pass over labelled shards through the shared loader: batches with `image` and `label`; with
    world_size > 1, only this rank's shards (see `lockstep`). (`tokenizer` is unused: captions are not
    needed, so they are not tokenised per sample.)"""

    def image_map(raw: dict, rng: random.Random) -> dict:
        return {"image": preprocess(decode_image(raw)), "key": raw["__key__"], "meta": decode_json(raw)}

    spec = StreamSpec(urls=urls, sample_map=labelled_map(image_map, n_classes), collate=default_collate,
                      batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
                      shuffle_buffer=0, repeat=False, drop_last=False)
    return Loader(spec)


def lockstep(batches: Iterable[dict]) -> Iterator[dict]:
    """This rank's batches, then padding batches until every rank has run out of its own.

    Ranks reading their own shards hold different numbers of batches, but under ZeRO-3 every forward
    pass gathers parameters from all ranks, so a rank that stopped early would hang the others. A
    padding batch has zeros shaped like a real batch (another rank's, when this one had none) and
    `pad: True`: the caller runs it through the model and drops its results. One object all-gather
    per batch; a plain iteration in a single process."""
    if dist.world_size() == 1:
        yield from batches
        return
    import torch.distributed as tdist

    it = iter(batches)
    while True:
        batch = next(it, None)
        shapes = None if batch is None else {k: (tuple(v.shape), v.dtype) for k, v in batch.items()
                                             if isinstance(v, torch.Tensor)}
        everyone: list[Any] = [None] * dist.world_size()
        tdist.all_gather_object(everyone, shapes)
        given = [s for s in everyone if s is not None]
        if not given:
            return
        if batch is None:
            batch = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in given[0].items()}
            batch["pad"] = True
        yield batch
