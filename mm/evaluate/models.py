"""Loading an exported model for the evaluation command lines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mm.errors import UserError


def load_embedding_model(path: str) -> tuple[Any, Any, torch.nn.Module, Callable, Callable]:
    """(task, config, model, tokenizer, eval preprocess) of an export whose model has
    encode_image/encode_text; any other export is a one-line UserError naming the file."""
    from mm.engine.checkpoint import load_exported
    from mm.models.clip import clip_preprocess, clip_tokenizer

    task, cfg, model = load_exported(path)
    if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
        raise UserError(f"{path}: a {task.name} model has no encode_image/encode_text")
    return task, cfg, model, clip_tokenizer(cfg.model), clip_preprocess(cfg.model, False)
