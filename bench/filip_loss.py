"""Benchmark the chunked FILIP loss against a naive dense one on the CPU: time and peak memory.

    python bench/filip_loss.py                 # the full table (slow on a small machine)
    python bench/filip_loss.py --quick         # smoke run
    python bench/filip_loss.py --sizes 64x49x32,256x49x32 --methods ours,naive

Every (method, size) runs one forward+backward in a fresh subprocess. Memory is the growth of the
process's resident set during that step: the kernel's peak-RSS mark (VmHWM) is reset through
/proc/self/clear_refs after the inputs exist, and the step's peak is VmHWM minus the RSS at reset.
glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) so freed tensors leave the resident set at
once instead of lingering in the heap; the figure is then the live memory of the step: activations,
everything autograd saves, and the input gradients (inputs themselves excluded). Time is the best of
the timed repeats after that first step.

`--gather-bytes` measures instead what two gloo ranks send per step (forward all_gathers and the
backward all_reduce of the gathered gradient), counted at torch.distributed's calls, with and without
FILIP's token reduction (loss.keep_image_tokens / loss.keep_text_tokens) and a bf16 gather:

    python bench/filip_loss.py --gather-bytes                 # B_local 32, 49 patches, 77 text tokens, d 256

"Largest B in budget" fits peak(B) = c + b*B^2 to the measured points of a token shape (b*B^2 alone
from one point), skipping sizes whose auto chunk still covers the whole batch, and solves
peak(B) = budget: an extrapolation, not a measurement, and a low one (see `largest_batch`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from worker_process import run_worker, status_kib

NAIVE_PEAK_FACTOR = 5  # naive peak ~= this many copies of the dense S (S, 2 masked copies, 2 grads)
FULL_SIZES = "64x49x32,256x49x32,1024x49x32,64x196x77"
QUICK_SIZES = "16x49x32,64x49x32"


def naive_loss(v, vm, t, tm, scale):
    """Plain dense FILIP loss: materialises the whole (B, B, N_img, N_txt) similarity tensor."""
    import torch
    import torch.nn.functional as F

    v, t = F.normalize(v, dim=-1), F.normalize(t, dim=-1)
    sim = torch.einsum("ikd,jrd->ijkr", v, t)
    best_txt = sim.masked_fill(~tm[None, :, None, :], float("-inf")).max(dim=3).values
    best_img = sim.masked_fill(~vm[:, None, :, None], float("-inf")).max(dim=2).values
    s_i2t = torch.where(vm[:, None, :], best_txt, 0).sum(2) / vm.sum(1)[:, None]
    s_t2i = torch.where(tm[None], best_img, 0).sum(2) / tm.sum(1)[None, :]
    labels = torch.arange(v.shape[0])
    return (F.cross_entropy(scale * s_i2t, labels) + F.cross_entropy(scale * s_t2i.T, labels)) / 2


def worker(method: str, b: int, ni: int, nt: int, d: int, repeats: int, chunk: int | None) -> dict:
    import torch

    from mm.losses.filip import filip_loss

    def make_inputs(b: int) -> tuple:
        g = torch.Generator().manual_seed(0)
        v = torch.randn(b, ni, d, generator=g).requires_grad_()
        t = torch.randn(b, nt, d, generator=g).requires_grad_()
        vm = torch.ones(b, ni, dtype=torch.bool)
        lengths = torch.randint(min(5, nt), nt + 1, (b,), generator=g)  # captions of varied length
        tm = torch.arange(nt)[None] < lengths[:, None]
        return v, vm, t, tm, torch.tensor(14.0, requires_grad=True)

    def step(v, vm, t, tm, scale) -> float:
        v.grad = t.grad = scale.grad = None
        start = time.perf_counter()
        if method == "naive":
            loss = naive_loss(v, vm, t, tm, scale)
        else:
            loss = filip_loss(v, vm, t, tm, scale, chunk_size=chunk,
                              store_indices=method != "ours-recompute")["loss"]
        loss.backward()
        return time.perf_counter() - start

    # A tiny warm-up first so one-off costs (thread pools, autograd engine) stay out of the peak.
    step(*make_inputs(2))
    inputs = make_inputs(b)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss0 = status_kib("VmRSS")
    first = step(*inputs)
    peak_kib = status_kib("VmHWM") - rss0
    times = [step(*inputs) for _ in range(repeats)] or [first]
    return {"time_s": min(times), "first_s": first, "peak_mib": peak_kib / 1024}


def run_one(method: str, b: int, ni: int, nt: int, d: int, repeats: int, chunk: int | None) -> dict:
    return run_worker(__file__, [method, b, ni, nt, d, repeats, chunk])


def largest_batch(points: list[tuple[int, float]], budget_mib: float) -> float | None:
    """Solve c + b*B^2 = budget for the least-squares fit through (B, peak MiB) points.

    No linear term: two or three points cannot separate it from the others, and folding the linear
    growth (input gradients) into b over-predicts the peak at large B, so the answer errs low.
    """
    import numpy as np

    if not points:
        return None
    bs = np.array([p[0] for p in points], float)
    peaks = np.array([p[1] for p in points], float)
    cols = [bs**2, np.ones_like(bs)] if len(points) >= 2 else [bs**2]
    coef = list(np.linalg.lstsq(np.stack(cols, 1), peaks, rcond=None)[0]) + [0.0]
    b, c = coef[0], coef[1]
    return math.sqrt((budget_mib - c) / b) if b > 0 and budget_mib > c else None


def chunk_covers_batch(method: str, b: int, ni: int, nt: int, chunk: int | None) -> bool:
    """True where the auto chunk holds the whole batch: there S's chunk still grows with B, so such
    points would bend the fit (beyond it the chunk block is a constant)."""
    from mm.losses.filip import DEFAULT_CHUNK_ELEMENTS

    if method == "naive" or chunk is not None:
        return False
    return max(1, DEFAULT_CHUNK_ELEMENTS // (b * ni * nt)) >= b


GATHER_CASES = (  # (label, keep_image_tokens, keep_text_tokens, gather_dtype)
    ("no reduction", None, None, None),
    ("image tokens 25%", 0.25, None, None),
    ("image + text tokens 25%", 0.25, 0.25, None),
    ("no reduction, bf16 gather", None, None, "bf16"),
    ("image + text 25%, bf16 gather", 0.25, 0.25, "bf16"),
)


def _gather_rank(rank: int, world: int, port: int, shape: tuple[int, int, int, int], queue) -> None:
    import torch
    import torch.distributed as dist

    from mm.losses.filip import filip_loss

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counts = {"gather": 0, "reduce": 0}
    real_gather, real_reduce = dist.all_gather, dist.all_reduce

    def gather(parts, x, *a, **k):
        counts["gather"] += sum(p.numel() * p.element_size() for p in parts)
        return real_gather(parts, x, *a, **k)

    def reduce(x, *a, **k):
        counts["reduce"] += x.numel() * x.element_size()
        return real_reduce(x, *a, **k)

    dist.all_gather, dist.all_reduce = gather, reduce
    b, ni, nt, d = shape
    g = torch.Generator().manual_seed(rank)
    results = []
    try:
        for label, keep_img, keep_txt, dtype in GATHER_CASES:
            v = torch.randn(b, ni, d, generator=g, requires_grad=True)
            t = torch.randn(b, nt, d, generator=g, requires_grad=True)
            tm = torch.arange(nt)[None] < torch.randint(5, nt + 1, (b, 1), generator=g)
            counts.update(gather=0, reduce=0)
            start = time.perf_counter()
            loss = filip_loss(v, None, t, tm, torch.tensor(14.0), keep_image_tokens=keep_img,
                              keep_text_tokens=keep_txt, gather_dtype=torch.bfloat16 if dtype else None)
            sent_forward = counts["gather"]
            loss["loss"].backward()
            results.append({"case": label, "gather_fwd": sent_forward, "reduce_bwd": counts["reduce"],
                            "time_s": time.perf_counter() - start})
    finally:
        dist.all_gather, dist.all_reduce = real_gather, real_reduce
        dist.destroy_process_group()
    if rank == 0:
        queue.put(results)


def gather_bytes(shape: tuple[int, int, int, int]) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_rank, args=(r, 2, port, shape, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = queue.get(timeout=600)
    for p in procs:
        p.join()
    b, ni, nt, d = shape
    print(f"2 gloo ranks, B_local={b}, N_img={ni}, N_txt={nt} (padded), d={d}; bytes per rank per step")
    print(f"{'case':<32}{'all_gather fwd':>16}{'all_reduce bwd':>16}{'total KiB':>11}{'vs none':>9}")
    base = results[0]["gather_fwd"] + results[0]["reduce_bwd"]
    for r in results:
        total = r["gather_fwd"] + r["reduce_bwd"]
        print(f"{r['case']:<32}{r['gather_fwd']:>16,}{r['reduce_bwd']:>16,}{total / 1024:>11.0f}"
              f"{total / base:>9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, one timed repeat")
    ap.add_argument("--sizes", default=None, help=f"BxN_imgxN_txt list (default {FULL_SIZES})")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--methods", default="ours,ours-recompute,naive")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps after the first (default 1)")
    ap.add_argument("--chunk-size", type=int, default=None, help="text candidates per chunk (default auto)")
    ap.add_argument("--max-naive-gib", type=float, default=8.0,
                    help=f"skip naive sizes whose estimated peak ({NAIVE_PEAK_FACTOR} x dense S) exceeds this")
    ap.add_argument("--budget-gib", type=float, default=8.0, help="memory budget for the largest-B estimate")
    ap.add_argument("--gather-bytes", action="store_true",
                    help="measure bytes sent per step by 2 ranks with and without token reduction")
    ap.add_argument("--gather-shape", default="32x49x77",
                    help="B_local x N_img x N_txt for --gather-bytes (default 32x49x77)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gather_bytes:
        b, ni, nt = (int(x) for x in args.gather_shape.split("x"))
        gather_bytes((b, ni, nt, args.dim))
        return
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return

    sizes = [tuple(int(x) for x in s.split("x")) for s in (args.sizes or (QUICK_SIZES if args.quick
                                                                             else FULL_SIZES)).split(",")]
    repeats = args.repeats if args.repeats is not None else 1
    methods = args.methods.split(",")
    rows: dict[tuple[str, tuple[int, int, int]], dict] = {}
    header = f"{'method':<15}{'B':>6}{'N_img':>7}{'N_txt':>7}{'dense S MiB':>13}{'time s':>9}{'peak MiB':>10}"
    print(f"d={args.dim}, chunk={args.chunk_size or 'auto'}, torch threads as default; peak = step RSS growth")
    print(header)
    for b, ni, nt in sizes:
        dense_mib = b * b * ni * nt * 4 / 2**20
        for method in methods:
            if method == "naive" and NAIVE_PEAK_FACTOR * dense_mib > args.max_naive_gib * 1024:
                res = {"error": "does not fit"}
            else:
                res = run_one(method, b, ni, nt, args.dim, repeats, args.chunk_size)
            rows[(method, (b, ni, nt))] = res
            if "error" in res:
                print(f"{method:<15}{b:>6}{ni:>7}{nt:>7}{dense_mib:>13.0f}  {res['error']}")
            else:
                print(f"{method:<15}{b:>6}{ni:>7}{nt:>7}{dense_mib:>13.0f}{res['time_s']:>9.2f}"
                      f"{res['peak_mib']:>10.0f}", flush=True)

    print("\nnaive / ours (time, peak):")
    for b, ni, nt in sizes:
        ours, naive = rows.get(("ours", (b, ni, nt))), rows.get(("naive", (b, ni, nt)))
        if ours and naive and "error" not in ours and "error" not in naive:
            print(f"  B={b} {ni}x{nt}: time x{naive['time_s'] / ours['time_s']:.2f}, "
                  f"peak x{naive['peak_mib'] / max(ours['peak_mib'], 1e-9):.1f}, "
                  f"naive peak = {naive['peak_mib'] / (b * b * ni * nt * 4 / 2**20):.1f} x dense S")

    print(f"\nlargest B within {args.budget_gib:g} GiB (fit to measured peaks, extrapolated):")
    for shape in sorted({s[1:] for s in sizes}):
        for method in methods:
            pts = [(b, r["peak_mib"]) for (m, (b, ni, nt)), r in rows.items()
                   if m == method and (ni, nt) == shape and "error" not in r
                   and not chunk_covers_batch(m, b, ni, nt, args.chunk_size)]
            # One point pins b*B^2 alone: fair for naive (dense S dominates), not for the chunked loss.
            best = largest_batch(pts, args.budget_gib * 1024) if len(pts) >= 2 or method == "naive" else None
            text = f"~{math.floor(best)}" if best else "n/a (no usable point)"
            print(f"  {method:<15} N_img={shape[0]} N_txt={shape[1]}: {text}  (from {len(pts)} point(s))")


if __name__ == "__main__":
    main()
