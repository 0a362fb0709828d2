"""Structure-CLIP (METHODS.md §2) on the shared engine: scene graphs, hard negatives, KEE, hinge loss.

Each sample's scene graph is its json `scene_graph` when present (the shapes world and
`mm-shards ... --scene-graphs` write one), else its caption parsed by `loss.parser`: `auto` (spaCy's
dependency rules when spaCy and en_core_web_sm are installed, else parse_simple), `spacy` or `simple`.
The sample map draws one semantic hard negative (relation swap or attribute swap, `loss.negatives`)
with the sample's own seeded rng, so a resumed run sees the same negatives; samples without a usable
negative (one object, identical attributes, a symmetric relation, or a negative equal to the caption)
carry zeros and `has_neg` False, and the logged `neg_share` says how many had one. The caption's triples are tokenised here for the KEE. The base loss scores the
KEE-fused caption, the hard-negative hinge the plain text tower's caption and negative (see
mm/models/structure_clip.py for why).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mm import dist as mmdist
from mm.config import RunConfig
from mm.data.image_text import image_text_map
from mm.data.loader import Loader, StreamSpec, default_collate
from mm.errors import UserError
from mm.losses.structure_clip import BASES, structure_clip_loss
from mm.models.clip import clip_preprocess, clip_tokenizer
from mm.models.kee import encode_triples
from mm.models.structure_clip import StructureClipModel, StructureClipModelConfig
from mm.scenegraph import SceneGraph, hard_negative, parse_simple
from mm.scenegraph.negatives import KINDS
from mm.scenegraph.parse import PARSERS, caption_parser, describe_parser, resolve_parser
from mm.tasks.base import Task
from mm.tasks.clip import zeroshot_metrics


@dataclass
class StructureClipLossConfig:
    base: str = "infonce"  # infonce | hinge (the released code's in-batch hardest-negative hinge)
    margin: float = 0.2  # margin of the hinge base
    neg_weight: float = 5.0  # weight of the hard-negative hinge
    neg_margin: float = 0.1  # margin of the hard-negative hinge
    negatives: list[str] = field(default_factory=lambda: ["relation", "attribute"])  # swap kinds drawn
    # Caption parser for samples without a json scene_graph: auto | spacy | simple. It sits with
    # `negatives` (it decides which negatives exist); in the model section it would change the
    # architecture identity that resume checks.
    parser: str = "auto"


@dataclass
class StructureClipRunConfig(RunConfig):
    model: StructureClipModelConfig = field(default_factory=StructureClipModelConfig)
    loss: StructureClipLossConfig = field(default_factory=StructureClipLossConfig)


def check_loss_config(loss: StructureClipLossConfig) -> None:
    if loss.base not in BASES:
        raise UserError(f"loss.base must be one of {', '.join(BASES)}; got {loss.base!r}")
    unknown = [k for k in loss.negatives if k not in KINDS]
    if unknown:
        raise UserError(f"loss.negatives: unknown kind(s) {unknown}; choose from {list(KINDS)}")
    if loss.parser not in PARSERS:
        raise UserError(f"loss.parser must be one of {', '.join(PARSERS)}; got {loss.parser!r}")
    if loss.neg_weight < 0 or loss.margin < 0 or loss.neg_margin < 0:
        raise UserError("loss.margin, loss.neg_margin and loss.neg_weight must be >= 0")


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def sample_graph(meta: dict, caption: str,
                 parse: Callable[[str], SceneGraph] = parse_simple) -> SceneGraph:
    """The json `scene_graph` if present and valid, else the caption parsed by `parse`."""
    data = meta.get("scene_graph")
    if isinstance(data, dict):
        try:
            graph = SceneGraph.from_dict(data)
            if graph:
                return graph
        except (KeyError, TypeError, ValueError):
            pass
    return parse(caption)


def sample_negative(graph: SceneGraph, caption: str, rng: random.Random, kinds: list[str]) -> str | None:
    """One hard negative caption (hard_negative), or None.

    A negative equal to the sample's own caption (case/space-insensitive) is dropped too: the graph's
    rendering can differ from the caption's wording."""
    negative = hard_negative(graph, rng, kinds) if graph else None
    if negative is None or _norm(negative) == _norm(caption):
        return None
    return negative


