"""cProfile mm's whole training loop (mm.engine.trainer.train) on one rank: where a step's time goes.

    python bench/train_profile.py --data '/path/to/shapes-{000000..000011}.tar'           # demo CLIP
    python bench/train_profile.py --data ... --steps 100 --workers 0 --config configs/clip/tiny.yaml

--workers 0 (the default) keeps the data loader in the profiled process, so its share of a step shows
next to the model's forward/backward, DeepSpeed's step and the loop's own bookkeeping (non-finite
check, loss sums, logging). No evaluation and no intermediate checkpoints; the run directory is a
temporary one. Prints the wall and CPU time of the run, then the functions by cumulative and by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/clip/tiny.yaml"))
    ap.add_argument("--data", required=True, help="training shards (brace pattern), as data.train")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--workers", type=int, default=0, help="data.num_workers")
    ap.add_argument("--ds", default=str(ROOT / "configs/ds/zero2.json"), help="train.deepspeed_config")
    ap.add_argument("--top", type=int, default=60, help="rows of each listing")
    ap.add_argument("--set", action="append", default=[], help="extra config overrides, key=value")
    args = ap.parse_args()

    from mm.config import load_config
    from mm.engine.trainer import train
    from mm.tasks import TASKS

    with tempfile.TemporaryDirectory() as out:
        import yaml

        name = yaml.safe_load(Path(args.config).read_text())["task"]
        cls = TASKS[name]
        cfg = load_config(Path(args.config), [f"data.train={args.data}", f"data.num_workers={args.workers}",
                                              f"train.steps={args.steps}", "train.ckpt_every=0",
                                              "train.eval_every=0", "eval.zeroshot_data=", f"train.out_dir={out}",
                                              f"train.deepspeed_config={args.ds}", *args.set], cls.config_class)
        prof = cProfile.Profile()
        t, c = time.perf_counter(), time.process_time()
        result = prof.runcall(train, cls(cfg))
        print(f"{name}: {args.steps} steps in {time.perf_counter() - t:.1f} s wall, {time.process_time() - c:.1f} s "
              f"CPU of this process (profiled); last logged: {result['last']}")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(args.top)
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
