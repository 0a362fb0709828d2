"""train.contrastive_accum (open_clip's --accum-freq): k micro-batches embedded without gradients, then
each re-embedded with gradients against all cached features, give the loss and the gradients of one
k-times-larger batch. In-process (one rank, an engine stand-in that backpropagates as DeepSpeed does
with gradient_accumulation_steps=k) against plain autograd on the big batch; the 2-rank DeepSpeed
check is tests/dist/accum_check.py (tests/test_grad_checkpointing.py launches it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mm.config import load_config
from mm.errors import ConfigError, UserError
from mm.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
K, B = 3, 4


class AveragingEngine:
    """What the accumulation path uses of a DeepSpeed engine: forward, and a backward that divides the
    loss by gradient_accumulation_steps (DeepSpeed's micro-step averaging)."""

    def __init__(self, module: torch.nn.Module, gas: int) -> None:
        self.module, self.gas = module, gas

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.gas).backward()

    def step(self) -> None:
        pass


def micro_batches(name: str, shapes: dict, overrides: list[str] = ()) -> tuple:
    cls = TASKS[name]
    cfg = load_config(ROOT / "configs" / name / "tiny.yaml",
                      [f"data.train={shapes['train']}", f"data.batch_size={B}", "data.num_workers=0",
                       "data.shuffle_buffer=10", *overrides], cls.config_class)
    task = cls(cfg)
    it = iter(task.batches("train"))
    return task, [next(it) for _ in range(K)]


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["clip", "filip", "structure_clip"])
def test_accumulated_loss_and_gradients_equal_the_big_batch(name, shapes):
    from mm.engine.trainer import contrastive_accum_backward, merge_batches

    task, batches = micro_batches(name, shapes)
    torch.manual_seed(0)
    model = task.build_model()
    model.train()

    big = task.losses(model, merge_batches(batches), 0)
    big["loss"].backward()
    reference = grads(model)
    model.zero_grad(set_to_none=True)

    losses, bad = contrastive_accum_backward(task, AveragingEngine(model, K), batches)
    accumulated = grads(model)
    assert bad == []
    assert losses["loss"].item() == pytest.approx(big["loss"].item(), rel=1e-5)
    assert accumulated.keys() == reference.keys() and len(reference) > 10
    for n, g in reference.items():
        torch.testing.assert_close(accumulated[n], g, rtol=1e-4, atol=1e-6, msg=n)

    # The big batch's negatives matter: a plain accumulation of k separate micro-batch losses (what
    # train.grad_accum does) gives other gradients.
    model.zero_grad(set_to_none=True)
    for batch in batches:
        (task.losses(model, batch, 0)["loss"] / K).backward()
    plain = grads(model)
    assert max((plain[n] - g).abs().max().item() for n, g in reference.items()) > 1e-4


def test_dropout_draws_the_same_masks_in_both_passes(shapes):
    """The RNG is replayed per micro-batch: with dropout on, the gradients still equal those of the big
    batch embedded with the same masks (each micro-batch embedded in turn from the same RNG states)."""
    from mm.engine.trainer import contrastive_accum_backward, merge_batches

    task, batches = micro_batches("clip", shapes)
    torch.manual_seed(0)
    model = task.build_model()
    model.visual.register_forward_hook(lambda m, i, out: torch.nn.functional.dropout(out, 0.3, m.training))
    model.train()

    torch.manual_seed(5)
    contrastive_accum_backward(task, AveragingEngine(model, K), batches)
    accumulated = grads(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(5)
    parts = [task.embed(model, b) for b in batches]
    merged = {k: torch.cat([p[k] for p in parts]) if v.ndim else v for k, v in parts[0].items()}
    task.loss_from_embeddings(merged, merge_batches(batches))["loss"].backward()
    reference = grads(model)
    for n, g in reference.items():
        torch.testing.assert_close(accumulated[n], g, rtol=1e-4, atol=1e-6, msg=n)

    # Without the replay the second pass would draw other masks: the gradients would differ.
    model.zero_grad(set_to_none=True)
    torch.manual_seed(6)
    contrastive_accum_backward(task, AveragingEngine(model, K), batches)
    assert max((model.get_parameter(n).grad - g).abs().max().item() for n, g in reference.items()) > 1e-4


def test_non_finite_loss_backpropagates_nothing(shapes):
    from mm.engine.trainer import contrastive_accum_backward

    task, batches = micro_batches("clip", shapes)
    model = task.build_model()
    calls = []

    class Counting(AveragingEngine):
        def backward(self, loss):
            calls.append(loss)

    _, bad = contrastive_accum_backward(task, Counting(model, K), batches, check=lambda losses: ["loss"])
    assert bad == ["loss"] and calls == []


def test_bad_values_are_refused_in_one_line(shapes):
    from mm.engine.trainer import check_contrastive_accum

    with pytest.raises(ConfigError, match="'train.contrastive_accum' must be >= 1"):
        micro_batches("clip", shapes, ["train.contrastive_accum=0"])
    cls = TASKS["unet"]
    cfg = load_config(ROOT / "configs/unet/tiny.yaml", ["train.contrastive_accum=2"], cls.config_class)
    with pytest.raises(UserError, match="the unet task has no embedding/loss split") as e:
        check_contrastive_accum(cls(cfg))
    assert "\n" not in str(e.value)
    assert check_contrastive_accum(TASKS["clip"](None)) == 1
