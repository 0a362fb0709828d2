"""mm-zeroshot: zero-shot classification of labelled images with an exported model.

--data is labelled WebDataset shards (json `label`), a CLIP_benchmark WebDataset root (its class names
and templates, `.cls` labels), an image folder with one sub-folder per class, or a .csv/.jsonl list of
image paths and labels (see mm/evaluate/datasets.py).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mm.cliargs import add_debug, command_prog
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=command_prog("zeroshot"),
        description="Zero-shot classification (CLIP_benchmark protocol: prompt-ensembled class embeddings, "
                    "logits 100 x cos) of an exported model (runs/<name>/export/model.safetensors).")
    add_model_arguments(p)
    p.add_argument("--data", required=True, action="append",
                   help="repeatable, one result per dataset. A CLIP_benchmark WebDataset root (classnames.txt, "
                        "zeroshot_classification_templates.txt, <split>/nshards.txt, <split>/0.tar ...); another "
                        "directory: image folder, one sub-folder per class; a .csv/.jsonl file: list with an image "
                        "path column (filepath/image) and a label (int or class name); anything else: WebDataset "
                        "shards whose json carries an int 'label'")
    p.add_argument("--split", default=None, help="the split of a CLIP_benchmark root (default test)")
    p.add_argument("--classnames", default=None,
                   help="built-in set (shapes, cifar10, cifar100, imagenet) or a file, one name per line "
                        "(default: a CLIP_benchmark root's classnames.txt, the folder names for an image "
                        "folder, else shapes)")
    p.add_argument("--templates", default=None,
                   help="built-in set (shapes, cifar10, cifar100, imagenet) or a file, one template with {} "
                        "per line (default: a CLIP_benchmark root's zeroshot_classification_templates.txt, else "
                        "the built-in set named by --classnames if there is one, else shapes)")
    p.add_argument("--scoring", choices=("pooled", "tokenwise", "tokenwise-mean"), default="pooled",
                   help="pooled: cosine of pooled embeddings (every model); tokenwise: FILIP's token-wise "
                        "late-interaction score s^I (image->text), averaged over templates (FILIP models); "
                        "tokenwise-mean: (s^I + s^T) / 2, both directions as the FILIP paper (FILIP models)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    add_output_arguments(p)
    p.add_argument("--confusion", metavar="PATH.png", help="write the confusion matrix as a PNG here (a template "
                                                           "like --output)")
    add_runtime_arguments(p)
    add_debug(p)
    return p


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
    from mm.evaluate.datasets import dataset_kind
    from mm.evaluate.models import load_eval_model, model_fields

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    runtime = runtime_from_args(args)
    runs = plan_datasets(args.data, {"--output": args.output, "--confusion": args.confusion},
                         {**model_fields(args), "task": "zeroshot_classification", "scoring": args.scoring},
                         args.skip_existing)
    todo = []
    for run in runs:
        if run.skip:
            announce_skip(run)
            continue
        # Every dataset's inputs are checked before the model loads or any dataset is scored.
        kind = dataset_kind(run.data)
        labels = _label_sets(args, run.data, kind)
        if kind == "shards":
            from mm.data.loader import check_local_shards

            check_local_shards(run.data, "--data")
        todo.append((run, kind, labels))
    if not todo:
        return 0
    loaded = load_eval_model(args)
    loaded.model.to(runtime.device)
    if args.scoring != "pooled" and not hasattr(loaded.model, "encode_image_tokens"):
        raise UserError(f"{loaded.source}: token-wise scoring needs a FILIP model, this is {loaded.task!r}")
    for run, kind, labels in todo:
        _evaluate_dataset(args, run, kind, labels, loaded, runtime)
    return 0


@dataclass
class LabelSets:
    """One dataset's class names (None: an image folder's sub-folders), templates, where each came
    from, and its CLIP_benchmark set if it is one."""

    classnames: list[str] | None
    templates: list[str]
    classnames_from: str
    templates_from: str
    clip_benchmark: ClipBenchmarkSet | None


def _label_sets(args: argparse.Namespace, data: str, kind: str) -> LabelSets:
    """Class names and templates for one dataset: a CLIP_benchmark root's own files, an image folder's
    sub-folders, else the shapes set, unless --classnames/--templates override them. Files are read here
    so that a missing one is reported before any compute."""
    from mm.data.classnames import BUILTIN_TEMPLATES, load_classnames, load_templates
    from mm.evaluate.datasets import clip_benchmark_prompts, clip_benchmark_set

    cb = clip_benchmark_set(data, args.split, "zeroshot_classification")
    if cb is not None:
        return LabelSets(*clip_benchmark_prompts(cb, args.classnames, args.templates), cb)
    names = args.classnames if args.classnames is not None or kind == "folder" else "shapes"
    templates = args.templates
    if templates is None:
        templates = names if names in BUILTIN_TEMPLATES else "shapes"
    return LabelSets(load_classnames(names) if names is not None else None, load_templates(templates),
                     names or "folder names", templates, None)


def _evaluate_dataset(args: argparse.Namespace, run: DatasetRun, kind: str, sets: LabelSets, loaded: Any,
                      runtime: Runtime) -> None:
    from mm.data.streams import labelled_shard_batches
    from mm.evaluate.datasets import SkipUnreadable, build_dataset, cls_shard_batches, image_label_loader
    from mm.metrics.zeroshot import SCORINGS, classification_metrics, confusion_matrix

    data, output, confusion = run.data, run.outputs["--output"], run.outputs["--confusion"]
    classnames, templates, cb = sets.classnames, sets.templates, sets.clip_benchmark
    model, tokenizer, preprocess = loaded.model, loaded.tokenizer, loaded.preprocess
    label_mapping, ignored = "shard_json_label", []
    if cb is not None:
        label_mapping = "shard_cls_label"
        batches = SkipUnreadable(cls_shard_batches(preprocess, cb.urls, len(classnames), args.batch_size,
                                                   args.workers))
    elif kind == "shards":
        batches = SkipUnreadable(labelled_shard_batches(preprocess, tokenizer, data, len(classnames),
                                                        args.batch_size, args.workers))
    else:
        dataset = build_dataset(data, preprocess, classnames)
        classnames, label_mapping, ignored = dataset.classnames, dataset.label_mapping, dataset.ignored
        batches = SkipUnreadable(image_label_loader(dataset, args.batch_size, args.workers))
    with runtime.autocast():
        logits, labels = SCORINGS[args.scoring](model, tokenizer, progress(batches, f"zero-shot {run.name}"),
                                                classnames, templates, runtime.device)
    if not len(labels):
        raise UserError(f"{data}: no readable labelled images")
    metrics = classification_metrics(logits, labels, len(classnames))
    metrics["n_images"] = float(len(labels))
    skipped = list(batches.skipped)
    if kind in ("shards", "clip_benchmark"):  # the shared loader skips corrupt samples and counts them per kind
        bad = batches.batches.bad_counts
        skipped_count = int(bad.get("total", 0))
    else:
        bad, skipped_count = {}, len(skipped)
    record = {"dataset": data, "dataset_name": run.name, "dataset_type": kind, "model": loaded.name,
              "pretrained": loaded.source, "checkpoint": loaded.source,
              "task": "zeroshot_classification", "model_task": loaded.task, "metrics": metrics,
              "language": "en", "scoring": args.scoring, "classnames": sets.classnames_from,
              "templates": sets.templates_from, "n_classes": len(classnames), "n_templates": len(templates),
              "label_mapping": label_mapping, "batch_size": args.batch_size, **runtime.describe(),
              "chance": 1.0 / len(classnames), "skipped_images": skipped_count,
              "skipped": [{"path": p, "reason": r} for p, r in skipped[:1000]],
              "ignored_files": len(ignored)}
    if cb is not None:
        record.update(split=cb.split, n_shards=len(cb.shards))
    if bad:
        record["bad_samples"] = bad
    if confusion:
        write_confusion_png(confusion_matrix(logits, labels, len(classnames)), classnames, confusion,
                            f"{Path(data).name}: acc1 {metrics['acc1']:.3f}")
        record["confusion_png"] = confusion
    text = json.dumps(record)
    if output:
        write_text_atomic(output, text + "\n", announce="--output")
    acc5 = f", acc5 {metrics['acc5']:.3f}" if "acc5" in metrics else ""
    skip = f", {skipped_count} unreadable skipped" if skipped_count else ""
    name = f"{run.name}: " if len(args.data) > 1 else ""
    print(f"{name}zero-shot {loaded.task} ({args.scoring}): acc1 {metrics['acc1']:.3f}{acc5}, mean "
          f"per-class recall {metrics['mean_per_class_recall']:.3f} on {int(metrics['n_images'])} images{skip} "
          f"(chance {1.0 / len(classnames):.3f})")
    print(text, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
