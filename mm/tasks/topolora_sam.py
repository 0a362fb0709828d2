"""TopoLoRA-SAM on the shared engine (docs/methods.md §4): prompt-free SAM with LoRA in the image
encoder, a spatial conv adapter and a trainable mask decoder, trained with BCE + soft Dice + soft clDice
on segmentation shards (`key.png|jpg` + `key.mask.png` + optional `key.fov.png`).

Export (`<out_dir>/export/model.safetensors`, train.export):
- `trainable` holds only the LoRA matrices, the adapter (with its BatchNorm statistics) and the mask
  decoder, plus metadata naming the base SAM checkpoint (variant, absolute path, size, sha256): about
  20 MB for vit_b instead of 380 MB. mm.tasks.load_exported rebuilds SAM from that file
  (or from `base_checkpoint=`) and refuses any other file.
- `full` holds every weight, the frozen SAM included (ZeRO-1 checkpoints lack frozen parameters, so the
  engine fills them from the module).
- `auto` (default) is `trainable` when model.checkpoint is set and `full` otherwise: a randomly
  initialised SAM (the CPU test sizes) has no file to rebuild its frozen weights from.
`mm export --format sam` (mm/evaluate/export.py; alias mm-merge-lora) folds LoRA into the encoder weights of
either kind.

Validation runs at the model's input resolution (the image resized so its longest side is
model.image_size, padding excluded), or with data.crop_mode = patch (native-resolution training squares)
at native resolution through mm-segment's own tiling (mm.tasks.segmentation). The export records the
shards' normalisation and training scale (data_provenance) for mm-segment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mm import dist as mmdist
from mm.config import RunConfig, TrainConfig
from mm.engine.task import ExportPlan
from mm.errors import ConfigError, UserError
from mm.losses.segmentation import SegLoss
from mm.models.sam import (
    SamModelConfig,
    build_topolora_sam,
    checkpoint_identity,
    format_parameter_report,
    trainable_parameter_report,
    trainable_state_keys,
)
from mm.tasks.segmentation import (  # noqa: F401 -- re-exported: the shared pieces lived here
    PROVENANCE_SAMPLES,
    SEG_IMAGE_KEYS,
    SegDataConfig,
    SegLossConfig,
    SegmentationTask,
    augment,
    data_provenance,
    evaluate_segmentation,
    seg_batches,
    seg_sample_map,
)

EXPORT_KINDS = ("auto", "full", "trainable")


@dataclass
class SegTrainConfig(TrainConfig):
    # auto = trainable-only when model.checkpoint is set (the frozen weights can be rebuilt from it),
    # full otherwise; see the module docstring.
    export: str = "auto"


@dataclass
class TopoLoraRunConfig(RunConfig):
    model: SamModelConfig = field(default_factory=SamModelConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)
    data: SegDataConfig = field(default_factory=SegDataConfig)
    loss: SegLossConfig = field(default_factory=SegLossConfig)


# ---------------------------------------------------------------------------------------------------
# The task


class TopoLoraSamTask(SegmentationTask):
    name = "topolora_sam"
    config_class = TopoLoraRunConfig
    headline = ("/dice", "/cldice", "/iou")

    def __init__(self, cfg: TopoLoraRunConfig | None = None) -> None:
        super().__init__(cfg)
        export_kind(self.cfg)  # a bad train.export fails before training, not at its end
        lc = self.cfg.loss
        self.loss = SegLoss(lc.bce, lc.dice, lc.cldice, lc.cldice_iters)
        self._reported = False

    def build_model(self, load_pretrained: bool = True) -> torch.nn.Module:
        model = build_topolora_sam(self.cfg.model, load_pretrained)
        if load_pretrained and not self._reported and mmdist.rank() == 0:
            print(f"topolora_sam: {format_parameter_report(trainable_parameter_report(model))}", flush=True)
            if not self.cfg.model.checkpoint:
                print("topolora_sam: no model.checkpoint: the image encoder is randomly initialised and frozen, "
                      "so LoRA adapts random features and most of what learns is the mask decoder (fine for "
                      "tests; for real images use SAM's released weights, see docs/segmentation.md)",
                      flush=True)
            self._reported = True
        return model

    def export_plan(self, model: torch.nn.Module) -> ExportPlan:
        cfg = self.cfg
        data = data_provenance(self.cfg)
        # Full exports carry the data record too: `mm segment --mode auto` needs the training scale.
        meta = {"mm_data": json.dumps(data, sort_keys=True)} if data else {}
        if export_kind(cfg) != "trainable":
            return ExportPlan(metadata=meta)
        base = {"variant": cfg.model.variant, **checkpoint_identity(cfg.model.checkpoint)}
        meta["mm_base"] = json.dumps(base, sort_keys=True)
        return ExportPlan(trainable_state_keys(model), meta)

    def build_export_base(self, meta: dict[str, str], path: str,
                          base_checkpoint: str | None = None) -> torch.nn.Module:
        """SAM from the export's base checkpoint (`base_checkpoint`, else the recorded absolute path, else
        model.checkpoint as configured) with LoRA and the adapter; cfg.model.checkpoint is set to the
        file used. Another variant or another file than the one trained on is a UserError."""
        cfg = self.cfg
        base = json.loads(meta.get("mm_base", "{}"))
        candidates = [base_checkpoint] if base_checkpoint else [base.get("path"), cfg.model.checkpoint]
        found = next((c for c in candidates if c and Path(c).is_file()), None)
        if found is None:
            tried = ", ".join(dict.fromkeys(c for c in candidates if c)) or "none recorded"
            raise UserError(f"{path}: holds only the trained weights; its base SAM {cfg.model.variant} "
                            f"checkpoint is not found (tried {tried}); pass it with --base-checkpoint "
                            f"(base_checkpoint=)")
        cfg.model.checkpoint = str(found)
        model = build_topolora_sam(cfg.model, load_checkpoint=True)  # another variant: UserError here
        if base.get("sha256"):
            got = checkpoint_identity(found)
            if (got["size"], got["sha256"]) != (base.get("size"), base["sha256"]):
                raise UserError(f"{path}: base SAM checkpoint {found} (sha256 {got['sha256'][:12]}) is not "
                                f"the one it was trained on ({Path(base.get('path', '?')).name}, "
                                f"sha256 {base['sha256'][:12]})")
        return model


def export_kind(cfg: TopoLoraRunConfig) -> str:
    """'full' or 'trainable', resolving train.export = auto; trainable without a base checkpoint is a
    ConfigError (nothing could rebuild the frozen weights)."""
    kind = cfg.train.export
    if kind not in EXPORT_KINDS:
        raise ConfigError(f"train.export must be one of {', '.join(EXPORT_KINDS)}, got {kind!r}")
    if kind == "auto":
        return "trainable" if cfg.model.checkpoint else "full"
    if kind == "trainable" and not cfg.model.checkpoint:
        raise ConfigError("train.export=trainable needs model.checkpoint: a randomly initialised SAM "
                          "cannot be rebuilt from a trainable-only export")
    return kind
