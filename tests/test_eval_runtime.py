"""What the evaluation commands share (mm/evaluate/runtime.py): --device and --precision (bf16 autocast
on the CPU scores as fp32 does on a briefly trained tiny CLIP), several --data per call with --output
templates and --skip-existing, and the one-line refusals."""

import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mm.evaluate import compositional, retrieval, segment, zeroshot
from mm.evaluate.runtime import autocast, dataset_name, pick_device, pick_precision, progress

ROOT = Path(__file__).resolve().parents[1]

ARCH = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    """A tiny CLIP (smaller than configs/clip/tiny.yaml) trained 120 steps on the shapes world by the CLIP task's
    own loss (no DeepSpeed), saved as an open_clip model folder; and a 120-image balanced val set."""
    from mm.config import load_config
    from mm.data.synthetic import write_shapes_world
    from mm.tasks.clip import ClipRunConfig, ClipTask

    root = tmp_path_factory.mktemp("runtime")
    torch.manual_seed(0)
    cfg = load_config(None, ["model.arch=" + json.dumps(ARCH), f"data.train={shapes['train']}",
                             "data.batch_size=32", "data.num_workers=0", "data.shuffle_buffer=100"], ClipRunConfig)
    task = ClipTask(cfg)
    model = task.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step, batch in zip(range(120), task.batches("train")):
            loss = task.losses(model, batch, step)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    folder = root / "tiny-clip"
    folder.mkdir()
    from open_clip.model import get_model_preprocess_cfg

    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {**ARCH, "custom_text": True}, "preprocess_cfg": get_model_preprocess_cfg(model)}))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    val = write_shapes_world(root / "val120", 120, image_size=32, seed=5, balanced=True)[0]
    return {"model": f"local-dir:{folder}", "val": val, "root": root}


