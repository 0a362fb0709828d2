"""mm-zeroshot: zero-shot classification of labelled images with an exported model.

--data is labelled WebDataset shards (json `label`), a CLIP_benchmark WebDataset root (its class names
and templates, `.cls` labels), an image folder with one sub-folder per class, or a .csv/.jsonl list of
image paths and labels (see mm/evaluate/datasets.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mm.cliargs import add_debug, command_prog
from mm.errors import UserError, check_output_file, cli_main, write_text_atomic
from mm.evaluate.models import add_model_arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=command_prog("zeroshot"),
        description="Zero-shot classification (CLIP_benchmark protocol: prompt-ensembled class embeddings, "
                    "logits 100 x cos) of an exported model (runs/<name>/export/model.safetensors).")
    add_model_arguments(p)
    p.add_argument("--data", required=True,
                   help="a CLIP_benchmark WebDataset root (classnames.txt, zeroshot_classification_templates.txt, "
                        "<split>/nshards.txt, <split>/0.tar ...); another directory: image folder, one sub-folder "
                        "per class; a .csv/.jsonl file: list with an image path column (filepath/image) and a "
                        "label (int or class name); anything else: WebDataset shards whose json carries an int "
                        "'label'")
    p.add_argument("--split", default=None,
                   help="the split of a CLIP_benchmark root (default test)")
    p.add_argument("--classnames", default=None,
                   help="built-in set (shapes, cifar10, cifar100, imagenet) or a file, one name per line "
                        "(default: a CLIP_benchmark root's classnames.txt, the folder names for an image "
                        "folder, else shapes)")
    p.add_argument("--templates", default=None,
                   help="built-in set (shapes, cifar10, cifar100, imagenet) or a file, one template with {} "
                        "per line (default: a CLIP_benchmark root's zeroshot_classification_templates.txt, else "
                        "the built-in set named by --classnames if there is one, else shapes)")
    p.add_argument("--scoring", choices=("pooled", "tokenwise"), default="pooled",
                   help="pooled: cosine of pooled embeddings (every model); tokenwise: FILIP's token-wise "
                        "late-interaction score, averaged over templates (FILIP models)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--output", help="write the metrics JSON here")
    p.add_argument("--confusion", metavar="PATH.png", help="write the confusion matrix as a PNG here")
    add_debug(p)
    return p


def _progress(batches: Iterable, desc: str) -> Iterable:
    from tqdm import tqdm

    try:
        total = len(batches)
    except TypeError:  # the shared loader streams: no length
        total = None
    return tqdm(batches, total=total, desc=desc, unit="batch", file=sys.stderr,
                disable=not sys.stderr.isatty(), leave=False)


def write_confusion_png(matrix: Any, classnames: list[str], path: str, title: str) -> None:
    """Row-normalised confusion matrix (true class rows, predicted columns) with the counts' colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classnames)
    m = matrix.float()
    rates = m / m.sum(1, keepdim=True).clamp(min=1)
    size = min(4 + 0.35 * n, 40)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 60:
        ax.set_xticks(range(n), classnames, rotation=90, fontsize=8)
        ax.set_yticks(range(n), classnames, fontsize=8)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mm.data.classnames import BUILTIN_TEMPLATES, load_classnames, load_templates
    from mm.data.streams import labelled_shard_batches
    from mm.evaluate.datasets import (
        SkipUnreadable,
        build_dataset,
        clip_benchmark_prompts,
        clip_benchmark_set,
        cls_shard_batches,
        dataset_kind,
        image_label_loader,
    )
    from mm.evaluate.models import load_eval_model
    from mm.metrics.zeroshot import SCORINGS, classification_metrics, confusion_matrix

    kind = dataset_kind(args.data)
    cb = clip_benchmark_set(args.data, args.split, "zeroshot_classification")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    for option, path in (("--output", args.output), ("--confusion", args.confusion)):
        if path:
            check_output_file(path, option)
    if cb is not None:
        classnames, templates, classnames_from, templates_from = clip_benchmark_prompts(
            cb, args.classnames, args.templates)
    else:
        if args.classnames is None and kind != "folder":
            args.classnames = "shapes"
        classnames = load_classnames(args.classnames) if args.classnames is not None else None
        if args.templates is None:
            args.templates = args.classnames if args.classnames in BUILTIN_TEMPLATES else "shapes"
        templates = load_templates(args.templates)
        classnames_from, templates_from = args.classnames or "folder names", args.templates
    loaded = load_eval_model(args)
    if kind == "shards":
        from mm.data.loader import check_local_shards

        check_local_shards(args.data, "--data")
    model, tokenizer, preprocess = loaded.model, loaded.tokenizer, loaded.preprocess
    if args.scoring == "tokenwise" and not hasattr(model, "encode_image_tokens"):
        raise UserError(f"{loaded.source}: token-wise scoring needs a FILIP model, this is {loaded.task!r}")

    label_mapping, ignored = "shard_json_label", []
    if kind == "clip_benchmark":
        label_mapping = "shard_cls_label"
        batches = SkipUnreadable(cls_shard_batches(preprocess, cb.urls, len(classnames), args.batch_size,
                                                   args.workers))
    elif kind == "shards":
        batches = SkipUnreadable(labelled_shard_batches(preprocess, tokenizer, args.data, len(classnames),
                                                        args.batch_size, args.workers))
    else:
        dataset = build_dataset(args.data, preprocess, classnames)
        classnames, label_mapping, ignored = dataset.classnames, dataset.label_mapping, dataset.ignored
        batches = SkipUnreadable(image_label_loader(dataset, args.batch_size, args.workers))
    logits, labels = SCORINGS[args.scoring](model, tokenizer, _progress(batches, "zero-shot"), classnames, templates)
    if not len(labels):
        raise UserError(f"{args.data}: no readable labelled images")
    metrics = classification_metrics(logits, labels, len(classnames))
    metrics["n_images"] = float(len(labels))
    skipped = list(batches.skipped)
    if kind in ("shards", "clip_benchmark"):  # the shared loader skips corrupt samples and counts them per kind
        bad = batches.batches.bad_counts
        skipped_count = int(bad.get("total", 0))
    else:
        bad, skipped_count = {}, len(skipped)
    record = {"dataset": args.data, "dataset_type": kind, "model": loaded.name,
              "pretrained": loaded.source, "checkpoint": loaded.source,
              "task": "zeroshot_classification", "model_task": loaded.task, "metrics": metrics,
              "language": "en", "scoring": args.scoring, "classnames": classnames_from,
              "templates": templates_from, "n_classes": len(classnames), "n_templates": len(templates),
              "label_mapping": label_mapping, "batch_size": args.batch_size,
              "chance": 1.0 / len(classnames), "skipped_images": skipped_count,
              "skipped": [{"path": p, "reason": r} for p, r in skipped[:1000]],
              "ignored_files": len(ignored)}
    if cb is not None:
        record.update(split=cb.split, n_shards=len(cb.shards))
    if bad:
        record["bad_samples"] = bad
    if args.confusion:
        write_confusion_png(confusion_matrix(logits, labels, len(classnames)), classnames, args.confusion,
                            f"{Path(args.data).name}: acc1 {metrics['acc1']:.3f}")
        record["confusion_png"] = args.confusion
    text = json.dumps(record)
    if args.output:
        write_text_atomic(args.output, text + "\n", announce="--output")
    acc5 = f", acc5 {metrics['acc5']:.3f}" if "acc5" in metrics else ""
    skip = f", {skipped_count} unreadable skipped" if skipped_count else ""
    print(f"zero-shot {loaded.task} ({args.scoring}): acc1 {metrics['acc1']:.3f}{acc5}, mean per-class recall "
          f"{metrics['mean_per_class_recall']:.3f} on {int(metrics['n_images'])} images{skip} "
          f"(chance {1.0 / len(classnames):.3f})")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
