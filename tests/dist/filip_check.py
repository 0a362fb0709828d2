"""Run by tests/test_filip_task.py under `torchrun --nproc_per_node 2`: trains the tiny FILIP under
ZeRO-2 and ZeRO-3 (one launch, as each launch costs tens of seconds) and writes a JSON of measurements."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
    "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1",
    "model.arch.text_cfg.context_length=12", "model.embed_dim=32", "data.batch_size=8",
    "optim.warmup_steps=2", "optim.lr=3e-3", "train.log_every=1", "train.steps=8", "train.ckpt_every=0",
    "train.eval_every=4",
]


def main(shards: str, val: str, out: str, stages: list[int]) -> None:
    from mm.config import load_config
    from mm.tasks import load_exported
    from mm.engine.trainer import init_distributed, train
    from mm.tasks import get_task

    init_distributed()
    rank = dist.get_rank()
    task = get_task("filip")
    results = {}
    for stage in stages:
        run_dir = Path(out) / f"z{stage}"
        overrides = TINY + [f"data.train={shards}", f"eval.zeroshot_data={val}", f"train.out_dir={run_dir}",
                            f"train.deepspeed_config={ROOT}/configs/ds/zero{stage}.json"]
        cfg = load_config(ROOT / "configs/filip/tiny.yaml", overrides, task.config_class)
        res = train(get_task(task.name, cfg))

        gen = torch.Generator().manual_seed(0)
        image = torch.randn(4, 3, 32, 32, generator=gen)
        engine = res["engine"]
        engine.eval()
        with torch.no_grad():  # every rank calls it: ZeRO-3 gathers are collective
            trained = engine.module.encode_image(image)
        _, _, plain = load_exported(res["export"], expect_task="filip")
        with torch.no_grad():
            exported = plain.encode_image(image)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if "loss" in r]
        results[stage] = {
            "losses": losses,
            "step": res["step"],
            "export_output_diff": (trained - exported).abs().max().item(),
            "eval": res["eval"],
            "export": str(res["export"]),
            # The same evaluation on the exported fp32 copy, without DeepSpeed: ZeRO-3 must not change it.
            "eval_of_export": get_task(task.name, cfg).evaluate(plain),
            "zeroshot_logged_at": [r["step"] for r in records if "zeroshot/acc1" in r],
        }
    if rank == 0:
        Path(out, "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], [int(s) for s in sys.argv[4].split(",")])
