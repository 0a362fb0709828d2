"""Structure-CLIP (docs/methods.md §2) on the shared engine: scene graphs, hard negatives, KEE, hinge loss.

The caption is the one image_text_map drew (one of json `captions` per sample and epoch, data.captions).
Its scene graph is the sample's json graph for that caption (`scene_graphs[i]`, or `scene_graph` for
the txt caption; `mm-shards ... --scene-graphs` and the shapes world write them), else the caption
parsed by `loss.parser`: `auto` (spaCy's dependency rules when an English pipeline is installed, else
the simple parser for the captions it reads completely), `spacy` or `simple`. The sample map draws one
semantic hard negative (relation swap or attribute swap, `loss.negatives`), a swap of words inside the
caption itself, with the sample's own seeded rng, so a resumed run sees the same negatives. Samples
without one carry zeros and `has_neg` False; the log's `neg_share` says how many had one and
`no_negative/<reason>` why the others had none (mm.scenegraph.captions: empty or foreign caption,
malformed json graph, no usable swap, ...). The caption's triples are tokenised here for the KEE. The
base loss scores the KEE-fused caption, the hard-negative hinge the plain text tower's caption and
negative (see mm/models/structure_clip.py for why).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mm import dist as mmdist
from mm.config import RunConfig
from mm.data.image_text import image_text_map
from mm.data.loader import Loader
from mm.data.streams import stream_from_config
from mm.engine.task import ONE_RANK, World
from mm.errors import UserError
from mm.losses.structure_clip import BASES, structure_clip_loss
from mm.models.clip import clip_preprocess, clip_tokenizer
from mm.models.kee import encode_triples
from mm.models.structure_clip import StructureClipModel, StructureClipModelConfig
from mm.scenegraph import SceneGraph, hard_negative, parse_simple
from mm.scenegraph.captions import CAPTION_REASONS, NO_SWAP, analyse_caption
from mm.scenegraph.negatives import KINDS
from mm.scenegraph.parse import PARSERS, caption_parser, describe_parser, resolve_parser
from mm.scenegraph.samples import sample_graph_json
from mm.tasks.base import TaskBase, zeroshot_metrics


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


def sample_negative(graph: SceneGraph, caption: str, rng: random.Random, kinds: list[str]) -> str | None:
    """One hard negative: a swap inside `caption` of words the graph designates (hard_negative), or None."""
    negative = hard_negative(graph, rng, kinds, caption=caption) if graph else None
    if negative is None or _norm(negative) == _norm(caption):
        return None
    return negative


def structure_clip_map(preprocess: Callable, tokenizer: Callable, kinds: list[str], max_triples: int = 6,
                       triple_tokens: int = 8, parse: Callable[[str], SceneGraph] = parse_simple,
                       parser: str = "simple", captions: str = "draw",
                       ) -> Callable[[dict, random.Random], dict[str, Any]]:
    """Image-text sample + neg_text, has_neg, neg_caption, neg_reason, triples, triple_mask (fixed
    shapes: the default collate stacks them). The caption is the one image_text_map drew; its graph is
    the sample's json graph for that caption, else `parse` of it (`parser` names it, for the reasons).
    neg_reason is "" with a negative, else why there is none (mm.scenegraph.captions)."""
    base = image_text_map(preprocess, tokenizer, captions=captions)

    def sample_map(raw: dict, rng: random.Random) -> dict[str, Any]:
        sample = base(raw, rng)
        graph_json = sample_graph_json(sample["meta"], sample["caption_index"])
        if graph_json is None:
            analysis = analyse_caption(sample["caption"], parse, parser, kinds)
        else:
            analysis = analyse_caption(sample["caption"], parse, parser, kinds, graph_json=graph_json)
        negative = analysis.draw(rng)
        triples, triple_mask = encode_triples(analysis.graph.triples(max_triples), tokenizer, max_triples,
                                              triple_tokens)
        neg_text = torch.zeros_like(sample["text"]) if negative is None else tokenizer([negative])[0]
        sample.update(neg_text=neg_text, has_neg=torch.tensor(negative is not None), neg_caption=negative or "",
                      neg_reason=analysis.reason or "", triples=triples, triple_mask=triple_mask)
        return sample

    return sample_map


NO_NEGATIVE_REASONS = (*CAPTION_REASONS, NO_SWAP)


def no_negative_shares(reasons: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """`no_negative/<reason>`: the share of the batch without a negative for that reason. Every reason
    is always present (the logger averages each key over ranks, which must all send the same keys)."""
    n = max(len(reasons), 1)
    return {f"no_negative/{r}": torch.tensor(sum(x == r for x in reasons) / n, device=device)
            for r in NO_NEGATIVE_REASONS}


class StructureClipTask(TaskBase):
    name = "structure_clip"
    config_class = StructureClipRunConfig

    def __init__(self, cfg: StructureClipRunConfig | None = None) -> None:
        super().__init__(cfg)
        lc = self.cfg.loss
        check_loss_config(lc)
        self.loss = functools.partial(structure_clip_loss, base=lc.base, margin=lc.margin,
                                      neg_weight=lc.neg_weight, neg_margin=lc.neg_margin)
        self._reported = False

    def check(self) -> None:
        resolve_parser(self.cfg.loss.parser, "loss.parser")  # a missing spaCy model, before any data is read
        super().check()

    def build_model(self, load_pretrained: bool = True) -> torch.nn.Module:
        cfg = self.cfg
        if load_pretrained:
            # Training: a missing spaCy model fails here, before any compute. A model rebuilt from a
            # checkpoint (load_pretrained=False) is for evaluation or export, which parse no captions.
            parser = resolve_parser(cfg.loss.parser, "loss.parser")
            if not self._reported and mmdist.rank() == 0:
                print(f"structure_clip: captions without a json scene_graph are parsed by "
                      f"{describe_parser(parser, cfg.loss.parser)}", flush=True)
                self._reported = True
        return StructureClipModel(cfg.model, load_pretrained)

    def batches(self, split: str, world: World = ONE_RANK, state: dict | None = None) -> Loader:
        cfg, m = self.cfg, self.cfg.model
        parser = resolve_parser(cfg.loss.parser, "loss.parser")
        sample_map = structure_clip_map(clip_preprocess(m, is_train=split == "train"), clip_tokenizer(m),
                                        list(cfg.loss.negatives), m.max_triples, m.triple_tokens,
                                        caption_parser(parser), parser, cfg.data.captions)
        return stream_from_config(cfg.data, split, sample_map, seed=cfg.train.seed, rank=world.rank,
                                  world_size=world.size, eval_batch_size=cfg.eval.batch_size, state=state)

    def losses(self, model: torch.nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        return self.loss_from_embeddings(self.embed(model, batch), batch)

    # The embed / loss split that train.contrastive_accum accumulates contrastive batches with.
    def embed(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        # Through the model's own forward (the engine's), so ZeRO-3 gathers every parameter it uses.
        return model(batch["image"], batch["text"], batch["neg_text"], batch["triples"], batch["triple_mask"])

    def loss_from_embeddings(self, embeddings: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        out = embeddings
        losses = self.loss(out["image_features"], out["text_features"], out["neg_text_features"],
                           batch["has_neg"], out["logit_scale"], hinge_text=out["tower_text_features"])
        losses.update(no_negative_shares(batch.get("neg_reason", []), losses["loss"].device))
        return losses

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return zeroshot_metrics(model, self.cfg, *self.eval_inputs())

    def eval_inputs(self) -> tuple[Callable, Callable]:
        return clip_tokenizer(self.cfg.model), clip_preprocess(self.cfg.model, False)
