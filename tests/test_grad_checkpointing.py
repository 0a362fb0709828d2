"""train.grad_checkpointing: the towers' (open_clip's set_grad_checkpointing) and SAM's image-encoder
blocks' activations are recomputed in backward; the gradients are those without it (in-process, every
task that has it). Under DeepSpeed with 2 ranks (tests/dist/accum_check.py, one launch): the same
gradients under ZeRO-3, and train.contrastive_accum against the big batch under ZeRO-2 and ZeRO-3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mm.config import load_config
from mm.errors import UserError
from mm.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
# The attention inside each block (open_clip's and segment_anything's): it runs again in a recomputation.
ATTENTION = ("MultiheadAttention", "Attention")


def batch_for(name: str, shapes: dict, overrides: tuple = ()) -> tuple:
    cls = TASKS[name]
    cfg = load_config(ROOT / "configs" / name / "tiny.yaml",
                      [f"data.train={shapes['train']}", "data.batch_size=4", "data.num_workers=0",
                       "data.shuffle_buffer=10", *overrides], cls.config_class)
    task = cls(cfg)
    return task, next(iter(task.batches("train")))


def gradients_and_block_calls(task, model, batch) -> tuple[dict, int]:
    # Pre-hooks: a recomputation stops early, after the block's last saved tensor.
    calls = []
    # Only the towers' and the image encoder's blocks count (not the KEE's, nor SAM's mask decoder's).
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for n, m in model.named_modules()
             if type(m).__name__ in ATTENTION and ("resblocks." in n or "image_encoder.blocks." in n)]
    model.zero_grad(set_to_none=True)
    task.losses(model, batch, 0)["loss"].backward()
    for h in hooks:
        h.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("name", ["clip", "filip", "structure_clip", "topolora_sam"])
def test_checkpointed_gradients_equal_the_plain_ones(name, shapes):
    task, batch = batch_for(name, shapes)
    torch.manual_seed(0)
    model = task.build_model()
    model.train()
    plain, plain_calls = gradients_and_block_calls(task, model, batch)
    model.set_grad_checkpointing(True)
    checkpointed, calls = gradients_and_block_calls(task, model, batch)
    # Every block ran again in backward: its activations were not kept.
    assert plain_calls > 0 and calls == 2 * plain_calls
    assert checkpointed.keys() == plain.keys()
    for n, g in plain.items():
        torch.testing.assert_close(checkpointed[n], g, rtol=1e-4, atol=1e-6, msg=n)
    if name == "topolora_sam":
        # LoRA sits inside the frozen, checkpointed blocks: it must still learn.
        lora = [n for n in checkpointed if "lora_" in n]
        assert lora and all(checkpointed[n].abs().sum() > 0 for n in lora if "lora_B" in n)


def test_a_model_without_it_is_refused_in_one_line(shapes):
    from mm.engine.trainer import apply_grad_checkpointing

    cls = TASKS["unet"]
    cfg = load_config(ROOT / "configs/unet/tiny.yaml", ["train.grad_checkpointing=true"], cls.config_class)
    task = cls(cfg)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="train.grad_checkpointing: the unet task's model has no activation") as e:
        apply_grad_checkpointing(task, model)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def dist_results(torchrun, shapes, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("accum")
    proc = torchrun(ROOT / "tests/dist/accum_check.py", shapes["train"], str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("case", ["clip-z2", "filip-z2", "structure_clip-z2", "clip-z3-ckpt"])
def test_two_ranks_contrastive_accum_equals_the_big_batch(dist_results, case):
    r = dist_results[case]
    assert r["n_grads"] > 10
    assert r["loss_diff"] < 1e-5 * max(1.0, abs(r["loss"]))
    assert r["max_grad_diff"] <= 1e-4 * max(r["max_grad"], 1e-3), r


def test_two_ranks_zero3_checkpointed_sam_gradients_equal_the_plain_ones(dist_results):
    r = dist_results["topolora_sam-z3-ckpt"]
    assert r["n_grads"] > 5 and r["n_lora"] > 0
    assert r["max_grad_diff"] <= 1e-4 * max(r["max_grad"], 1e-3), r


def test_two_ranks_train_runs_with_both_keys_under_zero3(dist_results):
    r = dist_results["train"]
    assert r["step"] == 2 and r["finite"]
    # 2 ranks x contrastive_accum 2 x batch 4 per optimizer step.
    assert r["global_batch_per_step"] == 16
