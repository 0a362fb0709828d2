"""Run by tests/test_structure_task.py under `torchrun --nproc_per_node 2`: trains STRUCTURE heads on a
prebuilt feature cache under ZeRO-2 and ZeRO-3 (one launch) and writes a JSON of measurements."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]


def main(config: str, out: str, stages: list[int]) -> None:
    from mm.config import load_config
    from mm.tasks import load_exported
    from mm.engine.trainer import init_distributed, train
    from mm.tasks import get_task

    init_distributed()
    rank = dist.get_rank()
    results = {}
    for stage in stages:
        task = get_task("structure")
        run_dir = Path(out) / f"z{stage}"
        cfg = load_config(config, [f"train.out_dir={run_dir}",
                                   f"train.deepspeed_config={ROOT}/configs/ds/zero{stage}.json"], task.config_class)
        res = train(get_task(task.name, cfg))
        engine = res["engine"]

        # One fixed batch of cached features and of images through the trained engine (every rank:
        # ZeRO-3 gathers are collective) and through the export loaded into a plain model.
        batch = next(iter(get_task(task.name, cfg).batches("train")))
        from mm.data.streams import labelled_shard_batches

        tokenizer, preprocess = get_task(task.name, cfg).eval_inputs()
        images = next(iter(labelled_shard_batches(preprocess, tokenizer, cfg.eval.zeroshot_data, 12, 8)))["image"]
        tokens = tokenizer(["a red circle", "a blue square above a green triangle"])
        with torch.no_grad():
            trained = engine(batch["vision"], batch["text"])
            trained_enc = (engine.module.encode_image(images), engine.module.encode_text(tokens))
        _, _, plain = load_exported(res["export"], expect_task="structure")
        with torch.no_grad():
            exported = plain(batch["vision"], batch["text"])
            exported_enc = (plain.encode_image(images), plain.encode_text(tokens))
        diff = max((a - b).abs().max().item() for a, b in zip([*trained, *trained_enc], [*exported, *exported_enc]))
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results[stage] = {
            "losses": [r["loss"] for r in lines if "loss" in r],
            "info_nce": [r["info_nce"] for r in lines if "info_nce" in r],
            "lambda": [r["lambda"] for r in lines if "lambda" in r],
            "step": res["step"],
            "export_output_diff": diff,
            "export": res["export"],
            "digest_recorded": bool(plain.encoder_digest.any()),
            "eval": res["eval"],
        }
    if rank == 0:
        Path(out, "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")])
