"""train.contrastive_accum against the big batch it equals: peak memory and time of one CLIP step.

    python bench/contrastive_accum.py                       # batch 128 as 4 x 32, ViT width 192 x 4 at 64 px
    python bench/contrastive_accum.py --batch 512 --accum 8 --width 256 --layers 6

Both sides train the same open_clip model (random weights, an --width x --layers ViT on --image-size px
images and a text transformer of the same size, 32 tokens) on the same synthetic batch of --batch pairs
with CLIP's InfoNCE and AdamW, in plain PyTorch (no DeepSpeed: the engine's accumulation path is used
with a stand-in that backpropagates as DeepSpeed does):

- big: the whole batch in one forward and backward;
- accum: mm.engine.trainer.contrastive_accum_backward over --accum micro-batches (embedded once without
  gradients, then each again with gradients against all the cached features).

Each side runs in a fresh subprocess (peak resident set VmHWM, reset once the model and the optimizer
state exist, after one warm-up step); time is the median of --steps timed steps. The maximum
difference of the two sides' gradients after the first step checks that they compute the same thing.
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


class _Engine:
    """What contrastive_accum_backward uses of a DeepSpeed engine (which averages over its k micro-steps)."""

    def __init__(self, module, gas: int) -> None:
        self.module, self.gas = module, gas

    def __call__(self, *a, **k):
        return self.module(*a, **k)

    def backward(self, loss) -> None:
        (loss / self.gas).backward()

    def step(self) -> None:
        pass


def worker(side: str, batch: int, accum: int, width: int, layers: int, image_size: int, steps: int) -> dict:
    import torch

    from mm.config import load_config
    from mm.engine.trainer import contrastive_accum_backward
    from mm.tasks import TASKS

    cls = TASKS["clip"]
    root = Path(__file__).resolve().parents[1]
    arch = [f"model.arch.embed_dim={width}", f"model.arch.vision_cfg.width={width}",
            f"model.arch.vision_cfg.layers={layers}", f"model.arch.vision_cfg.image_size={image_size}",
            "model.arch.vision_cfg.patch_size=8", "model.arch.vision_cfg.head_width=64",
            f"model.arch.text_cfg.width={width}", f"model.arch.text_cfg.layers={layers}",
            f"model.arch.text_cfg.heads={width // 64}", "model.arch.text_cfg.context_length=32"]
    task = cls(load_config(root / "configs/clip/tiny.yaml", arch, cls.config_class))
    torch.manual_seed(0)
    model = task.build_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    data = {"image": torch.randn(batch, 3, image_size, image_size, generator=g),
            "text": torch.randint(1, 49000, (batch, 32), generator=g)}
    n = batch // accum
    micro = [{k: v[i * n:(i + 1) * n]
              for k, v in data.items()} for i in range(accum)]

    def step() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        if side == "big":
            task.losses(model, data, 0)["loss"].backward()
        else:
            contrastive_accum_backward(task, _Engine(model, accum), micro)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None} if first else None
        optimizer.step()
        return time.perf_counter() - start, time.process_time() - cpu, grads

    first = True
    *_, grads = step()
    first = False
    torch.save(grads, os.environ["BENCH_GRADS"])
    Path("/proc/self/clear_refs").write_text("5")
    rss0 = status_kib("VmRSS")
    timed = [step() for _ in range(steps)]
    peak = status_kib("VmHWM")
    return {"side": side, "step_s": statistics.median(t for t, _, _ in timed),
            "cpu_s": statistics.median(c for _, c, _ in timed), "rss_mib": rss0 / 1024, "peak_mib": peak / 1024,
            "growth_mib": (peak - rss0) / 1024, "threads": torch.get_num_threads()}


def run_one(side: str, args: argparse.Namespace, grads: str) -> dict:
    spec = [side, args.batch, args.accum, args.width, args.layers, args.image_size, args.steps]
    row = run_worker(__file__, spec, {"BENCH_GRADS": grads})
    if "error" in row:
        raise SystemExit(f"{side}: {row['error']}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    if args.batch % args.accum:
        raise SystemExit("--batch must be a multiple of --accum")
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        rows = {side: run_one(side, args, f"{tmp}/{side}.pt") for side in ("big", "accum")}
        big, acc = torch.load(f"{tmp}/big.pt"), torch.load(f"{tmp}/accum.pt")
    diff = max((big[n] - acc[n]).abs().max().item() for n in big)
    scale = max(g.abs().max().item() for g in big.values())
    print(f"{datetime.date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}; CLIP ViT width {args.width} x {args.layers} layers at {args.image_size} px, "
          f"batch {args.batch}; accum = {args.accum} micro-batches of {args.batch // args.accum}")
    print(f"{'side':<8}{'step s':>9}{'cpu s':>9}{'peak MiB':>10}{'growth MiB':>12}")
    for side, r in rows.items():
        print(f"{side:<8}{r['step_s']:>9.2f}{r['cpu_s']:>9.2f}{r['peak_mib']:>10.0f}{r['growth_mib']:>12.0f}")
    b, a = rows["big"], rows["accum"]
    print(f"\naccum / big: step time x{a['step_s'] / b['step_s']:.2f}, CPU time x{a['cpu_s'] / b['cpu_s']:.2f}, "
          f"peak memory x{a['peak_mib'] / b['peak_mib']:.2f}, memory growth during a step "
          f"x{a['growth_mib'] / max(b['growth_mib'], 1e-9):.2f}; max gradient difference {diff:.1e} "
          f"(largest gradient {scale:.1e})")


if __name__ == "__main__":
    main()
