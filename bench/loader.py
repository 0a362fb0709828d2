"""Throughput of the shared loader (mm.data.loader) against a bare webdataset pipeline doing the same work.

    python bench/loader.py                      # synthetic 224px shapes world in a temp dir
    python bench/loader.py --workers 4 --repeats 5
    python bench/loader.py --data /path/to/shards --json

Both sides read the same shards with the same number of DataLoader workers and do the same work per
sample: PNG decode to RGB, open_clip's training image transform (RandomResizedCrop + normalise), json
metadata decode, and CLIP BPE tokenisation of the caption, then batches of --batch-size.

  ours: Loader(StreamSpec(...)) with image_text_map(transform, tokenizer), one pass (repeat=False).
  bare: wds.WebDataset(urls) .decode("pil", only=png/txt/json) .to_tuple("png", "txt")
        .map_tuple(transform, tokenizer) .batched(B) through DataLoader(batch_size=None, num_workers=W).

`only=` keeps the bare decoder off the shards' `mask.png` field, which our image_text_map never decodes
(without it the bare side would decode two PNGs per sample). --shuffle-buffer N (default 0: none, as in
evaluation) gives ours that shuffle_buffer and the bare pipeline a `.shuffle(N)` on the raw samples.

Each pass starts fresh workers. The first --warmup batches (default 2: one per worker at the default
W=2) are not timed: the clock starts when they have arrived and stops at the last batch, and the rate
is the images in the timed batches over that time. Passes alternate ours/bare so that load from other
processes on a shared machine falls on both; the table gives the median of --repeats passes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def shard_urls(args: argparse.Namespace, tmp: str) -> tuple[list[str], float]:
    """The shard paths to read, written into `tmp` unless --data names a directory; and seconds spent."""
    if args.data:
        paths = sorted(str(p) for p in Path(args.data).glob("*.tar"))
        if not paths:
            sys.exit(f"no .tar shards in {args.data}")
        return paths, 0.0
    from mm.data.synthetic import write_shapes_world

    t0 = time.perf_counter()
    shard_size = max(1, -(-args.num_images // args.shards))
    paths = write_shapes_world(tmp, args.num_images, image_size=args.image_size, shard_size=shard_size)
    return [str(p) for p in paths], time.perf_counter() - t0


def transforms(image_size: int):
    import open_clip

    preprocess = open_clip.image_transform(image_size, is_train=True)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    return preprocess, tokenizer


def ours_batches(urls: list[str], args: argparse.Namespace):
    from mm.data.image_text import image_text_map
    from mm.data.loader import Loader, StreamSpec, default_collate

    preprocess, tokenizer = transforms(args.image_size)
    spec = StreamSpec(urls="::".join(urls), sample_map=image_text_map(preprocess, tokenizer),
                      collate=default_collate, batch_size=args.batch_size, num_workers=args.workers,
                      shuffle_buffer=args.shuffle_buffer, repeat=False, drop_last=True)
    for batch in Loader(spec):
        yield batch["image"], batch["text"]


def bare_batches(urls: list[str], args: argparse.Namespace):
    import webdataset as wds
    from torch.utils.data import DataLoader

    preprocess, tokenizer = transforms(args.image_size)

    def tokenize(caption: str):
        return tokenizer([caption])[0]

    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.single_node_only,
                             workersplitter=wds.split_by_worker, empty_check=False)
    if args.shuffle_buffer > 1:
        dataset = dataset.shuffle(args.shuffle_buffer)
    dataset = (dataset.decode("pil", only=["png", "txt", "json"])
               .to_tuple("png", "txt")
               .map_tuple(preprocess, tokenize)
               .batched(args.batch_size, partial=False))
    yield from DataLoader(dataset, batch_size=None, num_workers=args.workers)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_pass(make, urls: list[str], args: argparse.Namespace) -> dict:
    """Images/s after the warm-up batches; the pass's wall time and CPU time (workers + main process)."""
    children0, main0 = _children_cpu(), time.process_time()
    t_start = time.perf_counter()
    t0 = None
    timed_images = total_images = batches = 0
    for images, texts in make(urls, args):
        if batches == 0:
            expect = (args.batch_size, 3, args.image_size, args.image_size)
            if tuple(images.shape) != expect or tuple(texts.shape) != (args.batch_size, 77):
                raise SystemExit(f"unexpected batch shapes {tuple(images.shape)}, {tuple(texts.shape)}")
        batches += 1
        total_images += images.shape[0]
        if batches == args.warmup:
            t0 = time.perf_counter()
        elif batches > args.warmup:
            timed_images += images.shape[0]
    t_end = time.perf_counter()
    cpu_s = _children_cpu() - children0 + time.process_time() - main0  # workers are joined by now
    if t0 is None or timed_images == 0:
        raise SystemExit(f"only {batches} batch(es) in a pass: need more than --warmup={args.warmup}; "
                         "raise --num-images or lower --batch-size")
    return {"img_s": timed_images / (t_end - t0), "pass_s": t_end - t_start,
            "cpu_ms_per_img": 1000 * cpu_s / total_images, "batches": batches,
            "images": total_images, "timed_images": timed_images}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=2000, help="synthetic images to write (ignored with --data)")
    p.add_argument("--shards", type=int, default=8, help="synthetic shards to write (ignored with --data)")
    p.add_argument("--image-size", type=int, default=224, help="synthetic image side and transform size")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="batches per pass left out of the timing")
    p.add_argument("--shuffle-buffer", type=int, default=0, help="sample shuffle buffer, both sides (0: none)")
    p.add_argument("--data", default="", help="directory of existing .tar shards (png + txt) to read instead")
    p.add_argument("--json", action="store_true", help="also print one JSON record")
    args = p.parse_args(argv)
    if args.workers < 1 or args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--workers, --batch-size and --repeats must be at least 1, --warmup at least 0")

    # Import everything up front so that neither side's first pass pays for imports.
    import open_clip  # noqa: F401
    import torch
    import webdataset  # noqa: F401

    import mm.data.image_text
    import mm.data.loader  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        urls, write_s = shard_urls(args, tmp)
        if len(urls) < args.workers:
            print(f"warning: {len(urls)} shard(s) for {args.workers} workers: some workers read nothing",
                  file=sys.stderr)
        runs: dict[str, list[dict]] = {"ours": [], "bare": []}
        for _ in range(args.repeats):  # alternate, so background load falls on both
            runs["ours"].append(one_pass(ours_batches, urls, args))
            runs["bare"].append(one_pass(bare_batches, urls, args))

    med = {k: statistics.median(r["img_s"] for r in v) for k, v in runs.items()}
    ratio = med["ours"] / med["bare"]
    cpu = {k: statistics.median(r["cpu_ms_per_img"] for r in v) for k, v in runs.items()}
    source = args.data or f"synthetic shapes world, {args.num_images} images, {len(urls)} shards"
    print(f"data: {source}, {args.image_size}px; batch {args.batch_size}, {args.workers} workers, "
          f"shuffle buffer {args.shuffle_buffer}, warm-up {args.warmup} batches, {args.repeats} repeats"
          + (f"; shards written in {write_s:.1f} s" if write_s else ""))
    print(f"{'pipeline':<8} {'median img/s':>12} {'min':>8} {'max':>8} {'pass s':>8} {'CPU ms/img':>10} "
          f"{'timed img/pass':>15}")
    for name, v in runs.items():
        rates = [r["img_s"] for r in v]
        print(f"{name:<8} {med[name]:>12.1f} {min(rates):>8.1f} {max(rates):>8.1f} "
              f"{statistics.median(r['pass_s'] for r in v):>8.2f} {cpu[name]:>10.2f} {v[0]['timed_images']:>15}")
    print(f"CPU ratio ours/bare = {cpu['ours'] / cpu['bare']:.2f} (CPU time per image, all processes; "
          "steadier than img/s when other jobs share the cores)")
    if args.json:
        record = {"bench": "loader", "args": vars(args), "shards": len(urls), "write_s": write_s,
                  "torch": torch.__version__, "cpus": os.cpu_count(), "python": platform.python_version(),
                  "runs": runs, "median_img_s": med, "median_cpu_ms_per_img": cpu,
                  "ratio_ours_bare": ratio, "cpu_ratio_ours_bare": cpu["ours"] / cpu["bare"]}
        print(json.dumps(record))
    print(f"ratio ours/bare = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
