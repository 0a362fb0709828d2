"""DeepSpeed config: ZeRO settings from configs/ds/*.json, everything else from the run config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mm.config import TrainConfig
from mm.errors import ConfigError


def build_ds_config(path: str, batch_size: int, grad_accum: int, grad_clip: float, precision: str,
                    world_size: int, on_gpu: bool) -> dict[str, Any]:
    """Read the ZeRO config and fill in the keys the run config owns.

    The run config is the one place for batch size, accumulation, clipping, precision and the optimizer;
    a DeepSpeed file that sets one of them to something else (other than "auto"), or has an optimizer
    or scheduler section, is an error, not a silent override.
    """
    if path == TrainConfig.deepspeed_config and not Path(path).is_file():
        # The default names the repository's configs/ds/zero2.json; an installed package run from another
        # directory has no such file, so it takes that file's settings.
        ds: Any = {"zero_optimization": {"stage": 2}}
    else:
        try:
            ds = json.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"{path}: cannot read DeepSpeed config ({e.strerror})") from None
        except ValueError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object, got {type(ds).__name__}")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{path}: 'zero_optimization' must be an object, got {zero!r}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: 'zero_optimization.stage' must be 0, 1, 2 or 3, got {stage!r}")
    for section in ("optimizer", "scheduler"):
        # The trainer hands DeepSpeed its own AdamW and schedule (optim.*), which win over these.
        if section in ds:
            raise ConfigError(f"{path}: has an '{section}' section, which this trainer does not use; set "
                              f"optim.* in the run config instead and remove it")
    for name in ("bf16", "fp16"):
        section = ds.get(name, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: '{name}' must be an object, got {section!r}")
        enabled = section.get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != (precision == name):
            raise ConfigError(f"{path}: '{name}.enabled' is {enabled!r} but train.precision is {precision!r}; "
                              f"set the precision in the run config (train.precision) and drop 'enabled'")
    if precision == "fp16" and not on_gpu:
        raise ConfigError("train.precision: fp16 needs a GPU (DeepSpeed refuses it on the CPU); use fp32 or bf16")
    if stage == 0 and grad_clip > 0:
        # DeepSpeed's ZeRO stage 0 path fails when gradient clipping is on.
        raise ConfigError(f"{path}: ZeRO stage 0 cannot clip gradients; use stage 1-3 or train.grad_clip=0")
    owned = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": batch_size * grad_accum * world_size,
        "gradient_clipping": grad_clip,
    }
    for key, value in owned.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ConfigError(f"{path}: '{key}' is {ds[key]!r} but the run config gives {value!r}; "
                              "set it in the run config (data.batch_size, train.grad_accum, train.grad_clip)")
        ds[key] = value
    for name in ("bf16", "fp16"):
        ds[name] = {**ds.get(name, {}), "enabled": precision == name}
    ds.setdefault("steps_per_print", 10**9)  # our own logger reports progress
    # Offload variants get DeepSpeedCPUAdam where it builds, else torch AdamW (trainer.make_optimizer),
    # which DeepSpeed would otherwise refuse.
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds
