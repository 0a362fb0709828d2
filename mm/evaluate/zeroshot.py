"""mm-zeroshot: zero-shot classification of labelled shards with an exported model."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mm.errors import UserError, cli_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mm-zeroshot",
        description="Zero-shot classification (CLIP_benchmark protocol: prompt-ensembled class embeddings, "
                    "logits 100 x cos) of an exported model (runs/<name>/export/model.safetensors).")
    p.add_argument("--checkpoint", required=True, help="exported safetensors file written by a train/ run")
    p.add_argument("--data", required=True, help="WebDataset shards whose json carries an int 'label'")
    p.add_argument("--classnames", default="shapes", help="built-in set (shapes) or a file, one name per line")
    p.add_argument("--templates", default="shapes", help="built-in set or a file, one template with {} per line")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--output", help="write the metrics JSON here")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mm.data.classnames import load_classnames, load_templates
    from mm.engine.checkpoint import load_exported
    from mm.metrics.zeroshot import evaluate_zeroshot
    from mm.models.clip import clip_preprocess, clip_tokenizer

    classnames, templates = load_classnames(args.classnames), load_templates(args.templates)
    task, cfg, model = load_exported(args.checkpoint)
    if not hasattr(model, "encode_image"):
        raise UserError(f"{args.checkpoint}: a {task.name} model has no encode_image/encode_text")
    metrics = evaluate_zeroshot(model, clip_tokenizer(cfg.model), clip_preprocess(cfg.model, False), args.data,
                                classnames, templates, args.batch_size, num_workers=args.workers)
    record = {"task": task.name, "checkpoint": str(args.checkpoint), "data": args.data,
              "classnames": args.classnames, "templates": args.templates, "metrics": metrics,
              "chance": 1.0 / len(classnames)}
    text = json.dumps(record)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    acc5 = f", acc5 {metrics['acc5']:.3f}" if "acc5" in metrics else ""
    print(f"zero-shot {task.name}: acc1 {metrics['acc1']:.3f}{acc5}, mean per-class recall "
          f"{metrics['mean_per_class_recall']:.3f} on {int(metrics['n_images'])} images "
          f"(chance {1.0 / len(classnames):.3f})")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
