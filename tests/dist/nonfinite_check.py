"""Run by tests/test_nonfinite.py under `torchrun --nproc_per_node 2`: a tiny CLIP whose loss is made
NaN or inf on chosen micro-batches of chosen ranks. Writes a JSON of what each rank saw.

    nonfinite_check.py SHARDS OUT_DIR
"""

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
    "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1",
    "model.arch.text_cfg.context_length=12", "data.batch_size=4", "data.num_workers=1",
    "optim.warmup_steps=2", "train.log_every=1", "train.ckpt_every=0", "eval.zeroshot_data=",
]


def faulty_task(schedule: dict[int, dict[int, tuple[str, float]]]):
    """A CLIP task with an extra `aux` loss; on micro-batch i (1-based, counted per rank) of rank r,
    schedule[i][r] = (loss name, value) replaces that loss's value by NaN or inf."""
    from mm.tasks.clip import ClipTask

    class FaultyClip(ClipTask):
        calls = 0

        def losses(self, model, batch, step):
            out = super().losses(model, batch, step)
            out["aux"] = 0.0 * out["loss"]
            FaultyClip.calls += 1
            fault = schedule.get(FaultyClip.calls, {}).get(dist.get_rank())
            if fault:
                name, value = fault
                out[name] = out[name] + value  # keeps the graph, as a real overflow would
            return out

    return FaultyClip


def run(shards: str, out: Path, schedule: dict, extra: list[str]) -> dict:
    from mm.config import load_config
    from mm.engine.trainer import train

    task_class = faulty_task(schedule)
    cfg = load_config(ROOT / "configs/clip/tiny.yaml", TINY + extra + [f"data.train={shards}", f"train.out_dir={out}"],
                      task_class.config_class)
    task = task_class(cfg)
    try:
        res = train(task)
    except Exception as e:  # the test checks the type and the message
        return {"error": type(e).__name__, "message": str(e), "calls": task.calls}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if dist.get_rank() == 0 else []
    engine = res["engine"]
    finite = all(bool(torch.isfinite(p).all()) for p in engine.module.parameters() if p.numel())
    return {"step": res["step"], "skipped": res["skipped_steps"], "calls": task.calls, "finite": finite,
            "global_steps": engine.global_steps, "records": records}


def main(shards: str, out: str) -> None:
    from mm.engine.trainer import init_distributed

    init_distributed()
    rank = dist.get_rank()
    nan, inf = math.nan, math.inf
    results = {
        # Rank-asymmetric: NaN on rank 1 only at micro-batch 3; inf in the aux loss of both at 6.
        "asymmetric": run(shards, Path(out, "asym"), {3: {1: ("loss", nan)}, 6: {0: ("aux", inf), 1: ("aux", -inf)}},
                          ["train.steps=6", f"train.deepspeed_config={ROOT}/configs/ds/zero2.json"]),
        # Three non-finite micro-batches in a row (alternating ranks) with max_nonfinite_steps=3.
        "diverged": run(shards, Path(out, "div"), {2: {0: ("loss", nan)}, 3: {1: ("loss", inf)}, 4: {0: ("loss", nan)}},
                        ["train.steps=6", "train.max_nonfinite_steps=3",
                         f"train.deepspeed_config={ROOT}/configs/ds/zero2.json"]),
        # ZeRO-3 gathers parameters in forward: a step skipped after the forward must not upset it.
        "zero3": run(shards, Path(out, "z3"), {2: {0: ("loss", nan)}},
                     ["train.steps=3", f"train.deepspeed_config={ROOT}/configs/ds/zero3.json"]),
    }
    all_ranks = [None] * dist.get_world_size()
    dist.all_gather_object(all_ranks, results)
    if rank == 0:
        Path(out, "results.json").write_text(json.dumps(all_ranks))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
