"""GPU-marked checks (skipped without CUDA; bench/gpu_check.sh runs them with `pytest -m gpu`)."""

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
    "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1",
    "model.arch.text_cfg.context_length=12", "data.batch_size=8", "data.num_workers=1", "optim.warmup_steps=1",
    "train.log_every=1", "train.ckpt_every=2", "eval.zeroshot_data=", "train.precision=bf16",
]


@pytest.mark.gpu
def test_chunked_filip_loss_equals_the_dense_loss_on_cuda():
    from mm.losses.filip import filip_loss

    gen = torch.Generator().manual_seed(0)
    v = torch.randn(16, 49, 32, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    t = torch.randn(16, 12, 32, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    vm = torch.ones(16, 49, dtype=torch.bool, device="cuda")
    tm = torch.ones(16, 12, dtype=torch.bool, device="cuda")
    tm[:, 7:] = False
    scale = torch.tensor(50.0, dtype=torch.float64, device="cuda")
    ours = filip_loss(v, vm, t, tm, scale, chunk_size=4, gather=False)["loss"]
    gv, gt = torch.autograd.grad(ours, (v, t))
    # Dense reference: every similarity materialised.
    vn, tn = torch.nn.functional.normalize(v, dim=-1), torch.nn.functional.normalize(t, dim=-1)
    sim = torch.einsum("ikd,jrd->ijkr", vn, tn)
    i2t = sim.masked_fill(~tm[None, :, None, :], float("-inf")).max(3).values.mean(2)
    t2i = torch.where(tm[None], sim.max(2).values, 0).sum(2) / tm.sum(1)[None]
    labels = torch.arange(16, device="cuda")
    ref = (torch.nn.functional.cross_entropy(scale * i2t, labels)
           + torch.nn.functional.cross_entropy(scale * t2i.T, labels)) / 2
    rv, rt = torch.autograd.grad(ref, (v, t))
    assert torch.allclose(ours, ref) and torch.allclose(gv, rv) and torch.allclose(gt, rt)


@pytest.mark.gpu
def test_bf16_training_on_cuda_resumes_and_skips_nothing(shapes, tmp_path):
    """One rank on the GPU under ZeRO-2 in bf16: the loss is finite throughout, the run resumes from its
    checkpoint to the same weights as the uninterrupted run (to bf16 step noise), the export loads."""
    import shutil

    from safetensors.torch import load_file

    from mm.config import load_config
    from mm.engine.trainer import init_distributed, train
    from mm.tasks import get_task

    init_distributed()
    task = get_task("clip")
    common = TINY + [f"data.train={shapes['train']}", "train.steps=4", "train.keep_checkpoints=5",
                     f"train.deepspeed_config={ROOT}/configs/ds/zero2.json"]
    a = train(task, load_config(ROOT / "configs/clip/tiny.yaml", common + [f"train.out_dir={tmp_path / 'a'}"],
                                task.config_class))
    assert a["step"] == 4 and a["skipped_steps"] == 0
    losses = [json.loads(x)["loss"] for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert all(v == v and abs(v) < 1e4 for v in losses)
    (tmp_path / "b/checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a/checkpoints/step00000002", tmp_path / "b/checkpoints/step00000002")
    b = train(task, load_config(ROOT / "configs/clip/tiny.yaml", common + [f"train.out_dir={tmp_path / 'b'}"],
                                task.config_class))
    wa, wb = load_file(a["export"]), load_file(b["export"])
    # GPU kernels may reduce in another order on the second run: agreement to well within a step.
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-3
