"""The offload configs' optimizer step: DeepSpeedCPUAdam (what mm's engine uses under
configs/ds/*offload*.json where DeepSpeed's cpu_adam op builds) against torch's AdamW, on the CPU.

    python bench/offload_adam.py                    # 20 M fp32 parameters in 4 tensors, 5 steps each
    python bench/offload_adam.py --params 150 --steps 3

Both optimizers get the same parameters (copies), the same fixed gradients and the same settings
(lr 1e-3, betas 0.9/0.98, eps 1e-6, weight decay 0.1, decoupled); steps alternate between the two so the
load of other processes falls on both. Reported: the median wall time of a step and the process's CPU
time per step, the ratio torch / DeepSpeed, and the largest difference of the parameters after the steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=20, help="millions of parameters")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()

    import torch

    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(4))])
    except Exception as e:  # noqa: BLE001 - any build failure
        raise SystemExit(f"DeepSpeedCPUAdam is unavailable here: {str(e).strip().splitlines()[-1:]}") from None

    g = torch.Generator().manual_seed(0)
    n = int(args.params * 1e6) // 4
    base = [torch.randn(n, generator=g) * 0.02 for _ in range(4)]
    grads = [torch.randn(n, generator=g) * 1e-3 for _ in range(4)]
    sides = {}
    for name, cls in (("torch AdamW", torch.optim.AdamW), ("DeepSpeedCPUAdam", DeepSpeedCPUAdam)):
        params = [torch.nn.Parameter(b.clone()) for b in base]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        kwargs = {"lr": 1e-3, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.1}
        opt = cls(params, adamw_mode=True, **kwargs) if cls is DeepSpeedCPUAdam else cls(params, **kwargs)
        opt.step()  # allocates the moments
        sides[name] = (params, opt, [], [])
    for _ in range(args.steps):
        for _params, opt, wall, cpu in sides.values():
            t, c = time.perf_counter(), time.process_time()
            opt.step()
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    (pt, _, wt, ct), (pd, _, wd, cd) = sides.values()
    diff = max((a - b).abs().max().item() for a, b in zip(pt, pd))
    print(f"{args.params:g} M fp32 parameters, {args.steps} steps each after one, {torch.get_num_threads()} threads")
    print(f"{'optimizer':<18}{'step s':>9}{'cpu s':>9}")
    for name, (_, _, wall, cpu) in sides.items():
        print(f"{name:<18}{statistics.median(wall):>9.3f}{statistics.median(cpu):>9.3f}")
    print(f"\ntorch / DeepSpeedCPUAdam: x{statistics.median(wt) / statistics.median(wd):.2f} wall, "
          f"x{statistics.median(ct) / statistics.median(cd):.2f} CPU; max parameter difference {diff:.1e}")


if __name__ == "__main__":
    main()
