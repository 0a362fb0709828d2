"""Export files: one safetensors file of fp32 weights plus string metadata, read and written here only.

An export's metadata names its task (`mm_task`), holds the resolved run config as JSON (`mm_config`),
the step (`mm_step`) and its kind (`mm_export`: `full`, every weight; `trainable`, only what trained,
completed on load from the base weights the task records), and how the launch that wrote it was started
(`mm_command`: JSON with the command line, working directory and world size; absent in older exports).
Building a model from an export needs the task registry and lives a floor up, in mm.tasks.load_exported;
this module knows no task.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mm.errors import UserError


def save_export(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write an export atomically: floating tensors as fp32, integer buffers as they are."""
    from safetensors.torch import save_file

    # Tied weights come back as shared storage, which safetensors refuses; exports are small enough to copy.
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().clone()
             for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_export_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an mm export; a missing file, another format or a foreign safetensors file is a
    UserError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise UserError(f"{path}: not a safetensors file ({str(e).splitlines()[0]})") from None
    if "mm_task" not in meta:
        raise UserError(f"{path}: not an mm export (no mm_task metadata)")
    try:
        config = json.loads(meta.get("mm_config", "{}"))
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise UserError(f"{path}: its mm_config metadata is not a JSON object; the export is damaged")
    return meta


def export_config_tree(meta: dict[str, str]) -> dict[str, Any]:
    """The run config stored in an export, as the plain mapping it was saved as."""
    return json.loads(meta["mm_config"])


def read_export_state(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
