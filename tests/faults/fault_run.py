"""Run by tests/faults/test_kill_resume.py under `torchrun --nproc_per_node 2`, several times over the
same directories: trains each named task in turn with tiny settings, resuming whatever an earlier
(killed) launch left, and marks a task done once train() returned.

    fault_run.py SHARDS OUT_ROOT RUN TASKS [TASK/KILL_SPEC]

KILL_SPEC (point:step:rank, see mm.engine.checkpoint._fault_point) is set as MM_FAULT_KILL while TASK
trains in this launch, so that task dies inside that checkpoint save. Each rank writes its pid to
OUT_ROOT/pids/ so the test can SIGKILL ranks from outside at a time of its choosing.
"""

import os
import sys
from pathlib import Path

import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
CLIP_TOWERS = [
    "model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
    "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1",
    "model.arch.text_cfg.context_length=12",
]
TINY = {
    "clip": CLIP_TOWERS + ["data.num_workers=2"],
    "filip": CLIP_TOWERS + ["model.embed_dim=32", "data.num_workers=1"],
    "structure_clip": CLIP_TOWERS + ["model.kee_layers=1", "data.num_workers=1"],
    # Heads on features cached once per test run (tiny random encoders; see ensure_cache).
    "structure": ["data.batch_size=16", "data.num_workers=1", "cache.num_workers=0", "cache.batch_size=64"],
    "topolora_sam": ["model.encoder_embed_dim=32", "model.encoder_depth=2", "model.encoder_num_heads=2",
                     "model.encoder_global_attn_indexes=[1]", "model.image_size=32", "data.num_workers=1",
                     "data.val=", "data.shuffle_buffer=50"],
}
STEPS = 6
COMMON = ["data.batch_size=4", "optim.warmup_steps=2", "optim.lr=3e-3", "train.log_every=1",
          f"train.steps={STEPS}", "train.ckpt_every=2", "train.keep_checkpoints=2", "eval.zeroshot_data=",
          f"train.deepspeed_config={ROOT}/configs/ds/zero2.json"]


def task_config(task_name: str, shards: str, out_dir: Path):
    from mm.config import load_config
    from mm.tasks import get_task

    task = get_task(task_name)
    overrides = COMMON + TINY[task_name] + [f"data.train={shards}", f"train.out_dir={out_dir}"]
    if task_name == "structure":
        overrides.append(f"cache.dir={out_dir.parents[1] / 'structure-cache'}")
    return task, load_config(ROOT / f"configs/{task_name}/tiny.yaml", overrides, task.config_class)


def ensure_cache(cfg, rank: int) -> None:
    """STRUCTURE trains on cached encoder features: rank 0 writes them once for every run here."""
    marker = Path(cfg.cache.dir + ".done")
    if rank == 0 and not marker.exists():
        from mm.tasks.structure_cli import run_cache

        run_cache(cfg, True)
        marker.write_text("")
    dist.barrier()


def main(shards: str, out_root: str, run: str, tasks: list[str], kill: str) -> None:
    from mm.engine.trainer import init_distributed, train

    init_distributed()
    rank = dist.get_rank()
    pids = Path(out_root, "pids")
    pids.mkdir(parents=True, exist_ok=True)
    Path(pids, f".rank{rank}").write_text(str(os.getpid()))
    os.replace(Path(pids, f".rank{rank}"), Path(pids, f"rank{rank}"))  # the test never reads half a pid
    kill_task, _, kill_spec = kill.partition("/")
    for name in tasks:
        out_dir = Path(out_root, run, name)
        if (out_dir / "done").exists():
            continue
        os.environ.pop("MM_FAULT_KILL", None)
        if name == kill_task:
            os.environ["MM_FAULT_KILL"] = kill_spec
        task, cfg = task_config(name, shards, out_dir)
        if name == "structure":
            ensure_cache(cfg, rank)
        train(type(task)(cfg))
        dist.barrier()
        if rank == 0:
            (out_dir / "done").write_text("")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(","), sys.argv[5] if len(sys.argv) > 5 else "")
