"""One CLIP training step through mm's engine (the CLIP task on DeepSpeed ZeRO-1, 2, 3) against
open_clip_train's step shape in plain PyTorch, on the same model, batch, loss and clipping.

    python bench/engine.py                         # ViT width 256 x 6 layers at 64 px, batch 64, 1 rank
    python bench/engine.py --width 768 --layers 12 --image-size 224 --patch 16 --batch 32   # ViT-B/16 size

Sides (one process, one rank; every side starts from the same initial weights):
- plain: open_clip_train's step: zero_grad, forward, InfoNCE (mm.losses.contrastive.clip_loss, the
  loss every side uses), backward, clip_grad_norm_(--clip), torch AdamW step, as train_one_epoch does
  at accum_freq 1 without a scaler;
- zero1, zero2, zero3: ClipTask.losses(engine, batch, step), engine.backward, engine.step, with the
  DeepSpeed config mm builds from configs/ds/zeroN.json (build_ds_config: gradient clipping --clip),
  the optimizer and param groups mm's engine makes (make_optimizer: torch's fused AdamW where the
  parameters allow it; no decay on gains and biases).

Passes alternate the sides (--repeats passes of --steps steps after a warm-up step per side), so load
from other processes falls on all of them; the table gives medians of the step's wall time and of the
process's CPU time (the steadier figure on a shared machine), and each side's ratio to plain.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side and pass")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the sides, alternating")
    ap.add_argument("--sides", default="plain,zero1,zero2,zero3")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (DeepSpeed's accelerator follows it)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                    help="bf16: the engine's bf16 weights; plain runs under bf16 autocast (open_clip's amp)")
    ap.add_argument("--profile", default="", metavar="SIDE",
                    help="instead of the table: cProfile --steps steps of SIDE after its warm-up step and print the "
                         "functions by own time and by cumulative time (where a side's extra time goes)")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.device == "cuda" else "cpu")

    import deepspeed
    import torch

    from mm.config import load_config
    from mm.engine.ds_config import build_ds_config
    from mm.engine.launch import init_distributed
    from mm.engine.trainer import make_optimizer, param_groups
    from mm.losses.contrastive import clip_loss
    from mm.models.clip import clip_outputs
    from mm.tasks import TASKS

    init_distributed()
    cls = TASKS["clip"]
    w = args.width
    arch = [f"model.arch.embed_dim={min(w, 512)}", f"model.arch.vision_cfg.width={w}",
            f"model.arch.vision_cfg.layers={args.layers}", f"model.arch.vision_cfg.image_size={args.image_size}",
            f"model.arch.vision_cfg.patch_size={args.patch}", "model.arch.vision_cfg.head_width=64",
            f"model.arch.text_cfg.width={min(w, 512)}", f"model.arch.text_cfg.layers={args.layers}",
            f"model.arch.text_cfg.heads={min(w, 512) // 64}", "model.arch.text_cfg.context_length=77",
            f"data.batch_size={args.batch}", f"train.grad_clip={args.clip}"]
    cfg = load_config(ROOT / "configs/clip/tiny.yaml", arch, cls.config_class)
    task = cls(cfg)
    o = cfg.optim
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g),
             "text": torch.randint(1, 49000, (args.batch, 77), generator=g)}
    batch = {k: v.to(args.device) for k, v in batch.items()}
    bf16 = args.precision == "bf16"
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return task.build_model().train()

    steps = {}
    for side in (args.profile or args.sides).split(","):
        model = fresh_model().to(args.device)
        if side == "plain":
            opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)

            def step(model=model, opt=opt) -> float:
                opt.zero_grad(set_to_none=True)
                with torch.autocast(args.device, dtype=torch.bfloat16, enabled=bf16):
                    out = clip_outputs(model, batch["image"], batch["text"])
                    loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])["loss"]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                opt.step()
                return float(loss)
        else:
            ds = build_ds_config(str(ROOT / f"configs/ds/{side}.json"), args.batch, 1, args.clip, args.precision, 1,
                                 args.device == "cuda")
            opt = make_optimizer(param_groups(model, o.weight_decay), o, ds)
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
            engine.train()

            data = {k: v.to(torch.bfloat16) if bf16 and v.is_floating_point() else v for k, v in batch.items()}

            def step(engine=engine, data=data) -> float:
                loss = task.losses(engine, data, 0)["loss"]
                engine.backward(loss)
                engine.step()
                return float(loss)
        steps[side] = step

    if args.profile:
        import cProfile
        import pstats

        steps[args.profile]()
        prof = cProfile.Profile()
        t, c = time.perf_counter(), time.process_time()
        prof.runcall(lambda: [steps[args.profile]() for _ in range(args.steps)])
        print(f"{args.profile}: {args.steps} steps, {time.perf_counter() - t:.3f} s wall, "
              f"{time.process_time() - c:.3f} s CPU (under the profiler)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        return
    first = {side: step() for side, step in steps.items()}  # warm-up; also the same first loss everywhere
    wall: dict[str, list[float]] = {s: [] for s in steps}
    cpu: dict[str, list[float]] = {s: [] for s in steps}
    for _ in range(args.repeats):
        for side, step in steps.items():
            for _ in range(args.steps):
                sync()
                t, c = time.perf_counter(), time.process_time()
                step()
                sync()
                wall[side].append(time.perf_counter() - t)
                cpu[side].append(time.process_time() - c)

    print(f"{datetime.date.today()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"deepspeed {deepspeed.__version__}, {torch.get_num_threads()} threads; CLIP ViT {w} x {args.layers} "
          f"at {args.image_size} px / patch {args.patch}, batch {args.batch}, {args.precision}, {args.device}, 1 rank, "
          f"{args.repeats} x {args.steps} steps per side")
    print(f"{'side':<8}{'first loss':>12}{'step s':>9}{'cpu s':>9}{'x plain':>9}{'x plain cpu':>13}")
    base_w, base_c = statistics.median(wall.get("plain", [1])), statistics.median(cpu.get("plain", [1]))
    for side in steps:
        mw, mc = statistics.median(wall[side]), statistics.median(cpu[side])
        print(f"{side:<8}{first[side]:>12.5f}{mw:>9.3f}{mc:>9.3f}{mw / base_w:>9.2f}{mc / base_c:>13.2f}")


if __name__ == "__main__":
    main()
