"""`mm export --format open_clip`: CLIP and Structure-CLIP exports become folders that open_clip itself
loads (`local-dir:`), offline, answering as mm's model does; FILIP / STRUCTURE are refused in one line;
every folder has a model card.

Exports are written the way the trainer's export step writes them (Task.export_plan, save_export with
mm_task / mm_config / mm_step / mm_preprocess), from a model whose weights were moved off their init.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from mm.config import config_json, load_config
from mm.evaluate.export import main as export_main
from mm.exports import save_export
from mm.models.clip import ClipModelConfig, clip_preprocess, clip_tokenizer, export_preprocess_metadata
from mm.tasks import get_task, load_exported

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
        "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1"]
CAPTIONS = ["a red circle left of a blue square", "two green triangles", ""]


def _write_export(task_name: str, path: Path, *overrides: str) -> Path:
    task = get_task(task_name)
    cfg = load_config(ROOT / f"configs/{task_name}/tiny.yaml", TINY + list(overrides), task.config_class)
    torch.manual_seed(1)
    model = get_task(task_name, cfg).build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    plan = get_task(task_name, cfg).export_plan(model)
    assert plan.keys is None
    meta = {"mm_task": task_name, "mm_config": config_json(cfg), "mm_step": "3", "mm_export": "full",
            **export_preprocess_metadata(model)}
    save_export(model.state_dict(), path, meta)
    return path


def _images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(3)
    return [Image.fromarray((torch.rand(40 + 8 * i, 48, 3, generator=g) * 255).byte().numpy()) for i in range(2)]


def _check_loads_as_mm(export: Path, folder: Path) -> None:
    """open_clip's own loaders on the folder vs mm's model from the export: tokens, pixels, embeddings."""
    _, cfg, mm_model = load_exported(export)
    oc_model, _, oc_preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    oc_tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    oc_model.eval()

    tokens = clip_tokenizer(cfg.model)(CAPTIONS)
    assert torch.equal(oc_tokenizer(CAPTIONS), tokens)
    mm_pre = clip_preprocess(cfg.model, is_train=False, model=mm_model)
    pixels = torch.stack([mm_pre(im) for im in _images()])
    torch.testing.assert_close(torch.stack([oc_preprocess(im) for im in _images()]), pixels, rtol=0, atol=0)

    for normalize in (False, True):  # (Structure-CLIP's model normalizes by default, open_clip's does not)
        with torch.no_grad():
            mm_img = mm_model.encode_image(pixels, normalize=normalize)
            mm_txt = mm_model.encode_text(tokens, normalize=normalize)
            oc_img = oc_model.encode_image(pixels, normalize=normalize)
            oc_txt = oc_model.encode_text(tokens, normalize=normalize)
        torch.testing.assert_close(oc_img, mm_img, rtol=0, atol=1e-5)
        torch.testing.assert_close(oc_txt, mm_txt, rtol=0, atol=1e-5)
    # The weights matter: a freshly initialised model of the same config answers differently.
    fresh = open_clip.create_model_and_transforms(f"local-dir:{folder}", load_weights=False)[0].eval()
    with torch.no_grad():
        assert not torch.allclose(fresh.encode_image(pixels), mm_img, atol=1e-3)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """A CLIP export in its run directory, with the run's metrics.jsonl and config.yaml."""
    run = tmp_path_factory.mktemp("run")
    export = _write_export("clip", run / "export" / "model.safetensors", "model.quick_gelu=true")
    (run / "config.yaml").write_text("task: clip\n")
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "time": 0.0, "loss": 4.5}, {"step": 3, "time": 1.0, "loss": 3.25, "zeroshot/top1": 0.5},
        {"step": 9, "time": 2.0, "loss": 0.1}]) + "\n")  # after the export's step: not its metrics
    return export


