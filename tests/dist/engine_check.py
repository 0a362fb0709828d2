"""Run by tests/test_engine_dist.py under `torchrun --nproc_per_node 2`: several engine behaviours per
launch, because each launch costs tens of seconds. Writes a JSON of measurements for the test."""

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
    "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1",
    "model.arch.text_cfg.context_length=12", "data.batch_size=8", "optim.warmup_steps=2", "optim.lr=3e-3",
    "train.log_every=1", "eval.zeroshot_data=",
]


def main(shards: str, out: str, stages: list[int]) -> None:
    from mm.config import load_config
    from mm.tasks import load_exported
    from mm.engine.trainer import init_distributed, train
    from mm.tasks import get_task

    init_distributed()
    rank = dist.get_rank()
    task = get_task("clip")
    results = {}
    for stage in stages:
        common = TINY + [f"data.train={shards}", f"train.deepspeed_config={ROOT}/configs/ds/zero{stage}.json",
                         "train.steps=10", "train.ckpt_every=3", "train.keep_checkpoints=10"]
        a_dir, b_dir = Path(out) / f"z{stage}a", Path(out) / f"z{stage}b"
        cfg_a = load_config(ROOT / "configs/clip/tiny.yaml", common + [f"train.out_dir={a_dir}"], task.config_class)
        res_a = train(get_task(task.name, cfg_a))

        # The exported file loads into a plain model (no DeepSpeed) that gives the trained model's outputs.
        gen = torch.Generator().manual_seed(0)
        image = torch.randn(4, 3, 32, 32, generator=gen)
        text = torch.randint(1, 49407, (4, 12), generator=gen)
        engine = res_a["engine"]
        engine.eval()
        with torch.no_grad():
            trained = engine(image, text)["image_features"]
        _, _, plain = load_exported(res_a["export"], expect_task="clip")
        with torch.no_grad():
            exported = plain(image, text)["image_features"]

        # Resume as if the run had been killed right after its step-3 checkpoint.
        if rank == 0:
            (b_dir / "checkpoints").mkdir(parents=True)
            shutil.copytree(a_dir / "checkpoints" / "step00000003", b_dir / "checkpoints" / "step00000003")
            (b_dir / "checkpoints" / "latest").write_text("step00000003")
        dist.barrier()
        cfg_b = load_config(ROOT / "configs/clip/tiny.yaml", common + [f"train.out_dir={b_dir}"], task.config_class)
        res_b = train(get_task(task.name, cfg_b))

        from safetensors.torch import load_file

        wa, wb = load_file(res_a["export"]), load_file(res_b["export"])
        losses = [json.loads(line)["loss"] for line in (a_dir / "metrics.jsonl").read_text().splitlines()]
        results[stage] = {
            "resume_max_diff": max((wa[k] - wb[k]).abs().max().item() for k in wa),
            "same_keys": sorted(wa) == sorted(wb),
            "export_output_diff": (trained - exported).abs().max().item(),
            "losses": losses,
            "steps": [res_a["step"], res_b["step"]],
        }
    if rank == 0:
        Path(out, "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")])
