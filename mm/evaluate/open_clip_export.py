"""`mm export --format open_clip`: a CLIP or Structure-CLIP export as a folder open_clip loads unchanged.

    mm export runs/demo-clip/export/model.safetensors --format open_clip --out demo-clip-open_clip

The folder holds what open_clip's `local-dir:` schema reads (open_clip/factory.py):
  open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ...}
  open_clip_model.safetensors  the model's weights (CustomTextCLIP layout: model_cfg has custom_text: true)
plus README.md (a model card) and training_config.yaml (the resolved run config stored in the export), so

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:DIR")
    tokenizer = open_clip.get_tokenizer("local-dir:DIR")

give the same image and text embeddings as mm's model. The tokenizer is open_clip's CLIP BPE (shipped
inside open_clip); architectures with a Hugging Face text tower or tokenizer are refused, since their
tokenizer files would have to be fetched.

Structure-CLIP: only the CLIP towers are written; the Knowledge Enhanced Encoder (KEE) is not carried,
so open_clip's encode_text is the plain text tower (as `mm compositional` evaluates by default).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mm.errors import UserError

# Tasks that cannot be written for open_clip, and why (one line each).
REFUSED = {
    "filip": "FILIP scores image-text pairs by token-wise late interaction through its own token projections; "
             "open_clip's CLIP has one pooled embedding per tower, so it cannot express FILIP's similarity",
    "structure": "STRUCTURE reads two frozen timm / Hugging Face encoders at a chosen intermediate layer through "
                 "trained heads (its export holds only the heads); open_clip's CLIP towers can express neither",
    "topolora_sam": "TopoLoRA-SAM is a SAM segmentation model, not a CLIP; use --format sam",
}
SUPPORTED = ("clip", "structure_clip")
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def open_clip_model_cfg(model_cfg: Any) -> dict[str, Any]:
    """The open_clip model_cfg of mm's ClipModelConfig: the named architecture's config or the inline
    `model.arch` (without its preprocess_cfg), QuickGELU as built, custom_text (mm's key layout)."""
    import open_clip

    if model_cfg.name:
        arch = open_clip.get_model_config(model_cfg.name)
        if arch is None:
            raise UserError(f"model.name: unknown open_clip architecture {model_cfg.name!r}")
    else:
        arch = {k: v for k, v in model_cfg.arch.items() if k != "preprocess_cfg"}
    arch = copy.deepcopy(arch)
    text = arch.get("text_cfg", {})
    if text.get("hf_model_name") or text.get("hf_tokenizer_name"):
        raise UserError(f"{model_cfg.name or 'model.arch'}: a Hugging Face text tower or tokenizer is not "
                        f"supported by --format open_clip (its tokenizer files are not carried)")
    if model_cfg.quick_gelu:
        arch["quick_gelu"] = True
    arch["custom_text"] = True  # mm always builds CustomTextCLIP: the text tower's keys sit under text.*
    return arch


def _prepare_out(out: Path, export: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out}: folder exists and is not empty (pass --overwrite to replace it)")
    res_out, res_export = out.resolve(), export.resolve()
    if res_out == res_export or res_out in res_export.parents:
        raise UserError(f"--out {out}: holds the input export {export}; choose another folder")


def _metrics(path: Path, step: int | None) -> dict[str, Any]:
    """The last value of each metric in metrics.jsonl up to the export's step."""
    last: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or (step is not None and isinstance(rec.get("step"), int) and rec["step"] > step):
            continue
        for k, v in rec.items():
            if k not in ("step", "time") and isinstance(v, (int, float, str)):
                last[k] = (rec.get("step"), v)
    return last


def _yaml_tree(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def model_card(export: Path, meta: dict[str, str], cfg_tree: dict[str, Any], model_cfg: dict[str, Any],
               preprocess_cfg: dict[str, Any]) -> str:
    """README.md of an exported folder: task, architecture, data, steps, final metrics, training command,
    licence fields; says what is not known (no run dir beside the export)."""
    task = meta["mm_task"]
    step = int(meta["mm_step"]) if meta.get("mm_step", "").isdigit() else None
    model = cfg_tree.get("model", {})
    data = cfg_tree.get("data", {})
    train = cfg_tree.get("train", {})
    optim = cfg_tree.get("optim", {})
    run = export.parent.parent if export.parent.name == "export" else None
    metrics_file = run / "metrics.jsonl" if run else None
    config_file = run / "config.yaml" if run else None
    absent = []
    pretrained = model.get("pretrained") or ""
    name = model.get("name") or "inline architecture (model.arch)"
    lines = [
        "---",
        "library_name: open_clip",
        "license: other",
        "license_name: unspecified",
        "license_details: >-",
        "  The weights were trained with mm (MIT licensed code). mm records no licence for the training data",
        f"  or base weights{f' ({pretrained})' if pretrained else ''}; set `license` to theirs before publishing.",
        "pipeline_tag: zero-shot-image-classification",
        f"tags: [{', '.join(dict.fromkeys(['clip', 'open_clip', 'mm', task]))}]",
        "---",
        "",
        f"# {task} model exported from mm",
        "",
        "Load it with open_clip (offline; the tokenizer is open_clip's bundled CLIP BPE):",
        "",
        "```python",
        "import open_clip",
        "model, _, preprocess = open_clip.create_model_and_transforms(\"local-dir:PATH_TO_THIS_FOLDER\")",
        "tokenizer = open_clip.get_tokenizer(\"local-dir:PATH_TO_THIS_FOLDER\")",
        "```",
        "",
        "## Task",
        "",
    ]
    if task == "structure_clip":
        lines += ["Structure-CLIP (CLIP fine-tuned with scene-graph hard negatives and a Knowledge Enhanced "
                  "Encoder). **The KEE is not carried**: open_clip's model is the plain CLIP towers, so "
                  "`encode_text` is the plain text tower, as `mm compositional` evaluates by default "
                  f"(model.kee was {model.get('kee')!r})."]
    else:
        lines += ["CLIP: contrastive image-text training (InfoNCE over the global batch)."]
    lines += [
        "",
        "## Architecture",
        "",
        f"- open_clip architecture: {name}; embed_dim {model_cfg.get('embed_dim')}; "
        f"QuickGELU: {bool(model_cfg.get('quick_gelu'))}; text tower as its own module (`custom_text`).",
        f"- initial weights: {pretrained or 'none (trained from scratch)'}",
        f"- image preprocessing: `{json.dumps(preprocess_cfg, sort_keys=True)}`",
        "- full open_clip model_cfg: `open_clip_config.json`.",
        "",
        "## Data",
        "",
        f"- train: `{data.get('train')}`",
        f"- val: `{data.get('val') or 'none'}`",
        f"- batch size (per rank): {data.get('batch_size')}; captions: {data.get('captions', 'default')}",
        "",
        "## Training",
        "",
        f"- steps: {step if step is not None else 'unknown'} (of train.steps = {train.get('steps')})",
        f"- optimizer: lr {optim.get('lr')}, weight decay {optim.get('weight_decay')}, "
        f"warmup {optim.get('warmup_steps')} steps; DeepSpeed config {train.get('deepspeed_config')}; "
        f"seed {train.get('seed')}",
        "",
        "## Final metrics",
        "",
    ]
    if metrics_file and metrics_file.is_file():
        last = _metrics(metrics_file, step)
        if last:
            lines += ["| metric | value | step |", "|---|---|---|"]
            lines += [f"| {k} | {v:.6g} | {s} |" if isinstance(v, float) else f"| {k} | {v} | {s} |"
                      for k, (s, v) in sorted(last.items())]
        else:
            lines += [f"{metrics_file} holds no metrics up to step {step}."]
    else:
        absent.append("metrics.jsonl")
        lines += ["Not known: the export does not sit in its run directory (no metrics.jsonl beside "
                  f"{export.parent}), so no metrics were recorded here."]
    lines += [
        "",
        "## Training command",
        "",
        "mm does not record the command line itself; the resolved run config stored in the export (every key, "
        "as trained) is `training_config.yaml` in this folder, and this command reruns the same training:",
        "",
        "```sh",
        f"mm train {task} --config training_config.yaml",
        "```",
        "",
    ]
    if config_file and config_file.is_file():
        same = _yaml_tree(config_file) == cfg_tree
        lines += [f"The run directory's config {config_file} "
                  f"{'is the same config' if same else 'differs from it (a later run rewrote it)'}.", ""]
    else:
        absent.append("config.yaml")
        lines += ["The run directory's config.yaml is absent (the export does not sit in its run directory).", ""]
    lines += [
        "## Licence",
        "",
        "- code (mm): MIT.",
        f"- training data (`{data.get('train')}`): not recorded by mm.",
        f"- base weights: {f'{pretrained}: not recorded by mm' if pretrained else 'none (from scratch)'}.",
        "",
        "## Provenance",
        "",
        f"- source export: {export} (mm_task {task}, mm_step {meta.get('mm_step')}, "
        f"mm_export {meta.get('mm_export', 'full')})",
        f"- absent from the run directory: {', '.join(absent) if absent else 'nothing'}",
        "",
    ]
    return "\n".join(lines)


def export_open_clip(export: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write a CLIP or Structure-CLIP export as an open_clip `local-dir:` folder; returns what was written.
    Bad input is a UserError and leaves nothing behind."""
    import yaml
    from safetensors.torch import save_file

    from mm.exports import export_config_tree, read_export_metadata
    from mm.models.clip import model_preprocess_cfg, preprocess_cfg_of
    from mm.tasks import load_exported

    export, out = Path(export), Path(out)
    meta = read_export_metadata(export)
    task_name = meta["mm_task"]
    if task_name in REFUSED:
        raise UserError(f"{export}: --format open_clip cannot write a {task_name} export: {REFUSED[task_name]}")
    if task_name not in SUPPORTED:
        raise UserError(f"{export}: --format open_clip writes {' and '.join(SUPPORTED)} exports, not {task_name}")
    _prepare_out(out, export, overwrite)
    _, cfg, model = load_exported(export)
    clip = model.clip if task_name == "structure_clip" else model
    model_cfg = open_clip_model_cfg(cfg.model)
    preprocess_cfg = preprocess_cfg_of(clip) or model_preprocess_cfg(cfg.model)
    if "mm_preprocess" in meta:
        preprocess_cfg = json.loads(meta["mm_preprocess"])
    cfg_tree = export_config_tree(meta)
    state = {k: v.detach().float().contiguous().clone() if v.is_floating_point() else v.detach().contiguous().clone()
             for k, v in clip.state_dict().items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg},
                                                  indent=2) + "\n")
        (tmp / "training_config.yaml").write_text(yaml.safe_dump(cfg_tree, sort_keys=False))
        (tmp / "README.md").write_text(model_card(export, meta, cfg_tree, model_cfg, preprocess_cfg))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "task": task_name, "tensors": len(state),
            "kee": task_name == "structure_clip" and getattr(model, "kee", None) is not None}
