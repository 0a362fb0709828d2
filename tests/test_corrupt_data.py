"""Corrupt data: truncated tar members, undecodable images, missing caption or mask fields, masks of
the wrong size, empty shards and zero-byte files. Training and evaluation skip the bad samples, go on
and report per-kind counts; more than data.max_bad_fraction bad stops the run with one clear line."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# What the corrupt image-text set below plants, per kind, and what the loader must count.
IMAGE_TEXT_BAD = {"undecodable_image": 8, "missing_caption": 5, "missing_image": 2, "zero_byte_shard": 1,
                  "truncated_tar": 1, "unreadable_tar": 1}
SEG_BAD = {"mask_size_mismatch": 4, "missing_mask": 3, "undecodable_mask": 2, "undecodable_image": 8,
           "missing_image": 2, "zero_byte_shard": 1, "truncated_tar": 1, "unreadable_tar": 1}


def read_samples(shard: str) -> list[dict[str, bytes]]:
    """A shard's samples as {extension: bytes} dicts with their __key__, in order."""
    samples: dict[str, dict] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def png(size: tuple[int, int], mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def write_corrupt_set(shapes: dict, out: Path) -> str:
    """Nine shards from the shapes world (40 samples each) with every kind of damage in known numbers;
    returns the brace pattern."""
    out.mkdir(parents=True, exist_ok=True)
    good = [read_samples(s) for s in shapes["train_shards"]]
    a = [dict(s) for s in good[0]]
    for s in a[0:5]:
        s["png"] = b"\x89PNG\r\n\x1a\n not really an image"  # undecodable image
    for s in a[5:10]:
        del s["txt"]  # missing caption
    for s in a[10:14]:
        s["mask.png"] = png((7, 9))  # mask of the wrong size
    for s in a[14:17]:
        del s["mask.png"]  # missing mask
    for s in a[17:19]:
        s["mask.png"] = b"garbage"  # undecodable mask
    b = [dict(s) for s in good[1]]
    for s in b[0:3]:
        s["png"] = b""  # zero-byte image member
    for s in b[3:5]:
        del s["png"]  # missing image
    shards = [a, b, [], None, "truncated", "junk", good[2], good[3], good[4]]
    for i, content in enumerate(shards):
        path = out / f"bad-{i:06d}.tar"
        if content is None:
            path.write_bytes(b"")  # zero-byte shard
        elif content == "junk":
            path.write_bytes(b"this is not a tar archive " * 40)
        elif content == "truncated":
            src = shapes["train_shards"][5]
            with tarfile.open(src) as tar:  # cut in the middle of a member's data, half-way through the shard
                members = tar.getmembers()
            member = members[len(members) // 2]
            path.write_bytes(Path(src).read_bytes()[: member.offset_data + member.size // 2])
        else:
            write_tar(path, content)
    return f"{out}/bad-{{000000..{len(shards) - 1:06d}}}.tar"


@pytest.fixture(scope="module")
def corrupt(shapes, tmp_path_factory):
    return write_corrupt_set(shapes, tmp_path_factory.mktemp("corrupt"))


def one_pass(sample_map, urls: str):
    from mm.data.loader import Loader, StreamSpec, default_collate

    loader = Loader(StreamSpec(urls=urls, sample_map=sample_map, collate=default_collate, batch_size=8,
                               num_workers=0, shuffle_buffer=0, repeat=False, drop_last=False))
    n = sum(len(batch["key"]) for batch in loader)
    return n, loader.bad_counts


def test_image_text_loader_counts_every_kind(corrupt):
    from mm.data.image_text import image_text_map
    from mm.models.clip import ClipModelConfig, clip_preprocess, clip_tokenizer

    cfg = ClipModelConfig()
    n, bad = one_pass(image_text_map(clip_preprocess(cfg, False), clip_tokenizer(cfg)), corrupt)
    assert {k: v for k, v in bad.items() if k != "total"} == IMAGE_TEXT_BAD
    assert bad["total"] == sum(IMAGE_TEXT_BAD.values())
    # 40 + 40 + 3 x 40 whole shards less the 15 bad samples, plus the truncated shard's first part.
    assert 185 < n < 185 + 40


def test_segmentation_loader_counts_every_kind(corrupt):
    from mm.tasks.topolora_sam import seg_sample_map

    n, bad = one_pass(seg_sample_map(32), corrupt)
    assert {k: v for k, v in bad.items() if k != "total"} == SEG_BAD


def test_a_worker_whose_samples_are_all_bad_stops_instead_of_hanging(tmp_path, shapes):
    from mm.data.image_text import image_text_map
    from mm.data.loader import Loader, StreamSpec, default_collate
    from mm.errors import DataError
    from mm.models.clip import ClipModelConfig, clip_preprocess, clip_tokenizer

    samples = read_samples(shapes["train_shards"][0])
    for s in samples:
        del s["txt"]
    write_tar(tmp_path / "nocaptions.tar", samples)
    cfg = ClipModelConfig()
    spec = StreamSpec(urls=str(tmp_path / "nocaptions.tar"), batch_size=4, num_workers=0, repeat=True,
                      sample_map=image_text_map(clip_preprocess(cfg, False), clip_tokenizer(cfg)),
                      collate=default_collate)
    with pytest.raises(DataError, match="none of the samples .* is usable .*missing_caption=40"):
        next(iter(Loader(spec, max_bad_fraction=1.0)))


def test_the_bad_share_check_names_the_kinds_and_the_setting(corrupt):
    from mm.data.image_text import image_text_map
    from mm.data.loader import Loader, StreamSpec, default_collate
    from mm.errors import DataError
    from mm.models.clip import ClipModelConfig, clip_preprocess, clip_tokenizer

    cfg = ClipModelConfig()
    spec = StreamSpec(urls=corrupt, batch_size=4, num_workers=0, shuffle_buffer=0, repeat=True,
                      sample_map=image_text_map(clip_preprocess(cfg, False), clip_tokenizer(cfg)),
                      collate=default_collate)
    loader = Loader(spec, max_bad_fraction=0.01, min_samples_for_check=50)
    with pytest.raises(DataError, match=r"samples in .* are unusable \(\w+=\d+.*\), more than "
                                        r"data.max_bad_fraction=0.01"):
        for _ in loader:
            pass


# ---------------------------------------------------------------------------------------------------
# End to end: the train entry points (one rank, a subprocess each) and the evaluation commands.

CLIP_TINY = [
    "model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
    "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1",
    "model.arch.text_cfg.context_length=12", "data.batch_size=8", "data.num_workers=1",
    "optim.warmup_steps=1", "train.log_every=1", "train.ckpt_every=0", "eval.zeroshot_data=",
]
SEG_TINY = [
    "model.encoder_embed_dim=32", "model.encoder_depth=1", "model.encoder_num_heads=2",
    "model.encoder_global_attn_indexes=[0]", "model.image_size=32", "data.batch_size=4",
    "data.num_workers=1", "data.val=", "data.shuffle_buffer=20", "train.log_every=1", "train.ckpt_every=0",
]


def train(task: str, overrides: list[str]) -> subprocess.CompletedProcess:
    args = [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, f"train/{task}.py", "--config", f"configs/{task}/tiny.yaml", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_training_skips_and_reports_each_kind(corrupt, tmp_path):
    out = tmp_path / "run"
    proc = train("clip", CLIP_TINY + [f"data.train={corrupt}", f"train.out_dir={out}", "train.steps=8",
                                      "data.max_bad_fraction=0.5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if "bad samples skipped" in x]
    assert line.startswith("clip: ") and "undecodable_image=" in line
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    kinds = {k[4:]: v for k, v in final.items() if k.startswith("bad/")}
    assert kinds and set(kinds) <= set(IMAGE_TEXT_BAD)
    assert final["bad_samples"] == sum(kinds.values())
    assert f"{int(final['bad_samples'])} bad samples skipped" in line
    assert (out / "export" / "model.safetensors").is_file()


def test_segmentation_training_skips_bad_masks(corrupt, tmp_path):
    out = tmp_path / "seg"
    proc = train("topolora_sam", SEG_TINY + [f"data.train={corrupt}", f"train.out_dir={out}", "train.steps=3",
                                             "data.max_bad_fraction=0.5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    kinds = {k[4:] for k in final if k.startswith("bad/")}
    assert kinds and kinds <= set(SEG_BAD)


def test_too_much_bad_data_stops_training_with_one_line(corrupt, tmp_path):
    proc = train("clip", CLIP_TINY + [f"data.train={corrupt}", f"train.out_dir={tmp_path / 'x'}",
                                      "train.steps=200", "data.max_bad_fraction=0.01"])
    assert proc.returncode == 2
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "data.max_bad_fraction=0.01" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    from mm.config import config_json, load_config
    from mm.models.clip import build_clip
    from mm.tasks.clip import ClipRunConfig

    cfg = load_config(None, [o for o in CLIP_TINY if o.startswith("model.")], ClipRunConfig)
    torch.manual_seed(0)
    model = build_clip(cfg.model)
    path = tmp_path_factory.mktemp("export") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"mm_task": "clip", "mm_config": config_json(cfg), "mm_step": "0"})
    return path


def test_zeroshot_skips_corrupt_samples_and_counts_them(export, shapes, tmp_path, capsys):
    from mm.evaluate.zeroshot import main

    samples = read_samples(shapes["val"])
    samples[0]["png"] = b"broken"
    del samples[1]["png"]
    samples[2]["json"] = b"{not json"
    write_tar(tmp_path / "val.tar", samples)
    out = tmp_path / "zs.json"
    assert main(["--checkpoint", str(export), "--data", str(tmp_path / "val.tar"), "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["bad_samples"] == {"undecodable_image": 1, "missing_image": 1, "bad_json": 1, "total": 3}
    assert record["metrics"]["n_images"] == len(samples) - 3


def test_retrieval_skips_corrupt_samples_and_counts_them(export, corrupt, tmp_path):
    from mm.evaluate.retrieval import main

    out = tmp_path / "ret.json"
    assert main(["--checkpoint", str(export), "--data", corrupt, "--output", str(out)]) == 0
    bad = json.loads(out.read_text())["bad_samples"]
    assert {k: v for k, v in bad.items() if k != "total"} == IMAGE_TEXT_BAD
