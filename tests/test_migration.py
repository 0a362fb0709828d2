"""Files of earlier versions still load: configs, run directories (resume) and exports whose FILIP
memory settings sit under `model:` (now `loss:`), and the dropped keys data.image_size /
data.context_length."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mm.config import build_config, config_json, load_config, migrate
from mm.engine.checkpoint import _first_difference, _migrated
from mm.exports import read_export_metadata, save_export
from mm.tasks import get_task, load_exported
from mm.tasks.filip import FilipRunConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
        "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1",
        "model.embed_dim=16"]


def _old_tree(cfg) -> dict:
    """A config as the earlier version saved it: memory settings in `model`, the dead data keys set."""
    tree = json.loads(config_json(cfg))
    loss = tree.pop("loss")
    # the keys that lived in `model` then; later loss keys (e.g. keep_text_tokens) did not exist
    tree["model"].update({k: loss[k] for k in ("chunk_size", "gather_dtype", "keep_image_tokens")})
    tree["data"].update(image_size=64, context_length=77)
    return tree


def test_migrate_moves_and_drops_keys_and_says_so():
    tree = {"model": {"chunk_size": 5, "embed_dim": 8}, "data": {"image_size": 64}, "loss": {"gather_dtype": "bf16"}}
    notes = migrate(FilipRunConfig, tree)
    assert tree == {"model": {"embed_dim": 8}, "data": {}, "loss": {"chunk_size": 5, "gather_dtype": "bf16"}}
    assert "'model.chunk_size' is now 'loss.chunk_size'" in notes
    assert "'data.image_size' is no longer used; ignored" in notes
    # A key set at both places keeps the new one.
    both = {"model": {"gather_dtype": "fp16"}, "loss": {"gather_dtype": "bf16"}}
    migrate(FilipRunConfig, both)
    assert both == {"model": {}, "loss": {"gather_dtype": "bf16"}}


def test_an_old_config_file_loads_with_a_note(tmp_path, capsys):
    cfg = load_config(ROOT / "configs/filip/tiny.yaml", TINY + ["loss.gather_dtype=bf16"], FilipRunConfig)
    import yaml

    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(_old_tree(cfg)))
    again = load_config(path, [], FilipRunConfig)
    assert again == cfg
    err = capsys.readouterr().err
    assert f"note: {path}: 'model.gather_dtype' is now 'loss.gather_dtype'" in err


def test_resume_compares_an_old_model_section_after_moving_its_loss_keys():
    cfg = load_config(ROOT / "configs/filip/tiny.yaml", TINY, FilipRunConfig)
    current = json.dumps(json.loads(config_json(cfg))["model"], sort_keys=True)
    stored = json.dumps(_old_tree(cfg)["model"], sort_keys=True)
    assert _first_difference(stored, current).startswith("model.chunk_size")  # unmigrated: refused
    assert _first_difference(_migrated(stored, FilipRunConfig), current) == ""
    # A real architecture change is still found after migration.
    wider = json.loads(stored)
    wider["embed_dim"] = 17
    assert _first_difference(_migrated(json.dumps(wider), FilipRunConfig), current) == "model.embed_dim was 17, now 16"


def test_an_old_filip_export_loads_with_its_settings_as_loss_settings(tmp_path):
    cfg = load_config(ROOT / "configs/filip/tiny.yaml", TINY + ["loss.chunk_size=3", "loss.keep_image_tokens=0.5"],
                      FilipRunConfig)
    torch.manual_seed(0)
    model = get_task("filip", cfg).build_model(load_pretrained=False).eval()
    path = tmp_path / "old.safetensors"
    save_export(model.state_dict(), path, {"mm_task": "filip", "mm_config": json.dumps(_old_tree(cfg)),
                                           "mm_step": "9", "mm_export": "full"})
    assert "chunk_size" in json.loads(read_export_metadata(path)["mm_config"])["model"]
    task, loaded_cfg, loaded = load_exported(path, expect_task="filip")
    assert loaded_cfg == cfg and (loaded_cfg.loss.chunk_size, loaded_cfg.loss.keep_image_tokens) == (3, 0.5)
    assert task.loss.chunk_size == 3
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(image), model.encode_image(image))


def test_build_config_leaves_its_input_alone():
    tree = {"model": {"chunk_size": 2}}
    build_config(FilipRunConfig, tree, "test")
    assert tree == {"model": {"chunk_size": 2}}


@pytest.fixture(scope="module")
def resumed(torchrun, shapes, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("migration")
    proc = torchrun(ROOT / "tests/dist/migration_check.py", shapes["train"], str(out), nproc=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "results.json").read_text())


def test_an_old_run_directory_resumes(resumed):
    assert {"chunk_size", "gather_dtype", "keep_image_tokens"} <= set(resumed["old_yaml_model_keys"])
    assert resumed["first_step"] == 2 and resumed["second_step"] == 3
    assert resumed["logged_steps"] == [1, 2, 3]  # step 3 continued the run, it did not start over
    assert resumed["loss_settings"] == [3, ""]
