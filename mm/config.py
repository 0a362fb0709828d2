"""Typed run configs: YAML files loaded into dataclasses, with dotted `--set key=value` overrides.

Loading is strict: an unknown or misspelt key, or a value of the wrong type, raises ConfigError naming
the key and the file before any compute starts. Each task declares its own `model` section; the
`data`, `optim` and `train` sections are shared by every task.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mm.errors import ConfigError, write_text_atomic


@dataclass
class DataConfig:
    train: str = ""  # shard URLs as webdataset takes them; several sources separated by '::'
    train_weights: list[float] = field(default_factory=list)  # one per source; needs resampled
    val: str = ""
    resampled: bool = False  # draw shards with replacement (needed for weighted mixing)
    # Training is counted in optimizer steps; with this set, the log also reports the fractional epoch
    # (samples seen / samples_per_epoch), as open_clip does for resampled streams.
    samples_per_epoch: int = 0
    batch_size: int = 32  # per rank, per micro-step
    num_workers: int = 2
    shuffle_buffer: int = 1000
    image_size: int = 64
    max_bad_fraction: float = 0.1  # stop when more than this share of samples is corrupt
    context_length: int = 77


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    grad_accum: int = 1
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 on GPU only)
    deepspeed_config: str = "configs/ds/zero2.json"
    out_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500  # 0 = only at the end
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0 = only at the end
    resume: bool = True  # resume from the newest checkpoint in out_dir when there is one
    # A non-finite loss skips its step; this many in a row stop the run (the model has diverged).
    max_nonfinite_steps: int = 5
    # After SIGTERM (or the launcher's death) the run saves a checkpoint at the end of the current step
    # if that comes within this many seconds; otherwise it exits without one.
    stop_grace_s: float = 60.0


@dataclass
class EvalConfig:
    zeroshot_data: str = ""  # labelled shards (json field 'label') for zero-shot classification
    classnames: str = "shapes"  # a built-in set (shapes) or a text file, one class name per line
    templates: str = "shapes"  # a built-in set or a text file, one template per line with '{}'
    batch_size: int = 64


@dataclass
class RunConfig:
    task: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_CHOICES = {"train.precision": ("fp32", "bf16", "fp16")}
# Inclusive bounds (None: unbounded) for the shared sections; a value outside fails at load time.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "data.batch_size": (1, None), "data.num_workers": (0, None), "data.shuffle_buffer": (0, None),
    "data.image_size": (1, None), "data.max_bad_fraction": (0.0, 1.0), "data.context_length": (1, None),
    "data.samples_per_epoch": (0, None),
    "optim.lr": (0.0, None), "optim.weight_decay": (0.0, None), "optim.eps": (0.0, None),
    "optim.warmup_steps": (0, None), "optim.min_lr_ratio": (0.0, 1.0),
    "train.steps": (1, None), "train.grad_accum": (1, None), "train.grad_clip": (0.0, None),
    "train.log_every": (1, None), "train.ckpt_every": (0, None), "train.keep_checkpoints": (1, None),
    "train.eval_every": (0, None), "train.max_nonfinite_steps": (1, None), "eval.batch_size": (1, None),
    "train.seed": (0, 2**32 - 1), "train.stop_grace_s": (0.0, None), "optim.betas": (0.0, 0.999999),
}


def _check_range(key: str, value: Any, source: str) -> None:
    if key == "optim.betas" and isinstance(value, list) and len(value) != 2:
        raise ConfigError(f"{source}: 'optim.betas' must be two numbers [beta1, beta2], got {value!r}")
    if isinstance(value, list):  # bounds apply to each item
        for item in value:
            _check_range(key, item, source)
        return
    if key not in _RANGES or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high = _RANGES[key]
    if (low is not None and value < low) or (high is not None and value > high) or value != value:
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise ConfigError(f"{source}: '{key}' must be {bounds}, got {value!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                pass
        raise ConfigError(f"{source}: '{key}' must be {tp}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, source)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads '3e-4' (no dot) as a string; a user writing it means the number.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is Any:
        return value
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{full}'{hint}")
        kwargs[key] = _coerce(value, hints[key], full, source)
        if full in _CHOICES and kwargs[key] not in _CHOICES[full]:
            raise ConfigError(f"{source}: '{full}' must be one of {_CHOICES[full]}, got {value!r}")
        _check_range(full, kwargs[key], source)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    # YAML gives numbers, booleans, lists and strings the way a user would write them on a command line.
    return yaml.safe_load(text) if text != "" else ""


def _apply_override(tree: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set: expected key=value, got {assignment!r}")
    key, text = assignment.split("=", 1)
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set: '{key}' goes through a value that is not a section")
    node[parts[-1]] = _parse_value(text)


def load_config(path: str | Path | None, overrides: list[str] = (), cls: type = RunConfig) -> Any:
    """Load a YAML config into `cls`, applying dotted overrides (`optim.lr=3e-4`) on top.

    Raises ConfigError naming the key and the file (or `--set`) for anything unknown or mistyped.
    """
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a YAML config (binary content)") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections")
    # Check the file on its own first so an error names the file, then the overrides.
    _build(cls, tree, "", source)
    for assignment in overrides:
        _apply_override(tree, assignment)
    return _build(cls, tree, "", f"{source} + --set" if overrides else source)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    # Written under a temporary name and renamed, so a killed run never leaves half a config behind.
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)
