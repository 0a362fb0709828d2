"""`mm export --format peft`: a TopoLoRA-SAM export as peft's adapter folder for a segment_anything Sam.

The reference is a user's own script: the model card's Python (segment_anything + peft + safetensors, run
in a fresh interpreter outside the repository) must give mm's logits on the same images.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mm.config import config_json, load_config
from mm.evaluate.export import main as export_main
from mm.evaluate.peft_export import BASE_FILE, EXTRA_FILE, user_script
from mm.exports import save_export
from mm.models.sam import SamModelConfig, build_sam, prepare_image, restore_logits
from mm.tasks import get_task, load_exported

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"variant": "custom", "encoder_embed_dim": 32, "encoder_depth": 2, "encoder_num_heads": 2,
              "encoder_global_attn_indexes": [1], "image_size": 64}
TINY = [f"model.{k}={v}" for k, v in TINY_MODEL.items()]
FOLDER_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors", EXTRA_FILE, "sam_config.json",
                "training_config.yaml", BASE_FILE}


def _cfg(*overrides: str):
    task = get_task("topolora_sam")
    return task, load_config(ROOT / "configs/topolora_sam/tiny.yaml", TINY + list(overrides), task.config_class)


def _export(root: Path, *overrides: str) -> Path:
    """A 'trained' tiny TopoLoRA-SAM export: every trainable part (and the adapter's BatchNorm statistics)
    moved off its initial value, written as the trainer's export step writes it."""
    task, cfg = _cfg(*overrides)
    torch.manual_seed(1)
    task = get_task(task.name, cfg)
    model = task.build_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad or "pos" in name:  # position embeddings start at zero in segment_anything
                p.add_(torch.randn_like(p) * 0.05)
        model.adapter.norm.running_mean.normal_(0, 0.1)
        model.adapter.norm.running_var.uniform_(0.5, 1.5)
    plan = task.export_plan(model)
    meta = {"mm_task": "topolora_sam", "mm_config": config_json(cfg), "mm_step": "7",
            "mm_export": "full" if plan.keys is None else "trainable", **plan.metadata}
    state = model.state_dict()
    path = root / "export" / "model.safetensors"
    save_export(state if plan.keys is None else {k: state[k] for k in plan.keys}, path, meta)
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    base = root / "sam_tiny.pth"
    sam = build_sam(SamModelConfig(**TINY_MODEL))
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "pos" in name:
                p.normal_(0, 0.5)
    torch.save(sam.state_dict(), base)
    return {"full": _export(root / "random"),  # no base checkpoint: the folder must carry the base
            "trainable": _export(root / "trained", f"model.checkpoint={base}"), "base": base}


def _images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    # A square image at the model size and a smaller, non-square one (SAM's resize and padding).
    return {"square": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
            "wide": rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)}


def _mm_logits(export: Path, image: np.ndarray) -> torch.Tensor:
    _, cfg, model = load_exported(export)
    x, hw = prepare_image(torch.from_numpy(image).permute(2, 0, 1).float(), cfg.model.image_size)
    with torch.no_grad():
        return restore_logits(model(x), hw, image.shape[:2])[0, 0]


