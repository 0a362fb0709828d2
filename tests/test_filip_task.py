"""The FILIP trainer: model, task, token-wise zero-shot, and 2-rank training under ZeRO-2/3."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mm.config import load_config
from mm.errors import UserError
from mm.losses.filip import filip_loss
from mm.metrics.zeroshot import tokenwise_logits
from mm.models.filip import text_token_mask
from mm.tasks import get_task
from mm.tasks.filip import FilipRunConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
    "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1",
    "model.embed_dim=24",
]


@pytest.fixture(scope="module")
def task_cfg():
    cfg = load_config(ROOT / "configs/filip/tiny.yaml", TINY, FilipRunConfig)
    return get_task("filip", cfg), cfg


@pytest.fixture(scope="module")
def model(task_cfg):
    task, cfg = task_cfg
    torch.manual_seed(0)
    return task.build_model().eval()


def _texts(n: int = 4, length: int = 16) -> torch.Tensor:
    from open_clip.tokenizer import SimpleTokenizer

    captions = ["a red circle", "a blue square left of a green triangle", "square", "a picture of a shape"]
    return SimpleTokenizer(context_length=length)(captions[:n])


def test_task_and_configs_build(task_cfg, model):
    task, cfg = task_cfg
    assert task.name == "filip" and isinstance(cfg, FilipRunConfig)
    assert cfg.model.embed_dim == 24 and cfg.train.out_dir == "runs/demo-filip"
    base = load_config(ROOT / "configs/filip/base.yaml", [], task.config_class)
    assert base.model.name == "ViT-B-32" and base.model.embed_dim == 256 and base.train.precision == "bf16"
    assert base.loss.gather_dtype == "bf16"
    with pytest.raises(UserError, match="loss.gather_dtype"):
        get_task("filip", load_config(ROOT / "configs/filip/tiny.yaml", TINY + ["loss.gather_dtype=fp8"],
                                      task.config_class))


def test_memory_settings_of_earlier_versions_are_read_as_loss_settings(tmp_path):
    """A config written when chunk_size, gather_dtype and keep_image_tokens sat under `model:` loads with
    them under `loss:`, and the task's loss module uses them."""
    old = tmp_path / "old.yaml"
    old.write_text("task: filip\nmodel:\n  embed_dim: 24\n  chunk_size: 3\n  gather_dtype: fp16\n"
                   "  keep_image_tokens: 0.5\ndata:\n  image_size: 32\n")
    cfg = load_config(old, [], FilipRunConfig)
    assert (cfg.loss.chunk_size, cfg.loss.gather_dtype, cfg.loss.keep_image_tokens) == (3, "fp16", 0.5)
    loss = get_task("filip", cfg).loss
    assert (loss.chunk_size, loss.gather_dtype, loss.keep_image_tokens) == (3, torch.float16, 0.5)


def test_token_reduction_settings_reach_the_loss_and_bad_values_are_refused():
    cfg = load_config(ROOT / "configs/filip/tiny.yaml", TINY + ["loss.keep_image_tokens=0.25",
                                                                "loss.keep_text_tokens=0.25"], FilipRunConfig)
    loss = get_task("filip", cfg).loss
    assert (loss.keep_image_tokens, loss.keep_text_tokens) == (0.25, 0.25)
    default = get_task("filip", load_config(ROOT / "configs/filip/tiny.yaml", TINY, FilipRunConfig))
    assert default.loss.keep_text_tokens is None  # 0 = off
    with pytest.raises(UserError, match=r"loss.keep_text_tokens must be in \[0, 1\]"):
        get_task("filip", load_config(ROOT / "configs/filip/tiny.yaml", TINY + ["loss.keep_text_tokens=1.5"],
                                      FilipRunConfig))


def test_clutter_configs_compare_like_with_like():
    clip = load_config(ROOT / "configs/clip/clutter.yaml", [], get_task("clip").config_class)
    filip = load_config(ROOT / "configs/filip/clutter.yaml", [], FilipRunConfig)
    assert clip.model.arch == filip.model.arch and clip.optim == filip.optim and clip.data == filip.data
    assert (clip.train.steps, clip.eval.zeroshot_data) == (filip.train.steps, filip.eval.zeroshot_data)


