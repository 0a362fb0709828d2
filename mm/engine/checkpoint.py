"""DeepSpeed checkpoints (save, prune, resume) and their consolidation into an export (mm.exports)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
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


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digests(folder: Path, rank: int, world_size: int) -> dict[str, dict]:
    """sha256 and size of this rank's share of the files in `folder` (every world_size-th name), so the
    ranks hash a large checkpoint in parallel. Needs a folder every rank sees (a shared out_dir)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != RUN_STATE
                   and not p.name.startswith("."))
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
            for name in names[rank::world_size]}


def save(engine: Any, out_dir: str | Path, step: int, client_state: dict, keep: int, task: str,
         world_size: int, model_config: str = "", extra: dict | None = None) -> str:
    """Write checkpoint `step<step>` on every rank; complete only once its run-state file exists.

    The run state records the sha256 of every file of the checkpoint, so a resume can tell a damaged
    checkpoint (truncated, zero-filled) before handing it to DeepSpeed, and fall back to an older one."""
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
    files: dict[str, dict] = {}
    parts = [None] * world_size
    torch.distributed.all_gather_object(parts, _digests(root / tag, engine.global_rank, world_size))
    for part in parts:
        files.update(part)
    if engine.global_rank == 0:
        state = {"step": step, "task": task, "world_size": world_size, "model_config": model_config,
                 **(extra or {}), "files": files}
        write_text_atomic(root / tag / RUN_STATE, json.dumps(state))
        _fault_point("after_run_state", step)
        write_text_atomic(root / "latest", tag)
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
        # Older tags go only after the new one is complete; incomplete newer ones are never kept.
        for old in tags[: max(0, len(tags) - keep)]:
            shutil.rmtree(root / old, ignore_errors=True)
    torch.distributed.barrier()
    return tag


def complete_tags(out_dir: str | Path) -> list[str]:
    """Every checkpoint with a run-state file, newest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir()
                   if p.is_dir() and p.name.startswith("step") and (p / RUN_STATE).is_file()), reverse=True)


def damage(out_dir: str | Path, tag: str) -> tuple[dict | None, str]:
    """(run state, "") for an intact checkpoint; (None, what is wrong) for a damaged one: a run state
    that does not parse, or a file missing, of another size or another sha256 than recorded at save."""
    folder = checkpoint_root(out_dir) / tag
    try:
        state = json.loads((folder / RUN_STATE).read_text())
    except (OSError, ValueError) as e:
        return None, f"{RUN_STATE} is unreadable ({type(e).__name__})"
    if not isinstance(state, dict) or not {"step", "task", "world_size"} <= set(state):
        return None, f"{RUN_STATE} lacks step, task or world_size"
    for name, record in sorted((state.get("files") or {}).items()):
        path = folder / name
        if not path.is_file():
            return None, f"{name} is missing"
        size = path.stat().st_size
        if size != record["bytes"]:
            return None, f"{name} has {size} bytes, {record['bytes']} when saved"
        if _sha256(path) != record["sha256"]:
            return None, f"{name} differs from what was saved (sha256)"
    return state, ""


def newest_intact(out_dir: str | Path) -> tuple[str | None, dict | None, list[str]]:
    """The newest checkpoint that is not damaged, its run state, and one line per newer damaged one."""
    notes = []
    for tag in complete_tags(out_dir):
        state, problem = damage(out_dir, tag)
        if state is not None:
            return tag, state, notes
        notes.append(f"{checkpoint_root(out_dir) / tag}: damaged ({problem}); not used")
    return None, None, notes


def check_compatible(out_dir: str | Path, tag: str, state: dict, task: str, world_size: int,
                     model_config: str = "", zero_stage: int | None = None, config_class: type | None = None) -> None:
    """Refuse, in one line, a checkpoint this run cannot continue: another task, world size, ZeRO stage
    or architecture. `config_class` (the run's config dataclass) moves keys of earlier versions in the
    stored model section (mm.config.migrate) before it is compared with `model_config`."""
    where = checkpoint_root(out_dir) / tag
    if state["task"] != task:
        raise UserError(f"{where}: checkpoint of task {state['task']!r}, not {task!r} "
                        f"(use another train.out_dir, or --set train.resume=false to set that run aside)")
    if state["world_size"] != world_size:
        raise UserError(f"{where}: written by {state['world_size']} ranks; DeepSpeed checkpoints "
                        f"resume only at the same world size (now {world_size})")
    if zero_stage is not None and state.get("zero_stage", zero_stage) != zero_stage:
        raise UserError(f"{where}: written under ZeRO stage {state['zero_stage']}, this run uses stage "
                        f"{zero_stage}; DeepSpeed cannot load one into the other (train.deepspeed_config)")
    difference = _first_difference(_migrated(state.get("model_config") or "", config_class), model_config)
    if difference:
        raise UserError(f"{where}: checkpoint of another architecture ({difference}); "
                        f"use another train.out_dir, or --set train.resume=false to set that run aside")


def resume(engine: Any, out_dir: str | Path, tag: str) -> dict:
    """Load checkpoint `tag` into the engine (weights only: no code in a checkpoint file runs); returns
    its client state."""
    root = checkpoint_root(out_dir)
    try:
        with safe_loading():
            _, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
    except (RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, (EOFError, pickle.UnpicklingError)) or "PytorchStreamReader" in text:
            raise UserError(f"{root / tag}: a checkpoint file is damaged ({text[:200]}); move this "
                            f"checkpoint folder away to resume from an older one") from None
        raise UserError(f"{root / tag}: does not fit this model ({text[:200]})") from None
    if client_state is None:
        raise UserError(f"{root / tag}: DeepSpeed found no checkpoint files in it")
    return client_state


class UnsafeCheckpoint(UserError):
    """A checkpoint file holds a Python object that is not weights: it is not loaded."""


def _safe_globals() -> list:
    """What DeepSpeed's checkpoints pickle besides tensors and plain containers (0.19.7, ZeRO 0-3,
    fp32/bf16/fp16), plus numpy arrays (RNG states of checkpoints written before they were lists)."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler, np.ndarray, np.dtype,
               type(np.dtype(np.uint32))]
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return allowed + [_reconstruct]


@contextmanager
def safe_loading() -> Iterator[None]:
    """Within this block every torch.load (DeepSpeed's, zero_to_fp32's) loads weights only: a pickled
    object outside the allow-list raises UnsafeCheckpoint instead of running its code."""
    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(_safe_globals()):
            try:
                return original(f, *args, **kwargs)
            except pickle.UnpicklingError as e:
                # torch names the object as "GLOBAL posix.system" (wording varies between versions)
                found = re.search(r"GLOBAL ([\w.]+)", str(e))
                what = found.group(1) if found else "an object outside the allow-list"
                raise UnsafeCheckpoint(f"{f}: holds a Python object ({what}) that a checkpoint of this "
                                       f"program never contains; not loaded, since loading it could run "
                                       f"code; move this checkpoint folder away if you did not put it "
                                       f"there") from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


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
