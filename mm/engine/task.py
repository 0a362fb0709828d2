"""The contract between the engine and a trainer: what the engine calls, and what it passes in.

The engine imports no trainer. A trainer (mm/tasks/<name>.py) is any class satisfying `Task`; it is
built from its run config (`TaskClass(cfg)`) and keeps that config and its loss module. Everything
that changes per call is an argument: the ranks (`World`) when batches are built, the optimizer step
when losses are computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks."""

    rank: int = 0
    size: int = 1


ONE_RANK = World()


@runtime_checkable
class Batches(Protocol):
    """What the engine iterates: dict batches, a resumable position, and counts of skipped samples."""

    bad_counts: dict[str, int]

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def state_dict(self) -> dict: ...


@dataclass
class ExportPlan:
    """What the export file holds: `keys` None = every weight (a full export), else only those
    (a trainable-only export) with `metadata` naming the base weights that complete it."""

    keys: set[str] | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """A trainer, as the engine sees it.

    - check: raise mm.errors.UserError on anything wrong with the config or its inputs, before any
      file is written (the engine calls it first);
    - build_model: the nn.Module whose trainable parameters are exactly those meant to train
      (load_pretrained=False: the architecture only, for loading an export into);
    - batches: the stream for `split` ("train": endless, this rank's share; "val": one pass) resuming
      from `state` (a Batches.state_dict());
    - losses: named scalar tensors, `loss` the one to optimise; `model` is the DeepSpeed engine, so
      ZeRO-3 gathers parameters through the model's own forward; `step` is the number of optimizer
      steps taken so far (it resumes with the run);
    - evaluate: named floats; called on every rank (ZeRO-3 gathers are collective);
    - export_plan: which weights the export file holds.
    """

    name: str
    cfg: Any

    def check(self) -> None: ...

    def build_model(self, load_pretrained: bool = True) -> torch.nn.Module: ...

    def batches(self, split: str, world: World = ONE_RANK, state: dict | None = None) -> Batches: ...

    def losses(self, model: torch.nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]: ...

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]: ...

    def export_plan(self, model: torch.nn.Module) -> ExportPlan: ...


@runtime_checkable
class ContrastiveTask(Protocol):
    """A task whose loss couples the samples of a batch (contrastive negatives) and splits into an
    embedding pass and a loss on the embeddings; `train.contrastive_accum` needs this split.

    - embed: named tensors of one micro-batch through the model's own forward; per-sample tensors have
      the batch on dim 0, 0-dim tensors (a logit scale) are shared;
    - loss_from_embeddings: what `losses` returns, from embeddings of any number of samples and the
      matching batch (`losses(model, batch, step)` is `loss_from_embeddings(embed(model, batch), batch)`).
    """

    def embed(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]: ...

    def loss_from_embeddings(self, embeddings: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]: ...
