"""TopoLoRA-SAM trainable-only exports (what they hold, how they load, what they refuse) and mm-merge-lora.

Exports are written here the way the trainer's export step writes them (Task.export_plan
then the engine's save_export); tests/dist/topolora_check.py runs the trainer's own path under ZeRO 2/3.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mm.config import config_json, load_config
from mm.errors import ConfigError, UserError
from mm.evaluate.merge_lora import main as merge_main
from mm.evaluate.merge_lora import stock_sam_logits
from mm.exports import read_export_metadata, save_export
from mm.models.sam import SamModelConfig, build_sam, build_topolora_sam, prepare_image
from mm.tasks import get_task, load_exported

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"variant": "custom", "encoder_embed_dim": 32, "encoder_depth": 2, "encoder_num_heads": 2,
              "encoder_global_attn_indexes": [1], "image_size": 64}
TINY = [f"model.{k}={v}" for k, v in TINY_MODEL.items()]


def _base_checkpoint(path: Path, seed: int = 0, dim: int = 32) -> Path:
    torch.manual_seed(seed)
    sam = build_sam(SamModelConfig(**{**TINY_MODEL, "encoder_embed_dim": dim}))
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "pos" in name:  # zero-initialised in segment_anything; make them matter
                p.normal_(0, 0.5)
    torch.save(sam.state_dict(), path)
    return path


def _cfg(*overrides: str):
    task = get_task("topolora_sam")
    return task, load_config(ROOT / "configs/topolora_sam/tiny.yaml", TINY + list(overrides), task.config_class)


def _trained_model(task, cfg):
    """The model as built for training, with every trainable part moved off its initial value."""
    torch.manual_seed(1)
    model = get_task(task.name, cfg).build_model()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
        model.adapter.norm.running_mean.normal_(0, 0.1)
        model.adapter.norm.running_var.uniform_(0.5, 1.5)
        model.adapter.norm.num_batches_tracked.fill_(7)
    return model.eval()


def _write_export(task, cfg, model, path: Path) -> Path:
    """What the trainer's export step writes, from a module instead of a DeepSpeed checkpoint."""
    plan = get_task(task.name, cfg).export_plan(model)
    keys = plan.keys
    meta = {"mm_task": task.name, "mm_config": config_json(cfg), "mm_step": "7",
            "mm_export": "full" if keys is None else "trainable"}
    if keys is not None:
        meta.update(plan.metadata)
    state = model.state_dict()
    save_export(state if keys is None else {k: state[k] for k in keys}, path, meta)
    return path


