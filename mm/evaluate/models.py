"""Loading the model an evaluation command line scores: an mm export or an open_clip checkpoint."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mm.errors import UserError


def is_model_source(spec: str) -> bool:
    """mm.models.clip.is_model_source, without importing open_clip for a command's --help."""
    from mm.models.clip import is_model_source as check

    return check(spec)


def load_embedding_model(path: str) -> tuple[Any, Any, torch.nn.Module, Callable, Callable]:
    """(task, config, model, tokenizer, eval preprocess) of an export whose model has
    encode_image/encode_text; any other export is a one-line UserError naming the file."""
    from mm.exports import read_export_metadata
    from mm.models.clip import transform_from_preprocess_cfg
    from mm.tasks import load_exported

    task, cfg, model = load_exported(path)
    inputs = task.eval_inputs()
    if inputs is None or not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise UserError(f"{path}: a {task.name} model has no encode_image/encode_text")
    tokenizer, preprocess = inputs
    # The transform the model trained with, as the export recorded it (open_clip's preprocess_cfg).
    recorded = read_export_metadata(path).get("mm_preprocess")
    if recorded:
        preprocess = transform_from_preprocess_cfg(json.loads(recorded), False)
    return task, cfg, model, tokenizer, preprocess


@dataclass
class EvalModel:
    """What an evaluation command needs of a model, wherever it came from."""

    task: str  # the mm task that trained it, or "open_clip" for a plain open_clip checkpoint
    name: str  # architecture, for the report
    source: str  # the file the weights came from
    model: torch.nn.Module
    tokenizer: Callable
    preprocess: Callable


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (--checkpoint, --model with --pretrained, or --model FOLDER)")
    g.add_argument("--checkpoint", help="exported safetensors file written by a train/ run")
    g.add_argument("--model", help="an open_clip architecture name (e.g. ViT-B-32) or an open_clip "
                                   "model-config JSON file, with --pretrained; or an open_clip model folder "
                                   "(architecture and weights): local-dir:PATH, hf-hub:ORG/NAME from the "
                                   "Hugging Face cache (offline), or a folder path")
    g.add_argument("--pretrained", help="local open_clip checkpoint file for --model (never downloaded)")


def load_eval_model(args: argparse.Namespace) -> EvalModel:
    """The model named by add_model_arguments' options."""
    if bool(args.checkpoint) == bool(args.model):
        raise UserError("give either --checkpoint (an mm export) or --model with --pretrained (open_clip)")
    if args.checkpoint:
        task, cfg, model, tokenizer, preprocess = load_embedding_model(args.checkpoint)
        return EvalModel(task.name, cfg.model.name or "inline architecture", str(args.checkpoint), model,
                         tokenizer, preprocess)
    if is_model_source(args.model):
        if args.pretrained:
            raise UserError(f"--model {args.model} is a model folder with its own weights; leave out --pretrained")
        model, tokenizer, preprocess, folder = load_model_folder(args.model)
        return EvalModel("open_clip", folder.name, folder.weights, model, tokenizer, preprocess)
    if ("/" in args.model or args.model.startswith(".")) and not args.model.endswith(".json"):
        raise UserError(f"--model {args.model}: no such folder (an open_clip model folder holds "
                        f"open_clip_config.json and the weights)")
    if not args.pretrained:
        raise UserError(f"--model {args.model}: give its weights with --pretrained FILE")
    model, tokenizer, preprocess = load_open_clip(args.model, args.pretrained)
    return EvalModel("open_clip", Path(args.model).stem if args.model.endswith(".json") else args.model,
                     str(args.pretrained), model, tokenizer, preprocess)


def load_model_folder(spec: str) -> tuple[torch.nn.Module, Callable, Callable, Any]:
    """(model, tokenizer, eval preprocess, ModelFolder) of an open_clip model folder (local-dir:PATH,
    hf-hub:ORG/NAME from the cache, or a folder path), built as the trainers build it (build_clip)."""
    from mm.models.clip import ClipModelConfig, build_clip, clip_preprocess, clip_tokenizer, resolve_model_folder

    folder = resolve_model_folder(spec, "--model")
    cfg = ClipModelConfig(pretrained=spec)
    try:
        model = build_clip(cfg)
    except UserError as e:
        raise UserError(str(e).replace("model.pretrained ", "--model ", 1)) from None
    return model.eval(), clip_tokenizer(cfg), clip_preprocess(cfg, False, model=model), folder


def model_fields(args: argparse.Namespace) -> dict[str, str]:
    """{model} and {pretrained} of an output template, from the model options alone (before loading)."""
    if args.checkpoint:
        path = Path(args.checkpoint)
        run = path.parent.parent.name if path.parent.name == "export" and path.parent.parent.name else path.stem
        return {"model": _slug(run), "pretrained": _slug(path.stem)}
    spec = args.model or ""
    if is_model_source(spec):
        if spec.startswith("hf-hub:"):
            name = spec.rstrip("/").split("/")[-1]
        else:
            base = Path(spec.removeprefix("local-dir:")).resolve().name
            name = base.split("--")[-1] if base.startswith("models--") else base
        return {"model": _slug(name), "pretrained": _slug(name)}
    arch = Path(spec).stem if spec.endswith(".json") else spec
    return {"model": _slug(arch), "pretrained": _slug(Path(args.pretrained or "none").stem)}


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def load_open_clip(arch: str, pretrained: str) -> tuple[torch.nn.Module, Callable, Callable]:
    """(model, tokenizer, eval preprocess) of an open_clip architecture with weights from a local file.

    `arch` is a name open_clip knows or a model-config JSON in open_clip's format (registered under its
    file stem, as open_clip's own add_model_config does)."""
    import open_clip

    if not Path(pretrained).is_file():
        # open_clip would take an unknown string for a pretrained tag and try the hub.
        raise UserError(f"--pretrained {pretrained}: no such file (weights are only read from local files)")
    if arch.endswith(".json"):
        if not Path(arch).is_file():
            raise UserError(f"--model {arch}: no such model-config file")
        try:
            json.loads(Path(arch).read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"--model {arch}: not a JSON model config ({e})") from None
        open_clip.add_model_config(arch)
        arch = Path(arch).stem
    if arch not in open_clip.list_models():
        raise UserError(f"--model {arch}: not an open_clip architecture (see open_clip.list_models())")
    from mm.models.clip import ClipModelConfig, build_clip, clip_preprocess

    cfg = ClipModelConfig(name=arch, pretrained=pretrained)
    try:
        # build_clip: an OpenAI TorchScript archive runs with QuickGELU, a plain file in a GELU
        # architecture with a -quickgelu twin gets a warning; the transform is the model's preprocess_cfg.
        model = build_clip(cfg)
    except UserError as e:
        raise UserError(str(e).replace("model.pretrained ", "--pretrained ", 1)) from None
    except RuntimeError as e:  # load_state_dict's size/key mismatch report
        first = str(e).strip().splitlines()
        raise UserError(f"--pretrained {pretrained}: weights do not fit {arch} "
                        f"({first[1].strip() if len(first) > 1 else first[0]})") from None
    except Exception as e:  # unpickling errors of a file that is not a checkpoint
        raise UserError(f"--pretrained {pretrained}: not a readable checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    preprocess = clip_preprocess(cfg, False, model=model)
    return model.eval(), open_clip.get_tokenizer(arch), preprocess
