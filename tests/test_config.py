"""Typed configs: strict keys and types, dotted overrides, one-line errors naming key and file."""

from pathlib import Path

import pytest

from mm.config import load_config, save_config
from mm.errors import ConfigError
from mm.tasks.clip import ClipRunConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/clip/tiny.yaml"


def test_shipped_configs_load():
    """Every shipped config parses with its task's schema (a misspelt key in one would fail here)."""
    from mm.tasks import get_task

    paths = sorted((ROOT / "configs").glob("*/*.yaml"))
    assert len(paths) >= 11
    for path in paths:
        task = get_task(path.parent.name)
        cfg = load_config(path, cls=task.config_class)
        assert cfg.task == task.name, path


def test_overrides_are_typed_and_nested():
    cfg = load_config(TINY, ["optim.lr=3e-4", "train.steps=7", "model.arch.vision_cfg.layers=1",
                             "optim.betas=[0.9, 0.95]"], cls=ClipRunConfig)
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7
    assert cfg.model.arch["vision_cfg"]["layers"] == 1
    assert cfg.optim.betas == [0.9, 0.95]


def test_misspelt_key_in_file_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, cls=ClipRunConfig)
    msg = str(err.value)
    assert str(path) in msg and "'optim.lrr'" in msg and "did you mean 'optim.lr'" in msg
    assert "\n" not in msg


def test_misspelt_override_and_wrong_type_fail(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'train.stepz'"):
        load_config(TINY, ["train.stepz=3"], cls=ClipRunConfig)
    with pytest.raises(ConfigError, match="'train.steps' must be int, got 'many'"):
        load_config(TINY, ["train.steps=many"], cls=ClipRunConfig)
    with pytest.raises(ConfigError, match="'train.precision' must be one of"):
        load_config(TINY, ["train.precision=fp8"], cls=ClipRunConfig)
    with pytest.raises(ConfigError, match="unknown key 'model.archh'"):
        load_config(TINY, ["model.archh={}"], cls=ClipRunConfig)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(TINY, ["optim.lr=1e-3"], cls=ClipRunConfig)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", cls=ClipRunConfig) == cfg


def test_deepspeed_file_may_not_contradict_the_run_config(tmp_path):
    from mm.engine.ds_config import build_ds_config

    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}')
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        build_ds_config(str(ds), 8, 1, 1.0, "fp32", 1, on_gpu=False)
    ds.write_text('{"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}')
    out = build_ds_config(str(ds), 8, 2, 1.0, "bf16", 2, on_gpu=False)
    assert out["train_batch_size"] == 32 and out["gradient_clipping"] == 1.0 and out["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        build_ds_config(str(ds), 8, 1, 1.0, "fp16", 1, on_gpu=False)
    ds.write_text('{"zero_optimization": {"stage": 0}}')
    with pytest.raises(ConfigError, match="stage 0 cannot clip"):
        build_ds_config(str(ds), 8, 1, 1.0, "fp32", 1, on_gpu=False)


def test_relative_paths_resolve_against_the_config_folder_from_anywhere(tmp_path, monkeypatch):
    """A config's relative input paths are found from the config's folder or a folder above it (the
    repository's configs name data/ and configs/ds/ from the repository root); paths that exist
    nowhere stay as written (relative to the current directory), and --set values are not touched."""
    from mm.tasks import get_task

    project = tmp_path / "project"
    (project / "configs" / "seg").mkdir(parents=True)
    (project / "data").mkdir()
    (project / "data" / "seg-000000.tar").write_bytes(b"")
    (project / "configs" / "seg" / "ds.json").write_text("{}")
    config = project / "configs" / "seg" / "run.yaml"
    config.write_text("task: topolora_sam\n"
                      "data: {train: 'data/seg-{000000..000003}.tar::data/missing-{0..1}.tar', val: /abs/x.tar}\n"
                      "train: {deepspeed_config: ds.json, out_dir: runs/x}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cls = get_task("topolora_sam").config_class
    cfg = load_config(config, cls=cls)
    assert cfg.data.train == f"{project}/data/seg-{{000000..000003}}.tar::data/missing-{{0..1}}.tar"
    assert cfg.data.val == "/abs/x.tar"
    assert cfg.train.deepspeed_config == str(project / "configs" / "seg" / "ds.json")
    assert cfg.train.out_dir == "runs/x"  # outputs stay relative to the current directory
    cfg = load_config(config, ["train.deepspeed_config=ds.json"], cls=cls)
    assert cfg.train.deepspeed_config == "ds.json"
    # A path that exists in the current directory but not beside the config stays relative to it.
    (elsewhere / "local.json").write_text("{}")
    config.write_text("task: topolora_sam\ntrain: {deepspeed_config: local.json}\n")
    assert load_config(config, cls=cls).train.deepspeed_config == "local.json"
