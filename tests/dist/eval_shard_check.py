"""Run by tests/test_engine_dist.py under `torchrun --nproc_per_node 2`: training-time evaluation sharded
over the ranks. CLIP and FILIP under ZeRO-3 and the U-Net each train one step, then evaluate on their
own shards of a val set in lockstep (the trainer's final evaluation; the U-Net also at native
resolution, tiled); the same model evaluated on the
whole set by every rank alone (World(0, 1), the earlier behaviour) is the reference. Writes results.json.

    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/dist/eval_shard_check.py \
        TRAIN_SHARDS VAL_SHARDS ONE_VAL_SHARD OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
TINY_CLIP = ["model.arch.vision_cfg.layers=1", "model.arch.text_cfg.layers=1", "data.batch_size=8",
             "data.num_workers=1", "data.shuffle_buffer=50", "optim.warmup_steps=1", "train.steps=1",
             "train.ckpt_every=0", "eval.batch_size=5"]


def counted_forwards(module: torch.nn.Module) -> list[int]:
    """A counter of `module`'s forward calls (a one-item list the hook increments)."""
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def gather(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def main(train_shards: str, val: str, one_val: str, out: str) -> None:
    from mm.config import load_config
    from mm.engine.task import World
    from mm.engine.trainer import init_distributed
    from mm.engine.trainer import train as run
    from mm.tasks import get_task
    from mm.tasks.base import zeroshot_metrics
    from mm.tasks.segmentation import evaluate_segmentation

    init_distributed()
    results: dict = {"world": dist.get_world_size()}
    alone = World(0, 1)

    for name, scorings in (("clip", ("pooled",)), ("filip", ("pooled", "tokenwise"))):
        task = get_task(name)
        cfg = load_config(ROOT / f"configs/{name}/tiny.yaml",
                          TINY_CLIP + [f"data.train={train_shards}", f"eval.zeroshot_data={val}",
                                       f"train.deepspeed_config={ROOT}/configs/ds/zero3.json",
                                       f"train.out_dir={out}/{name}"], task.config_class)
        task = get_task(name, cfg)
        res = run(task)
        module = res["engine"].module
        calls = counted_forwards(module.visual if name == "clip" else module.clip.visual)
        sharded = zeroshot_metrics(module, cfg, *task.eval_inputs(), scorings=scorings)
        sharded_calls = calls[0]
        whole = zeroshot_metrics(module, cfg, *task.eval_inputs(), scorings=scorings, world=alone)
        cfg.eval.zeroshot_data = one_val  # one shard for two ranks: rank 1 runs padding batches only
        one_sharded = zeroshot_metrics(module, cfg, *task.eval_inputs(), scorings=scorings)
        one_whole = zeroshot_metrics(module, cfg, *task.eval_inputs(), scorings=scorings, world=alone)
        results[name] = {"trainer_eval": res["eval"], "sharded": sharded, "whole": whole,
                         "one_shard_sharded": one_sharded, "one_shard_whole": one_whole,
                         "forwards_per_rank": gather(sharded_calls),
                         "sharded_per_rank": gather(sharded), "zero_stage": res["engine"].zero_optimization_stage()}

    task = get_task("unet")
    cfg = load_config(ROOT / "configs/unet/tiny.yaml",
                      ["data.batch_size=8", "data.num_workers=1", "data.shuffle_buffer=50", "optim.warmup_steps=1",
                       "train.steps=1", "eval.batch_size=5", f"data.train={train_shards}", f"data.val={val}",
                       f"train.deepspeed_config={ROOT}/configs/ds/zero3.json", f"train.out_dir={out}/unet"],
                      task.config_class)
    res = run(get_task("unet", cfg))
    module = res["engine"].module
    calls = counted_forwards(module)
    sharded = evaluate_segmentation(module, cfg)
    sharded_calls = calls[0]
    results["unet"] = {"trainer_eval": res["eval"], "sharded": sharded,
                       "whole": evaluate_segmentation(module, cfg, world=alone),
                       "forwards_per_rank": gather(sharded_calls), "sharded_per_rank": gather(sharded),
                       "zero_stage": res["engine"].zero_optimization_stage()}
    # Native resolution (crop_mode patch), tiled like mm segment: 48 px images in 4 tiles of 32 px, 2 tiles
    # a forward; 3 shards of 14, 14 and 8 images, so the ranks' forward counts differ before padding.
    if dist.get_rank() == 0:
        from mm.data.synthetic import write_shapes_world

        write_shapes_world(Path(out, "val48"), 36, image_size=48, seed=3, balanced=True, shard_size=14)
    dist.barrier()
    cfg.data.crop_mode, cfg.model.image_size, cfg.eval.batch_size = "patch", 32, 2
    cfg.data.val = f"{out}/val48/shapes-{{000000..000002}}.tar"
    calls[0] = 0
    sharded = evaluate_segmentation(module, cfg)
    sharded_calls = calls[0]
    results["unet_native"] = {"sharded": sharded, "whole": evaluate_segmentation(module, cfg, world=alone),
                              "forwards_per_rank": gather(sharded_calls), "sharded_per_rank": gather(sharded)}
    if dist.get_rank() == 0:
        Path(out, "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:5])
