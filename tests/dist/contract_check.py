"""Run by tests/test_task_contract.py under torchrun (one rank): every entry of TASKS, from its shipped
configs/<task>/tiny.yaml on the shapes world, through the Task contract as the engine uses it: built
from its config, one optimizer step, export, reload from the export, evaluate. Writes results.json."""

import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
# What every task is given: the test's shards, one step, small batches, no loader workers.
COMMON = ["data.batch_size=16", "data.num_workers=0", "data.shuffle_buffer=10", "train.steps=1",
          "train.log_every=1", "train.ckpt_every=0", "optim.warmup_steps=1", "eval.batch_size=32"]


def prepare(name: str, cfg) -> None:
    """Work a task needs before training (STRUCTURE trains on a feature cache of data.train)."""
    if name == "structure":
        from mm.tasks.structure_cli import run_cache

        run_cache(cfg, overwrite=True)


def check(name: str, train_urls: str, val: str, out: Path) -> dict:
    from mm.config import load_config
    from mm.engine.task import Batches, Task
    from mm.engine.trainer import train
    from mm.tasks import TASKS, load_exported

    cls = TASKS[name]
    overrides = COMMON + [f"data.train={train_urls}", f"data.val={val}", f"eval.zeroshot_data={val}",
                          f"train.out_dir={out / name}"]
    if name == "structure":
        overrides.append(f"cache.dir={out / name}-cache")
    cfg = load_config(ROOT / "configs" / name / "tiny.yaml", overrides, cls.config_class)
    prepare(name, cfg)
    task = cls(cfg)
    result = {"is_task": isinstance(task, Task), "is_batches": isinstance(task.batches("train"), Batches)}
    res = train(task)
    result.update(step=res["step"], loss=res["last"]["loss"], eval=res["eval"], export=res["export"])
    loaded, loaded_cfg, model = load_exported(res["export"], expect_task=name)
    result["same_config"] = loaded_cfg == cfg
    result["eval_of_export"] = loaded.evaluate(model)
    result["finite"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return result


def main(train_urls: str, val: str, out: str, names: list[str]) -> None:
    from mm.engine.trainer import init_distributed

    init_distributed()
    results = {name: check(name, train_urls, val, Path(out)) for name in names}
    for r in results.values():
        assert math.isfinite(r["loss"])
    Path(out, "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(","))
