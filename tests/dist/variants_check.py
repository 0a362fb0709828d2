"""Run by tests/test_engine_variants.py as one process: the ZeRO offload configs, bf16 on the CPU and
`pipe:` shard URLs each train a few steps and export. Writes a JSON of results."""

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "dist"))
from engine_check import TINY  # noqa: E402


def main(shards: str, out: str) -> None:
    from safetensors.torch import load_file

    from mm.config import load_config
    from mm.engine.trainer import train
    from mm.tasks import get_task

    task = get_task("clip")
    variants = {
        "zero2_offload": ["train.deepspeed_config=configs/ds/zero2_offload.json"],
        "zero3_offload": ["train.deepspeed_config=configs/ds/zero3_offload.json"],
        "bf16_zero2": ["train.precision=bf16"],
        "pipe_urls": [f"data.train=pipe:cat {shards}"],
        "grad_accum_2": ["train.grad_accum=2", "data.samples_per_epoch=64"],
    }
    results = {}
    for name, extra in variants.items():
        overrides = TINY + [f"data.train={shards}", "train.steps=3", "data.num_workers=1",
                            f"train.out_dir={out}/{name}"] + extra
        res = train(get_task("clip", load_config(ROOT / "configs/clip/tiny.yaml", overrides, task.config_class)))
        weights = load_file(res["export"])
        results[name] = {"loss": res["last"]["loss"], "step": res["step"],
                         "finite": all(bool(w.isfinite().all()) for w in weights.values()),
                         "dtype": str(next(iter(weights.values())).dtype),
                         "epoch": res["last"].get("epoch"),
                         "batches": res["engine"].global_samples // 8}
        assert math.isfinite(res["last"]["loss"])
    Path(out, "variants.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
