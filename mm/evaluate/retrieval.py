"""mm-retrieval: image->text and text->image recall@k of an exported model on image-text shards.

Every image is in the gallery once; its captions are the json `captions` list (as `mm-shards coco`
writes it) or else the lines of its txt (one caption per line, as CLIP_benchmark's retrieval shards
hold them), and every one of them counts as correct (CLIP_benchmark protocol). --data may also be a
CLIP_benchmark WebDataset root (dataset_type.txt `retrieval`, `<split>/nshards.txt`, `<split>/N.tar`).
`--scoring tokenwise` ranks with FILIP's token-wise similarities (s^I for image queries, s^T for caption
queries) instead of the cosine of pooled embeddings; `--scoring tokenwise-mean` ranks both directions
with (s^I + s^T) / 2, as the FILIP paper scores a pair.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mm.cliargs import add_debug, command_prog
from mm.data.loader import Loader
from mm.errors import UserError, cli_main, write_text_atomic
from mm.evaluate.models import add_model_arguments
from mm.evaluate.runtime import (
    DatasetRun,
    Runtime,
    add_output_arguments,
    add_runtime_arguments,
    announce_skip,
    plan_datasets,
    progress,
    runtime_from_args,
)

if TYPE_CHECKING:
    from mm.evaluate.datasets import ClipBenchmarkSet


def captions_map(preprocess: Callable) -> Callable[[dict, random.Random], dict[str, Any]]:
    """Sample map: {image, captions (list of str)}: the json `captions`, else every non-blank line of the
    txt; a sample without any caption is skipped and counted."""
    from mm.data.image_text import decode_image, decode_json
    from mm.data.loader import SampleError

    def sample_map(raw: dict, rng: random.Random) -> dict[str, Any]:
        meta = decode_json(raw)
        captions = meta.get("captions")
        if not (isinstance(captions, list) and captions and all(isinstance(c, str) for c in captions)):
            txt = raw.get("txt")
            captions = txt.decode("utf-8", "replace").splitlines() if txt is not None else []
        captions = [c.strip() for c in captions if c.strip()]
        if not captions:
            raise SampleError("missing_caption", raw.get("__key__", "?"))
        return {"image": preprocess(decode_image(raw)), "captions": captions, "key": raw["__key__"]}

    return sample_map


def retrieval_batches(preprocess: Callable, urls: str, batch_size: int = 64, num_workers: int = 0) -> Loader:
    """One pass over image-text shards through the shared loader (no shuffling)."""
    from mm.data.loader import Loader, StreamSpec, default_collate

    spec = StreamSpec(urls=urls, sample_map=captions_map(preprocess), collate=default_collate,
                      batch_size=batch_size, num_workers=num_workers, shuffle_buffer=0, repeat=False,
                      drop_last=False)
    return Loader(spec)


@torch.no_grad()
def retrieval_embeddings(model: torch.nn.Module, tokenizer: Callable, batches: Iterable[dict],
                         device: torch.device | str = "cpu", text_batch_size: int = 256
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image embeddings, caption embeddings, caption -> image index), all normalised, on the CPU."""
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    images, texts, owners = [], [], []
    n_images = 0
    try:
        for batch in batches:
            feats = model.encode_image(batch["image"].to(device, dtype)).float()
            images.append(F.normalize(feats, dim=-1).cpu())
            captions = [c for caps in batch["captions"] for c in caps]
            owners.extend(n_images + i for i, caps in enumerate(batch["captions"]) for _ in caps)
            n_images += len(batch["captions"])
            for start in range(0, len(captions), text_batch_size):
                tokens = tokenizer(captions[start:start + text_batch_size]).to(device)
                texts.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    finally:
        model.train(was_training)
    if not images:
        raise UserError("no image-caption samples to evaluate")
    return torch.cat(images), torch.cat(texts), torch.tensor(owners, dtype=torch.long)