def structure_clip_map(preprocess: Callable, tokenizer: Callable, kinds: list[str], max_triples: int = 6,
                       triple_tokens: int = 8, parse: Callable[[str], SceneGraph] = parse_simple,
                       ) -> Callable[[dict, random.Random], dict[str, Any]]:
    """Image-text sample + neg_text, has_neg, neg_caption, triples, triple_mask (fixed shapes: the
    default collate stacks them). `parse`: the caption parser for samples without a json graph."""
    base = image_text_map(preprocess, tokenizer)

    def sample_map(raw: dict, rng: random.Random) -> dict[str, Any]:
        sample = base(raw, rng)
        graph = sample_graph(sample["meta"], sample["caption"], parse)
        negative = sample_negative(graph, sample["caption"], rng, kinds)
        triples, triple_mask = encode_triples(graph.triples(max_triples), tokenizer, max_triples, triple_tokens)
        neg_text = torch.zeros_like(sample["text"]) if negative is None else tokenizer([negative])[0]
        sample.update(neg_text=neg_text, has_neg=torch.tensor(negative is not None), neg_caption=negative or "",
                      triples=triples, triple_mask=triple_mask)
        return sample

    return sample_map


def structure_clip_batches(cfg: StructureClipRunConfig, split: str, rank: int, world_size: int,
                           state: dict | None) -> Loader:
    train = split == "train"
    m = cfg.model
    spec = StreamSpec(
        urls=cfg.data.train if train else cfg.data.val,
        sample_map=structure_clip_map(clip_preprocess(m, is_train=train), clip_tokenizer(m),
                                      list(cfg.loss.negatives), m.max_triples, m.triple_tokens,
                                      caption_parser(resolve_parser(cfg.loss.parser, "loss.parser"))),
        collate=default_collate, batch_size=cfg.data.batch_size, seed=cfg.train.seed, rank=rank,
        world_size=world_size, num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer if train else 0, repeat=train,
        resampled=cfg.data.resampled and train, weights=cfg.data.train_weights if train else [],
        retries=cfg.data.retries,
    )
    return Loader(spec, state=state, max_bad_fraction=cfg.data.max_bad_fraction)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


class StructureClipTask(Task):
    name = "structure_clip"
    config_class = StructureClipRunConfig

    def __init__(self) -> None:
        self._reported = False

    def check_config(self, cfg: StructureClipRunConfig) -> None:
        check_loss_config(cfg.loss)
        resolve_parser(cfg.loss.parser, "loss.parser")  # a missing spaCy model, before any data is read

    def build_model(self, cfg: StructureClipRunConfig, load_pretrained: bool = True) -> torch.nn.Module:
        check_loss_config(cfg.loss)
        if load_pretrained:
            # Training: a missing spaCy model fails here, before any compute. A model rebuilt from a
            # checkpoint (load_pretrained=False) is for evaluation or export, which parse no captions.
            parser = resolve_parser(cfg.loss.parser, "loss.parser")
            if not self._reported and mmdist.rank() == 0:
                print(f"structure_clip: captions without a json scene_graph are parsed by "
                      f"{describe_parser(parser, cfg.loss.parser)}", flush=True)
                self._reported = True
        model = StructureClipModel(cfg.model, load_pretrained)
        # The loss options travel with the model: `losses` sees only the engine.
        model.loss_options = {"base": cfg.loss.base, "margin": cfg.loss.margin,
                              "neg_weight": cfg.loss.neg_weight, "neg_margin": cfg.loss.neg_margin}
        return model

    def batches(self, cfg: StructureClipRunConfig, split: str, rank: int = 0, world_size: int = 1,
                state: dict | None = None) -> Loader:
        check_loss_config(cfg.loss)
        return structure_clip_batches(cfg, split, rank, world_size, state)

    def losses(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        # Through the model's own forward (the engine's), so ZeRO-3 gathers every parameter it uses.
        out = model(batch["image"], batch["text"], batch["neg_text"], batch["triples"], batch["triple_mask"])
        options = getattr(_unwrap(model), "loss_options", {})
        return structure_clip_loss(out["image_features"], out["text_features"], out["neg_text_features"],
                                   batch["has_neg"], out["logit_scale"], hinge_text=out["tower_text_features"],
                                   **options)

    def evaluate(self, model: torch.nn.Module, cfg: StructureClipRunConfig) -> dict[str, float]:
        return zeroshot_metrics(model, cfg)
