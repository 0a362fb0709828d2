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
from mm.evaluate.model_card import model_card as write_card
from mm.evaluate.model_card import prepare_out_folder

# Tasks that cannot be written for open_clip, and why (one line each).
REFUSED = {
    "filip": "FILIP scores image-text pairs by token-wise late interaction through its own token projections; "
             "open_clip's CLIP has one pooled embedding per tower, so it cannot express FILIP's similarity",
    "structure": "STRUCTURE reads two frozen timm / Hugging Face encoders at a chosen intermediate layer through "
                 "trained heads (its export holds only the heads); open_clip's CLIP towers can express neither",
    "topolora_sam": "TopoLoRA-SAM is a SAM segmentation model, not a CLIP; use --format sam or --format peft",
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


def model_card(export: Path, meta: dict[str, str], cfg_tree: dict[str, Any], model_cfg: dict[str, Any],
               preprocess_cfg: dict[str, Any]) -> str:
    """README.md of an exported folder (mm.evaluate.model_card's writer with open_clip's parts)."""
    task = meta["mm_task"]
    model = cfg_tree.get("model", {})
    pretrained = model.get("pretrained") or ""
    name = model.get("name") or "inline architecture (model.arch)"
    usage = [
        "Load it with open_clip (offline; the tokenizer is open_clip's bundled CLIP BPE):",
        "",
        "```python",
        "import open_clip",
        "model, _, preprocess = open_clip.create_model_and_transforms(\"local-dir:PATH_TO_THIS_FOLDER\")",
        "tokenizer = open_clip.get_tokenizer(\"local-dir:PATH_TO_THIS_FOLDER\")",
        "```",
    ]
    if task == "structure_clip":
        task_lines = ["Structure-CLIP (CLIP fine-tuned with scene-graph hard negatives and a Knowledge Enhanced "
                      "Encoder). **The KEE is not carried**: open_clip's model is the plain CLIP towers, so "
                      "`encode_text` is the plain text tower, as `mm compositional` evaluates by default "
                      f"(model.kee was {model.get('kee')!r})."]
    else:
        task_lines = ["CLIP: contrastive image-text training (InfoNCE over the global batch)."]
    architecture = [
        f"- open_clip architecture: {name}; embed_dim {model_cfg.get('embed_dim')}; "
        f"QuickGELU: {bool(model_cfg.get('quick_gelu'))}; text tower as its own module (`custom_text`).",
        f"- initial weights: {pretrained or 'none (trained from scratch)'}",
        f"- image preprocessing: `{json.dumps(preprocess_cfg, sort_keys=True)}`",
        "- full open_clip model_cfg: `open_clip_config.json`.",
    ]
    return write_card(export, meta, cfg_tree, library_name="open_clip",
                      pipeline_tag="zero-shot-image-classification", tags=["clip", "open_clip", "mm", task],
                      usage=usage, task_lines=task_lines, architecture=architecture, base_weights=pretrained,
                      data_extra=f"; captions: {cfg_tree.get('data', {}).get('captions', 'default')}")


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
    prepare_out_folder(out, export, overwrite)
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