@torch.no_grad()
def retrieval_token_scores(model: torch.nn.Module, tokenizer: Callable, batches: Iterable[dict],
                           device: torch.device | str = "cpu", text_batch_size: int = 256,
                           image_chunk: int = 64, text_chunk: int = 256
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s_i2t, s_t2i, caption -> image index): FILIP's token-wise similarities of every image with every
    caption, both (n_images, n_captions), for a model with encode_image_tokens / encode_text_tokens.

    Every image's and caption's normalised tokens are kept on the CPU (n x tokens x width floats), and
    the scores are computed in blocks of `image_chunk` images x `text_chunk` captions.
    """
    from mm.losses.filip import filip_similarity

    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    img_tok, img_mask, txt_tok, txt_mask, owners = [], [], [], [], []
    n_images = 0
    try:
        for batch in batches:
            tokens, mask = model.encode_image_tokens(batch["image"].to(device, dtype))
            img_tok.append(F.normalize(tokens.float(), dim=-1).cpu())
            img_mask.append(mask.cpu())
            captions = [c for caps in batch["captions"] for c in caps]
            owners.extend(n_images + i for i, caps in enumerate(batch["captions"]) for _ in caps)
            n_images += len(batch["captions"])
            for start in range(0, len(captions), text_batch_size):
                tokens, mask = model.encode_text_tokens(tokenizer(captions[start:start + text_batch_size]).to(device))
                txt_tok.append(F.normalize(tokens.float(), dim=-1).cpu())
                txt_mask.append(mask.cpu())
    finally:
        model.train(was_training)
    if not img_tok:
        raise UserError("no image-caption samples to evaluate")
    img, im, txt, tm = torch.cat(img_tok), torch.cat(img_mask), torch.cat(txt_tok), torch.cat(txt_mask)
    s_i2t, s_t2i = [], []
    for start in range(0, len(img), image_chunk):
        a, b = filip_similarity(img[start:start + image_chunk], im[start:start + image_chunk], txt, tm,
                                normalize=False, chunk_size=text_chunk)
        s_i2t.append(a)
        s_t2i.append(b)
    return torch.cat(s_i2t), torch.cat(s_t2i), torch.tensor(owners, dtype=torch.long)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=command_prog("retrieval"),
        description="Image->text and text->image recall@k (CLIP_benchmark protocol: each image once in the "
                    "gallery, all its captions correct) of an exported model on image-text shards.")
    add_model_arguments(p)
    p.add_argument("--data", required=True, action="append",
                   help="repeatable, one result per dataset: WebDataset shards (captions from json 'captions' as "
                        "mm-shards coco writes them, else one per line of the txt) or a CLIP_benchmark WebDataset "
                        "root (<split>/nshards.txt, <split>/0.tar ...)")
    p.add_argument("--split", default=None, help="the split of a CLIP_benchmark root (default test)")
    p.add_argument("--scoring", choices=("pooled", "tokenwise", "tokenwise-mean"), default="pooled",
                   help="pooled: cosine of pooled embeddings (every model); tokenwise: FILIP's token-wise "
                        "similarities, s^I for image queries and s^T for caption queries (FILIP exports only); "
                        "tokenwise-mean: (s^I + s^T) / 2 for both (FILIP exports only)")
    p.add_argument("--ks", default="1,5,10", help="comma-separated k values (default 1,5,10)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    add_output_arguments(p)
    add_runtime_arguments(p)
    add_debug(p)
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mm.data.loader import check_local_shards
    from mm.evaluate.datasets import clip_benchmark_set
    from mm.evaluate.models import load_eval_model, model_fields

    try:
        ks = tuple(int(k) for k in args.ks.split(","))
    except ValueError:
        raise UserError(f"--ks: {args.ks!r} is not a comma-separated list of integers") from None
    if not ks or min(ks) < 1:
        raise UserError(f"--ks: {args.ks!r}: every k must be >= 1")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    runtime = runtime_from_args(args)
    runs = plan_datasets(args.data, {"--output": args.output},
                         {**model_fields(args), "task": "zeroshot_retrieval", "scoring": args.scoring},
                         args.skip_existing)
    todo = []
    for run in runs:
        if run.skip:
            announce_skip(run)
        else:  # every dataset is checked before the model loads
            cb = clip_benchmark_set(run.data, args.split, "zeroshot_retrieval")
            urls = cb.urls if cb is not None else run.data
            check_local_shards(urls, "--data")
            todo.append((run, urls, cb))
    if not todo:
        return 0
    loaded = load_eval_model(args)
    loaded.model.to(runtime.device)
    if args.scoring != "pooled" and not hasattr(loaded.model, "encode_image_tokens"):
        raise UserError(f"{loaded.source}: token-wise scoring needs a FILIP model, this is {loaded.task!r}")
    for run, urls, cb in todo:
        _evaluate_dataset(args, run, urls, cb, ks, loaded, runtime)
    return 0


def _evaluate_dataset(args: argparse.Namespace, run: DatasetRun, urls: Any, cb: ClipBenchmarkSet | None,
                      ks: tuple[int, ...], loaded: Any, runtime: Runtime) -> None:
    from mm.metrics.retrieval import recall_from_scores, retrieval_recall

    model, tokenizer, preprocess = loaded.model, loaded.tokenizer, loaded.preprocess
    loader = retrieval_batches(preprocess, urls, args.batch_size, args.workers)
    batches = progress(loader, f"retrieval {run.name}")
    with runtime.autocast():
        if args.scoring != "pooled":
            s_i2t, s_t2i, text_to_image = retrieval_token_scores(model, tokenizer, batches, runtime.device)
        else:
            image_emb, text_emb, text_to_image = retrieval_embeddings(model, tokenizer, batches, runtime.device)
    if args.scoring == "tokenwise-mean":
        both = (s_i2t + s_t2i) / 2
        metrics = recall_from_scores(both, both, text_to_image, ks)
    elif args.scoring == "tokenwise":
        metrics = recall_from_scores(s_i2t, s_t2i, text_to_image, ks)
    else:
        metrics = retrieval_recall(image_emb, text_emb, text_to_image, ks)
    n_images, n_texts = int(metrics["n_images"]), int(metrics["n_texts"])
    record = {"dataset": run.data, "dataset_name": run.name, "model": loaded.name,
              "pretrained": loaded.source, "checkpoint": loaded.source,
              "task": "zeroshot_retrieval", "model_task": loaded.task, "scoring": args.scoring,
              "metrics": metrics, "language": "en", "ks": list(ks), "batch_size": args.batch_size,
              **runtime.describe(), "captions_per_image": n_texts / max(1, n_images)}
    if cb is not None:
        record.update(dataset_type="clip_benchmark", split=cb.split, n_shards=len(cb.shards))
    bad = loader.bad_counts
    if bad:
        record["bad_samples"] = bad
    text = json.dumps(record)
    output = run.outputs["--output"]
    if output:
        write_text_atomic(output, text + "\n", announce="--output")
    parts = ", ".join(f"R@{k} {metrics[f'image_to_text_recall@{k}']:.3f}/"
                      f"{metrics[f'text_to_image_recall@{k}']:.3f}" for k in ks)
    name = f"{run.name}: " if len(args.data) > 1 else ""
    print(f"{name}retrieval {loaded.task} ({args.scoring}; image->text/text->image): {parts} on {n_images} "
          f"images, {n_texts} captions")
    print(text, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