def test_every_parameter_trains_and_gets_a_gradient(task_cfg, model):
    task, _ = task_cfg
    assert all(p.requires_grad for p in model.parameters())
    model.zero_grad()
    torch.manual_seed(1)
    losses = task.losses(model, {"image": torch.randn(4, 3, 32, 32), "text": _texts()}, 0)
    assert set(losses) == {"loss", "loss_i2t", "loss_t2i", "logit_scale"}
    assert all(v.ndim == 0 for v in losses.values())
    losses["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert abs(losses["logit_scale"].item() - 1 / 0.07) < 1e-3
    model.zero_grad()


def test_forward_shapes(model):
    out = model(torch.randn(3, 3, 32, 32), _texts(3))
    assert out["image_tokens"].shape == (3, 64, 24)  # 8x8 patches, no CLS
    assert out["image_mask"].shape == (3, 64) and bool(out["image_mask"].all())
    assert out["text_tokens"].shape == (3, 16, 24)
    # "a red circle" -> SOT a red circle EOT: the 3 words + EOT are matched, SOT and pads are not.
    assert out["text_mask"][0].tolist() == [False, True, True, True, True] + [False] * 11
    assert out["logit_scale"].ndim == 0


def test_logit_scale_is_clamped_in_value_not_in_place(model):
    with torch.no_grad():
        model.logit_scale.fill_(6.0)
    try:
        out = model(torch.randn(2, 3, 32, 32), _texts(2))
        assert out["logit_scale"].item() == pytest.approx(100.0)
        assert model.logit_scale.item() == pytest.approx(6.0)
    finally:
        with torch.no_grad():
            model.logit_scale.fill_(torch.log(torch.tensor(1 / 0.07)).item())


def _loss(model, image, text):
    out = model(image, text)
    return filip_loss(out["image_tokens"], out["image_mask"], out["text_tokens"], out["text_mask"],
                      out["logit_scale"])["loss"]


def test_pad_tokens_never_change_the_loss(model):
    torch.manual_seed(2)
    image = torch.randn(4, 3, 32, 32)
    short = _texts(4, 12)
    padded = torch.cat([short, torch.zeros(4, 4, dtype=short.dtype)], 1)  # more pads appended
    mask = text_token_mask(padded)
    assert torch.equal(mask[:, :12], text_token_mask(short)) and not bool(mask[:, 12:].any())
    junk = padded.clone()
    after_eot = torch.arange(16)[None] > (padded == 49407).int().argmax(1, keepdim=True)
    junk[after_eot] = 320  # whatever sits after EOT is never matched (causal text tower + mask)
    with torch.no_grad():
        out = model(image, padded)
        ref = filip_loss(out["image_tokens"], out["image_mask"], out["text_tokens"], out["text_mask"],
                         out["logit_scale"])["loss"]
        # Dropping the appended pad positions altogether gives the same loss ...
        cut = filip_loss(out["image_tokens"], out["image_mask"], out["text_tokens"][:, :12],
                         out["text_mask"][:, :12], out["logit_scale"])["loss"]
        assert torch.allclose(cut, ref, atol=1e-6)
        # ... and so does putting arbitrary tokens where the pads were.
        assert torch.allclose(_loss(model, image, junk), ref, atol=1e-5)
        assert torch.allclose(model.encode_text(junk), model.encode_text(padded), atol=1e-5)


def test_pooled_embeddings_are_unit_norm(model):
    with torch.no_grad():
        img = model.encode_image(torch.randn(3, 3, 32, 32))
        txt = model.encode_text(_texts(3))
    assert img.shape == txt.shape == (3, 24)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)


def _reference_scores(img, img_mask, txt, txt_mask, n_classes, n_templates):
    """Plain loops: score(i, c) = mean over templates t of mean over valid k of max over valid r <v_k, t_r>."""
    out = torch.zeros(img.shape[0], n_classes)
    for i in range(img.shape[0]):
        v = F.normalize(img[i][img_mask[i]].double(), dim=-1)
        for c in range(n_classes):
            total = 0.0
            for t in range(n_templates):
                row = c * n_templates + t
                w = F.normalize(txt[row][txt_mask[row]].double(), dim=-1)
                total += (v @ w.T).max(1).values.mean().item()
            out[i, c] = 100.0 * total / n_templates
    return out


def test_tokenwise_logits_equal_a_plain_reference():
    gen = torch.Generator().manual_seed(3)
    n_classes, n_templates = 5, 3
    img = torch.randn(6, 7, 8, generator=gen)
    img_mask = torch.rand(6, 7, generator=gen) > 0.3
    img_mask[:, 0] = True
    txt = torch.randn(n_classes * n_templates, 5, 8, generator=gen)
    txt_mask = torch.rand(n_classes * n_templates, 5, generator=gen) > 0.4
    txt_mask[:, 0] = True
    got = tokenwise_logits(img, img_mask, txt, txt_mask, n_classes, chunk_size=4)
    want = _reference_scores(img, img_mask, txt, txt_mask, n_classes, n_templates)
    assert torch.allclose(got.float(), want, atol=1e-4)


