"""The trainers: TASKS maps a task name to its class (one module under mm/tasks/ each); every entry
gets `mm train <name>`. load_exported rebuilds a trained model from its export file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mm.errors import UserError
from mm.tasks.base import TaskBase
from mm.tasks.clip import ClipTask
from mm.tasks.filip import FilipTask
from mm.tasks.structure import StructureTask
from mm.tasks.structure_clip import StructureClipTask
from mm.tasks.topolora_sam import TopoLoraSamTask
from mm.tasks.unet import UnetTask

TASKS: dict[str, type[TaskBase]] = {t.name: t for t in (ClipTask, FilipTask, StructureClipTask, StructureTask,
                                                        TopoLoraSamTask, UnetTask)}


def task_class(name: str) -> type[TaskBase]:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def get_task(name: str, cfg: Any = None) -> TaskBase:
    """The task `name` built from `cfg` (None: its config class's defaults)."""
    return task_class(name)(cfg)


def load_exported(path: str | Path, expect_task: str | None = None, base_checkpoint: str | None = None
                  ) -> tuple[TaskBase, Any, torch.nn.Module]:
    """(task, config, model) from an exported safetensors file, on the CPU, in eval mode.

    A trainable-only export (metadata mm_export = 'trainable', e.g. TopoLoRA-SAM's LoRA, adapter and
    decoder) is completed by its task from the base checkpoint it records; `base_checkpoint` overrides
    that path. Its weights must then cover every key the task exports. Config keys of earlier versions
    are moved to their current place (mm.config.migrate)."""
    from mm.config import build_config
    from mm.exports import export_config_tree, read_export_metadata, read_export_state

    meta = read_export_metadata(path)
    if expect_task and meta["mm_task"] != expect_task:
        raise UserError(f"{path}: a {meta['mm_task']!r} checkpoint, expected {expect_task!r}")
    cls = task_class(meta["mm_task"])
    task = cls(build_config(cls.config_class, export_config_tree(meta), str(path)))
    cfg = task.cfg
    if meta.get("mm_export", "full") == "trainable":
        model = task.build_export_base(meta, str(path), base_checkpoint)
        required = task.export_plan(model).keys or set(model.state_dict())
    else:
        model = task.build_model(load_pretrained=False)
        required = set(model.state_dict())
    state = read_export_state(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes of another architecture under this task's name
        detail = str(e).strip().splitlines()
        raise UserError(f"{path}: weights do not fit the {meta['mm_task']} model its metadata describes "
                        f"({(detail[1] if len(detail) > 1 else detail[0]).strip()[:200]})") from None
    missing = [k for k in missing if k in required]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit the {meta['mm_task']} model "
                        f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]})")
    return task, cfg, model.eval()