def test_clip_export_loads_in_open_clip(clip_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "oc"
    assert export_main([str(clip_run), "--format", "open_clip", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "open_clip_config.json",
                                                      "open_clip_model.safetensors", "training_config.yaml"]
    oc_cfg = json.loads((out / "open_clip_config.json").read_text())
    assert oc_cfg["model_cfg"]["quick_gelu"] is True and oc_cfg["model_cfg"]["embed_dim"] == 32
    _check_loads_as_mm(clip_run, out)

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: open_clip\nlicense: other\n")
    assert "| loss | 3.25 | 3 |" in card and "| zeroshot/top1 | 0.5 | 3 |" in card and "| loss | 0.1 |" not in card
    assert "mm train clip --config training_config.yaml" in card
    assert "data/demo/train/shapes-{000000..000011}.tar" in card and "steps: 3 (of train.steps = 250)" in card
    assert "absent from the run directory: nothing" in card and "differs from it" in card
    # training_config.yaml is the export's resolved config: mm reads it back to the same config.
    task = get_task("clip")
    again = load_config(out / "training_config.yaml", [], task.config_class)
    assert config_json(again) == config_json(load_exported(clip_run)[1])


def test_structure_clip_export_drops_the_kee(tmp_path):
    export = _write_export("structure_clip", tmp_path / "sc.safetensors")
    assert any(k.startswith("kee.") for k in load_exported(export)[2].state_dict())
    out = tmp_path / "oc"
    assert export_main([str(export), "--format", "open_clip", "--out", str(out)]) == 0
    _check_loads_as_mm(export, out)
    from safetensors import safe_open

    with safe_open(str(out / "open_clip_model.safetensors"), framework="pt") as f:
        assert not any(k.startswith(("kee.", "clip.")) for k in f.keys())  # noqa: SIM118
    card = (out / "README.md").read_text()
    assert "The KEE is not carried" in card
    assert "metrics.jsonl" in card and "Not known" in card  # not in a run directory: said so
    assert "absent from the run directory: metrics.jsonl, config.yaml" in card


def test_named_architecture_model_cfg():
    from mm.evaluate.open_clip_export import open_clip_model_cfg

    cfg = open_clip_model_cfg(ClipModelConfig(name="ViT-B-32", quick_gelu=True))
    assert cfg == {**open_clip.get_model_config("ViT-B-32"), "quick_gelu": True, "custom_text": True}
    assert "quick_gelu" not in open_clip.get_model_config("ViT-B-32")  # not modified in place


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        export_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


@pytest.mark.parametrize("task,why", [("filip", "token-wise late interaction"), ("structure", "intermediate layer"),
                                      ("topolora_sam", "--format sam")])
def test_refused_tasks_say_why_in_one_line(task, why, tmp_path, capsys):
    export = tmp_path / "x.safetensors"
    save_export({"w": torch.zeros(1)}, export, {"mm_task": task, "mm_config": "{}", "mm_step": "1"})
    err = _refused([str(export), "--format", "open_clip", "--out", str(tmp_path / "oc")], capsys)
    assert why in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # nothing left behind


def test_bad_out_refused_and_overwrite(clip_run, tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "not empty" in _refused([str(clip_run), "--format", "open_clip", "--out", str(out)], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"] and (out / "keep.txt").read_text() == "mine"
    # Never over the input: a folder holding the export is refused even with --overwrite.
    err = _refused([str(clip_run), "--format", "open_clip", "--out", str(clip_run.parent.parent), "--overwrite"],
                   capsys)
    assert "holds the input export" in err and clip_run.is_file()
    assert "not a safetensors file" in _refused([str(out / "keep.txt"), "--format", "open_clip", "--out",
                                                 str(tmp_path / "o2")], capsys)
    assert not (tmp_path / "o2").exists()
    assert export_main([str(clip_run), "--format", "open_clip", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "open_clip_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no temporary folder left


def test_trained_run_end_to_end(shapes, tmp_path):
    """`mm train clip` for 2 steps through the engine, then `mm export --format open_clip` on its run's
    export: open_clip answers as mm, and the card's metrics are the run's metrics.jsonl."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    sets = TINY + ["data.batch_size=4", "data.num_workers=0", "train.steps=2", "train.log_every=1",
                   f"data.train={shapes['train']}", f"eval.zeroshot_data={shapes['val']}", f"train.out_dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mm", "train", "clip", "--config", "configs/clip/tiny.yaml",
                           *[a for s in sets for a in ("--set", s)]], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export, out = run / "export" / "model.safetensors", tmp_path / "oc"
    proc = subprocess.run([sys.executable, "-m", "mm", "export", str(export), "--format", "open_clip", "--out",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_loads_as_mm(export, out)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    card = (out / "README.md").read_text()
    loss = [r["loss"] for r in records if "loss" in r][-1]
    acc1 = [r["zeroshot/acc1"] for r in records if "zeroshot/acc1" in r][-1]
    assert f"| loss | {loss:.6g} | 2 |" in card and f"| zeroshot/acc1 | {acc1:.6g} | 2 |" in card
    assert f"{run / 'config.yaml'} is the same config" in card and "steps: 2 (of train.steps = 2)" in card
    # The exact command that trained it, and where it ran (relative paths in it are relative to that).
    typed = shlex.join(["python", "-m", "mm", "train", "clip", "--config", "configs/clip/tiny.yaml",
                        *[a for s in sets for a in ("--set", s)]])
    assert f"ran, in `{ROOT}` with 1 rank(s):\n\n```sh\n{typed}\n```" in card
    assert "launches (the run was resumed)" not in card  # one launch: no resume history to point at

    # Resumed to step 3 by another command: the export's card shows that command and points at the history.
    more = [*sets[:-1], "train.steps=3", sets[-1]]
    proc = subprocess.run([sys.executable, "-m", "mm", "train", "clip", "--config", "configs/clip/tiny.yaml",
                           *[a for s in more for a in ("--set", s)]], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launches = [json.loads(line) for line in (run / "launches.jsonl").read_text().splitlines()]
    assert [r["resumed_from"] for r in launches] == [None, "step00000002"]
    out2 = tmp_path / "oc2"
    assert export_main([str(export), "--format", "open_clip", "--out", str(out2)]) == 0
    card = (out2 / "README.md").read_text()
    assert launches[1]["command"] in card and "train.steps=3" in launches[1]["command"]
    assert f"{run / 'launches.jsonl'} records 2 launches" in card
