"""DeepSpeed checkpoints (save, prune, resume) and their consolidation into an export (mm.exports)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mm.config import migrate
from mm.errors import UserError, write_text_atomic
from mm.exports import save_export

RUN_STATE = "mm_run_state.json"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_tag(out_dir: str | Path) -> str | None:
    """The newest complete checkpoint: the highest step whose run-state file exists.

    The run state is written (atomically) only after every rank has written its files, so a checkpoint
    cut short by a kill has none and is passed over. `latest` is kept for DeepSpeed's own tools; it is
    not trusted here, since a kill can fall between writing the run state and updating it."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return None
    complete = [p.name for p in root.iterdir()
                if p.is_dir() and p.name.startswith("step") and (p / RUN_STATE).is_file()]
    return max(complete, default=None)


def _fault_point(name: str, step: int) -> None:
    """Test hook: MM_FAULT_KILL="<point>:<step>:<rank>" SIGKILLs this process at that point of the save
    of that step, so the fault tests can cut a checkpoint short deterministically. Unset: no effect."""
    spec = os.environ.get("MM_FAULT_KILL")
    if not spec:
        return
    point, at_step, at_rank = spec.split(":")
    if point == name and int(at_step) == step and int(at_rank) == torch.distributed.get_rank():
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def save(engine: Any, out_dir: str | Path, step: int, client_state: dict, keep: int, task: str,
         world_size: int, model_config: str = "") -> str:
    """Write checkpoint `step<step>` on every rank; complete only once its run-state file exists."""
    root = checkpoint_root(out_dir)
    tag = f"step{step:08d}"
    if engine.global_rank == 0 and (root / tag).exists():
        # Left by a run killed while saving this step: never complete, so remove it before rewriting.
        shutil.rmtree(root / tag, ignore_errors=True)
    torch.distributed.barrier()
    _fault_point("before_save", step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    _fault_point("after_rank_files", step)
    # Every rank's files are on disk before the run state says the checkpoint is complete.
    torch.distributed.barrier()
    if engine.global_rank == 0:
        state = {"step": step, "task": task, "world_size": world_size, "model_config": model_config}
        write_text_atomic(root / tag / RUN_STATE, json.dumps(state))
        _fault_point("after_run_state", step)
        write_text_atomic(root / "latest", tag)
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
        # Older tags go only after the new one is complete; incomplete newer ones are never kept.
        for old in tags[: max(0, len(tags) - keep)]:
            shutil.rmtree(root / old, ignore_errors=True)
    torch.distributed.barrier()
    return tag


def resume(engine: Any, out_dir: str | Path, task: str, world_size: int, model_config: str = "",
           config_class: type | None = None) -> dict | None:
    """Load the newest checkpoint into the engine; returns its client state, or None if there is none.

    `config_class` (the run's config dataclass) moves keys of earlier versions in the stored model
    section (mm.config.migrate) before it is compared with `model_config`."""
    tag = latest_tag(out_dir)
    if tag is None:
        return None
    root = checkpoint_root(out_dir)
    state = json.loads((root / tag / RUN_STATE).read_text())
    if state["task"] != task:
        raise UserError(f"{root / tag}: checkpoint of task {state['task']!r}, not {task!r} "
                        f"(use another train.out_dir, or --set train.resume=false)")
    if state["world_size"] != world_size:
        raise UserError(f"{root / tag}: written by {state['world_size']} ranks; DeepSpeed checkpoints "
                        f"resume only at the same world size (now {world_size})")
    difference = _first_difference(_migrated(state.get("model_config") or "", config_class), model_config)
    if difference:
        raise UserError(f"{root / tag}: checkpoint of another architecture ({difference}); "
                        f"use another train.out_dir, or --set train.resume=false")
    try:
        _, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
    except (RuntimeError, KeyError, ValueError) as e:  # shapes or names that do not fit this model
        raise UserError(f"{root / tag}: does not fit this model ({str(e).strip().splitlines()[0][:200]})") from None
    if client_state is None:
        raise UserError(f"{root / tag}: DeepSpeed found no checkpoint files in it")
    return client_state


# Where the starting weights come from, not what the model is: a run may resume with them moved.
_NOT_ARCHITECTURE = ("pretrained", "checkpoint", "base_checkpoint")


def _migrated(stored: str, config_class: type | None) -> str:
    """A stored model section with the keys that have since moved out of it (or been renamed) moved."""
    if not stored or config_class is None:
        return stored
    tree = {"model": json.loads(stored)}
    migrate(config_class, tree)
    return json.dumps(tree.get("model", {}), sort_keys=True)


def _first_difference(stored: str, current: str) -> str:
    """The first model-config value that differs between a checkpoint and this run ("" if none)."""
    if not stored or not current:
        return ""
    flat_a, flat_b = _flatten(json.loads(stored), "model"), _flatten(json.loads(current), "model")
    for key in sorted(set(flat_a) | set(flat_b)):
        if key.rsplit(".", 1)[-1] not in _NOT_ARCHITECTURE and flat_a.get(key) != flat_b.get(key):
            return f"{key} was {flat_a.get(key)!r}, now {flat_b.get(key)!r}"
    return ""


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}"))
    return out


def export_safetensors(out_dir: str | Path, tag: str, path: str | Path, metadata: dict[str, str],
                       frozen: dict[str, torch.Tensor] | None = None, keys: set[str] | None = None) -> None:
    """Consolidate the (possibly ZeRO-partitioned) fp32 master weights of checkpoint `tag` into one
    safetensors file that eval/ loads without DeepSpeed. Call on one rank.

    ZeRO-1 checkpoints hold no frozen parameters (their fp32 copies live only with the optimizer, which
    never sees frozen ones); `frozen` supplies those from the module's own state dict. `keys` keeps only
    those entries (a trainable-only export, metadata mm_export = 'trainable')."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_root(out_dir)), tag=tag)
    for key, value in (frozen or {}).items():
        state.setdefault(key, value)
    if keys is not None:
        missing = sorted(keys - set(state))
        if missing:
            raise RuntimeError(f"checkpoint {tag} lacks {len(missing)} exported weights, e.g. {missing[0]}")
        state = {k: state[k] for k in sorted(keys)}
    save_export(state, path, metadata)
