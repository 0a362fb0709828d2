"""Run by tests/test_structure_clip_task.py under `torchrun --nproc_per_node 2`: trains the tiny
Structure-CLIP under ZeRO-2 and ZeRO-3 (one launch, as each launch costs tens of seconds) and writes a
JSON of measurements."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
    "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1",
    "model.arch.text_cfg.context_length=12", "model.kee_layers=1", "data.batch_size=8",
    "optim.warmup_steps=2", "optim.lr=3e-3", "train.log_every=1", "train.steps=8", "train.ckpt_every=0",
]


def main(shards: str, val: str, out: str, stages: list[int]) -> None:
    from mm.config import load_config
    from mm.tasks import load_exported
    from mm.engine.trainer import init_distributed, train
    from mm.tasks import get_task

    init_distributed()
    rank = dist.get_rank()
    task = get_task("structure_clip")
    results = {}
    for stage in stages:
        run_dir = Path(out) / f"z{stage}"
        overrides = TINY + [f"data.train={shards}", f"eval.zeroshot_data={val}", f"train.out_dir={run_dir}",
                            f"train.deepspeed_config={ROOT}/configs/ds/zero{stage}.json"]
        cfg = load_config(ROOT / "configs/structure_clip/tiny.yaml", overrides, task.config_class)
        res = train(get_task(task.name, cfg))

        # The same fixed batch through the trained engine (every rank: ZeRO-3 gathers are collective)
        # and through the exported weights loaded into a plain model.
        loader = get_task(task.name, cfg).batches("train")
        batch = next(iter(loader))
        args = [batch[k] for k in ("image", "text", "neg_text", "triples", "triple_mask")]
        engine = res["engine"]
        engine.train()  # dropout is 0; train mode keeps torch's fused attention fast path off under ZeRO-3
        with torch.no_grad():
            trained = engine(*args)
            trained_image = engine.module.encode_image(batch["image"])
        _, _, plain = load_exported(res["export"], expect_task="structure_clip")
        plain.train()
        with torch.no_grad():
            exported = plain(*args)
            exported_image = plain.encode_image(batch["image"])
        diff = max((trained[k] - exported[k]).abs().max().item()
                   for k in ("image_features", "text_features", "tower_text_features", "neg_text_features"))
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results[stage] = {
            "losses": [r["loss"] for r in lines if "loss" in r],
            "neg_share": [r["neg_share"] for r in lines if "neg_share" in r],
            "step": res["step"],
            "export_output_diff": max(diff, (trained_image - exported_image).abs().max().item()),
            "eval": res["eval"],
            "export": str(res["export"]),
        }
    if rank == 0:
        Path(out, "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], [int(s) for s in sys.argv[4].split(",")])
