"""Benchmark STRUCTURE training on cached features on the CPU: steps/s of a full training step and the
cost of the regulariser R_S relative to InfoNCE alone.

    python bench/structure.py                      # batch 4096, DINOv2-B (768) + MiniLM (384) widths
    python bench/structure.py --batch 1024 --repeats 3
    python bench/structure.py --markdown out.md    # also append the table as markdown

A step is what the trainer does per batch of cached features, without DeepSpeed: both linear heads
forward, the loss, backward, AdamW. "loss only" times the loss's forward + backward on fixed head
outputs. Each figure is the median of the timed repeats after one warm-up. The features are random:
the cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--vision-dim", type=int, default=768)
    p.add_argument("--text-dim", type=int, default=384)
    p.add_argument("--embed-dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--with-l2", action="store_true",
                   help="also time L=2 (a B x B x B product per modality: minutes at batch 4096 on a CPU)")
    p.add_argument("--markdown", help="append the table to this file")
    args = p.parse_args(argv)

    import torch

    from mm.losses.structure import info_nce, structure_loss

    torch.manual_seed(0)
    b = args.batch
    xv, xt = torch.randn(b, args.vision_dim), torch.randn(b, args.text_dim)
    heads = [torch.nn.Linear(args.vision_dim, args.embed_dim), torch.nn.Linear(args.text_dim, args.embed_dim)]
    params = [q for h in heads for q in h.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=1e-4)

    variants = {
        "InfoNCE only": None,
        "InfoNCE + R_S (js, L=1)": {"divergence": "js", "levels": 1},
        "InfoNCE + R_S (js_release, L=1)": {"divergence": "js_release", "levels": 1},
    }
    if args.with_l2:
        variants["InfoNCE + R_S (js, L=2)"] = {"divergence": "js", "levels": 2}

    def loss_of(a, t, variant):
        if variant is None:
            return info_nce(a, t, 0.05)
        return structure_loss(xv, xt, a, t, step=10_000, tau=0.05, lam=10.0, **variant)["loss"]

    rows = []
    for name, variant in variants.items():
        fixed_a = torch.randn(b, args.embed_dim, requires_grad=True)
        fixed_t = torch.randn(b, args.embed_dim, requires_grad=True)

        def loss_only(a=fixed_a, t=fixed_t, variant=variant):
            loss_of(a, t, variant).backward()

        def step(variant=variant):
            opt.zero_grad(set_to_none=True)
            loss_of(heads[0](xv), heads[1](xt), variant).backward()
            opt.step()

        rows.append((name, _median_time(loss_only, args.repeats), _median_time(step, args.repeats)))
        print(f"{name}: loss {rows[-1][1]:.3f} s, step {rows[-1][2]:.3f} s", flush=True)

    base_loss, base_step = rows[0][1], rows[0][2]
    setting = (f"batch {b}, features {args.vision_dim}/{args.text_dim} -> {args.embed_dim}, fp32, "
               f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs "
               f"({platform.processor() or platform.machine()}), load average {os.getloadavg()[0]:.1f}, "
               f"median of {args.repeats}")
    lines = [
        setting,
        "",
        "| loss | loss fwd+bwd (s) | x InfoNCE | training step (s) | steps/s | x InfoNCE |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, t_loss, t_step in rows:
        lines.append(f"| {name} | {t_loss:.3f} | {t_loss / base_loss:.2f} | {t_step:.3f} | {1 / t_step:.2f} | "
                     f"{t_step / base_step:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
