"""STRUCTURE on the shared engine (docs/methods.md §3): heads over frozen pretrained encoders, trained on
cached features with InfoNCE(tau) + lambda_t (R_S(image) + R_S(text)) / 2.

Workflow (`mm structure`, mm/tasks/structure_cli.py): `cache` extracts every layer of both encoders
once; `select` scores every (vision layer, text layer) pair and writes a config with the best pair;
`mm train structure` (train/structure.py) trains the heads on the cached features of the chosen layers under ZeRO 1/2/3.
Each global batch is drawn from one seeded permutation of the cache per epoch and split over the
ranks; the loss (InfoNCE and R_S) is computed on the gathered global batch, as the release computes
it on its single-GPU batch of 4096.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from mm import dist as mmdist
from mm.config import RunConfig
from mm.data.feature_cache import FeatureCache, expected_identity
from mm.engine.task import ONE_RANK, World
from mm.errors import ConfigError, DataError
from mm.losses.structure import DIVERGENCES, structure_loss
from mm.models.encoders import build_encoder, identity_digest, resolve_layer
from mm.models.structure import (
    StructureModelConfig,
    build_structure_model,
    structure_preprocess,
    structure_tokenizer,
)
from mm.tasks.base import TaskBase, zeroshot_metrics


@dataclass
class StructureLossConfig:
    tau: float = 0.05  # shared by InfoNCE and R_S, as in the release
    lam: float = 10.0  # lambda after warm-up
    warmup_steps: int = 1000  # lambda rises linearly from 0 over these optimizer steps
    levels: int = 1  # L: random-walk levels P^1..P^L
    divergence: str = "js"  # js (textbook) | js_release (the released code's reversed KL)


@dataclass
class CacheConfig:
    dir: str = "runs/structure-cache"
    batch_size: int = 64  # images through the encoders per forward while caching
    num_workers: int = 2
    dtype: str = "float32"  # float32 | float16 (halves the disk; features are upcast to fp32 on load)
    part_size: int = 8192  # samples per part file (bounds memory while caching)
    max_samples: int = 0  # 0 = every pair in data.train
    device: str = "cpu"  # where the encoders run while caching (cuda on a GPU node)
    # Train and select on this many of the cache's pairs (0 = all): a subset drawn by a fixed seed, the
    # same for every train.seed and nested (the 300 pairs are among the 1,000), so one cache built at
    # the largest budget serves every smaller one.
    use_pairs: int = 0


@dataclass
class SelectConfig:
    metric: str = "mutual_knn"  # mutual_knn | cka
    n: int = 5000  # pairs scored (a seeded random subset when the cache holds more)
    k: int = 0  # neighbours for mutual_knn; 0 = ceil(2 n^(1/3))
    seed: int = 0
    out: str = ""  # directory for alignment.json / .png and train.yaml; "" = <cache.dir>/select


@dataclass
class StructureRunConfig(RunConfig):
    model: StructureModelConfig = field(default_factory=StructureModelConfig)
    loss: StructureLossConfig = field(default_factory=StructureLossConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    select: SelectConfig = field(default_factory=SelectConfig)


def open_checked_cache(cfg: StructureRunConfig) -> FeatureCache:
    """The feature cache of cfg.cache.dir, refused if it was built from other encoders or data."""
    return FeatureCache(cfg.cache.dir, expected_identity(cfg.model.vision, cfg.model.text, cfg.data.train))


def pair_rows(n_cache: int, use_pairs: int) -> torch.Tensor | None:
    """The cache rows cache.use_pairs selects (None = all). The seed is fixed, not train.seed: every
    seed of a budget sees the same pairs, and a smaller budget's pairs are among a larger one's."""
    if not use_pairs or use_pairs >= n_cache:
        return None
    return torch.randperm(n_cache, generator=torch.Generator().manual_seed(0))[:use_pairs].sort().values


def resolve_layers(cfg: StructureRunConfig, cache: FeatureCache) -> None:
    """Negative layer indices as the non-negative ones they name, in place: -1 and the last index are
    one architecture, so the recorded config and resume's comparison see one value."""
    m = cfg.model
    m.vision_layer = resolve_layer(m.vision_layer, len(cache.vision_dims), "model.vision_layer")
    m.text_layer = resolve_layer(m.text_layer, len(cache.text_dims), "model.text_layer")


class CachedFeatureBatches:
    """Endless batches of cached (vision, text) features: each epoch one seeded permutation of all
    pairs, cut into global batches (incomplete tail dropped), each rank taking its slice. The state
    (epoch, position) resumes exactly."""

    def __init__(self, vision: torch.Tensor, text: torch.Tensor, batch_size: int, seed: int, rank: int,
                 world_size: int, state: dict | None = None):
        self.vision, self.text = vision, text
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world_size
        if len(vision) < batch_size * world_size:
            raise DataError(f"the feature cache holds {len(vision)} pairs, fewer than one global batch "
                            f"({batch_size} x {world_size} ranks)")
        state = state or {}
        self.epoch, self.pos = int(state.get("epoch", 0)), int(state.get("pos", 0))
        self.bad_counts: dict[str, int] = {}

    def __iter__(self) -> Iterator[dict]:
        n, b, global_b = len(self.vision), self.batch_size, self.batch_size * self.world
        while True:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(n, generator=gen)
            while self.pos + global_b <= n:
                start = self.pos + self.rank * b
                idx = perm[start:start + b]
                self.pos += global_b
                yield {"vision": self.vision[idx], "text": self.text[idx]}
            self.epoch, self.pos = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}