def _zeroshot(args, tmp_path, name="zs.json"):
    out = tmp_path / name
    assert zeroshot.main([*args, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_bf16_on_the_cpu_scores_as_fp32(trained, tmp_path):
    common = ["--model", trained["model"], "--data", trained["val"], "--device", "cpu"]
    fp32 = _zeroshot([*common, "--precision", "fp32"], tmp_path, "fp32.json")
    bf16 = _zeroshot([*common, "--precision", "bf16"], tmp_path, "bf16.json")
    assert fp32["precision"] == "fp32" and bf16["precision"] == "bf16" and bf16["device"] == "cpu"
    assert fp32["metrics"]["n_images"] == bf16["metrics"]["n_images"] == 120
    assert fp32["metrics"]["acc1"] > 0.25, "the briefly trained model should be well above chance (0.083)"
    assert abs(bf16["metrics"]["acc1"] - fp32["metrics"]["acc1"]) <= 0.01
    # auto on the CPU is fp32: the same numbers exactly.
    auto = _zeroshot(common, tmp_path, "auto.json")
    assert auto["precision"] == "fp32" and auto["metrics"] == fp32["metrics"]


@pytest.mark.parametrize("task", ["clip", "filip", "structure_clip"])
def test_bf16_on_the_cpu_scores_as_fp32_on_the_demos_val_set(task, tmp_path):
    """The demo's own exports (scripts/demo.sh) on its 240-image val set, where the demo has been run."""
    export, val = ROOT / f"runs/demo-{task}/export/model.safetensors", ROOT / "data/demo/val/shapes-000000.tar"
    if not (export.is_file() and val.is_file()):
        pytest.skip("the demo has not been run here (scripts/demo.sh writes runs/demo-* and data/demo)")
    common = ["--checkpoint", str(export), "--data", str(val), "--classnames", "shapes", "--templates", "shapes",
              "--device", "cpu"]
    fp32 = _zeroshot([*common, "--precision", "fp32"], tmp_path, "fp32.json")
    bf16 = _zeroshot([*common, "--precision", "bf16"], tmp_path, "bf16.json")
    assert fp32["metrics"]["n_images"] == bf16["metrics"]["n_images"] == 240
    assert abs(bf16["metrics"]["acc1"] - fp32["metrics"]["acc1"]) <= 0.01


def test_autocast_really_runs_bf16_on_the_cpu():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with autocast("cpu", "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert layer(x).dtype == torch.float32


def test_several_datasets_one_call(trained, shapes, tmp_path, capsys):
    second = tmp_path / "more" / "val"
    second.mkdir(parents=True)
    shutil.copy(shapes["val"], second / "extra-000000.tar")
    template = str(tmp_path / "out" / "{dataset}_{model}_{task}.json")
    args = ["--model", trained["model"], "--data", trained["val"], "--data", str(second / "extra-000000.tar"),
            "--output", template]
    assert zeroshot.main(args) == 0
    captured = capsys.readouterr()
    first_file = tmp_path / "out" / "shapes_tiny-clip_zeroshot_classification.json"
    second_file = tmp_path / "out" / "extra_tiny-clip_zeroshot_classification.json"
    one, two = json.loads(first_file.read_text()), json.loads(second_file.read_text())
    assert one["dataset"] == trained["val"] and one["metrics"]["n_images"] == 120
    assert two["dataset_name"] == "extra" and two["metrics"]["n_images"] == 24
    # Each result equals a call with that dataset alone.
    alone = _zeroshot(["--model", trained["model"], "--data", str(second / "extra-000000.tar")], tmp_path)
    assert alone["metrics"] == two["metrics"]
    assert "shapes: zero-shot open_clip (pooled): acc1" in captured.out
    assert "extra: zero-shot open_clip (pooled): acc1" in captured.out

    # --skip-existing: both are there, nothing runs, each skip is said.
    before = (first_file.stat().st_mtime_ns, second_file.stat().st_mtime_ns)
    assert zeroshot.main([*args, "--skip-existing"]) == 0
    err = capsys.readouterr().err
    assert err.count("(--skip-existing)") == 2 and str(first_file) in err
    assert (first_file.stat().st_mtime_ns, second_file.stat().st_mtime_ns) == before
    # One missing: only that one runs.
    second_file.unlink()
    assert zeroshot.main([*args, "--skip-existing"]) == 0
    assert json.loads(second_file.read_text())["metrics"] == two["metrics"]
    assert first_file.stat().st_mtime_ns == before[0]


def test_retrieval_and_compositional_take_device_and_templates(trained, shapes, tmp_path):
    other = tmp_path / "captions-000000.tar"
    shutil.copy(shapes["val"], other)
    template = str(tmp_path / "{dataset}-{scoring}.json")
    assert retrieval.main(["--model", trained["model"], "--data", str(other), "--data", trained["val"],
                           "--output", template, "--device", "cpu", "--precision", "bf16"]) == 0
    small = json.loads((tmp_path / "captions-pooled.json").read_text())
    assert small["precision"] == "bf16" and small["metrics"]["n_images"] == 24
    assert json.loads((tmp_path / "shapes-pooled.json").read_text())["metrics"]["n_images"] == 120
    out = tmp_path / "comp_{model}.json"
    assert compositional.main(["--model", trained["model"], "--synthetic-shapes", shapes["val"], "--parser",
                               "simple", "--precision", "bf16", "--output", str(out)]) == 0
    record = json.loads((tmp_path / "comp_tiny-clip.json").read_text())
    results = record["results"]
    assert record["precision"] == "bf16" and results["shapes_relation"]["n_images"] == 24


def _one_line(capsys, fn, argv):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("fn, data", [(zeroshot.main, "--data"), (retrieval.main, "--data"),
                                      (compositional.main, "--synthetic-shapes")])
def test_cuda_without_a_gpu_is_one_line(fn, data, trained, tmp_path, capsys):
    err = _one_line(capsys, fn, ["--model", trained["model"], data, trained["val"], "--device", "cuda",
                                 "--output", str(tmp_path / "x.json")])
    assert "no CUDA GPU" in err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--device", "cpu", "--precision", "fp16"], "fp16 needs a GPU"),
    (["--device", "tpu"], "unknown device"),
    (["--data", "{val2}", "--output", "{t}/fixed.json"], "would all write this one file"),
    (["--output", "{t}/{{datset}}.json"], "unknown placeholder(s) {datset}"),
    (["--skip-existing"], "--skip-existing needs --output"),
    (["--data", "{val}", "--output", "{t}/{{dataset}}.json"], "would both write"),
])
def test_bad_runtime_options_are_one_line(trained, tmp_path, capsys, extra, message):
    val2 = tmp_path / "b" / "other-000000.tar"
    val2.parent.mkdir()
    shutil.copy(trained["val"], val2)
    extra = [a.format(t=tmp_path, val=trained["val"], val2=val2) for a in extra]
    err = _one_line(capsys, zeroshot.main, ["--model", trained["model"], "--data", trained["val"], *extra])
    assert message in err, err
    assert sorted(os.listdir(tmp_path)) == ["b"]


def test_segment_uses_the_shared_device_options():
    assert segment.pick_device is pick_device and segment.pick_precision is pick_precision
    args = segment.build_parser().parse_args(["--checkpoint", "x", "--input", "y", "--output", "z",
                                              "--precision", "bf16", "--device", "cpu"])
    assert pick_precision(args.precision, pick_device(args.device)) == "bf16"


def test_dataset_names_and_progress_totals(tmp_path):
    (tmp_path / "imagenet-folder").mkdir()
    assert dataset_name("/d/shapes-{000000..000003}.tar") == "shapes"
    assert dataset_name("/d/cifar10/test/{0..9}.tar") == "cifar10-test"
    assert dataset_name("/d/list.csv") == "list"
    assert dataset_name(str(tmp_path / "imagenet-folder")) == "imagenet-folder"
    assert progress([1, 2, 3], "x").total == 3
    assert progress(iter([1, 2]), "x").total is None
    assert progress(iter([1, 2]), "x", total=2).total == 2


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_commands_show_progress_bars_with_totals(trained, tmp_path, monkeypatch):
    """On a terminal the commands draw tqdm bars whose total is the known size: batches of an image
    folder (5 images in batches of 2: 3) and a SugarCrepe file's items (4)."""
    from PIL import Image

    names = ["circle", "circle", "circle", "square", "square"]
    for i, name in enumerate(names):
        (tmp_path / "folder" / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(tmp_path / "folder" / name / f"{i}.png")
    items = {str(i): {"filename": f"{names[i]}/{i}.png", "caption": f"a {names[i]}", "negative_caption": "a star"}
             for i in range(4)}
    (tmp_path / "swap_att.json").write_text(json.dumps(items))
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert zeroshot.main(["--model", trained["model"], "--data", str(tmp_path / "folder"), "--batch-size", "2",
                          "--device", "cpu", "--output", str(tmp_path / "zs.json")]) == 0
    assert compositional.main(["--model", trained["model"], "--sugarcrepe", str(tmp_path / "swap_att.json"),
                               "--images", str(tmp_path / "folder"), "--batch-size", "2", "--device", "cpu",
                               "--output", str(tmp_path / "comp.json")]) == 0
    bars = sys.stderr.getvalue()
    assert re.search(r"zero-shot folder: +\d+%.*\| ?[0-3]/3 ", bars), bars
    assert re.search(r"swap_att.json: +\d+%.*\| ?[0-4]/4 ", bars), bars


@pytest.mark.gpu
def test_cuda_bf16_and_fp16_score_as_cpu_fp32(trained, tmp_path):
    common = ["--model", trained["model"], "--data", trained["val"]]
    cpu = _zeroshot([*common, "--device", "cpu", "--precision", "fp32"], tmp_path, "cpu.json")
    for precision in ("fp32", "bf16", "fp16"):
        gpu = _zeroshot([*common, "--device", "cuda", "--precision", precision], tmp_path, f"{precision}.json")
        assert gpu["device"].startswith("cuda") and gpu["precision"] == precision
        assert abs(gpu["metrics"]["acc1"] - cpu["metrics"]["acc1"]) <= 0.01