def _images() -> torch.Tensor:
    return prepare_image(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 255, 64)[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base = _base_checkpoint(root / "sam_tiny.pth")
    task, cfg = _cfg(f"model.checkpoint={base}")
    model = _trained_model(task, cfg)
    with torch.no_grad():
        expected = model(_images())
    path = _write_export(task, cfg, model, root / "model.safetensors")
    full = _write_export(task, _cfg(f"model.checkpoint={base}", "train.export=full")[1], model,
                         root / "full.safetensors")
    return {"root": root, "base": base, "model": model, "expected": expected, "path": path, "full": full}


def test_trainable_export_holds_only_lora_adapter_decoder(trained):
    with safe_open(str(trained["path"]), framework="pt") as f:
        keys = set(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k or k.startswith(("adapter.", "mask_decoder."))
                        for k in keys)
    assert {"adapter.norm.running_mean", "adapter.norm.num_batches_tracked"} <= keys  # BN statistics too
    assert keys == {n for n, _ in trained["model"].named_parameters() if _trains(n)} | {
        n for n, _ in trained["model"].named_buffers() if n.startswith("adapter.")}
    meta = read_export_metadata(trained["path"])
    assert meta["mm_export"] == "trainable" and '"sha256"' in meta["mm_base"]
    # The frozen SAM's bytes are what the trainable-only file saves (the tiny SAM's decoder dominates it).
    frozen = sum(v.numel() * 4 for k, v in trained["model"].state_dict().items() if k not in keys)
    assert trained["full"].stat().st_size - trained["path"].stat().st_size >= frozen


def _trains(name: str) -> bool:
    return ".lora_" in name or name.startswith(("adapter.", "mask_decoder."))


def test_trainable_export_loads_with_the_trained_outputs(trained):
    for path in (trained["path"], trained["full"]):
        _, cfg, model = load_exported(path, expect_task="topolora_sam")
        with torch.no_grad():
            torch.testing.assert_close(model(_images()), trained["expected"], atol=1e-6, rtol=1e-6)
    assert Path(cfg.model.checkpoint).resolve() == trained["base"].resolve()


def test_moved_base_checkpoint_needs_the_override(trained, tmp_path):
    export = tmp_path / "model.safetensors"
    shutil.copy(trained["path"], export)
    moved = tmp_path / "elsewhere.pth"
    shutil.move(trained["base"], moved)
    try:
        with pytest.raises(UserError, match=r"holds only the trained weights.*--base-checkpoint") as err:
            load_exported(export)
        assert "\n" not in str(err.value)
        _, cfg, model = load_exported(export, base_checkpoint=str(moved))
        assert cfg.model.checkpoint == str(moved)
        with torch.no_grad():
            torch.testing.assert_close(model(_images()), trained["expected"], atol=1e-6, rtol=1e-6)
    finally:
        shutil.move(moved, trained["base"])


def test_wrong_base_checkpoints_are_refused(trained, tmp_path):
    other = _base_checkpoint(tmp_path / "other_seed.pth", seed=5)  # same sizes, other weights
    with pytest.raises(UserError, match=r"other_seed\.pth .*is not the one it was trained on"):
        load_exported(trained["path"], base_checkpoint=str(other))
    wider = _base_checkpoint(tmp_path / "wider.pth", dim=48)  # another encoder
    with pytest.raises(UserError, match=r"wider\.pth does not fit custom .*width 48"):
        load_exported(trained["path"], base_checkpoint=str(wider))


def test_export_kind_follows_the_base_checkpoint(trained):
    task, cfg = _cfg()  # the tiny config: random SAM, nothing to rebuild frozen weights from
    model = get_task(task.name, cfg).build_model()
    assert cfg.train.export == "auto" and get_task(task.name, cfg).export_plan(model).keys is None
    # A bad train.export fails when the task is built from its config, before any training.
    with pytest.raises(ConfigError, match="train.export=trainable needs model.checkpoint"):
        get_task(task.name, _cfg("train.export=trainable")[1])
    with pytest.raises(ConfigError, match="train.export must be one of"):
        get_task(task.name, _cfg("train.export=lora")[1])


# ---------------------------------------------------------------------------------------------------
# mm-merge-lora


@pytest.mark.parametrize("source", ["path", "full"])
def test_merged_file_gives_the_unmerged_outputs(trained, tmp_path, source, capsys):
    out = tmp_path / "merged.safetensors"
    assert merge_main([str(trained[source]), "--out", str(out)]) == 0
    assert "merged 4 LoRA layers" in capsys.readouterr().out  # lin1 + lin2 in 2 blocks
    meta = read_export_metadata(out)
    assert meta["mm_export"] == "full"
    _, cfg, merged = load_exported(out, expect_task="topolora_sam")
    assert cfg.model.lora_r == 0
    with torch.no_grad():
        torch.testing.assert_close(merged(_images()), trained["expected"], atol=1e-5, rtol=1e-5)
    # The file is a SAM state dict in segment_anything's layout plus the adapter.
    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
    sam_keys = set(build_sam(SamModelConfig(**TINY_MODEL)).state_dict())
    assert {k for k in keys if not k.startswith("adapter.")} == sam_keys
    assert not any("lora" in k or "base_layer" in k for k in keys)
    # OUT.pth: a Sam made from segment_anything's classes at the tiny sizes loads it strictly; it is the
    # trained model without the adapter.
    sam = _segment_anything_sam()
    sam.load_state_dict(torch.load(out.with_suffix(".pth"), weights_only=True), strict=True)
    merged.adapter = torch.nn.Identity()
    with torch.no_grad():  # 1e-5: mm decodes the batch at once, segment_anything image by image (rounding)
        torch.testing.assert_close(stock_sam_logits(sam.eval(), _images()), merged(_images()), atol=1e-5, rtol=1e-5)
    card = out.with_suffix(".md").read_text()
    assert card.startswith("---\nlibrary_name: segment-anything\nlicense: other\n")
    assert "mm train topolora_sam --config training_config.yaml" in card and "lora_r: 8" in card


def _segment_anything_sam():
    """A Sam at the tiny sizes, built from segment_anything's classes as its build_sam.py does (not mm's)."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    return Sam(image_encoder=ImageEncoderViT(depth=2, embed_dim=32, img_size=64, mlp_ratio=4,
                                             norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2,
                                             patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=[1],
                                             window_size=14, out_chans=256),
               prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                            mask_in_chans=16),
               mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
                   depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3,
                   iou_head_hidden_dim=256))


def test_stock_sam_difference_is_measured_and_printed(trained, tmp_path, capsys):
    """The printed figures against stock SAM's own forward (Sam.__call__ with its preprocessing) and mm's
    own validation (evaluate_segmentation's global Dice) on a vessels shard."""
    import re
    import tarfile
    from io import BytesIO

    import numpy as np
    from PIL import Image
    from segment_anything.utils.transforms import ResizeLongestSide

    from mm.data.synthetic import write_vessels
    from mm.tasks.segmentation import evaluate_segmentation

    shard = write_vessels(tmp_path / "vessels", 6, image_size=48, seed=3)[0]
    out = tmp_path / "merged.safetensors"
    assert merge_main([str(trained["path"]), "--out", str(out), "--compare-data", shard]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    got = re.search(r"on (\d+) images of .*: mean \|prob diff\| ([\d.]+), Dice between their masks ([\d.]+); "
                    r"Dice vs ground truth ([\d.]+) \(trained\) vs ([\d.]+) \(stock\)", line)
    assert got, line
    assert "stock segment_anything SAM (merged.pth" in line and line in out.with_suffix(".md").read_text()

    sam = _segment_anything_sam()
    sam.load_state_dict(torch.load(out.with_suffix(".pth"), weights_only=True))
    sam.eval()
    _, cfg, model = load_exported(trained["path"])
    diffs, mm_masks, stock_masks = [], [], []
    with tarfile.open(shard) as tar:
        pngs = sorted(m.name for m in tar if m.name.endswith(".png") and not m.name.endswith(".mask.png"))
        for name in pngs:
            image = np.array(Image.open(BytesIO(tar.extractfile(name).read())).convert("RGB"))
            resized = torch.as_tensor(ResizeLongestSide(64).apply_image(image)).permute(2, 0, 1).float()
            with torch.no_grad():
                stock = sam([{"image": resized, "original_size": (64, 64)}], multimask_output=False)[0]
                q = sam.postprocess_masks(stock["low_res_logits"], (64, 64), (64, 64)).sigmoid()
                p = model(prepare_image(torch.from_numpy(image).permute(2, 0, 1).float(), 64)[0]).sigmoid()
            diffs.append((p - q).abs().mean())
            mm_masks.append(p > 0.5)
            stock_masks.append(stock["masks"])
    a, b = torch.stack(mm_masks), torch.stack(stock_masks)
    assert int(got[1]) == len(pngs) == 6
    assert abs(float(got[2]) - float(torch.stack(diffs).mean())) < 1e-3
    assert abs(float(got[3]) - float(2 * (a & b).sum() / (a.sum() + b.sum()))) < 1e-3
    cfg.data.val, cfg.data.num_workers = shard, 0
    assert abs(float(got[4]) - evaluate_segmentation(model, cfg)["val/global_dice"]) < 1e-3
    assert float(got[2]) > 0.001  # the adapter was perturbed: stock SAM is not the trained model


def test_merged_vit_b_loads_into_segment_anything_builder(tmp_path, capsys):
    """OUT.pth of a vit_b export is a checkpoint segment_anything's own builder loads (strictly), with the
    LoRA folded in as W0 + (alpha / r) B A."""
    from segment_anything import sam_model_registry

    task, cfg = _cfg("model.variant=vit_b", "model.image_size=1024")  # the encoder sizes are vit_b's
    model = build_topolora_sam(cfg.model, load_checkpoint=False)
    with torch.no_grad():
        model.image_encoder.blocks[0].mlp.lin1.lora_B["default"].weight.fill_(0.01)
    lin1 = model.image_encoder.blocks[0].mlp.lin1
    expected = (lin1.base_layer.weight + 2.0 * lin1.lora_B["default"].weight @ lin1.lora_A["default"].weight).detach()
    export = _write_export(task, cfg, model, tmp_path / "vit_b.safetensors")
    del model
    out = tmp_path / "merged.safetensors"
    assert merge_main([str(export), "--out", str(out), "--compare-images", "0"]) == 0
    assert "merged 24 LoRA layers" in capsys.readouterr().out
    export.unlink()
    sam = sam_model_registry["vit_b"](checkpoint=str(out.with_suffix(".pth")))
    torch.testing.assert_close(sam.image_encoder.blocks[0].mlp.lin1.weight, expected)
    card = out.with_suffix(".md").read_text()
    assert 'sam_model_registry["vit_b"](checkpoint="merged.pth")' in card


def test_merge_errors_are_one_line(trained, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"

    def fails(*argv: str) -> str:
        with pytest.raises(SystemExit) as e:
            merge_main(list(argv))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    assert "no such checkpoint file" in fails(str(tmp_path / "nope.safetensors"), "--out", str(out))
    assert "is the export itself" in fails(str(trained["path"]), "--out", str(trained["path"]), "--overwrite")
    assert "*.safetensors" in fails(str(trained["path"]), "--out", str(tmp_path / "merged.pth"))
    merge_main([str(trained["path"]), "--out", str(out)])
    capsys.readouterr()
    assert "exists; pass --overwrite" in fails(str(trained["path"]), "--out", str(out))
    assert "no LoRA layers to merge" in fails(str(out), "--out", str(tmp_path / "again.safetensors"))
    assert "not found" in fails(str(trained["path"]), "--out", str(tmp_path / "m2.safetensors"),
                                "--base-checkpoint", str(tmp_path / "missing.pth"))
    clip = tmp_path / "clip.safetensors"
    save_export({"w": torch.zeros(1)}, clip, {"mm_task": "clip", "mm_config": "{}"})
    assert "expected 'topolora_sam'" in fails(str(clip), "--out", str(tmp_path / "m3.safetensors"))


def test_mm_export_format_sam_writes_what_mm_merge_lora_writes(trained, tmp_path, capsys):
    """`mm export EXPORT --format sam` is the old `mm-merge-lora EXPORT`: the same tensors, the same line."""
    from safetensors.torch import load_file

    from mm.evaluate.export import main as export_main

    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    assert merge_main([str(trained["full"]), "--out", str(old)]) == 0
    old_line = capsys.readouterr().out.replace(str(tmp_path / "old"), "OUT").replace("old.pth", "OUT.pth")
    assert export_main([str(trained["full"]), "--format", "sam", "--out", str(new)]) == 0
    assert capsys.readouterr().out.replace(str(tmp_path / "new"), "OUT").replace("new.pth", "OUT.pth") == old_line
    a, b = load_file(str(old)), load_file(str(new))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
