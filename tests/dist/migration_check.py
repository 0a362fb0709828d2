"""Run by tests/test_migration.py under torchrun (one rank): a FILIP run written by an earlier version
(its config.yaml and checkpoint hold the loss's memory settings under `model:`) resumes, with other
memory settings too, instead of being refused as another architecture."""

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
        "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1",
        "model.embed_dim=16", "data.batch_size=8", "data.num_workers=0", "optim.warmup_steps=1",
        "train.log_every=1", "train.ckpt_every=0", "eval.zeroshot_data=", "train.steps=2"]
KNOBS = {"chunk_size": 0, "gather_dtype": "", "keep_image_tokens": 0.0}


def make_old(run: Path) -> None:
    """Rewrite what the run wrote the way the earlier version wrote it."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    loss = cfg.pop("loss")
    cfg["model"].update({k: loss[k] for k in KNOBS})  # later loss keys did not exist then
    cfg["data"].update(image_size=32, context_length=77)  # dead keys of earlier versions
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for state_file in (run / "checkpoints").glob("step*/mm_run_state.json"):
        state = json.loads(state_file.read_text())
        model = json.loads(state["model_config"])
        model.update(KNOBS)
        state["model_config"] = json.dumps(model, sort_keys=True)
        state_file.write_text(json.dumps(state))


def main(shards: str, out: str) -> None:
    from mm.config import load_config
    from mm.engine.trainer import init_distributed, train
    from mm.tasks import get_task
    from mm.tasks.filip import FilipRunConfig

    init_distributed()
    run = Path(out) / "run"
    cfg = load_config(ROOT / "configs/filip/tiny.yaml", TINY + [f"data.train={shards}", f"train.out_dir={run}"],
                      FilipRunConfig)
    first = train(get_task("filip", cfg))
    make_old(run)
    old_yaml = yaml.safe_load((run / "config.yaml").read_text())
    # Resume from the old config.yaml itself, one step further and with another chunk size.
    resumed_cfg = load_config(run / "config.yaml", ["train.steps=3", "loss.chunk_size=3"], FilipRunConfig)
    second = train(get_task("filip", resumed_cfg))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    Path(out, "results.json").write_text(json.dumps({
        "old_yaml_model_keys": sorted(old_yaml["model"]), "first_step": first["step"],
        "second_step": second["step"], "logged_steps": steps,
        "loss_settings": [resumed_cfg.loss.chunk_size, resumed_cfg.loss.gather_dtype]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
