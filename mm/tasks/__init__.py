"""Trainers: a plain dict maps a task name to its Task."""

from __future__ import annotations

from mm.errors import UserError
from mm.tasks.base import Task
from mm.tasks.clip import ClipTask
from mm.tasks.filip import FilipTask
from mm.tasks.structure import StructureTask
from mm.tasks.structure_clip import StructureClipTask
from mm.tasks.topolora_sam import TopoLoraSamTask

TASKS: dict[str, type[Task]] = {"clip": ClipTask, "filip": FilipTask, "structure_clip": StructureClipTask,
                                "topolora_sam": TopoLoraSamTask}
TASKS["structure"] = StructureTask


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]()
