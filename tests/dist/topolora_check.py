"""Run by tests/test_topolora_task.py under `torchrun --nproc_per_node 2`: a tiny TopoLoRA-SAM trained on
segmentation shards (the test writes thin vessel-like curves) under each given ZeRO stage; validation
before and after, and the export reloaded.
Stages listed in BASE_STAGES train from a base SAM checkpoint (a random tiny SAM saved by rank 0), so
their export is trainable-only (train.export auto); those exports are also merged with mm-merge-lora.
Writes a JSON of measurements for the test.

    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/dist/topolora_check.py \
        TRAIN_SHARDS VAL_SHARD OUT_DIR 1,2,3 STEPS 2,3
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model.encoder_embed_dim=32", "model.encoder_depth=2", "model.encoder_num_heads=2",
    "model.encoder_global_attn_indexes=[1]", "model.image_size=64", "data.batch_size=8",
    "data.num_workers=1", "data.shuffle_buffer=100", "optim.warmup_steps=3", "optim.lr=2e-3",
    "train.log_every=5", "train.ckpt_every=0", "eval.batch_size=24",
]


def main(train: str, val: str, out: str, stages: list[int], steps: int, base_stages: list[int]) -> None:
    from safetensors import safe_open

    from mm.config import load_config
    from mm.exports import read_export_metadata
    from mm.tasks import load_exported
    from mm.engine.trainer import init_distributed
    from mm.engine.trainer import train as run
    from mm.evaluate.merge_lora import merge_export
    from mm.models.sam import build_sam
    from mm.tasks import get_task

    init_distributed()
    rank = dist.get_rank()
    task = get_task("topolora_sam")
    base = Path(out) / "sam_tiny_base.pth"
    results = {}
    for stage in stages:
        extra = [f"model.checkpoint={base}"] if stage in base_stages else []
        cfg = load_config(ROOT / "configs/topolora_sam/tiny.yaml",
                          TINY + [f"data.train={train}", f"data.val={val}", f"train.steps={steps}",
                                  f"train.deepspeed_config={ROOT}/configs/ds/zero{stage}.json",
                                  f"train.out_dir={Path(out) / f'z{stage}'}", *extra], task.config_class)
        if extra and rank == 0 and not base.exists():
            torch.manual_seed(123)
            torch.save(build_sam(cfg.model).state_dict(), base)
        dist.barrier()
        # Validation of the model as the trainer builds it at step 0 (same seed), before any step.
        torch.manual_seed(cfg.train.seed)
        before = get_task(task.name, cfg).evaluate(get_task(task.name, cfg).build_model())
        res = run(get_task(task.name, cfg))
        after = res["eval"]

        engine = res["engine"]
        engine.eval()
        images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            trained = engine(images)
        _, _, plain = load_exported(res["export"], expect_task="topolora_sam")
        with torch.no_grad():
            exported = plain(images)
        losses = [json.loads(line) for line in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
        with safe_open(res["export"], framework="pt") as f:
            exported_keys = set(f.keys())
        trainable = {n for n, p in plain.named_parameters() if p.requires_grad}
        merged_diff = None
        if stage in base_stages and rank == 0:
            merged_path = Path(out) / f"merged-z{stage}.safetensors"
            merge_export(res["export"], merged_path)
            _, _, merged = load_exported(merged_path, expect_task="topolora_sam")
            with torch.no_grad():
                merged_diff = (merged(images) - exported).abs().max().item()
        results[stage] = {
            "export_kind": read_export_metadata(res["export"])["mm_export"],
            "export_has_frozen": bool(exported_keys - trainable - {n for n, _ in plain.named_buffers()}),
            "export_has_all_trainable": trainable <= exported_keys,
            "merged_output_diff": merged_diff,
            "before": before, "after": after, "step": res["step"],
            "losses": [r["loss"] for r in losses if "loss" in r],
            "export_output_diff": (trained - exported).abs().max().item(),
            "bad_samples": res["bad_counts"].get("total", 0),
            "export": str(res["export"]),
        }
    if rank == 0:
        Path(out, "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], [int(s) for s in sys.argv[4].split(",")],
         int(sys.argv[5]) if len(sys.argv) > 5 else 30,
         [int(s) for s in sys.argv[6].split(",") if s] if len(sys.argv) > 6 else [])
