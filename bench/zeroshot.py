"""Images per second of our zero-shot evaluation against open_clip's own zero-shot evaluation loop.

    python bench/zeroshot.py                       # 384 synthetic 64px images, small inline ViT, CPU
    python bench/zeroshot.py --num-images 960 --repeats 5 --workers 1

Same model (one random-init open_clip CustomTextCLIP with a small inline ViT at --image-size), same
images, same class names and templates (the shapes world's 12 classes x 3 templates), same
preprocess (open_clip's eval transform), same batch size and DataLoader workers, logits 100 x cos:

  ours-shards: mm.metrics.zeroshot.evaluate_zeroshot_batches over the shards through the shared loader;
  ours-folder: mm.evaluate.datasets.FolderDataset + image_label_loader + evaluate_zeroshot_batches
               over the same images written as an image folder (what mm-zeroshot does for a folder);
  open_clip:   open_clip's build_zero_shot_classifier, then open_clip_train.zero_shot.run (if
               open_clip_train is importable, else an equivalent loop written here) over
               torchvision's ImageFolder of the same folder through a plain DataLoader.

Each pass times everything from the classifier build to the last logit (both sides build the
classifier from the same prompts), as wall clock (images/s) and as CPU time of the process per image
(all threads; steadier on a machine shared with other jobs; --workers 0 keeps all work in-process).
Passes alternate the three sides so load from other processes on a shared machine falls on all of
them; the table gives the median of --repeats passes. The accuracy of each side is printed as a
check that they computed the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def small_arch(image_size: int) -> dict:
    return {"embed_dim": 128,
            "vision_cfg": {"image_size": image_size, "patch_size": 8, "width": 128, "layers": 2,
                           "head_width": 32},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}


def write_data(tmp: Path, num_images: int, image_size: int) -> tuple[str, Path]:
    """Labelled shapes shards and the same images as an image folder (one sub-folder per class)."""
    import tarfile

    from mm.data.synthetic import CLASSNAMES, write_shapes_world

    shards = write_shapes_world(tmp / "shards", num_images, image_size=image_size, seed=1, balanced=True,
                                shard_size=max(1, num_images // 4))
    folder = tmp / "folder"
    for path in shards:
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in members.items():
                if name.endswith(".png") and not name.endswith(".mask.png"):
                    key = name[: -len(".png")]
                    label = json.load(tar.extractfile(members[key + ".json"]))["label"]
                    out = folder / CLASSNAMES[label] / f"{Path(path).stem}_{key.replace('/', '_')}.png"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(tar.extractfile(member).read())
    return f"{tmp}/shards/shapes-{{000000..{len(shards) - 1:06d}}}.tar", folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=384)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--json", action="store_true", help="also print one JSON record")
    args = p.parse_args(argv)

    import open_clip
    import torch
    from open_clip import build_zero_shot_classifier
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from mm.data.classnames import load_classnames, load_templates
    from mm.data.streams import labelled_shard_batches
    from mm.evaluate.datasets import FolderDataset, image_label_loader
    from mm.metrics.zeroshot import evaluate_zeroshot_batches
    from mm.models.clip import ClipModelConfig, build_clip, clip_preprocess, clip_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from open_clip_train.zero_shot import run as open_clip_run
        reference = "open_clip_train.zero_shot.run"
    except ImportError:
        open_clip_run, reference = None, "loop written here (open_clip_train not importable)"

    def plain_run(model, classifier, dataloader, _args):
        """open_clip_train.zero_shot.run's loop: forward image only, 100 x features @ classifier, top-1/5."""
        top1 = top5 = n = 0
        with torch.inference_mode():
            for images, target in dataloader:
                feats = model(image=images)["image_features"]
                logits = 100.0 * feats @ classifier
                top = logits.topk(5, 1).indices
                top1 += (top[:, 0] == target).sum().item()
                top5 += (top == target[:, None]).any(1).sum().item()
                n += len(target)
        return top1 / n, top5 / n

    run_ref = open_clip_run or plain_run
    cfg = ClipModelConfig(arch=small_arch(args.image_size))
    torch.manual_seed(0)
    model = build_clip(cfg).eval()
    tokenizer, preprocess = clip_tokenizer(cfg), clip_preprocess(cfg, False)
    classnames, templates = load_classnames("shapes"), load_templates("shapes")
    ref_args = argparse.Namespace(device="cpu", precision="fp32", batch_size=args.batch_size)

    with tempfile.TemporaryDirectory() as tmp:
        urls, folder = write_data(Path(tmp), args.num_images, args.image_size)

        def ours_shards():
            batches = labelled_shard_batches(preprocess, tokenizer, urls, len(classnames), args.batch_size,
                                             args.workers)
            return evaluate_zeroshot_batches(model, tokenizer, batches, classnames, templates)["acc1"]

        def ours_folder():
            ds = FolderDataset(folder, preprocess, classnames)
            loader = image_label_loader(ds, args.batch_size, args.workers)
            return evaluate_zeroshot_batches(model, tokenizer, loader, classnames, templates)["acc1"]

        def open_clip_side():
            ds = ImageFolder(str(folder), transform=preprocess)
            order = [classnames.index(c) for c in ds.classes]  # folder order -> shapes order
            ds.target_transform = lambda t: order[t]
            loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
            classifier = build_zero_shot_classifier(model, tokenizer, classnames, templates,
                                                    num_classes_per_batch=10)
            return run_ref(model, classifier, loader, ref_args)[0]

        sides = {"ours-shards": ours_shards, "ours-folder": ours_folder, "open_clip": open_clip_side}
        try:
            open_clip_side()  # warm-up (first-call costs: tokenizer cache, allocator)
        except TypeError as e:  # open_clip_train's accuracy() does float(1-element array): numpy >= 2 refuses
            if run_ref is plain_run:
                raise
            reference = f"loop written here (open_clip_train.zero_shot.run fails: {e})"
            run_ref = plain_run
            open_clip_side()
        times: dict[str, list[float]] = {k: [] for k in sides}
        cpu: dict[str, list[float]] = {k: [] for k in sides}
        accs: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, fn in sides.items():
                t0, c0 = time.perf_counter(), time.process_time()
                accs[name] = fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(1000 * (time.process_time() - c0) / args.num_images)

    rates = {k: [args.num_images / t for t in v] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"data: {args.num_images} shapes images at {args.image_size}px, 12 classes x 3 templates; batch "
          f"{args.batch_size}, {args.workers} workers, {torch.get_num_threads()} torch threads; "
          f"reference: {reference}")
    print(f"{'side':<12} {'median img/s':>12} {'min':>8} {'max':>8} {'CPU ms/img':>10} {'acc1':>7} "
          f"{'img/s ratio vs open_clip':>24} {'CPU ratio':>9}")
    for name in sides:
        print(f"{name:<12} {med[name]:>12.1f} {min(rates[name]):>8.1f} {max(rates[name]):>8.1f} "
              f"{cpu_med[name]:>10.2f} {accs[name]:>7.4f} {med[name] / med['open_clip']:>24.2f} "
              f"{cpu_med[name] / cpu_med['open_clip']:>9.2f}")
    if args.json:
        print(json.dumps({"args": vars(args), "reference": reference, "median_images_per_s": med,
                          "median_cpu_ms_per_image": cpu_med,
                          "acc1": accs, "python": platform.python_version(), "torch": torch.__version__,
                          "open_clip": open_clip.__version__}))
    print(f"ratio ours-shards/open_clip = {med['ours-shards'] / med['open_clip']:.2f}, "
          f"ours-folder/open_clip = {med['ours-folder'] / med['open_clip']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
