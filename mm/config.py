"""Typed run configs: YAML files loaded into dataclasses, with dotted `--set key=value` overrides.

Loading is strict: an unknown or misspelt key, or a value of the wrong type, raises ConfigError naming
the key and the file before any compute starts. Relative input paths (shards, checkpoints, the
DeepSpeed json) resolve against the config file's folder or a folder above it where they exist, else
the current directory (resolve_relative_paths), so a config works from any directory. Each task
declares its own `model` section; the `data`, `optim` and `train` sections are shared by every task.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import sys
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
    max_bad_fraction: float = 0.1  # stop when more than this share of samples is corrupt
    # Image-text samples with several captions (json `captions`, as mm-shards coco writes): "draw" one
    # per sample and epoch (seeded: resume sees the same), or "first" (the txt caption only).
    captions: str = "draw"
    # Further attempts at a remote shard (http(s)://, pipe:, s3:) whose request fails or whose
    # connection drops; a shard still failing is lost from there and counted (url_error, connection_lost).
    retries: int = 2


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
    # Contrastive batch beyond memory (open_clip's --accum-freq): k micro-batches are embedded without
    # gradients, then each is re-embedded with gradients against all k's cached features; one optimizer
    # step sees the loss of one k-times-larger batch. 1 = off. Tasks with an embed/loss split only.
    contrastive_accum: int = 1
    # Activation checkpointing of the towers / encoder blocks: recompute activations in backward.
    grad_checkpointing: bool = False
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

    # Keys of earlier versions: old dotted name -> new dotted name ("" = dropped, it was never read).
    # Configs, run directories and exports written before a move still load (`migrate`).
    MOVED: typing.ClassVar[dict[str, str]] = {"data.image_size": "", "data.context_length": ""}


_CHOICES = {"train.precision": ("fp32", "bf16", "fp16")}
# Inclusive bounds (None: unbounded) for the shared sections; a value outside fails at load time.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "data.batch_size": (1, None), "data.num_workers": (0, None), "data.shuffle_buffer": (0, None),
    "data.max_bad_fraction": (0.0, 1.0),
    "data.samples_per_epoch": (0, None), "data.retries": (0, None),
    "optim.lr": (0.0, None), "optim.weight_decay": (0.0, None), "optim.eps": (0.0, None),
    "optim.warmup_steps": (0, None), "optim.min_lr_ratio": (0.0, 1.0),
    "train.steps": (1, None), "train.grad_accum": (1, None), "train.contrastive_accum": (1, None),
    "train.grad_clip": (0.0, None),
    "train.log_every": (1, None), "train.ckpt_every": (0, None), "train.keep_checkpoints": (1, None),
    "train.eval_every": (0, None), "train.max_nonfinite_steps": (1, None), "eval.batch_size": (1, None),
    # STRUCTURE's cache and layer selection (mm-structure); 0 means "all" / "default" where allowed.
    "cache.batch_size": (1, None), "cache.num_workers": (0, None), "cache.part_size": (1, None),
    "cache.max_samples": (0, None), "select.n": (0, None), "select.k": (0, None),
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


def migrate(cls: type, tree: dict) -> list[str]:
    """Move (or drop) the keys `cls.MOVED` names, in place; returns one note per key moved. A key set
    at both its old and its new place keeps the new value."""
    notes = []
    for old, new in getattr(cls, "MOVED", {}).items():
        *path, leaf = old.split(".")
        node = tree
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        if not new:
            notes.append(f"'{old}' is no longer used; ignored")
            continue
        *new_path, new_leaf = new.split(".")
        target = tree
        for part in new_path:
            target = target.setdefault(part, {})
        target.setdefault(new_leaf, value)
        notes.append(f"'{old}' is now '{new}'")
    return notes


def build_config(cls: type, tree: Any, source: str) -> Any:
    """A config of class `cls` from a plain mapping (a saved config, an export's metadata), with keys of
    earlier versions moved to their current place; ConfigError names `source` for anything else."""
    if isinstance(tree, dict):
        tree = json.loads(json.dumps(tree))  # a deep copy: migrate works in place
        migrate(cls, tree)
    return _build(cls, tree, "", source)


def _check_data(data: DataConfig, prefix: str, source: str) -> None:
    """Values of the data section that only make sense together, checked before any run directory exists."""
    weights = data.train_weights
    if not weights:
        return
    key = f"{prefix}.train_weights"
    if any(not w >= 0 or w == float("inf") for w in weights) or not sum(weights) > 0:
        raise ConfigError(f"{source}: '{key}' must be finite, >= 0 and not all 0 (each source is drawn in "
                          f"proportion to its weight), got {weights}")
    if data.train:
        n = len([part for part in data.train.split("::") if part.strip()])
        if n != len(weights):
            raise ConfigError(f"{source}: '{key}' has {len(weights)} weights for {n} source(s) in "
                              f"'{prefix}.train' (sources are separated by '::')")
    if not data.resampled:
        raise ConfigError(f"{source}: '{key}' needs '{prefix}.resampled: true' (weighted mixing draws shards "
                          "with replacement)")


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


# Input paths a config may give relative to itself (see resolve_relative_paths). Outputs (train.out_dir)
# stay relative to the current directory.
PATH_KEYS = ("data.train", "data.val", "train.deepspeed_config", "model.checkpoint", "eval.zeroshot_data",
             "eval.classnames", "eval.templates", "model.encoder_weights")


def _first_expansion(pattern: str) -> str:
    """The first file a shard pattern names: a/{000..019}.tar -> a/000.tar, {x,y} -> x."""
    pattern = re.sub(r"\{([^{}]*?)\.\.[^{}]*\}", r"\1", pattern)
    return re.sub(r"\{([^{},]*),[^{}]*\}", r"\1", pattern)


def _resolve_one(value: str, folders: list[Path]) -> str:
    if not value or "://" in value or value.startswith(("pipe:", "/", "~")):
        return value
    probe = _first_expansion(value)
    for folder in folders:
        if (folder / probe).exists():
            return str(folder / value)
    return value


def resolve_relative_paths(tree: dict, config_dir: Path) -> None:
    """Make a config's relative input paths (PATH_KEYS) work from any current directory: each is
    looked up in the config file's folder, then in every folder above it, and the first folder where
    it exists is prepended (configs/topolora_sam/x.yaml naming data/drive/... finds the repository's
    data/ two levels up); a path found nowhere is left as written, relative to the current directory.
    Shard patterns are checked by their first shard; '::' separates sources, each resolved on its
    own. Values given with --set are not touched (they are relative to the current directory)."""
    folders = [config_dir, *config_dir.parents]
    for key in PATH_KEYS:
        section, name = key.split(".")
        node = tree.get(section)
        if not isinstance(node, dict) or not isinstance(node.get(name), str):
            continue
        node[name] = "::".join(_resolve_one(part, folders) for part in node[name].split("::"))


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
    if path is not None:
        resolve_relative_paths(tree, Path(path).resolve().parent)
    for note in migrate(cls, tree):
        print(f"note: {source}: {note}", file=sys.stderr)
    # Check the file on its own first so an error names the file, then the overrides.
    _build(cls, tree, "", source)
    for assignment in overrides:
        _apply_override(tree, assignment)
    for note in migrate(cls, tree):
        print(f"note: --set: {note}", file=sys.stderr)
    cfg = _build(cls, tree, "", f"{source} + --set" if overrides else source)
    if isinstance(getattr(cfg, "data", None), DataConfig):
        _check_data(cfg.data, "data", f"{source} + --set" if overrides else source)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    # Written under a temporary name and renamed, so a killed run never leaves half a config behind.
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)
