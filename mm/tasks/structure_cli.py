"""mm structure: the preparation steps of a STRUCTURE run.

  mm structure cache  --config C   one pass over data.train: every layer of both frozen encoders, on disk
  mm structure select --config C   score every (vision layer, text layer) pair on n cached pairs with
                                   mutual k-NN and CKA; writes alignment_<metric>.json / .png and
                                   train.yaml (C with the best pair by select.metric filled in)
Then train: `mm train structure --config <select.out>/train.yaml` (or keep C's layers, -1/-1 = the
last layers, as the baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from mm.cliargs import add_config_options, add_debug, command_prog
from mm.errors import ConfigError, cli_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=command_prog("structure"), description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("cache", "extract and store every layer's features of both encoders"),
                            ("select", "score every layer pair and write the best one into a train config")):
        s = sub.add_parser(name, help=help_text)
        add_config_options(s, "cache.dir=runs/cache")
        add_debug(s)
        if name == "cache":
            s.add_argument("--overwrite", action="store_true", help="rebuild a cache directory that exists")
    return p


def _config(args: argparse.Namespace):
    from mm.config import load_config
    from mm.tasks.structure import StructureRunConfig

    cfg = load_config(args.config, args.set, cls=StructureRunConfig)
    if cfg.task and cfg.task != "structure":
        raise ConfigError(f"{args.config}: a config for task {cfg.task!r}, not structure")
    cfg.task = "structure"
    if not cfg.data.train:
        raise ConfigError(f"{args.config}: data.train is empty")
    return cfg


def run_cache(cfg: Any, overwrite: bool) -> dict:
    from mm.data.feature_cache import build_feature_cache

    c = cfg.cache
    meta = build_feature_cache(cfg.model.vision, cfg.model.text, cfg.data.train, c.dir, batch_size=c.batch_size,
                               num_workers=c.num_workers, dtype=c.dtype, part_size=c.part_size,
                               max_samples=c.max_samples, overwrite=overwrite, device=c.device,
                               max_bad_fraction=cfg.data.max_bad_fraction, progress=sys.stderr.isatty())
    return {"cache": c.dir, "n": meta["n"], "vision_layers": len(meta["vision_dims"]),
            "text_layers": len(meta["text_dims"]), "vision_dims": meta["vision_dims"],
            "text_dims": meta["text_dims"], "duplicate_keys": meta["duplicate_keys"],
            "images_encoded": meta["images_encoded"], "bad_samples": meta["bad_samples"]}


def run_select(cfg: Any) -> dict:
    import torch

    from mm.config import save_config
    from mm.metrics.alignment import (
        METRICS,
        default_k,
        layer_alignment_matrix,
        save_alignment_heatmap,
        save_alignment_json,
        select_layers,
    )
    from mm.tasks.structure import open_checked_cache, pair_rows

    s = cfg.select
    if s.metric not in METRICS:
        raise ConfigError(f"select.metric must be one of {METRICS}, got {s.metric!r}")
    cache = open_checked_cache(cfg)
    # Selection sees only the pairs training will use (cache.use_pairs): the budget covers both steps.
    pool = pair_rows(len(cache), cfg.cache.use_pairs)
    available = len(cache) if pool is None else len(pool)
    n = min(s.n, available) if s.n > 0 else available
    rows = pool
    if n < available:
        pick = torch.randperm(available, generator=torch.Generator().manual_seed(s.seed))[:n]
        rows = pick if pool is None else pool[pick]
    k = s.k or default_k(n)
    if not 1 <= k < n:
        raise ConfigError(f"select.k: {k} neighbours need more than {n} pairs")
    vision, text = cache.layers("vision", rows), cache.layers("text", rows)
    out = Path(s.out or Path(cfg.cache.dir) / "select")
    earlier = [p.name for p in (out / "train.yaml", *(out / f"alignment_{m}.{e}" for m in METRICS
                                                      for e in ("json", "png"))) if p.is_file()]
    if earlier:  # a rerun replaces the earlier selection: say so rather than overwrite silently
        print(f"note: replacing the earlier layer selection in {out} ({', '.join(earlier)})", file=sys.stderr)
    record = {"n": n, "k": k, "metric": s.metric}
    for metric in METRICS:
        matrix = layer_alignment_matrix(vision, text, metric=metric, k=k)
        best = select_layers(matrix)
        save_alignment_json(matrix, out / f"alignment_{metric}.json", best, metric,
                            k if metric == "mutual_knn" else None, n)
        save_alignment_heatmap(matrix, out / f"alignment_{metric}.png", metric, best)
        record[metric] = {"vision_layer": best[0], "text_layer": best[1], "score": float(matrix[best])}
    chosen = record[s.metric]
    cfg.model.vision_layer, cfg.model.text_layer = chosen["vision_layer"], chosen["text_layer"]
    save_config(cfg, out / "train.yaml")
    record["train_config"] = str(out / "train.yaml")
    record["set"] = f"--set model.vision_layer={chosen['vision_layer']} --set model.text_layer={chosen['text_layer']}"
    return record


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = _config(args)
    if args.command == "cache":
        record = run_cache(cfg, args.overwrite)
        print(f"cached {record['n']} pairs: {record['vision_layers']} vision layers, {record['text_layers']} "
              f"text layers -> {record['cache']}")
    else:
        record = run_select(cfg)
        chosen = record[record["metric"]]
        print(f"best pair by {record['metric']} (n {record['n']}, k {record['k']}): vision layer "
              f"{chosen['vision_layer']}, text layer {chosen['text_layer']} (score {chosen['score']:.4f}); "
              f"config {record['train_config']}")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
