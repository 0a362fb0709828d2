"""Run by tests/test_grad_checkpointing.py under `torchrun --nproc_per_node 2` (one launch, several
checks). Gradients are read with deepspeed.utils.safe_get_full_grad at the accumulation boundary,
before the optimizer step (averaged over ranks, unclipped):
- `<task>-z2`: train.contrastive_accum=K (engine path, gradient_accumulation_steps=K) against the same
  task on each rank's K micro-batches as one batch (gradient_accumulation_steps=1), ZeRO-2;
- `clip-z3-ckpt`: the same under ZeRO-3 with grad checkpointing on the accumulating side only;
- `topolora_sam-z3-ckpt`: TopoLoRA-SAM with and without checkpointed encoder blocks, ZeRO-3;
- `train`: mm's loop with both keys, ZeRO-3, 2 optimizer steps.
Writes results.json."""

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
K, B = 2, 4


def load(name: str, shards: str, extra: tuple = ()):
    from mm.config import load_config
    from mm.tasks import TASKS

    cls = TASKS[name]
    cfg = load_config(ROOT / "configs" / name / "tiny.yaml",
                      [f"data.train={shards}", f"data.batch_size={B}", "data.num_workers=0",
                       "data.shuffle_buffer=10", "train.log_every=1", "train.ckpt_every=0",
                       "optim.warmup_steps=1", "eval.zeroshot_data=", *extra], cls.config_class)
    return cls(cfg)


def engine_for(task, stage: int, gas: int, batch_size: int, checkpointing: bool):
    import deepspeed

    from mm.engine.ds_config import build_ds_config

    torch.manual_seed(0)
    model = task.build_model()
    if checkpointing:
        model.set_grad_checkpointing(True)
    ds = build_ds_config(str(ROOT / f"configs/ds/zero{stage}.json"), batch_size, gas, 0.0, "fp32",
                         dist.get_world_size(), False)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-3), config=ds)
    engine.train()
    return engine


def full_grads(engine) -> dict:
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for n, p in engine.module.named_parameters():
        if p.requires_grad:
            g = safe_get_full_grad(p)
            if g is not None:
                out[n] = g.detach().float().cpu().clone()
    return out


def compare(a: dict, b: dict, loss_a: float = 0.0, loss_b: float = 0.0) -> dict:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return {"n_grads": len(a), "max_grad": max(g.abs().max().item() for g in b.values()),
            "max_grad_diff": max((a[n] - b[n]).abs().max().item() for n in a),
            "loss": loss_b, "loss_diff": abs(loss_a - loss_b), "n_lora": sum("lora_" in n for n in a)}


def accum_case(name: str, shards: str, stage: int, checkpointing: bool) -> dict:
    from mm.engine.trainer import contrastive_accum_backward, merge_batches

    task = load(name, shards)
    it = iter(task.batches("train"))
    batches = [next(it) for _ in range(2 * K)]
    mine = batches[dist.get_rank() * K:(dist.get_rank() + 1) * K]  # this rank's micro-batches

    accum = engine_for(task, stage, K, B, checkpointing)
    losses, bad = contrastive_accum_backward(task, accum, mine)
    assert not bad
    got = full_grads(accum)
    accum.step()

    big = engine_for(task, stage, 1, K * B, False)
    big_losses = task.losses(big, merge_batches(mine), 0)
    big.backward(big_losses["loss"])
    want = full_grads(big)
    big.step()
    return compare(got, want, float(losses["loss"]), float(big_losses["loss"]))


def sam_case(shards: str) -> dict:
    task = load("topolora_sam", shards)
    batch = next(iter(task.batches("train")))
    grads = []
    for checkpointing in (True, False):
        engine = engine_for(task, 3, 1, B, checkpointing)
        engine.backward(task.losses(engine, batch, 0)["loss"])
        grads.append(full_grads(engine))
        engine.step()
    return compare(*grads)


def train_case(shards: str, out: str) -> dict:
    from mm.engine.trainer import train

    task = load("clip", shards, ("train.contrastive_accum=2", "train.grad_checkpointing=true", "train.steps=2",
                                 f"train.deepspeed_config={ROOT}/configs/ds/zero3.json",
                                 f"train.out_dir={Path(out) / 'train'}"))
    res = train(task)
    engine = res["engine"]
    return {"step": res["step"], "finite": all(math.isfinite(v) for v in res["last"].values()
                                                 if isinstance(v, float)),
            "global_batch_per_step": engine.train_batch_size() // task.cfg.train.grad_accum // 2 * 2}


def main(shards: str, out: str) -> None:
    from mm.engine.trainer import init_distributed

    init_distributed()
    results = {}
    for name in ("clip", "filip", "structure_clip"):
        results[f"{name}-z2"] = accum_case(name, shards, 2, False)
    results["clip-z3-ckpt"] = accum_case("clip", shards, 3, True)
    results["topolora_sam-z3-ckpt"] = sam_case(shards)
    results["train"] = train_case(shards, out)
    if dist.get_rank() == 0:
        Path(out, "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