def _card_script(folder: Path) -> str:
    card = (folder / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


@pytest.mark.parametrize("kind", ["full", "trainable"])
def test_user_script_without_mm_gives_mm_logits(exports, kind, tmp_path, capsys):
    out = tmp_path / "folder"
    assert export_main([str(exports[kind]), "--format", "peft", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "4 layers" in line and f"PeftModel.from_pretrained(sam.image_encoder, \"{out}\")" in line
    assert {p.name for p in out.iterdir()} == FOLDER_FILES  # custom sizes: the base ships in the folder

    images = _images()
    save_file({k: torch.from_numpy(v) for k, v in images.items()}, str(tmp_path / "images.safetensors"))
    script = _card_script(out).replace("PATH_TO_THIS_FOLDER", str(out)) + (
        "\nimport sys\n"
        "from safetensors.torch import save_file\n"
        "images = load_file('images.safetensors')\n"
        "save_file({k: segment(v.numpy()).contiguous() for k, v in images.items()}, 'logits.safetensors')\n"
        "assert not [m for m in sys.modules if m == 'mm' or m.startswith('mm.')], 'mm was imported'\n")
    (tmp_path / "user.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "user.py"], cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "logits.safetensors"))
    for name, image in images.items():
        expected = _mm_logits(exports[kind], image)
        assert got[name].shape == image.shape[:2]
        torch.testing.assert_close(got[name], expected, atol=1e-5, rtol=1e-5)
        assert expected.std() > 0.01  # a real output, not a constant both sides agree on


def test_folder_layout_is_peft_and_the_documented_keys(exports, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    out = tmp_path / "folder"
    assert export_main([str(exports["trainable"]), "--format", "peft", "--out", str(out)]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        lora_keys = set(f.keys())
    assert lora_keys == {f"base_model.model.blocks.{b}.mlp.{lin}.lora_{ab}.weight"
                         for b in (0, 1) for lin in ("lin1", "lin2") for ab in "AB"}
    extra = load_file(str(out / EXTRA_FILE))
    decoder = build_sam(SamModelConfig(**TINY_MODEL)).mask_decoder.state_dict()
    assert set(extra) == {f"mask_decoder.{k}" for k in decoder} | {
        "adapter.depthwise.weight", "adapter.pointwise.weight", "adapter.out.weight", "adapter.norm.weight",
        "adapter.norm.bias", "adapter.norm.running_mean", "adapter.norm.running_var",
        "adapter.norm.num_batches_tracked"}
    _, _, model = load_exported(exports["trainable"])
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in extra.items())
    sam_config = json.loads((out / "sam_config.json").read_text())
    assert sam_config["base"] == {"file": BASE_FILE} and sam_config["image_size"] == 64
    # peft's lower-level path takes the same folder: inject from the config, then set the state dict.
    sam = build_sam(SamModelConfig(**TINY_MODEL))
    sam.load_state_dict(load_file(str(out / BASE_FILE)))
    inject_adapter_in_model(LoraConfig.from_pretrained(str(out)), sam.image_encoder)
    result = set_peft_model_state_dict(sam.image_encoder, load_file(str(out / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.image_encoder(x)
        torch.testing.assert_close(sam.image_encoder(x), expected, atol=1e-6, rtol=1e-6)
    # ... and merge_and_unload folds it into plain nn.Linear weights.
    from peft import PeftModel

    sam = build_sam(SamModelConfig(**TINY_MODEL))
    sam.load_state_dict(load_file(str(out / BASE_FILE)))
    sam.image_encoder = PeftModel.from_pretrained(sam.image_encoder, str(out)).merge_and_unload()
    assert type(sam.image_encoder.blocks[0].mlp.lin1) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(sam.image_encoder(x), expected, atol=1e-5, rtol=1e-5)
    # The model card: the run's facts and licence fields.
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\nlicense: other\n")
    assert "mm train topolora_sam --config training_config.yaml" in card and "sam_tiny.pth" in card
    assert "steps: 7 (of train.steps = 100)" in card


def test_docs_show_the_card_script():
    """The loading lines in docs/topolora_sam.md are the ones the card prints (and the test above runs)."""
    from mm.evaluate.peft_export import _BUILD_CLASSES, _IMPORTS_CLASSES

    docs = (ROOT / "docs/topolora_sam.md").read_text()
    assert user_script(ship_base=False) in docs  # the whole vit_b script
    assert user_script(ship_base=True) == _IMPORTS_CLASSES + _BUILD_CLASSES + user_script(False).split(
        "sam_model_registry[\"vit_b\"](checkpoint=\"sam_vit_b_01ec64.pth\")\n")[1]  # only the build differs
    assert _IMPORTS_CLASSES in docs and _BUILD_CLASSES in docs


def test_refusals_are_one_line_and_leave_nothing(exports, tmp_path, capsys):
    def fails(*argv: str) -> str:
        with pytest.raises(SystemExit) as e:
            export_main(list(argv))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    clip = tmp_path / "clip.safetensors"
    save_export({"w": torch.zeros(1)}, clip, {"mm_task": "clip", "mm_config": "{}"})
    assert "TopoLoRA-SAM exports" in fails(str(clip), "--format", "peft", "--out", str(tmp_path / "a"))
    merged = tmp_path / "merged.safetensors"
    assert export_main([str(exports["full"]), "--format", "sam", "--out", str(merged), "--compare-images", "0"]) == 0
    capsys.readouterr()
    assert "no LoRA layers" in fails(str(merged), "--format", "peft", "--out", str(tmp_path / "b"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert "not empty" in fails(str(exports["full"]), "--format", "peft", "--out", str(busy))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["busy", "clip.safetensors", "merged.safetensors", "merged.pth", "merged.md"])
    assert (busy / "keep.txt").read_text() == "mine"


def test_vit_b_folder_loads_on_the_registry_sam(tmp_path, capsys):
    """The real-size path: a vit_b export trained from a base checkpoint keeps the base out of the folder,
    and the card's script (sam_model_registry + peft) gives mm's logits at 1024 x 1024."""
    torch.manual_seed(0)
    base = tmp_path / "sam_vit_b_01ec64.pth"  # a stand-in for SAM's released file: same layout and sizes
    torch.save(build_sam(SamModelConfig(variant="vit_b")).state_dict(), base)
    export = _export(tmp_path / "run", "model.variant=vit_b", "model.image_size=1024", f"model.checkpoint={base}")
    out = tmp_path / "folder"
    assert export_main([str(export), "--format", "peft", "--out", str(out)]) == 0
    assert "24 layers" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == FOLDER_FILES - {BASE_FILE}  # the base is not copied
    sam_config = json.loads((out / "sam_config.json").read_text())
    assert sam_config["base"]["checkpoint"] == base.name and len(sam_config["base"]["sha256"]) == 64
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    save_file({"image": torch.from_numpy(image)}, str(tmp_path / "images.safetensors"))
    script = _card_script(out).replace("PATH_TO_THIS_FOLDER", str(out)) + (
        "\nfrom safetensors.torch import save_file\n"
        "save_file({'logits': segment(load_file('images.safetensors')['image'].numpy()).contiguous()}, "
        "'logits.safetensors')\n")
    assert 'sam_model_registry["vit_b"](checkpoint="sam_vit_b_01ec64.pth")' in script
    (tmp_path / "user.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "user.py"], cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    torch.testing.assert_close(got, _mm_logits(export, image), atol=1e-4, rtol=1e-4)