def test_tokenwise_zeroshot_equals_a_plain_reference(model, shapes):
    from mm.data.classnames import load_classnames, load_templates
    from mm.data.image_text import image_text_map
    from mm.data.loader import Loader, StreamSpec, default_collate
    from mm.data.streams import labelled_map, labelled_shard_batches
    from mm.metrics.zeroshot import classification_metrics, evaluate_zeroshot_batches
    from mm.models.clip import clip_preprocess, clip_tokenizer

    cfg = load_config(ROOT / "configs/filip/tiny.yaml", TINY, FilipRunConfig).model
    tok, pre = clip_tokenizer(cfg), clip_preprocess(cfg, False)
    classnames, templates = load_classnames("shapes"), load_templates("shapes")
    batches = labelled_shard_batches(pre, tok, str(shapes["val"]), len(classnames), 10)
    got = evaluate_zeroshot_batches(model, tok, batches, classnames, templates, scoring="tokenwise")

    spec = StreamSpec(urls=str(shapes["val"]), sample_map=labelled_map(image_text_map(pre, tok, False),
                                                                       len(classnames)),
                      collate=default_collate, batch_size=100, shuffle_buffer=0, repeat=False, drop_last=False)
    batch = next(iter(Loader(spec)))
    with torch.no_grad():
        img, img_mask = model.encode_image_tokens(batch["image"])
        prompts = tok([t.format(c) for c in classnames for t in templates])
        txt, txt_mask = model.encode_text_tokens(prompts)
    scores = _reference_scores(img, img_mask, txt, txt_mask, len(classnames), len(templates))
    want = classification_metrics(scores, batch["label"], len(classnames))
    assert got["n_images"] == len(batch["label"]) == 2 * len(classnames)
    for k, v in want.items():
        assert got[k] == pytest.approx(v), k


@pytest.fixture(scope="module")
def dist_results(torchrun, shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("filip")
    proc = torchrun(ROOT / "tests/dist/filip_check.py", shapes["train"], str(shapes["val"]), str(out), "2,3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("stage", ["2", "3"])
def test_two_rank_training_lowers_the_loss(dist_results, stage):
    r = dist_results[stage]
    assert r["step"] == 8 and len(r["losses"]) == 8
    assert sum(r["losses"][-3:]) / 3 < sum(r["losses"][:3]) / 3 - 0.05


@pytest.mark.parametrize("stage", ["2", "3"])
def test_export_loads_and_gives_the_engine_pooled_embedding(dist_results, stage):
    assert dist_results[stage]["export_output_diff"] < 1e-5


@pytest.mark.parametrize("stage", ["2", "3"])
def test_evaluation_reports_pooled_and_tokenwise_zeroshot(dist_results, stage):
    ev = dist_results[stage]["eval"]
    for key in ("zeroshot/acc1", "zeroshot/acc5", "zeroshot_tokenwise/acc1", "zeroshot_tokenwise/acc5",
                "zeroshot_tokenwise/mean_per_class_recall"):
        assert 0.0 <= ev[key] <= 1.0, key
    assert ev["zeroshot/n_images"] == 24


@pytest.mark.parametrize("stage", ["2", "3"])
def test_periodic_zeroshot_is_logged_and_equals_the_exported_models(dist_results, stage):
    r = dist_results[stage]
    assert r["zeroshot_logged_at"] == [4, 8]  # train.eval_every=4, plus the final evaluation
    for key, value in r["eval_of_export"].items():
        assert r["eval"][key] == pytest.approx(value, abs=1e-6), key


def test_zeroshot_cli_on_the_export_gives_the_training_time_evaluation(dist_results, shapes, capsys, tmp_path):
    """mm-zeroshot on a FILIP export (trained under ZeRO-3), pooled and token-wise, reproduces the
    evaluation the trainer logged at the end of training."""
    from mm.evaluate.zeroshot import main

    r = dist_results["3"]
    for scoring, prefix in (("pooled", "zeroshot"), ("tokenwise", "zeroshot_tokenwise")):
        out = tmp_path / f"{scoring}.json"
        assert main(["--checkpoint", r["export"], "--data", str(shapes["val"]), "--scoring", scoring,
                     "--output", str(out)]) == 0
        assert capsys.readouterr().out.startswith(f"zero-shot filip ({scoring}): acc1 ")
        metrics = json.loads(out.read_text())["metrics"]
        for key in ("acc1", "acc5", "mean_per_class_recall"):
            assert metrics[key] == pytest.approx(r["eval"][f"{prefix}/{key}"], abs=1e-6), (scoring, key)
