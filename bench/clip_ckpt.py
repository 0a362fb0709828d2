"""train.grad_checkpointing on a CLIP step: peak memory and time with and without.

    python bench/clip_ckpt.py                              # ViT-B-16 (open_clip's), batch 32, 224 px
    python bench/clip_ckpt.py --model ViT-S-16 --batch 8   # a smaller check

Both sides build the same open_clip architecture (random weights) through the CLIP task, take the same
synthetic batch of --batch pairs (77 tokens), CLIP's InfoNCE and AdamW, in plain PyTorch; `ckpt` turns
checkpointing on the way the engine does (mm.engine.trainer.apply_grad_checkpointing, i.e. open_clip's
set_grad_checkpointing on both towers). Each side runs in a fresh subprocess: peak resident set
(VmHWM) reset after one warm-up step, once the model and AdamW's state exist; time is the median of
--steps timed steps. The two sides' first-step losses and gradients must agree (printed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

from worker_process import run_worker, status_kib


def worker(side: str, model_name: str, batch: int, steps: int) -> dict:
    import torch

    from mm.config import load_config
    from mm.engine.trainer import apply_grad_checkpointing
    from mm.tasks import TASKS

    cls = TASKS["clip"]
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/clip/vit_b32.yaml", [f"model.name={model_name}",
                      f"train.grad_checkpointing={side == 'ckpt'}"], cls.config_class)
    task = cls(cfg)
    torch.manual_seed(0)
    model = task.build_model().train()
    apply_grad_checkpointing(task, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    g = torch.Generator().manual_seed(0)
    data = {"image": torch.randn(batch, 3, size, size, generator=g),
            "text": torch.randint(1, 49000, (batch, 77), generator=g)}

    def step(keep: bool) -> tuple:
        start, cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss = task.losses(model, data, 0)["loss"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None} if keep else None
        optimizer.step()
        return time.perf_counter() - start, time.process_time() - cpu, float(loss), grads

    *_, loss, grads = step(True)
    torch.save(grads, os.environ["BENCH_GRADS"])
    del grads
    Path("/proc/self/clear_refs").write_text("5")
    rss0 = status_kib("VmRSS")
    timed = [step(False) for _ in range(steps)]
    peak = status_kib("VmHWM")
    return {"side": side, "loss": loss, "step_s": statistics.median(t[0] for t in timed),
            "cpu_s": statistics.median(t[1] for t in timed), "rss_mib": rss0 / 1024, "peak_mib": peak / 1024,
            "growth_mib": (peak - rss0) / 1024, "threads": torch.get_num_threads(), "image_size": size}


def run_one(side: str, args: argparse.Namespace, grads: str) -> dict:
    row = run_worker(__file__, [side, args.model, args.batch, args.steps], {"BENCH_GRADS": grads})
    if "error" in row:
        raise SystemExit(f"{side}: {row['error']}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-B-16", help="an open_clip architecture name")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1, help="timed steps after the warm-up step")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        rows = {side: run_one(side, args, f"{tmp}/{side}.pt") for side in ("plain", "ckpt")}
        ref, ck = torch.load(f"{tmp}/plain.pt"), torch.load(f"{tmp}/ckpt.pt")
    diff = max((ref[n] - ck[n]).abs().max().item() for n in ref)
    scale = max(g.abs().max().item() for g in ref.values())
    p, c = rows["plain"], rows["ckpt"]
    print(f"{datetime.date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {p['threads']} threads; CLIP {args.model} at {p['image_size']} px, "
          f"batch {args.batch}, fp32")
    print(f"{'side':<7}{'loss':>10}{'step s':>9}{'cpu s':>9}{'peak MiB':>10}{'growth MiB':>12}")
    for side, r in rows.items():
        print(f"{side:<7}{r['loss']:>10.5f}{r['step_s']:>9.2f}{r['cpu_s']:>9.2f}{r['peak_mib']:>10.0f}"
              f"{r['growth_mib']:>12.0f}")
    print(f"\nckpt / plain: step time x{c['step_s'] / p['step_s']:.2f}, CPU time x{c['cpu_s'] / p['cpu_s']:.2f}, "
          f"peak memory x{c['peak_mib'] / p['peak_mib']:.2f}, memory growth during a step "
          f"x{c['growth_mib'] / max(p['growth_mib'], 1e-9):.2f}; max gradient difference {diff:.1e} "
          f"(largest gradient {scale:.1e})")


if __name__ == "__main__":
    main()
