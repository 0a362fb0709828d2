"""The prepared GPU check behind bench/gpu_check.sh: GPU-marked tests, 50 training steps of every trainer
at a realistic size on synthetic data with random weights (nothing is downloaded), the FILIP loss
against the naive dense loss, the segmentation-inference benchmark (batch 8) and mm's engine against a
plain AdamW step (bench/engine.py); everything lands in ONE JSON.

    python bench/gpu_check.py --out gpu_check.json          # on a CUDA machine (bench/gpu_check.sh)
    python bench/gpu_check.py --dry-run                     # any machine: resolve and check every config
    python bench/gpu_check.py --smoke --out smoke.json      # any machine: the same code path, tiny, on the CPU

Each trainer runs in its own process (`--worker NAME`) so its peak GPU memory is its own. Samples/s is
the mean of the logged `samples_per_s` after the first WARMUP steps (log every step); peak memory is
torch.cuda.max_memory_allocated (tensors only; the CUDA context and allocator cache come on top).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, WARMUP = 50, 10

# name -> (task, base config, data kind, overrides at the realistic size, overrides for --smoke)
TRAINERS: dict[str, tuple[str, str, str, list[str], list[str]]] = {
    "filip_vit_b16": (
        "filip", "configs/filip/base.yaml", "image_text",
        ["model.name=ViT-B-16", "data.batch_size=128", "train.precision=bf16",
         "train.deepspeed_config=configs/ds/zero2.json"],
        ["model.name=", "model.arch={embed_dim: 32, vision_cfg: {image_size: 32, patch_size: 8, width: 32, "
         "layers: 1, head_width: 16}, text_cfg: {context_length: 16, vocab_size: 49408, width: 32, heads: 2, "
         "layers: 1}}", "model.embed_dim=32", "data.batch_size=8", "train.precision=fp32"],
    ),
    "topolora_sam_vit_b_1024": (
        "topolora_sam", "configs/topolora_sam/vit_b_drive.yaml", "segmentation",
        ["model.checkpoint=", "model.image_size=1024", "data.batch_size=4", "train.grad_accum=1",
         "train.precision=bf16", "data.val=", "train.export=full"],
        ["model.checkpoint=", "model.variant=custom", "model.encoder_embed_dim=32", "model.encoder_depth=1",
         "model.encoder_num_heads=2", "model.encoder_global_attn_indexes=[0]", "model.image_size=32",
         "data.batch_size=2", "train.grad_accum=1", "train.precision=fp32", "data.val=", "train.export=full"],
    ),
    "structure_clip_vit_b32": (
        "structure_clip", "configs/structure_clip/vit_b32.yaml", "image_text",
        ["model.pretrained=", "data.batch_size=256", "train.precision=bf16"],
        ["model.name=", "model.pretrained=", "model.arch={embed_dim: 32, vision_cfg: {image_size: 32, patch_size: 8, "
         "width: 32, layers: 1, head_width: 16}, text_cfg: {context_length: 16, vocab_size: 49408, width: 32, "
         "heads: 2, layers: 1}}", "model.kee_layers=1", "data.batch_size=8", "train.precision=fp32"],
    ),
    "structure_heads_b4096": (
        "structure", "configs/structure/tiny.yaml", "pairs",
        # Random ViT-B/16 (768-d) and open_clip ViT-B-32 text (512-d) features; the heads train at 4096.
        ["model.vision.name=vit_base_patch16_224", "model.vision.args={}", "model.vision.image_size=224",
         "model.text.name=ViT-B-32", "model.text.args={}", "data.batch_size=4096", "cache.batch_size=512",
         "cache.device=cuda", "train.precision=bf16"],
        ["data.batch_size=64", "train.precision=fp32"],
    ),
    # The memory keys (issue 15): FILIP at a 2 x 64 contrastive batch with checkpointed towers, and
    # TopoLoRA-SAM at 1024 with checkpointed encoder blocks; compare with the rows above.
    "filip_vit_b16_ckpt_accum2": (
        "filip", "configs/filip/base.yaml", "image_text",
        ["model.name=ViT-B-16", "data.batch_size=64", "train.precision=bf16", "train.contrastive_accum=2",
         "train.grad_checkpointing=true", "train.deepspeed_config=configs/ds/zero2.json"],
        ["model.name=", "model.arch={embed_dim: 32, vision_cfg: {image_size: 32, patch_size: 8, width: 32, "
         "layers: 1, head_width: 16}, text_cfg: {context_length: 16, vocab_size: 49408, width: 32, heads: 2, "
         "layers: 1}}", "model.embed_dim=32", "data.batch_size=4", "train.precision=fp32",
         "train.contrastive_accum=2", "train.grad_checkpointing=true"],
    ),
    "topolora_sam_vit_b_1024_ckpt": (
        "topolora_sam", "configs/topolora_sam/vit_b_drive.yaml", "segmentation",
        ["model.checkpoint=", "model.image_size=1024", "data.batch_size=4", "train.grad_accum=1",
         "train.precision=bf16", "data.val=", "train.export=full", "train.grad_checkpointing=true"],
        ["model.checkpoint=", "model.variant=custom", "model.encoder_embed_dim=32", "model.encoder_depth=1",
         "model.encoder_num_heads=2", "model.encoder_global_attn_indexes=[0]", "model.image_size=32",
         "data.batch_size=2", "train.grad_accum=1", "train.precision=fp32", "data.val=", "train.export=full",
         "train.grad_checkpointing=true"],
    ),
}
COMMON = [f"train.steps={STEPS}", "train.log_every=1", "train.ckpt_every=0", "train.eval_every=0",
          "optim.warmup_steps=5", "eval.zeroshot_data=", "data.num_workers=4", "data.shuffle_buffer=256"]
SMOKE_COMMON = ["train.steps=3", "train.log_every=1", "train.ckpt_every=0", "train.eval_every=0",
                "optim.warmup_steps=1", "eval.zeroshot_data=", "data.num_workers=1", "data.shuffle_buffer=16",
                "train.deepspeed_config=configs/ds/zero2.json"]


def available(name: str) -> bool:
    task = TRAINERS[name][0]
    return (ROOT / TRAINERS[name][1]).is_file() and (ROOT / f"train/{task}.py").is_file()


def overrides(name: str, smoke: bool, data: Path, out: Path) -> list[str]:
    task, _, kind, real, tiny = TRAINERS[name]
    sets = (SMOKE_COMMON + tiny) if smoke else (COMMON + real)
    sets = sets + [f"data.train={data / kind}/shapes-{{000000..000007}}.tar", f"train.out_dir={out / name}"]
    if task == "structure":
        sets.append(f"cache.dir={out / name / 'cache'}")
        if smoke:
            sets.append("cache.device=cpu")
    return sets


def load(name: str, sets: list[str]):
    from mm.config import load_config
    from mm.tasks import get_task

    task = get_task(TRAINERS[name][0])
    return task, load_config(ROOT / TRAINERS[name][1], sets, task.config_class)


def write_data(data: Path, smoke: bool) -> None:
    """Shapes-world shards: 8 per kind, so 4 loader workers each read two; the loader repeats epochs."""
    from mm.data.synthetic import write_shapes_world

    sizes = {"image_text": (32, 8 * 4) if smoke else (224, 8 * 128),
             "segmentation": (32, 8 * 2) if smoke else (1024, 8 * 8),
             # STRUCTURE trains on cached features: the cache must hold more pairs than one batch of 4096.
             "pairs": (32, 8 * 16) if smoke else (64, 8 * 1024)}
    for kind, (size, n) in sizes.items():
        if not (data / kind).is_dir():
            write_shapes_world(data / kind, n, image_size=size, seed=0, shard_size=n // 8)


def worker(name: str, smoke: bool, data: Path, out: Path, result: Path) -> None:
    """One trainer, in this process: STEPS optimizer steps, then samples/s and peak memory to `result`."""
    import torch

    from mm.engine.trainer import init_distributed, train
    from mm.tasks import get_task

    task, cfg = load(name, overrides(name, smoke, data, out))
    shutil.rmtree(out / name, ignore_errors=True)  # measure a fresh run, never a resumed one
    init_distributed()
    if TRAINERS[name][0] == "structure":
        from mm.tasks.structure_cli import main as structure_main

        args = [a for s in overrides(name, smoke, data, out) for a in ("--set", s)]
        structure_main(["cache", "--config", str(ROOT / TRAINERS[name][1]), "--overwrite", *args])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    res = train(get_task(task.name, cfg))
    wall = time.time() - t0
    records = [json.loads(line) for line in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r and r["step"] > (0 if smoke else WARMUP)]
    report = {"task": task.name, "steps": res["step"], "wall_s": round(wall, 1),
              "samples_per_s": round(sum(rates) / len(rates), 2) if rates else None,
              "global_batch": cfg.data.batch_size * cfg.train.grad_accum, "precision": cfg.train.precision,
              "zero_config": cfg.train.deepspeed_config, "final_loss": res["last"].get("loss"),
              "skipped_steps": res.get("skipped_steps"),
              "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}
    result.write_text(json.dumps(report))


def run(cmd: list[str], timeout: int, env: dict | None = None) -> dict:
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        return {"rc": proc.returncode, "wall_s": round(time.time() - t0, 1), "stdout": proc.stdout[-4000:],
                "stderr": proc.stderr[-4000:]}
    except subprocess.TimeoutExpired:
        return {"rc": "timeout", "wall_s": timeout}


def filip_loss_benchmark(device: str, smoke: bool) -> list[dict]:
    """The chunked FILIP loss against the naive dense one (bench/filip_loss.py's naive_loss): time of one
    forward+backward and peak memory, at FILIP ViT-B/16 token counts (196 patches, 77 text tokens)."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from filip_loss import naive_loss

    from mm.losses.filip import filip_loss

    sizes = [(8, 16, 8, 32)] if smoke else [(128, 196, 77, 256), (256, 196, 77, 256), (512, 196, 77, 256)]
    rows = []
    for b, ni, nt, d in sizes:
        for method in ("ours", "naive"):
            gen = torch.Generator(device="cpu").manual_seed(0)
            v = torch.randn(b, ni, d, generator=gen).to(device).requires_grad_()
            t = torch.randn(b, nt, d, generator=gen).to(device).requires_grad_()
            vm = torch.ones(b, ni, dtype=torch.bool, device=device)
            tm = torch.ones(b, nt, dtype=torch.bool, device=device)
            tm[:, nt // 2:] = False
            scale = torch.tensor(100.0, device=device)
            def fn(v, vm, t, tm, scale, method=method):
                if method == "ours":
                    return filip_loss(v, vm, t, tm, scale, gather=False)["loss"]
                with torch.device(device):  # naive_loss makes its labels on the default device
                    return naive_loss(v, vm, t, tm, scale)

            row = {"method": method, "B": b, "N_img": ni, "N_txt": nt, "dim": d}
            try:
                times = []
                for _ in range(3):
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    t0 = time.time()
                    out = fn(v, vm, t, tm, scale)
                    out.backward()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.time() - t0)
                    v.grad = t.grad = None
                row["time_s"] = round(min(times[1:]), 4)
                if device == "cuda":
                    row["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
                torch.cuda.empty_cache()
            rows.append(row)
    return rows


def dry_run() -> int:
    """Resolve every trainer's config (strict keys, ranges) and check the files it names: no GPU needed."""
    problems = []
    for name in TRAINERS:
        if not available(name):
            print(f"{name}: skipped (trainer not in this checkout)")
            continue
        for smoke in (False, True):
            try:
                _, cfg = load(name, overrides(name, smoke, Path("/tmp/data"), Path("/tmp/runs")))
                ds = ROOT / cfg.train.deepspeed_config if not Path(cfg.train.deepspeed_config).is_absolute() \
                    else Path(cfg.train.deepspeed_config)
                if not ds.is_file():
                    raise FileNotFoundError(f"{ds}: no such DeepSpeed config")
                print(f"{name} ({'smoke' if smoke else 'real'}): ok, batch {cfg.data.batch_size}, "
                      f"{cfg.train.precision}, "
                      f"{Path(cfg.train.deepspeed_config).name}")
            except Exception as e:  # every problem is listed, not only the first
                problems.append(f"{name} ({'smoke' if smoke else 'real'}): {e}")
    for script in ("bench/filip_loss.py", "bench/seg_infer.py"):
        print(f"{script}: {'present' if (ROOT / script).is_file() else 'missing (skipped)'}")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check.json", help="the JSON file to write")
    p.add_argument("--work", default="runs/gpu_check", help="folder for the synthetic data and the runs")
    p.add_argument("--dry-run", action="store_true", help="only resolve and check the configs")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 3 steps, on the CPU: checks the script")
    p.add_argument("--budget", type=int, default=440,
                   help="seconds for the whole check; each stage gets at most what is left, the JSON is "
                        "rewritten after every stage (default 440: under 8 minutes with start-up)")
    p.add_argument("--only", default="", help="comma-separated trainer names (default: all)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = Path(args.work).absolute()
    data, runs = work / ("data-smoke" if args.smoke else "data"), work / ("runs-smoke" if args.smoke else "runs")
    if args.worker:
        worker(args.worker, args.smoke, data, runs, Path(args.result))
        return 0
    if args.dry_run:
        return dry_run()

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("error: gpu_check needs a CUDA device (torch.cuda.is_available() is False); "
              "use --dry-run or --smoke on this machine", file=sys.stderr)
        return 2
    t_start = time.time()
    deadline = t_start + args.budget

    def left(cap: int) -> int:
        """A stage's time limit: its own cap, or what is left of --budget (0: skip the stage)."""
        remaining = int(deadline - time.time())
        return min(cap, remaining) if remaining >= 30 else 0

    def save() -> None:  # after every stage, so a run stopped from outside still leaves its figures
        report["total_wall_s"] = round(time.time() - t_start, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{args.out}.tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, args.out)

    device = "cpu" if args.smoke else "cuda"
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "smoke": args.smoke,
                    "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
                    "torch": torch.__version__, "cuda": torch.version.cuda, "host": platform.node(),
                    "steps": 3 if args.smoke else STEPS, "warmup_excluded": 0 if args.smoke else WARMUP,
                    "budget_s": args.budget}
    env = {"DS_ACCELERATOR": "cpu" if args.smoke else "cuda", "HF_HUB_OFFLINE": "1"}
    if not args.smoke:
        report["gpu_tests"] = run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"], left(120), env)
        print(f"gpu tests: rc {report['gpu_tests']['rc']} ({report['gpu_tests']['wall_s']} s)", flush=True)
        save()
    t0 = time.time()
    write_data(data, args.smoke)
    report["data_write_s"] = round(time.time() - t0, 1)
    report["trainers"] = {}
    names = [n for n in (args.only.split(",") if args.only else TRAINERS) if n]
    for name in names:
        if not available(name):
            report["trainers"][name] = {"skipped": "trainer not in this checkout"}
            continue
        limit = left(600 if args.smoke else 100)
        if not limit:
            report["trainers"][name] = {"skipped": f"--budget {args.budget} s spent"}
            save()
            continue
        result = runs / f"{name}.json"
        runs.mkdir(parents=True, exist_ok=True)
        result.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).absolute()), "--worker", name, "--result", str(result),
               "--work", str(work)] + (["--smoke"] if args.smoke else [])
        proc = run(cmd, limit, env)
        entry = json.loads(result.read_text()) if result.is_file() else {"error": proc.get("stderr", "")[-1500:],
                                                                        "rc": proc["rc"]}
        entry["process_wall_s"] = proc["wall_s"]
        report["trainers"][name] = entry
        save()
        print(f"{name}: {entry.get('samples_per_s')} samples/s, peak {entry.get('peak_gpu_mem_gib')} GiB"
              f"{'' if 'error' not in entry else ' (FAILED)'}", flush=True)
    if (ROOT / "bench/seg_infer.py").is_file():
        cmd = [sys.executable, "bench/seg_infer.py", "--repeats", "1"]
        cmd += ["--variant", "vit_b", "--image-size", "64", "--height", "96", "--width", "96"] if args.smoke else \
            ["--image-size", "1024", "--height", "1792", "--width", "2560", "--device", "cuda", "--precision", "bf16",
             "--batch-size", "8"]
        limit = left(300 if args.smoke else 90)
        report["seg_infer"] = run(cmd, limit, env) if limit else {"skipped": f"--budget {args.budget} s spent"}
        save()
    if (ROOT / "bench/engine.py").is_file():  # mm's engine (ZeRO-1/2/3) against a plain AdamW step
        cmd = [sys.executable, "bench/engine.py", "--repeats", "1"]
        cmd += ["--width", "32", "--layers", "1", "--batch", "4", "--steps", "1"] if args.smoke else \
            ["--device", "cuda", "--precision", "bf16", "--width", "768", "--layers", "12", "--image-size", "224",
             "--patch", "16", "--batch", "64", "--steps", "5"]
        limit = left(300 if args.smoke else 90)
        report["engine"] = run(cmd, limit, env) if limit else {"skipped": f"--budget {args.budget} s spent"}
        save()
    # In-process and short (a few seconds on a GPU): last, so that it cannot starve the stages above.
    report["filip_loss"] = filip_loss_benchmark(device, args.smoke) if left(60) else \
        {"skipped": f"--budget {args.budget} s spent"}
    save()
    failed = [n for n, e in report["trainers"].items() if "error" in e]
    skipped = [n for n, e in report["trainers"].items() if "skipped" in e]
    print(f"wrote {args.out} in {report['total_wall_s']} s; "
          f"{'failed: ' + ', '.join(failed) if failed else 'no trainer failed'}"
          f"{'; skipped: ' + ', '.join(skipped) if skipped else ''}")
    return 1 if failed or skipped else 0


if __name__ == "__main__":
    sys.exit(main())
