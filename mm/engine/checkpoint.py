"""DeepSpeed checkpoints (save, prune, resume) and the consolidated fp32 safetensors export."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mm.errors import UserError

RUN_STATE = "mm_run_state.json"


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_tag(out_dir: str | Path) -> str | None:
    """The newest complete checkpoint: DeepSpeed writes `latest` only after every rank finished."""
    latest = checkpoint_root(out_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (checkpoint_root(out_dir) / tag / RUN_STATE).is_file() else None


def save(engine: Any, out_dir: str | Path, step: int, client_state: dict, keep: int, task: str,
         world_size: int) -> str:
    root = checkpoint_root(out_dir)
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    if engine.global_rank == 0:
        # The run state is written last and `latest` after it, so a reader never sees a half-written tag.
        state = {"step": step, "task": task, "world_size": world_size}
        _atomic_write_text(root / tag / RUN_STATE, json.dumps(state))
        _atomic_write_text(root / "latest", tag)
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[: max(0, len(tags) - keep)]:
            shutil.rmtree(root / old, ignore_errors=True)
    torch.distributed.barrier()
    return tag


def resume(engine: Any, out_dir: str | Path, task: str, world_size: int) -> dict | None:
    """Load the newest checkpoint into the engine; returns its client state, or None if there is none."""
    tag = latest_tag(out_dir)
    if tag is None:
        return None
    root = checkpoint_root(out_dir)
    state = json.loads((root / tag / RUN_STATE).read_text())
    if state["task"] != task:
        raise UserError(f"{root / tag}: checkpoint of task {state['task']!r}, not {task!r}")
    if state["world_size"] != world_size:
        raise UserError(f"{root / tag}: written by {state['world_size']} ranks; DeepSpeed checkpoints "
                        f"resume only at the same world size (now {world_size})")
    _, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    return client_state


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


def save_export(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write an export atomically: floating tensors as fp32, integer buffers as they are."""
    # Tied weights come back as shared storage, which safetensors refuses; exports are small enough to copy.
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().clone()
             for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_export_metadata(path: str | Path) -> dict[str, str]:
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
    return meta


def load_exported(path: str | Path, expect_task: str | None = None, base_checkpoint: str | None = None
                  ) -> tuple[Any, Any, torch.nn.Module]:
    """(task, config, model) from an exported safetensors file, on the CPU, in eval mode.

    A trainable-only export (metadata mm_export = 'trainable', e.g. TopoLoRA-SAM's LoRA, adapter and
    decoder) is completed by its task from the base checkpoint it records; `base_checkpoint` overrides
    that path. Its weights must then cover every key the task exports."""
    from safetensors.torch import load_file

    from mm.config import _build
    from mm.tasks import get_task

    meta = read_export_metadata(path)
    if expect_task and meta["mm_task"] != expect_task:
        raise UserError(f"{path}: a {meta['mm_task']!r} checkpoint, expected {expect_task!r}")
    task = get_task(meta["mm_task"])
    cfg = _build(task.config_class, json.loads(meta["mm_config"]), "", str(path))
    if meta.get("mm_export", "full") == "trainable":
        model = task.build_export_base(cfg, meta, str(path), base_checkpoint)
        required = task.export_keys(model, cfg) or set(model.state_dict())
    else:
        model = task.build_model(cfg, load_pretrained=False)
        required = set(model.state_dict())
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k in required]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit the {meta['mm_task']} model "
                        f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]})")
    return task, cfg, model.eval()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
