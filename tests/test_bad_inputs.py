"""Bad input to every command: a table of cases across the console scripts and the train entry points.

Each case must give exactly one `error: ...` line naming the problem, exit code 2, no traceback (the
traceback is for --debug) and no partial output. Console scripts run in-process (main(argv)); the
train cases run in one subprocess (tests/faults/bad_train_inputs.py) because train() sets up a
process group; a few cases go through the installed console scripts as a user would run them.

To cover a new command: add it to COMMANDS (module:function) and give it rows in CASES.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]

COMMANDS = {
    "mm-shards": "mm.data.cli:main",
    "mm-zeroshot": "mm.evaluate.zeroshot:main",
    "mm-retrieval": "mm.evaluate.retrieval:main",
    "mm-compositional": "mm.evaluate.compositional:main",
    "mm-segment": "mm.evaluate.segment:main",
    "mm-merge-lora": "mm.evaluate.merge_lora:main",
    "mm-structure": "mm.tasks.structure_cli:main",
    "mm-export": "mm.evaluate.export:main",
    "mm": "mm.cli:mm_main",
}


@dataclass
class Case:
    id: str
    command: str  # a COMMANDS key, or train:<task>
    argv: list[str]  # {placeholders} filled from the `paths` fixture
    expect: list[str]  # fragments the error line must contain
    absent: list[str] = field(default_factory=list)  # outputs that must not exist afterwards


CLIP_TINY = [
    "model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
    "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1",
    "model.arch.text_cfg.context_length=12", "data.batch_size=4", "data.num_workers=1", "train.steps=2",
    "eval.zeroshot_data=",
]


def clip_train(*extra: str, out: str = "{t}/{case}") -> list[str]:
    sets = CLIP_TINY + ["data.train={shards}", f"train.out_dir={out}", *extra]
    return ["--config", "configs/clip/tiny.yaml"] + [a for s in sets for a in ("--set", s)]


CASES = [
    # --- train entry points: config files and values
    Case("train-missing-config", "train:clip", ["--config", "{t}/nope.yaml"], ["nope.yaml", "cannot read"]),
    Case("train-config-is-an-image", "train:clip", ["--config", "{png}"], ["image.png", "not"]),
    Case("train-config-is-a-list", "train:clip", ["--config", "{list_yaml}"], ["list.yaml", "mapping"]),
    Case("train-misspelt-key-in-file", "train:clip", ["--config", "{misspelt_yaml}"],
         ["misspelt.yaml", "optim.lrr", "did you mean 'optim.lr'"]),
    Case("train-misspelt-set-key", "train:clip", clip_train("train.stepz=3"), ["train.stepz", "train.steps"],
         ["{t}/{case}"]),
    Case("train-batch-size-zero", "train:clip", clip_train("data.batch_size=0"), ["data.batch_size", ">= 1"],
         ["{t}/{case}"]),
    Case("train-bad-fraction-above-one", "train:clip", clip_train("data.max_bad_fraction=1.5"),
         ["data.max_bad_fraction", "between 0.0 and 1.0"], ["{t}/{case}"]),
    Case("train-negative-lr", "train:clip", clip_train("optim.lr=-0.1"), ["optim.lr", ">= 0.0"], ["{t}/{case}"]),
    Case("train-precision-unknown", "train:clip", clip_train("train.precision=fp8"), ["train.precision", "fp8"],
         ["{t}/{case}"]),
    Case("train-steps-not-a-number", "train:clip", clip_train("train.steps=many"), ["train.steps", "many"],
         ["{t}/{case}"]),
    Case("train-config-of-another-task", "train:filip", ["--config", "configs/clip/tiny.yaml"],
         ["clip", "train/filip.py"]),
    # --- train entry points: files the run needs
    Case("train-missing-shards", "train:clip", clip_train("data.train={t}/none-{{000000..000003}}.tar"),
         ["data.train", "no such shard", "none-000000.tar"], ["{t}/{case}"]),
    Case("train-shard-is-a-folder", "train:clip", clip_train("data.train={t}"), ["data.train", "not a shard"],
         ["{t}/{case}"]),
    Case("train-missing-deepspeed-config", "train:clip", clip_train("train.deepspeed_config={t}/ds.json"),
         ["ds.json", "cannot read"], ["{t}/{case}"]),
    Case("train-deepspeed-config-not-json", "train:clip", clip_train("train.deepspeed_config={txt}"),
         ["notes.txt", "not valid JSON"], ["{t}/{case}"]),
    Case("train-unwritable-out-dir", "train:clip", clip_train(out="{file}/run"), ["train.out_dir", "cannot write"]),
    Case("train-missing-pretrained", "train:clip", clip_train("model.pretrained={t}/w.pt"), ["w.pt"], ["{t}/{case}"]),
    Case("train-sam-checkpoint-missing", "train:topolora_sam",
         ["--config", "configs/topolora_sam/tiny.yaml", "--set", "model.checkpoint={t}/sam.pth",
          "--set", "data.train={shards}", "--set", "train.out_dir={t}/{case}"], ["sam.pth"], ["{t}/{case}"]),
    Case("train-sam-checkpoint-not-weights", "train:topolora_sam",
         ["--config", "configs/topolora_sam/tiny.yaml", "--set", "model.checkpoint={txt}",
          "--set", "data.train={shards}", "--set", "train.out_dir={t}/{case}"], ["notes.txt"], ["{t}/{case}"]),
    Case("train-structure-clip-misspelt-loss-key", "train:structure_clip",
         ["--config", "configs/structure_clip/tiny.yaml", "--set", "loss.neg_wieght=1"],
         ["loss.neg_wieght", "did you mean 'loss.neg_weight'"]),
    Case("train-structure-clip-unknown-parser", "train:structure_clip",
         ["--config", "configs/structure_clip/tiny.yaml", "--set", "loss.parser=fancy", "--set",
          "train.out_dir={t}/{case}"], ["loss.parser", "auto, spacy, simple", "'fancy'"], ["{t}/{case}"]),
    Case("train-structure-missing-cache", "train:structure",
         ["--config", "configs/structure/tiny.yaml", "--set", "cache.dir={t}/nocache", "--set",
          "train.out_dir={t}/{case}", "--set", "eval.zeroshot_data="], ["nocache"], ["{t}/{case}"]),
    Case("train-structure-damaged-cache", "train:structure",
         ["--config", "configs/structure/tiny.yaml", "--set", "cache.dir={damaged_cache}", "--set",
          "train.out_dir={t}/{case}", "--set", "eval.zeroshot_data="], ["damaged", "--overwrite"], ["{t}/{case}"]),
    # --- train entry points: data values that only make sense together
    Case("train-mixing-weights-sum-to-zero", "train:clip",
         clip_train("data.resampled=true", "data.train_weights=[0.0]"), ["data.train_weights", "not all 0"],
         ["{t}/{case}"]),
    Case("train-mixing-weight-negative", "train:clip",
         clip_train("data.resampled=true", "data.train_weights=[-1.0]"), ["data.train_weights", ">= 0"],
         ["{t}/{case}"]),
    Case("train-mixing-weights-per-source", "train:clip",
         clip_train("data.resampled=true", "data.train_weights=[1.0, 2.0]"), ["2 weights for 1 source"],
         ["{t}/{case}"]),
    Case("train-mixing-weights-without-resampling", "train:clip", clip_train("data.train_weights=[1.0]"),
         ["data.resampled: true"], ["{t}/{case}"]),
    Case("train-retries-negative", "train:clip", clip_train("data.retries=-1"), ["data.retries", ">= 0"],
         ["{t}/{case}"]),
    # --- train entry points: an out_dir holding someone else's checkpoint
    Case("train-resume-checkpoint-of-another-task", "train:clip", clip_train(out="{other_task_run}"),
         ["checkpoint of task 'filip'", "train.resume=false"], ["{other_task_run}/export"]),
    Case("train-resume-checkpoint-of-another-architecture", "train:clip", clip_train(out="{other_arch_run}"),
         ["another architecture", "model.arch.vision_cfg.width was 64, now 32", "train.resume=false"],
         ["{other_arch_run}/export"]),
    Case("train-resume-other-world-size", "train:clip", clip_train(out="{other_world_run}"),
         ["written by 4 ranks", "same world size"], ["{other_world_run}/export"]),
    # --- mm-shards
    Case("shards-zero-samples", "mm-shards", ["synthetic", "--out", "{t}/s", "--num-samples", "0"],
         ["at least 1"], ["{t}/s"]),
    Case("shards-missing-image-folder", "mm-shards",
         ["folder", "--images", "{t}/nope", "--captions", "{txt}", "--out", "{t}/s"], ["nope"], ["{t}/s"]),
    Case("shards-captions-wrong-type", "mm-shards",
         ["folder", "--images", "{t}", "--captions", "{png}", "--out", "{t}/s"], ["image.png"], ["{t}/s"]),
    Case("shards-coco-annotations-not-json", "mm-shards",
         ["coco", "--annotations", "{txt}", "--images", "{t}", "--out", "{t}/s"], ["notes.txt"], ["{t}/s"]),
    Case("shards-unknown-dataset", "mm-shards", ["dataset", "--name", "imagenot", "--root", "{t}", "--out", "{t}/s"],
         ["imagenot"], ["{t}/s"]),
    Case("shards-missing-masks", "mm-shards", ["seg", "--images", "{t}", "--masks", "{t}/nomasks", "--out", "{t}/s"],
         ["nomasks"], ["{t}/s"]),
    Case("shards-unwritable-out", "mm-shards", ["synthetic", "--out", "{file}/s", "--num-samples", "4"],
         ["afile"]),
    Case("shards-out-is-a-file", "mm-shards", ["synthetic", "--out", "{file}", "--num-samples", "4"],
         ["afile", "is a file"]),
    # --- mm-zeroshot
    Case("zeroshot-missing-checkpoint", "mm-zeroshot",
         ["--checkpoint", "{t}/none.safetensors", "--data", "{val}", "--output", "{t}/zs.json"],
         ["none.safetensors"], ["{t}/zs.json"]),
    Case("zeroshot-checkpoint-not-safetensors", "mm-zeroshot",
         ["--checkpoint", "{txt}", "--data", "{val}", "--output", "{t}/zs.json"], ["notes.txt", "safetensors"],
         ["{t}/zs.json"]),
    Case("zeroshot-checkpoint-of-another-task", "mm-zeroshot",
         ["--checkpoint", "{seg_export}", "--data", "{val}", "--output", "{t}/zs.json"], ["topolora_sam"],
         ["{t}/zs.json"]),
    Case("zeroshot-checkpoint-of-another-architecture", "mm-zeroshot",
         ["--checkpoint", "{misfit_export}", "--data", "{val}", "--output", "{t}/zs.json"], ["do not fit"],
         ["{t}/zs.json"]),
    Case("zeroshot-missing-data", "mm-zeroshot",
         ["--checkpoint", "{export}", "--data", "{t}/none.tar", "--output", "{t}/zs.json"], ["none.tar"],
         ["{t}/zs.json"]),
    Case("zeroshot-missing-classnames", "mm-zeroshot",
         ["--checkpoint", "{export}", "--data", "{val}", "--classnames", "{t}/names.txt"], ["names.txt"]),
    Case("zeroshot-tokenwise-on-clip", "mm-zeroshot",
         ["--checkpoint", "{export}", "--data", "{val}", "--scoring", "tokenwise", "--output", "{t}/zs.json"],
         ["token-wise", "FILIP"], ["{t}/zs.json"]),
    Case("zeroshot-batch-size-zero", "mm-zeroshot",
         ["--checkpoint", "{export}", "--data", "{val}", "--batch-size", "0", "--output", "{t}/zs.json"],
         ["--batch-size"], ["{t}/zs.json"]),
    Case("zeroshot-template-with-another-placeholder", "mm-zeroshot",
         ["--checkpoint", "{export}", "--data", "{val}", "--templates", "{style_templates}", "--output", "{t}/zs.json"],
         ["style.txt", "{{style}}"], ["{t}/zs.json"]),
    Case("zeroshot-template-with-two-slots", "mm-zeroshot",
         ["--checkpoint", "{export}", "--data", "{val}", "--templates", "{two_slot_templates}", "--output",
          "{t}/zs.json"], ["two.txt", "exactly one"], ["{t}/zs.json"]),
    Case("zeroshot-template-with-a-stray-brace", "mm-zeroshot",
         ["--checkpoint", "{export}", "--data", "{val}", "--templates", "{brace_templates}", "--output",
          "{t}/zs.json"], ["brace.txt", "not a format string"], ["{t}/zs.json"]),
    Case("zeroshot-workers-negative", "mm-zeroshot",
         ["--checkpoint", "{export}", "--data", "{val}", "--workers", "-1", "--output", "{t}/zs.json"],
         ["--workers", ">= 0"], ["{t}/zs.json"]),
    Case("zeroshot-data-empty", "mm-zeroshot",
         ["--checkpoint", "{export}", "--data", "", "--output", "{t}/zs.json"], ["--data is empty"], ["{t}/zs.json"]),
    Case("zeroshot-data-not-a-tar", "mm-zeroshot",
         ["--checkpoint", "{export}", "--data", "{txt}", "--output", "{t}/zs.json"], ["no usable samples", "notes.txt"],
         ["{t}/zs.json"]),
    Case("zeroshot-output-is-a-folder", "mm-zeroshot",
         ["--checkpoint", "{export}", "--data", "{val}", "--output", "{t}"], ["--output", "is a folder"]),
    Case("zeroshot-unwritable-output", "mm-zeroshot",
         ["--checkpoint", "{export}", "--data", "{val}", "--output", "{file}/zs.json"], ["--output", "afile"]),
    # --- mm-retrieval
    Case("retrieval-ks-zero", "mm-retrieval", ["--checkpoint", "{export}", "--data", "{val}", "--ks", "0,5"],
         ["--ks", ">= 1"]),
    Case("retrieval-ks-not-numbers", "mm-retrieval", ["--checkpoint", "{export}", "--data", "{val}", "--ks", "a"],
         ["--ks"]),
    Case("retrieval-model-and-checkpoint", "mm-retrieval",
         ["--checkpoint", "{export}", "--model", "ViT-B-32", "--data", "{val}"], ["either --checkpoint"]),
    Case("retrieval-model-without-weights", "mm-retrieval", ["--model", "ViT-B-32", "--data", "{val}"],
         ["--pretrained"]),
    Case("retrieval-missing-pretrained", "mm-retrieval",
         ["--model", "ViT-B-32", "--pretrained", "{t}/w.pt", "--data", "{val}"], ["w.pt", "no such file"]),
    Case("retrieval-missing-data", "mm-retrieval",
         ["--checkpoint", "{export}", "--data", "{t}/none.tar", "--output", "{t}/r.json"], ["none.tar"],
         ["{t}/r.json"]),
    Case("retrieval-workers-negative", "mm-retrieval",
         ["--checkpoint", "{export}", "--data", "{val}", "--workers", "-1"], ["--workers", ">= 0"]),
    Case("retrieval-output-is-a-folder", "mm-retrieval",
         ["--checkpoint", "{export}", "--data", "{val}", "--output", "{t}"], ["--output", "is a folder"]),
    Case("retrieval-unwritable-output", "mm-retrieval",
         ["--checkpoint", "{export}", "--data", "{val}", "--output", "{file}/r.json"], ["--output", "afile"]),
    # --- mm-compositional
    Case("compositional-nothing-to-do", "mm-compositional", ["--checkpoint", "{export}"], ["nothing to evaluate"]),
    Case("compositional-missing-sugarcrepe", "mm-compositional",
         ["--checkpoint", "{export}", "--sugarcrepe", "{t}/swap.json"], ["swap.json", "no such file"]),
    Case("compositional-sugarcrepe-not-json", "mm-compositional",
         ["--checkpoint", "{export}", "--sugarcrepe", "{txt}"], ["notes.txt", "not valid JSON"]),
    Case("compositional-aro-not-a-list", "mm-compositional",
         ["--checkpoint", "{export}", "--aro-relation", "{json_dict}"], ["dict.json", "list"]),
    Case("compositional-unknown-parser", "mm-compositional",
         ["--checkpoint", "{export}", "--synthetic-shapes", "{val}", "--parser", "fancy", "--output", "{t}/c.json"],
         ["--parser must be one of auto, spacy, simple", "fancy"], ["{t}/c.json"]),
    Case("compositional-output-is-a-folder", "mm-compositional",
         ["--checkpoint", "{export}", "--synthetic-shapes", "{val}", "--output", "{t}"], ["--output", "is a folder"]),
    Case("compositional-min-pair-items-zero", "mm-compositional",
         ["--checkpoint", "{export}", "--synthetic-shapes", "{val}", "--min-pair-items", "0"], [">= 1"]),
    # --- mm-segment, mm-merge-lora, mm-structure
    Case("segment-checkpoint-of-another-task", "mm-segment",
         ["--checkpoint", "{export}", "--input", "{png}", "--output", "{t}/seg"], ["clip"], ["{t}/seg"]),
    Case("segment-missing-input", "mm-segment",
         ["--checkpoint", "{seg_export}", "--input", "{t}/none.png", "--output", "{t}/seg"], ["none.png"],
         ["{t}/seg"]),
    Case("merge-lora-checkpoint-of-another-task", "mm-merge-lora", ["{export}", "--out", "{t}/merged.safetensors"],
         ["clip"], ["{t}/merged.safetensors"]),
    Case("merge-lora-missing-export", "mm-merge-lora", ["{t}/none.safetensors", "--out", "{t}/merged.safetensors"],
         ["none.safetensors"], ["{t}/merged.safetensors"]),
    Case("export-sam-of-a-clip-export", "mm-export", ["{export}", "--format", "sam", "--out", "{t}/m.safetensors"],
         ["clip"], ["{t}/m.safetensors"]),
    Case("export-sam-missing-export", "mm-export",
         ["{t}/none.safetensors", "--format", "sam", "--out", "{t}/m.safetensors"], ["none.safetensors"],
         ["{t}/m.safetensors"]),
    # --- the same tools through `mm`
    Case("mm-zeroshot-checkpoint-not-safetensors", "mm", ["zeroshot", "--checkpoint", "{txt}", "--data", "{val}"],
         ["notes.txt"]),
    Case("mm-train-missing-config", "mm", ["train", "clip", "--config", "{t}/nope.yaml"], ["nope.yaml", "cannot read"]),
    Case("merge-lora-out-is-a-folder", "mm-merge-lora", ["{seg_export}", "--out", "{t}", "--overwrite"],
         ["--out", "is a folder"]),
    Case("structure-cache-misspelt-key", "mm-structure", ["cache", "--config", "{misspelt_yaml}"], ["optim.lrr"]),
    Case("structure-cache-overwrite-of-a-folder-that-is-no-cache", "mm-structure",
         ["cache", "--config", "configs/structure/tiny.yaml", "--set", "cache.dir={t}", "--set", "data.train={shards}",
          "--overwrite"], ["not a feature cache", "nothing deleted"]),
    Case("structure-cache-batch-size-zero", "mm-structure",
         ["cache", "--config", "configs/structure/tiny.yaml", "--set", "cache.dir={t}/{case}", "--set",
          "cache.batch_size=0"], ["cache.batch_size", ">= 1"], ["{t}/{case}"]),
    Case("structure-cache-unknown-device", "mm-structure",
         ["cache", "--config", "configs/structure/tiny.yaml", "--set", "cache.dir={t}/{case}", "--set",
          "data.train={shards}", "--set", "cache.device=tpu"], ["cache.device", "tpu"], ["{t}/{case}"]),
    Case("structure-select-on-a-damaged-cache", "mm-structure",
         ["select", "--config", "configs/structure/tiny.yaml", "--set", "cache.dir={damaged_cache}"],
         ["damaged", "meta.json", "--overwrite"]),
    Case("structure-select-missing-config", "mm-structure", ["select", "--config", "{t}/nope.yaml"], ["nope.yaml"]),
]


def fill(text: str, paths: dict[str, str], case: str = "") -> str:
    return text.format(case=case, **paths)


def _export(model: torch.nn.Module, path: Path, task: str, cfg) -> None:
    from mm.config import config_json

    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}, str(path),
              metadata={"mm_task": task, "mm_config": config_json(cfg), "mm_step": "0", "mm_export": "full"})


def _fake_run(root: Path, task: str, world_size: int, model_config: dict | None) -> str:
    """A run directory whose newest complete checkpoint was written by another task/architecture/world."""
    step = root / "checkpoints" / "step00000002"
    step.mkdir(parents=True)
    state = {"step": 2, "task": task, "world_size": world_size,
             "model_config": json.dumps(model_config, sort_keys=True) if model_config else ""}
    (step / "mm_run_state.json").write_text(json.dumps(state))
    return str(root)


@pytest.fixture(scope="module")
def paths(shapes, tmp_path_factory) -> dict[str, str]:
    import dataclasses

    from mm.config import load_config
    from mm.models.clip import build_clip
    from mm.tasks.clip import ClipRunConfig
    from mm.tasks.topolora_sam import TopoLoraSamTask

    t = tmp_path_factory.mktemp("bad_inputs")
    (t / "notes.txt").write_text("just some notes: {not json\n")
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(t / "image.png")
    (t / "afile").write_text("a regular file where a folder is expected")
    (t / "list.yaml").write_text("- a\n- b\n")
    (t / "misspelt.yaml").write_text("optim:\n  lrr: 0.1\n")
    (t / "dict.json").write_text('{"a": 1}')
    (t / "style.txt").write_text("a photo of a {}, {style}\n")
    (t / "two.txt").write_text("a {} next to a {}\n")
    (t / "brace.txt").write_text("a {} }\n")
    (t / "damaged_cache").mkdir()
    (t / "damaged_cache" / "meta.json").write_text('{"kind": "mm-feature-cache", "identity": {"form')

    clip_cfg = load_config(None, [o for o in CLIP_TINY if o.startswith("model.")], ClipRunConfig)
    torch.manual_seed(0)
    _export(build_clip(clip_cfg.model), t / "clip.safetensors", "clip", clip_cfg)
    # Weights of the tiny model under metadata that describes a wider one.
    wide = load_config(None, ["model.arch.vision_cfg.width=64"] + [o for o in CLIP_TINY if o.startswith("model.")
                                                                   and "vision_cfg.width" not in o], ClipRunConfig)
    _export(build_clip(clip_cfg.model), t / "misfit.safetensors", "clip", wide)

    seg = TopoLoraSamTask
    seg_cfg = load_config(ROOT / "configs/topolora_sam/tiny.yaml",
                          ["model.encoder_embed_dim=32", "model.encoder_depth=1", "model.encoder_num_heads=2",
                           "model.encoder_global_attn_indexes=[0]", "model.image_size=32"], seg.config_class)
    _export(seg(seg_cfg).build_model(load_pretrained=False), t / "seg.safetensors", "topolora_sam", seg_cfg)

    # The model section exactly as the train cases resolve it, so the fake runs differ in one value only.
    model_cfg = dataclasses.asdict(load_config(ROOT / "configs/clip/tiny.yaml", CLIP_TINY, ClipRunConfig).model)
    other_arch = json.loads(json.dumps(model_cfg))
    other_arch["arch"]["vision_cfg"]["width"] = 64
    return {
        "t": str(t), "txt": str(t / "notes.txt"), "png": str(t / "image.png"), "file": str(t / "afile"),
        "list_yaml": str(t / "list.yaml"), "misspelt_yaml": str(t / "misspelt.yaml"),
        "json_dict": str(t / "dict.json"), "shards": shapes["train"], "val": shapes["val"],
        "style_templates": str(t / "style.txt"), "two_slot_templates": str(t / "two.txt"),
        "brace_templates": str(t / "brace.txt"), "damaged_cache": str(t / "damaged_cache"),
        "export": str(t / "clip.safetensors"), "misfit_export": str(t / "misfit.safetensors"),
        "seg_export": str(t / "seg.safetensors"),
        "other_task_run": _fake_run(t / "other_task", "filip", 1, None),
        "other_arch_run": _fake_run(t / "other_arch", "clip", 1, other_arch),
        "other_world_run": _fake_run(t / "other_world", "clip", 4, model_cfg),
    }


def assert_clean_error(case: Case, code, stderr: str, paths: dict[str, str]) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 2, f"exit code {code!r}; stderr:\n{stderr[-2000:]}"
    assert len(errors) == 1, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    for fragment in case.expect:
        assert fill(fragment, paths, case.id) in errors[0], errors[0]
    for path in case.absent:
        assert not Path(fill(path, paths, case.id)).exists(), f"partial output left: {fill(path, paths, case.id)}"


@pytest.fixture(scope="module")
def train_results(paths, tmp_path_factory) -> dict:
    cases = [{"id": c.id, "task": c.command.split(":", 1)[1], "argv": [fill(a, paths, c.id) for a in c.argv]}
             for c in CASES if c.command.startswith("train:")]
    work = tmp_path_factory.mktemp("train_cases")
    (work / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "tests/faults/bad_train_inputs.py", str(work / "cases.json"),
                           str(work / "results.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / "results.json").read_text())


def test_the_table_is_large_enough():
    assert len(CASES) >= 30
    assert {c.command.split(":")[0] for c in CASES} >= {"train", *COMMANDS}


@pytest.mark.parametrize("case", [c for c in CASES if c.command.startswith("train:")], ids=lambda c: c.id)
def test_train_entry_point(case, train_results, paths):
    result = train_results[case.id]
    assert not result["traceback"], result["traceback"]
    assert_clean_error(case, result["code"], result["stderr"], paths)


@pytest.mark.parametrize("case", [c for c in CASES if not c.command.startswith("train:")], ids=lambda c: c.id)
def test_console_script(case, paths, capsys, monkeypatch):
    module, _, function = COMMANDS[case.command].partition(":")
    try:
        main = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError):
        pytest.skip(f"{case.command} is not in this checkout yet")
    monkeypatch.setattr(sys, "argv", [case.command])  # no --debug from pytest's own command line
    monkeypatch.delenv("MM_DEBUG", raising=False)
    try:
        code = main([fill(a, paths, case.id) for a in case.argv])
    except SystemExit as e:
        code = e.code
    assert_clean_error(case, code, capsys.readouterr().err, paths)


# A few cases as a user runs them: the installed console script, and --debug.

def _script(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        pytest.skip(f"{name} is not installed")
    return path


def test_installed_console_script_fails_in_one_line(paths):
    proc = subprocess.run([_script("mm-zeroshot"), "--checkpoint", paths["txt"], "--data", paths["val"]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.strip()] == \
        [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "notes.txt" in proc.stderr and "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(paths):
    proc = subprocess.run([_script("mm-shards"), "synthetic", "--out", f"{paths['t']}/dbg", "--num-samples", "0",
                           "--debug"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UserError" in proc.stderr
