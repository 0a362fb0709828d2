"""Benchmark one TopoLoRA-SAM training step against the same SAM fully fine-tuned: time and peak memory.

    python bench/seg_train.py                                  # vit_b at 256 x 256, batch 1 (CPU default)
    python bench/seg_train.py --variant vit_b --image-size 1024 --steps 5
    python bench/seg_train.py --quick                          # tiny custom SAM, smoke run

Both modes build the same prompt-free SAM (mm.models.sam, random weights: speed and memory do not
depend on their values) at the same input size and train it with the same loss (BCE + soft Dice +
0.5 soft clDice) and AdamW, in one plain PyTorch process (no DeepSpeed, no data loader: one fixed
synthetic batch), so the difference is the model's trainable set alone:

- topolora: LoRA (r 8, alpha 16, encoder MLPs) + spatial adapter + mask decoder train (docs/methods.md §4);
- full: no LoRA, no adapter, every parameter of SAM trains (image encoder, prompt encoder, decoder);
- topolora-ckpt: topolora with train.grad_checkpointing (the image encoder's blocks recompute their
  activations in backward: TopoLoraSam.set_grad_checkpointing).

    python bench/seg_train.py --variant vit_b --image-size 1024 --steps 2 --modes topolora,topolora-ckpt

Each mode runs in a fresh subprocess. Time: the median and the best of the timed steps (forward,
backward, gradient clipping, optimizer step) after one warm-up step, which also allocates the AdamW
states; and the median CPU time of the process per step (time.process_time). On a shared CPU the
wall-clock times swing with the other jobs' load; with --threads 1 the CPU time is the steadier measure
of the work a step does. Memory: the peak
resident set of the process over the warm-up and timed steps (VmHWM, reset through
/proc/self/clear_refs once the model is built), reported as the peak and as its growth over the
resident set with the model built (gradients, AdamW states, activations). glibc's mmap threshold is
pinned so freed tensors leave the resident set at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from worker_process import run_worker, status_kib

MODES = ("topolora", "full", "topolora-ckpt")
QUICK = {"variant": "custom", "image_size": 64, "steps": 2}


def build(mode: str, variant: str, image_size: int):
    from mm.models.sam import SamModelConfig, build_topolora_sam

    sizes = {}
    if variant == "custom":  # the tiny SAM of the tests
        sizes = {"encoder_embed_dim": 32, "encoder_depth": 2, "encoder_num_heads": 2,
                 "encoder_global_attn_indexes": [1]}
    if mode.startswith("topolora"):
        cfg = SamModelConfig(variant=variant, image_size=image_size, **sizes)
        model = build_topolora_sam(cfg, load_checkpoint=False)
        model.set_grad_checkpointing(mode == "topolora-ckpt")
        return model
    cfg = SamModelConfig(variant=variant, image_size=image_size, lora_r=0, adapter=False, **sizes)
    model = build_topolora_sam(cfg, load_checkpoint=False)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def worker(mode: str, variant: str, image_size: int, batch: int, steps: int, threads: int) -> dict:
    import torch

    from mm.losses.segmentation import SegLoss

    if threads:
        torch.set_num_threads(threads)

    torch.manual_seed(0)
    model = build(mode, variant, image_size).train()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  weight_decay=1e-4)
    loss_fn = SegLoss()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g)
    masks = (torch.rand(batch, 1, image_size, image_size, generator=g) > 0.9).float()

    def step() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), masks)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        return time.perf_counter() - start, time.process_time() - cpu

    Path("/proc/self/clear_refs").write_text("5")  # peak RSS mark := the RSS with the model built
    rss0 = status_kib("VmRSS")
    first = step()[0]
    timed = [step() for _ in range(steps)]
    peak = status_kib("VmHWM")
    times, cpu = [t for t, _ in timed], [c for _, c in timed]
    return {"mode": mode, "params": params, "trainable": trainable, "first_s": first,
            "step_s": statistics.median(times), "best_s": min(times), "steps_s": times,
            "cpu_s": statistics.median(cpu), "steps_cpu_s": cpu, "rss_model_mib": rss0 / 1024,
            "peak_mib": peak / 1024, "growth_mib": (peak - rss0) / 1024,
            # What the optimizer side needs by construction: fp32 gradients + two AdamW moments.
            "grad_adam_mib": trainable * 4 * 3 / 2**20, "threads": torch.get_num_threads()}


def run_one(mode: str, variant: str, image_size: int, batch: int, steps: int, threads: int) -> dict:
    row = run_worker(__file__, [mode, variant, image_size, batch, steps, threads])
    return {"mode": mode, **row} if "error" in row else row


def _pool(a: dict, b: dict) -> dict:
    """Two runs of one mode: all timed steps together, the higher peaks."""
    if "error" in a:
        return a
    times, cpu = a["steps_s"] + b["steps_s"], a["steps_cpu_s"] + b["steps_cpu_s"]
    out = dict(a, steps_s=times, step_s=statistics.median(times), best_s=min(times),
               steps_cpu_s=cpu, cpu_s=statistics.median(cpu), first_s=min(a["first_s"], b["first_s"]))
    for key in ("peak_mib", "growth_mib", "rss_model_mib"):
        out[key] = max(a[key], b[key])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="vit_b", help="vit_b | vit_l | vit_h | custom (the tiny test SAM)")
    ap.add_argument("--image-size", type=int, default=256, help="input side, a multiple of 16 (SAM: 1024)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up step (default 3)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the modes this many times, alternating, and pool their timed steps (a shared "
                         "machine's load then weighs on both alike)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per run (0 = torch's default); 1 makes the CPU time per step a "
                         "measure of the work alone")
    ap.add_argument("--quick", action="store_true", help="tiny custom SAM at 64 px, 2 timed steps")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    if args.quick:
        args.variant, args.image_size = QUICK["variant"], QUICK["image_size"]
        args.steps = args.steps or QUICK["steps"]
    args.steps = args.steps or 3

    print(f"SAM {args.variant} at {args.image_size} x {args.image_size}, batch {args.batch_size}, "
          f"{args.steps} timed steps after 1 warm-up, {args.rounds} round(s), fp32, CPU, one process, "
          f"{args.threads or 'default'} torch thread(s)")
    print(f"{'mode':<15}{'trainable':>13}{'of params':>13}{'step s':>9}{'best s':>9}{'cpu s':>9}{'first s':>9}"
          f"{'peak MiB':>10}"
          f"{'growth MiB':>12}{'grad+Adam MiB':>15}")
    rows: dict[str, dict] = {}
    for _ in range(args.rounds):
        for mode in args.modes.split(","):
            r = run_one(mode, args.variant, args.image_size, args.batch_size, args.steps, args.threads)
            rows[mode] = r if mode not in rows or "error" in r else _pool(rows[mode], r)
    for mode, r in rows.items():
        if "error" in r:
            print(f"{mode:<15}  {r['error']}")
            continue
        print(f"{mode:<15}{r['trainable']:>13,}{r['params']:>13,}{r['step_s']:>9.2f}{r['best_s']:>9.2f}"
              f"{r['cpu_s']:>9.2f}"
              f"{r['first_s']:>9.2f}"
              f"{r['peak_mib']:>10.0f}{r['growth_mib']:>12.0f}{r['grad_adam_mib']:>15.0f}", flush=True)
    lora, full = rows.get("topolora", {}), rows.get("full", {})
    if "step_s" in lora and "step_s" in full:
        print(f"\ntopolora / full: step time x{lora['step_s'] / full['step_s']:.2f} (median), "
              f"x{lora['best_s'] / full['best_s']:.2f} (best), CPU time x{lora['cpu_s'] / full['cpu_s']:.2f}, "
              f"peak memory x{lora['peak_mib'] / full['peak_mib']:.2f}, "
              f"memory growth over the built model x{lora['growth_mib'] / max(full['growth_mib'], 1e-9):.2f}")
    ckpt = rows.get("topolora-ckpt", {})
    if "step_s" in lora and "step_s" in ckpt:
        print(f"topolora-ckpt / topolora (grad checkpointing): step time x{ckpt['step_s'] / lora['step_s']:.2f} "
              f"(median), CPU time x{ckpt['cpu_s'] / lora['cpu_s']:.2f}, peak memory "
              f"x{ckpt['peak_mib'] / lora['peak_mib']:.2f}, memory growth over the built model "
              f"x{ckpt['growth_mib'] / max(lora['growth_mib'], 1e-9):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
