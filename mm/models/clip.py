"""open_clip models for the contrastive trainers, built from a name or an inline architecture.

OpenAI's weights: OpenAI trained CLIP with QuickGELU, open_clip's plain names (ViT-B-32) use GELU and
their `-quickgelu` twins (ViT-B-32-quickgelu) QuickGELU. A pretrained file that is an OpenAI TorchScript
archive (the released ViT-B-32.pt) builds the model with QuickGELU, as open_clip does for its `openai`
tag, and records it as `model.quick_gelu: true` (so the export is rebuilt the same way); a plain state
dict loaded into a GELU architecture that has a `-quickgelu` twin gets one warning line naming the twin
(OpenAI weights in a plain file cannot be told from weights trained with GELU).

Preprocessing comes from the model: mean, std, interpolation and resize mode are the architecture's
preprocess_cfg (open_clip's pretrained tags of that architecture when they all agree, else OpenAI's),
then an inline architecture's `preprocess_cfg`, then `model.preprocess`; the built model carries the
result (open_clip.get_model_preprocess_cfg) and exports carry it in their metadata (mm_preprocess).

Model folders: `model.pretrained` may name a whole open_clip model folder instead of a file
(resolve_model_folder: `local-dir:PATH`, `hf-hub:ORG/NAME` from the Hugging Face cache, offline, or a
folder path). With model.name and model.arch empty, the folder's model_cfg and preprocess_cfg become
model.arch, recorded in the run's config like quick_gelu, so an export rebuilds without the folder.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import open_clip
import torch
from open_clip.model import CustomTextCLIP
from PIL import Image

from mm.errors import UserError


@dataclass
class ClipModelConfig:
    name: str = ""  # an open_clip architecture name (ViT-B-32, ...); or leave empty and give `arch`
    arch: dict = field(default_factory=dict)  # inline open_clip model config: embed_dim, vision_cfg, text_cfg
    # A local checkpoint file, or an open_clip model folder (architecture and weights): local-dir:PATH,
    # hf-hub:ORG/NAME from the Hugging Face cache, or a folder path; nothing is downloaded.
    pretrained: str = ""
    # QuickGELU activations (OpenAI's); set automatically when `pretrained` is an OpenAI TorchScript archive.
    quick_gelu: bool = False
    # Image preprocessing overrides (mean, std, interpolation, resize_mode, fill_color) on top of the
    # architecture's own preprocess_cfg.
    preprocess: dict = field(default_factory=dict)
    # Standard open_clip checkpoints keep the text tower's parameters on the top module; we always
    # build CustomTextCLIP (text tower as its own module) so ZeRO-3 gathers them when the tower runs.


LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
# open_clip's order of preference for the weights in a model folder (open_clip/factory.py).
FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                  "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors",
                  "pytorch_model.bin", "pytorch_model.pth", "model.pth")


@dataclass
class ModelFolder:
    """An open_clip model folder: open_clip_config.json ({"model_cfg", "preprocess_cfg"}) and weights."""

    folder: str
    name: str  # for reports: the folder's name, or NAME of hf-hub:ORG/NAME
    model_cfg: dict
    preprocess_cfg: dict
    weights: str


def is_model_source(spec: str) -> bool:
    """True for what names a whole model folder (architecture and weights): local-dir:PATH,
    hf-hub:ORG/NAME, or a folder path."""
    return bool(spec) and (spec.startswith((LOCAL_DIR_PREFIX, HF_HUB_PREFIX)) or os.path.isdir(spec))


def hf_cache_dir() -> str:
    """The Hugging Face hub cache, as huggingface_hub finds it (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE,
    HF_HOME/hub), read now rather than when huggingface_hub was imported."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _snapshot(repo_dir: str, option: str, spec: str) -> str:
    """The snapshot folder of a hub cache entry models--ORG--NAME: refs/main's revision, else the only one."""
    snapshots = os.path.join(repo_dir, "snapshots")
    ref = os.path.join(repo_dir, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            revision = f.read().strip()
        if os.path.isdir(os.path.join(snapshots, revision)):
            return os.path.join(snapshots, revision)
    revisions = sorted(os.listdir(snapshots)) if os.path.isdir(snapshots) else []
    if len(revisions) != 1:
        raise UserError(f"{option} {spec}: {repo_dir} has {len(revisions)} snapshots and no refs/main naming "
                        f"one; give the snapshot folder itself ({snapshots}/REVISION)")
    return os.path.join(snapshots, revisions[0])


def resolve_model_folder(spec: str, option: str = "model.pretrained") -> ModelFolder:
    """The open_clip model folder named by `spec`, offline: `local-dir:PATH`; `hf-hub:ORG/NAME` from the
    Hugging Face cache (hf_cache_dir, never downloaded); a folder holding open_clip_config.json; or a hub
    cache entry `models--ORG--NAME` (its refs/main snapshot). Anything missing is a one-line UserError."""
    if spec.startswith(HF_HUB_PREFIX):
        repo = spec[len(HF_HUB_PREFIX):].strip("/")
        if repo.count("/") != 1:
            raise UserError(f"{option} {spec}: give hf-hub:ORG/NAME")
        cache = hf_cache_dir()
        repo_dir = os.path.join(cache, "models--" + repo.replace("/", "--"))
        if not os.path.isdir(repo_dir):
            raise UserError(f"{option} {spec}: not in the Hugging Face cache {cache} (no {repo_dir}; nothing is "
                            f"downloaded: set HF_HOME or HF_HUB_CACHE to the cache that holds it)")
        folder, name = _snapshot(repo_dir, option, spec), repo.split("/")[1]
    else:
        folder = spec[len(LOCAL_DIR_PREFIX):] if spec.startswith(LOCAL_DIR_PREFIX) else spec
        if not os.path.isdir(folder):
            raise UserError(f"{option} {spec}: no such folder {folder!r}")
        base = os.path.basename(os.path.normpath(folder))
        if base.startswith("models--") and os.path.isdir(os.path.join(folder, "snapshots")):
            name = base.split("--")[-1]
            folder = _snapshot(folder, option, spec)
        else:
            name = base
    config_path = os.path.join(folder, "open_clip_config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{option} {spec}: no open_clip_config.json in {folder} (an open_clip model folder, as "
                        f"`mm export --format open_clip` writes, holds it and the weights)")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{option} {spec}: {config_path} is not JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise UserError(f"{option} {spec}: {config_path} has no 'model_cfg' (open_clip's folder format)")
    text = config["model_cfg"].get("text_cfg", {})
    if text.get("hf_model_name") or text.get("hf_tokenizer_name"):
        raise UserError(f"{option} {spec}: a Hugging Face text tower or tokenizer is not supported (its "
                        f"tokenizer files would have to be fetched)")
    weights = next((os.path.join(folder, w) for w in FOLDER_WEIGHTS if os.path.isfile(os.path.join(folder, w))),
                   None)
    if weights is None:
        raise UserError(f"{option} {spec}: no weights in {folder} (looked for {', '.join(FOLDER_WEIGHTS[:3])}, ...)")
    return ModelFolder(folder, name, config["model_cfg"], config.get("preprocess_cfg") or {}, weights)


def folder_arch(folder: ModelFolder) -> dict:
    """The folder's model_cfg as an inline model.arch (CustomTextCLIP's arguments; preprocess_cfg kept)."""
    arch = {k: v for k, v in folder.model_cfg.items() if k != "custom_text"}
    if folder.preprocess_cfg:
        arch["preprocess_cfg"] = _plain(dict(folder.preprocess_cfg))
    return arch


def is_openai_archive(path: str | os.PathLike) -> bool:
    """True for a TorchScript archive (OpenAI's released CLIP files), False for a plain checkpoint."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def quickgelu_twin(name: str) -> str | None:
    """The `-quickgelu` open_clip architecture of a GELU name (ViT-B-32 -> ViT-B-32-quickgelu), or None."""
    twin = f"{name}-quickgelu"
    return twin if name and not name.endswith("-quickgelu") and twin in open_clip.list_models() else None


def _archive_state_dict(path: str) -> dict[str, torch.Tensor]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        archive = torch.jit.load(path, map_location="cpu")
    # A TorchScript archive also holds the non-persistent buffers (the causal attn_mask) and OpenAI's
    # metadata scalars; neither is a weight.
    return {k: v for k, v in archive.state_dict().items()
            if k not in ("input_resolution", "context_length", "vocab_size") and not k.endswith("attn_mask")}


def _load_state(model: CustomTextCLIP, state: dict[str, torch.Tensor], path: str, name: str) -> None:
    """open_clip's checkpoint conversion (OpenAI / standard CLIP layout -> CustomTextCLIP), then load."""
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed

    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    if "logit_scale" in state and model.logit_scale.ndim != state["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    resize_pos_embed(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise UserError(f"model.pretrained {path}: weights do not fit {name} "
                        f"({lines[1].strip() if len(lines) > 1 else lines[0]})") from None


class _NoRandomInitNote(logging.Filter):
    # open_clip notes "No pretrained weights loaded ... initialized randomly" when built without a
    # checkpoint; build_clip loads the weights right after, so the note would be false.
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def build_clip(cfg: ClipModelConfig, load_pretrained: bool = True) -> CustomTextCLIP:
    """Build the model; `pretrained` is a local file (open_clip converts standard checkpoints) or a
    model folder (see the module docstring).

    An OpenAI TorchScript archive sets cfg.quick_gelu (see the module docstring) before the model is
    built; the model carries its preprocess_cfg (model_preprocess_cfg)."""
    if is_model_source(cfg.pretrained) and (load_pretrained or not (cfg.name or cfg.arch)):
        folder = resolve_model_folder(cfg.pretrained)
        if not (cfg.name or cfg.arch):
            # Recorded in the run's config, so its export is rebuilt without the folder.
            cfg.arch = folder_arch(folder)
        pretrained = folder.weights if load_pretrained else ""
    else:
        pretrained = cfg.pretrained if load_pretrained else ""
    if bool(cfg.name) == bool(cfg.arch):
        raise UserError("model: give exactly one of model.name (an open_clip architecture) or model.arch "
                        "(or neither, with model.pretrained an open_clip model folder)")
    if pretrained and not os.path.isfile(pretrained):
        raise UserError(f"model.pretrained: no such file {pretrained!r} (give a local checkpoint path; "
                        "nothing is downloaded)")
    if cfg.name and cfg.name not in open_clip.list_models():
        raise UserError(f"model.name: unknown open_clip architecture {cfg.name!r}")
    archive = bool(pretrained) and is_openai_archive(pretrained)
    arch_quick = bool(_arch(cfg).get("quick_gelu", False))
    if archive and not (cfg.quick_gelu or arch_quick):
        cfg.quick_gelu = True  # recorded in the run's config, so the export is rebuilt with QuickGELU too
        print(f"model.pretrained {pretrained} is an OpenAI TorchScript archive: building "
              f"{cfg.name or 'model.arch'} with QuickGELU, as OpenAI trained it (model.quick_gelu=true)",
              file=sys.stderr, flush=True)
    elif pretrained and not archive and not (cfg.quick_gelu or arch_quick) and quickgelu_twin(cfg.name):
        print(f"warning: model.name {cfg.name} uses GELU; OpenAI's weights need QuickGELU: for them use "
              f"{quickgelu_twin(cfg.name)} (or set model.quick_gelu=true)", file=sys.stderr, flush=True)
    if cfg.arch:
        arch = {k: v for k, v in cfg.arch.items() if k != "preprocess_cfg"}
        if cfg.quick_gelu:
            arch["quick_gelu"] = True
        try:
            model = CustomTextCLIP(**arch, output_dict=True)
        except TypeError as e:
            raise UserError(f"model.arch: {e}") from None
    else:
        quiet = _NoRandomInitNote()
        logging.getLogger().addFilter(quiet)
        try:
            model = open_clip.create_model(cfg.name, pretrained=None, force_custom_text=True, output_dict=True,
                                           pretrained_text=False, force_quick_gelu=cfg.quick_gelu)
        finally:
            logging.getLogger().removeFilter(quiet)
    if pretrained:
        if archive:
            _load_state(model, _archive_state_dict(pretrained), pretrained, cfg.name or "model.arch")
        else:
            try:
                open_clip.load_checkpoint(model, pretrained)
            except RuntimeError as e:
                lines = str(e).strip().splitlines()
                raise UserError(f"model.pretrained {pretrained}: weights do not fit {cfg.name or 'model.arch'} "
                                f"({lines[1].strip() if len(lines) > 1 else lines[0]})") from None
    from open_clip.model import set_model_preprocess_cfg

    set_model_preprocess_cfg(model, model_preprocess_cfg(cfg))
    return model


def _arch(cfg: ClipModelConfig) -> dict:
    return cfg.arch or open_clip.get_model_config(cfg.name) or {}


def architecture_preprocess_cfg(name: str, arch: dict | None = None) -> dict[str, Any]:
    """An architecture's preprocess_cfg: open_clip's defaults (OpenAI's mean/std, bicubic, shortest
    side), then what every pretrained tag of `name` agrees on (SigLIP: mean/std 0.5, squash), then the
    inline architecture's own `preprocess_cfg`; `size` is the vision tower's input size."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    arch = arch if arch is not None else (open_clip.get_model_config(name) or {}) if name else {}
    out = asdict(PreprocessCfg())
    if name:
        keys = ("mean", "std", "interpolation", "resize_mode")
        tags = [open_clip.get_pretrained_cfg(name, t) for t in open_clip.list_pretrained_tags_by_model(name)]
        seen = {json.dumps({k: list(t[k]) if isinstance(t.get(k), tuple) else t.get(k) for k in keys if k in t},
                           sort_keys=True) for t in tags}
        if len(seen) == 1:
            out = merge_preprocess_dict(out, json.loads(seen.pop()))
    out = merge_preprocess_dict(out, arch.get("preprocess_cfg", {}) or {})
    size = arch.get("vision_cfg", {}).get("image_size", 224)
    out["size"] = size
    return _plain(out)


def _plain(cfg: dict[str, Any]) -> dict[str, Any]:
    """Tuples as lists, so that the dict survives a JSON round trip unchanged."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def model_preprocess_cfg(cfg: ClipModelConfig) -> dict[str, Any]:
    """The preprocess_cfg the built model carries: architecture_preprocess_cfg + model.preprocess."""
    from open_clip.transform import _PREPROCESS_KEYS, merge_preprocess_dict

    unknown = sorted(set(cfg.preprocess) - _PREPROCESS_KEYS)
    if unknown:
        raise UserError(f"model.preprocess: unknown key(s) {unknown}; choose from {sorted(_PREPROCESS_KEYS)}")
    return _plain(merge_preprocess_dict(architecture_preprocess_cfg(cfg.name, cfg.arch or None), cfg.preprocess))


def transform_from_preprocess_cfg(pp: dict[str, Any], is_train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """open_clip's image transform for a preprocess_cfg dict (get_model_preprocess_cfg's form)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    full = merge_preprocess_dict(PreprocessCfg(), pp)
    full["size"] = pp.get("size", full["size"])
    if isinstance(full["size"], list):
        full["size"] = tuple(full["size"])
    return image_transform_v2(PreprocessCfg(**full), is_train=is_train)


def clip_tokenizer(cfg: ClipModelConfig) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for the architecture (the CLIP BPE ships inside open_clip: no download)."""
    context_length = _arch(cfg).get("text_cfg", {}).get("context_length", 77)
    if cfg.name:
        return open_clip.get_tokenizer(cfg.name, context_length=context_length)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def clip_preprocess(cfg: ClipModelConfig, is_train: bool, model: torch.nn.Module | None = None
                    ) -> Callable[[Image.Image], torch.Tensor]:
    """The image transform of the model: its preprocess_cfg (open_clip.get_model_preprocess_cfg of
    `model`, or the same dict resolved from the config, model_preprocess_cfg)."""
    pp = preprocess_cfg_of(model) if model is not None else None
    return transform_from_preprocess_cfg(pp or model_preprocess_cfg(cfg), is_train)


def preprocess_cfg_of(model: torch.nn.Module) -> dict[str, Any] | None:
    """open_clip.get_model_preprocess_cfg of the first open_clip model inside `model` (a wrapper such
    as Structure-CLIP's, a DeepSpeed engine), or None."""
    for module in model.modules():
        if isinstance(getattr(module, "visual", None), torch.nn.Module) and \
                isinstance(getattr(module.visual, "preprocess_cfg", None), dict):
            return _plain(dict(open_clip.get_model_preprocess_cfg(module)))
    return None


def export_preprocess_metadata(model: torch.nn.Module) -> dict[str, str]:
    """{"mm_preprocess": json} for an export's metadata when the model carries a preprocess_cfg."""
    pp = preprocess_cfg_of(model)
    return {"mm_preprocess": json.dumps(pp, sort_keys=True)} if pp else {}


def clip_outputs(model: torch.nn.Module, image: torch.Tensor, text: torch.Tensor) -> dict[str, Any]:
    """Forward through the model's own forward (so ZeRO-3 gathers), with the logit scale clamped.

    The clamp is applied to the value, never in place: an in-place clamp of the parameter after
    step() would be undone by ZeRO-1/2, which keeps the fp32 master copy in the optimizer.
    """
    out = model(image, text)
    out["logit_scale"] = out["logit_scale"].clamp(max=100.0)
    return out