class StructureTask(TaskBase):
    name = "structure"
    config_class = StructureRunConfig

    def __init__(self, cfg: StructureRunConfig | None = None) -> None:
        super().__init__(cfg)
        lc = self.cfg.loss
        _check(self.cfg)
        self.loss = functools.partial(structure_loss, tau=lc.tau, lam=lc.lam, warmup_steps=lc.warmup_steps,
                                      levels=lc.levels, divergence=lc.divergence)

    def check(self) -> None:
        """Trains on the feature cache: it must match the config and hold one global batch, checked
        here, before the run directory is written; data.train is read by `mm structure cache`, not here.
        Resolves negative layer indices against the cache's layer counts."""
        cfg = self.cfg
        cache = open_checked_cache(cfg)
        resolve_layers(cfg, cache)
        rows = pair_rows(len(cache), cfg.cache.use_pairs)
        n = len(cache) if rows is None else len(rows)
        world = mmdist.world_size()
        if n < cfg.data.batch_size * world:
            used = f"cache.use_pairs={cfg.cache.use_pairs} of its {len(cache)}" if rows is not None else "all"
            raise DataError(f"{cfg.cache.dir}: training on {n} pairs ({used}), fewer than one global batch "
                            f"(data.batch_size {cfg.data.batch_size} x {world} ranks); lower data.batch_size")

    def build_model(self, load_pretrained: bool = True) -> torch.nn.Module:
        """Training (load_pretrained): heads sized from the checked cache, with the cache's encoder
        digests. Loading an export: the frozen encoders are built from their paths (the export holds
        only the heads and the digests, which are checked at the first encode)."""
        cfg = self.cfg
        if load_pretrained:
            cache = open_checked_cache(cfg)
            model = build_structure_model(cfg.model, cache.vision_dims, cache.text_dims)
            ident = cache.meta["identity"]
            model.set_encoder_digest(identity_digest(ident["vision"]), identity_digest(ident["text"]))
            return model
        vision = build_encoder(cfg.model.vision, "vision")
        text = build_encoder(cfg.model.text, "text")
        model = build_structure_model(cfg.model, vision.dims, text.dims)
        model.attach_encoders(vision, text)
        return model

    def batches(self, split: str, world: World = ONE_RANK, state: dict | None = None) -> CachedFeatureBatches:
        cfg = self.cfg
        cache = open_checked_cache(cfg)
        v = resolve_layer(cfg.model.vision_layer, len(cache.vision_dims), "model.vision_layer")
        t = resolve_layer(cfg.model.text_layer, len(cache.text_dims), "model.text_layer")
        vision, text = cache.layer("vision", v), cache.layer("text", t)
        rows = pair_rows(len(cache), cfg.cache.use_pairs)
        if rows is not None:
            vision, text = vision[rows], text[rows]
        return CachedFeatureBatches(vision, text, cfg.data.batch_size, cfg.train.seed, world.rank, world.size,
                                    state)

    def losses(self, model: torch.nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        # lambda's warm-up follows the optimizer steps (and resumes with them).
        img, txt = model(batch["vision"], batch["text"])
        gather = mmdist.all_gather_with_grad
        return self.loss(mmdist.all_gather_no_grad(batch["vision"].float()),
                         mmdist.all_gather_no_grad(batch["text"].float()),
                         gather(img.float()), gather(txt.float()), step)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        return zeroshot_metrics(model, self.cfg, *self.eval_inputs())

    def eval_inputs(self) -> tuple[Callable, Callable]:
        """The frozen encoders' own tokenizer and preprocessing (not open_clip's of a CLIP model)."""
        return structure_tokenizer(self.cfg.model), structure_preprocess(self.cfg.model)


def _check(cfg: StructureRunConfig) -> None:
    if cfg.loss.divergence not in DIVERGENCES:
        raise ConfigError(f"loss.divergence must be one of {DIVERGENCES}, got {cfg.loss.divergence!r}")
    if cfg.loss.levels < 1:
        raise ConfigError(f"loss.levels must be >= 1, got {cfg.loss.levels}")
    if cfg.loss.tau <= 0:
        raise ConfigError(f"loss.tau must be > 0, got {cfg.loss.tau}")
    if cfg.cache.use_pairs < 0:
        raise ConfigError(f"cache.use_pairs must be >= 0 (0 = every cached pair), got {cfg.cache.use_pairs}")
