"""The offload configs' optimizer: DeepSpeed's CPU Adam where its op builds, the same AdamW update as
torch's (decoupled weight decay, bias correction); torch's AdamW with one line where it does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mm.config import OptimConfig
from mm.engine.trainer import make_optimizer, offloads_optimizer, param_groups

ROOT = Path(__file__).resolve().parents[1]


def ds(name: str) -> dict:
    return json.loads((ROOT / "configs/ds" / name).read_text())


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))


def _same_steps_as_torch_adamw(a: torch.nn.Module, opt_a: torch.optim.Optimizer, b: torch.nn.Module,
                               cfg: OptimConfig, rtol: float, atol: float) -> None:
    """Three steps of `opt_a` on `a` and of torch's default AdamW on the twin `b` end at the same weights."""
    opt_b = torch.optim.AdamW(param_groups(b, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    x = torch.randn(8, 16)
    for _ in range(3):
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol)


def test_only_the_offload_configs_offload():
    assert offloads_optimizer(ds("zero2_offload.json")) and offloads_optimizer(ds("zero3_offload.json"))
    assert not any(offloads_optimizer(ds(f"zero{s}.json")) for s in (1, 2, 3))
    opt = make_optimizer(param_groups(model(), 0.1), OptimConfig(), ds("zero2.json"))
    assert type(opt) is torch.optim.AdamW


def test_cpu_adam_steps_as_torch_adamw(capsys):
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, betas=[0.9, 0.98], eps=1e-6)
    a, b = model(), model()
    opt_a = make_optimizer(param_groups(a, cfg.weight_decay), cfg, ds("zero2_offload.json"))
    if type(opt_a) is torch.optim.AdamW:
        pytest.skip(f"DeepSpeed's cpu_adam op does not build here: {capsys.readouterr().err.strip()}")
    assert type(opt_a).__name__ == "DeepSpeedCPUAdam"
    _same_steps_as_torch_adamw(a, opt_a, b, cfg, rtol=1e-5, atol=1e-6)


def test_falls_back_to_torch_adamw_in_one_line(monkeypatch, capsys):
    import deepspeed.ops.adam as ds_adam

    class Broken:
        def __init__(self, *a, **k):
            raise RuntimeError("Error building extension 'cpu_adam'\nc++: not found")

    monkeypatch.setattr(ds_adam, "DeepSpeedCPUAdam", Broken)
    opt = make_optimizer(param_groups(model(), 0.1), OptimConfig(), ds("zero3_offload.json"))
    assert type(opt) is torch.optim.AdamW
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "c++: not found" in err and "torch's AdamW" in err


def test_torch_adamw_is_fused_and_steps_as_the_plain_one():
    """Without offload, mm's AdamW is torch's fused kernel (ZeRO hands it one flat tensor per group, which
    the op-by-op AdamW streams through memory several times a step): the same update as torch's default."""
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, betas=[0.9, 0.98], eps=1e-6)
    a, b = model(), model()
    opt_a = make_optimizer(param_groups(a, cfg.weight_decay), cfg, ds("zero1.json"))
    assert opt_a.defaults["fused"] is True
    _same_steps_as_torch_adamw(a, opt_a, b, cfg, rtol=1e-6, atol=1e-7)
