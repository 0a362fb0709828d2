"""OpenAI weights run as OpenAI's model (QuickGELU), and images are preprocessed as the model says
(its open_clip preprocess_cfg) in training, in evaluation and in the export's metadata."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import yaml
from PIL import Image

from mm.models.clip import (
    ClipModelConfig,
    architecture_preprocess_cfg,
    build_clip,
    clip_preprocess,
    is_openai_archive,
    quickgelu_twin,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _features(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 3, 32, 32, generator=g)
    text = torch.randint(1, 400, (2, 16), generator=g)
    with torch.no_grad():
        return model.encode_image(image), model.encode_text(text)


def _reference(arch: dict, quick: bool):
    from open_clip.model import CLIP

    torch.manual_seed(0)
    return CLIP(**arch, quick_gelu=quick).eval()  # OpenAI's key layout: text tower on the top module


def test_openai_torchscript_archive_builds_quickgelu(tmp_path, capsys):
    ref = _reference(TINY, quick=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
        torch.jit.script(ref).save(str(tmp_path / "openai.pt"))
    torch.save(ref.state_dict(), tmp_path / "plain.pt")
    assert is_openai_archive(tmp_path / "openai.pt") and not is_openai_archive(tmp_path / "plain.pt")

    cfg = ClipModelConfig(arch=dict(TINY), pretrained=str(tmp_path / "openai.pt"))
    model = build_clip(cfg).eval()
    assert cfg.quick_gelu is True  # recorded in the run's config: the export is rebuilt the same way
    assert "OpenAI TorchScript archive" in capsys.readouterr().err
    for got, want in zip(_features(model), _features(ref)):
        torch.testing.assert_close(got, want)
    # The same weights in a GELU model answer differently: the activation matters.
    gelu = build_clip(ClipModelConfig(arch=dict(TINY), pretrained=str(tmp_path / "plain.pt"))).eval()
    assert not torch.allclose(_features(gelu)[0], _features(ref)[0], atol=1e-4)
    # Rebuilt from the recorded config without the file (as an export is), it is QuickGELU again.
    rebuilt = build_clip(cfg, load_pretrained=False)
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(_features(rebuilt.eval())[0], _features(ref)[0])


def test_openai_state_dict_into_vit_b_32(tmp_path, capsys):
    """A random ViT-B-32-quickgelu state dict saved in OpenAI's key layout: the -quickgelu name
    reproduces it exactly; the GELU name warns in one line naming the twin."""
    import open_clip

    assert quickgelu_twin("ViT-B-32") == "ViT-B-32-quickgelu" and quickgelu_twin("ViT-B-32-quickgelu") is None
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32-quickgelu").eval()  # plain CLIP: OpenAI's key layout
    assert "transformer.resblocks.0.attn.in_proj_weight" in ref.state_dict()
    torch.save(ref.state_dict(), tmp_path / "ViT-B-32.pt")
    image = torch.randn(1, 3, 224, 224)

    capsys.readouterr()
    quick = build_clip(ClipModelConfig(name="ViT-B-32-quickgelu", pretrained=str(tmp_path / "ViT-B-32.pt")))
    assert capsys.readouterr().err == ""
    with torch.no_grad():
        torch.testing.assert_close(quick.eval().encode_image(image), ref.encode_image(image))

    gelu = build_clip(ClipModelConfig(name="ViT-B-32", pretrained=str(tmp_path / "ViT-B-32.pt")))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "ViT-B-32-quickgelu" in err[0]
    with torch.no_grad():
        assert not torch.allclose(gelu.eval().encode_image(image), ref.encode_image(image), atol=1e-4)


def test_shipped_configs_name_quickgelu_for_openai_weights():
    for path in ("configs/clip/vit_b32.yaml", "configs/structure_clip/vit_b32.yaml"):
        cfg = yaml.safe_load((ROOT / path).read_text())
        assert cfg["model"]["name"] == "ViT-B-32-quickgelu", path


# --- preprocessing from the model ----------------------------------------------------------------------

SIGLIP_LIKE = {**TINY, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                          "interpolation": "bilinear", "resize_mode": "squash"}}


def test_architecture_preprocess_cfg():
    openai = architecture_preprocess_cfg("ViT-B-32")
    assert openai["mean"] == [0.48145466, 0.4578275, 0.40821073] and openai["interpolation"] == "bicubic"
    assert openai["resize_mode"] == "shortest" and openai["size"] == 224
    siglip = architecture_preprocess_cfg("ViT-B-16-SigLIP")  # every open_clip tag of it says so
    assert siglip["mean"] == [0.5, 0.5, 0.5] and siglip["std"] == [0.5, 0.5, 0.5] and siglip["resize_mode"] == "squash"
    inline = architecture_preprocess_cfg("", SIGLIP_LIKE)
    assert inline["mean"] == [0.5, 0.5, 0.5] and inline["interpolation"] == "bilinear" and inline["size"] == 32


def _expected(image: Image.Image, mean: float, std: float) -> torch.Tensor:
    """Squash-resize to 32x32 with bilinear filtering, then (x - mean) / std: an independent reference."""
    import numpy as np

    small = image.resize((32, 32), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - mean) / std


def test_training_and_model_use_the_architecture_preprocess_cfg():
    import open_clip

    cfg = ClipModelConfig(arch=SIGLIP_LIKE)
    model = build_clip(cfg, load_pretrained=False)
    pp = open_clip.get_model_preprocess_cfg(model)
    assert list(pp["mean"]) == [0.5] * 3 and pp["resize_mode"] == "squash" and pp["interpolation"] == "bilinear"
    image = Image.new("RGB", (64, 40), (200, 100, 50))
    image.putpixel((3, 3), (0, 255, 0))
    for transform in (clip_preprocess(cfg, False), clip_preprocess(cfg, False, model=model)):
        torch.testing.assert_close(transform(image), _expected(image, 0.5, 0.5), atol=2e-2, rtol=0)
    # model.preprocess overrides the architecture's.
    over = clip_preprocess(ClipModelConfig(arch=SIGLIP_LIKE, preprocess={"mean": [0.0] * 3, "std": [1.0] * 3}), False)
    torch.testing.assert_close(over(image), _expected(image, 0.0, 1.0), atol=2e-2, rtol=0)


def test_export_carries_the_transform_and_evaluation_uses_it(tmp_path):
    """A CLIP model on an architecture with SigLIP-like preprocessing, exported with the metadata the
    trainer writes: the evaluators' loader reproduces the training transform from it."""
    from mm.config import config_json, load_config
    from mm.evaluate.models import load_embedding_model
    from mm.exports import read_export_metadata, save_export
    from mm.models.clip import export_preprocess_metadata
    from mm.tasks import get_task

    cfg = load_config(ROOT / "configs/clip/tiny.yaml", [], get_task("clip").config_class)
    cfg.model.arch = json.loads(json.dumps(SIGLIP_LIKE))
    model = get_task("clip", cfg).build_model()
    meta = {"mm_task": "clip", "mm_config": config_json(cfg), "mm_step": "1", "mm_export": "full",
            **export_preprocess_metadata(model)}
    path = tmp_path / "model.safetensors"
    save_export({k: v.contiguous() for k, v in model.state_dict().items()}, path, meta)
    recorded = json.loads(read_export_metadata(path)["mm_preprocess"])
    assert recorded["mean"] == [0.5] * 3 and recorded["resize_mode"] == "squash" and recorded["size"] == 32
    _, _, _, _, preprocess = load_embedding_model(str(path))
    image = Image.new("RGB", (50, 30), (10, 200, 90))
    train_eval = clip_preprocess(cfg.model, False)
    torch.testing.assert_close(preprocess(image), train_eval(image))
    torch.testing.assert_close(preprocess(image), _expected(image, 0.5, 0.5), atol=2e-2, rtol=0)


def test_evaluators_load_an_openai_archive_as_quickgelu(tmp_path, capsys):
    """mm-zeroshot / mm-retrieval / mm-compositional --model ARCH --pretrained FILE go through the same
    builder: an OpenAI TorchScript archive runs with QuickGELU."""
    from mm.evaluate.models import load_open_clip

    ref = _reference(TINY, quick=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(ref).save(str(tmp_path / "openai.pt"))
    config = tmp_path / "tiny_eval_arch.json"
    config.write_text(json.dumps(TINY))
    model, _, preprocess = load_open_clip(str(config), str(tmp_path / "openai.pt"))
    assert "OpenAI TorchScript archive" in capsys.readouterr().err
    torch.testing.assert_close(_features(model)[0], _features(ref)[0])
    assert preprocess(Image.new("RGB", (40, 40))).shape == (3, 32, 32)
