"""Run by tests/test_unet_task.py under `torchrun --nproc_per_node 2`: the tiny U-Net (configs/unet/tiny.yaml,
random encoder) trained under ZeRO-2 on segmentation shards (the test writes the thin-curve vessels world);
validation before and after, the export reloaded and compared with the engine's model. Writes results.json.

    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/dist/unet_check.py \
        TRAIN_SHARDS VAL_SHARD OUT_DIR STEPS
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["data.batch_size=8", "data.num_workers=1", "data.shuffle_buffer=100", "optim.warmup_steps=3",
          "train.log_every=5", "train.ckpt_every=0", "eval.batch_size=24"]


def main(train: str, val: str, out: str, steps: int) -> None:
    from mm.config import load_config
    from mm.engine.trainer import init_distributed
    from mm.engine.trainer import train as run
    from mm.tasks import get_task, load_exported

    init_distributed()
    task = get_task("unet")
    cfg = load_config(ROOT / "configs/unet/tiny.yaml",
                      COMMON + [f"data.train={train}", f"data.val={val}", f"train.steps={steps}",
                                f"train.deepspeed_config={ROOT}/configs/ds/zero2.json", f"train.out_dir={out}/z2"],
                      task.config_class)
    torch.manual_seed(cfg.train.seed)  # the model as the trainer builds it at step 0 (same seed)
    before = get_task("unet", cfg).evaluate(get_task("unet", cfg).build_model())
    res = run(get_task("unet", cfg))
    engine = res["engine"]
    engine.eval()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = engine(images)
    _, _, plain = load_exported(res["export"], expect_task="unet")
    with torch.no_grad():
        exported = plain(images)
    records = [json.loads(line) for line in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    if dist.get_rank() == 0:
        Path(out, "results.json").write_text(json.dumps({
            "before": before, "after": res["eval"], "step": res["step"], "world": dist.get_world_size(),
            "losses": [r["loss"] for r in records if "loss" in r], "bad_samples": res["bad_counts"].get("total", 0),
            "export_output_diff": (trained - exported).abs().max().item(), "export": str(res["export"])}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
