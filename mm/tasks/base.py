"""What the trainers share: TaskBase (the defaults of the engine's Task contract) and the helpers
every image-text trainer uses the same way (zero-shot evaluation from the config)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.distributed

from mm import dist
from mm.config import RunConfig
from mm.data.loader import Loader, check_local_shards
from mm.engine.task import ONE_RANK, Batches, ExportPlan, World
from mm.models.clip import export_preprocess_metadata


class TaskBase:
    """A trainer: one subclass per module under mm/tasks/, satisfying mm.engine.task.Task.

    Built from its run config (`Task(cfg)`; None = the config class's defaults), it keeps the config
    and builds its loss module from the `loss` section once, here, so `losses` needs nothing but the
    model, the batch and the step. Subclasses set `name` and `config_class` and implement
    build_model, batches and losses; the rest has defaults.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = RunConfig
    # Suffixes of the evaluation metrics the one-line summary of `mm train` prints.
    headline: ClassVar[tuple[str, ...]] = ("acc1", "acc5")

    def __init__(self, cfg: Any = None) -> None:
        self.cfg = cfg if cfg is not None else self.config_class()

    def check(self) -> None:
        """Raise UserError on what the config types cannot check; runs before anything is read or
        written. By default: the local shards of data.train exist."""
        train = getattr(self.cfg.data, "train", "")
        if isinstance(train, str) and train.strip():
            check_local_shards(train, "data.train")

    def build_model(self, load_pretrained: bool = True) -> torch.nn.Module:
        raise NotImplementedError

    def batches(self, split: str, world: World = ONE_RANK, state: dict | None = None) -> Batches:
        raise NotImplementedError

    def losses(self, model: torch.nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return {}

    def export_plan(self, model: torch.nn.Module) -> ExportPlan:
        """Every weight, by default, with the image transform an open_clip model inside trained with
        (its preprocess_cfg, for the evaluators). A task whose model is mostly frozen pretrained weights
        may export only what trains, with metadata naming the base weights (see build_export_base)."""
        return ExportPlan(metadata=export_preprocess_metadata(model))

    def build_export_base(self, meta: dict[str, str], path: str,
                          base_checkpoint: str | None = None) -> torch.nn.Module:
        """The model with its base weights loaded, for a trainable-only export to complete."""
        raise NotImplementedError(f"{self.name} has no trainable-only exports")

    def eval_inputs(self) -> tuple[Callable, Callable] | None:
        """(tokenizer, eval preprocess) that feed the model's encode_text / encode_image, for the
        evaluation commands; None for a model without them."""
        return None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DeepSpeed engine (or the module itself)."""
    return getattr(model, "module", model)


def share_rank0_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), before the ranks evaluate shares of a set.

    Training updates each rank's BatchNorm statistics from its own batches and DeepSpeed, unlike DDP, never
    broadcasts them, so they drift apart; the checkpoints and the export hold rank 0's, so every rank
    evaluates with those."""
    if dist.world_size() == 1:
        return
    for buffer in unwrap(model).buffers():
        torch.distributed.broadcast(buffer, src=0)


def zeroshot_metrics(model: torch.nn.Module, cfg: Any, tokenizer: Callable, preprocess: Callable,
                     scorings: tuple[str, ...] = ("pooled",), world: World | None = None) -> dict[str, float]:
    """Zero-shot classification of cfg.eval.zeroshot_data under each scoring (mm.metrics.zeroshot):
    `zeroshot/<metric>` for pooled, `zeroshot_<scoring>/<metric>` for the others. {} without data.

    Each rank of `world` (by default the torch.distributed group, one rank without it) scores its own
    shards of the set in lockstep with the others; the per-class counts are summed over the ranks, so
    every rank returns the metrics of the whole set. World(0, 1) evaluates the whole set here alone."""
    if not cfg.eval.zeroshot_data:
        return {}
    from mm.data.classnames import load_classnames, load_templates
    from mm.data.streams import labelled_shard_batches, lockstep
    from mm.errors import DataError
    from mm.metrics.zeroshot import metrics_from_counts, zeroshot_counts

    world = world or World(dist.rank(), dist.world_size())
    model = unwrap(model)
    if world.size > 1:
        share_rank0_buffers(model)
    device = next(model.parameters()).device
    classnames, templates = load_classnames(cfg.eval.classnames), load_templates(cfg.eval.templates)
    out: dict[str, float] = {}
    for scoring in scorings:
        batches = labelled_shard_batches(preprocess, None, cfg.eval.zeroshot_data, len(classnames),
                                         cfg.eval.batch_size, rank=world.rank, world_size=world.size)
        if world.size > 1:
            batches = lockstep(batches)
        counts = zeroshot_counts(model, tokenizer, batches, classnames, templates, device, scoring)
        if world.size > 1:
            counts = counts.to(device)  # NCCL reduces GPU tensors only
            torch.distributed.all_reduce(counts)
            counts = counts.cpu()
        if not counts[:, 0].sum():
            raise DataError(f"no usable samples in {cfg.eval.zeroshot_data!r}: its shards are empty, damaged or "
                            "not tar files")
        metrics = metrics_from_counts(counts)
        if scoring == "pooled":
            out.update({f"zeroshot/{k}": v for k, v in metrics.items()})
            out["zeroshot/n_images"] = float(counts[:, 0].sum())
        else:
            out.update({f"zeroshot_{scoring}/{k}": v for k, v in metrics.items()})
    return out


def image_text_batches(cfg: Any, split: str, world: World = ONE_RANK, state: dict | None = None) -> Loader:
    """The image-text loader of the contrastive tasks whose model is an open_clip CLIP (CLIP, FILIP): the
    model's own transform (augmented for train), its tokenizer, one of a sample's captions per epoch."""
    from mm.data.image_text import image_text_map
    from mm.data.streams import stream_from_config
    from mm.models.clip import clip_preprocess, clip_tokenizer

    m = cfg.model
    sample_map = image_text_map(clip_preprocess(m, is_train=split == "train"), clip_tokenizer(m),
                                captions=cfg.data.captions)
    return stream_from_config(cfg.data, split, sample_map, seed=cfg.train.seed, rank=world.rank,
                              world_size=world.size, eval_batch_size=cfg.eval.batch_size, state=state)
