"""Structure-CLIP trainer: sample map, KEE on/off, and 2-rank training under ZeRO-2/3."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm.config import load_config
from mm.models.kee import PAD_ID
from mm.tasks import get_task
from mm.tasks.structure_clip import sample_negative, structure_clip_map

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
        "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1"]


def _raw(caption, graph=None):
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="png")
    raw = {"__key__": "k", "png": buf.getvalue(), "txt": caption.encode()}
    if graph is not None:
        raw["json"] = json.dumps({"scene_graph": graph}).encode()
    return raw


@pytest.fixture(scope="module")
def task_cfg():
    task = get_task("structure_clip")
    return task, load_config(ROOT / "configs/structure_clip/tiny.yaml", TINY, task.config_class)


def _map(cfg):
    from mm.models.clip import clip_preprocess, clip_tokenizer
    return structure_clip_map(clip_preprocess(cfg.model, False), clip_tokenizer(cfg.model), ["relation", "attribute"])


def test_sample_map_negative_present_and_triples(task_cfg):
    _, cfg = task_cfg
    s = _map(cfg)(_raw("a red circle to the left of a blue square"), random.Random(0))
    assert bool(s["has_neg"]) and s["neg_caption"] != s["caption"] and s["neg_text"].any()
    assert s["triple_mask"].tolist() == [True] * 3 + [False] * 3  # relation + 2 attributes
    assert (s["triples"][3:] == PAD_ID).all()
    assert sorted(s["neg_caption"].split()) == sorted(s["caption"].split())  # a swap: same words, new order


def test_sample_map_negative_absent_or_identical(task_cfg):
    _, cfg = task_cfg
    m = _map(cfg)
    single = m(_raw("a red circle"), random.Random(0))
    assert not bool(single["has_neg"]) and not single["neg_text"].any()
    assert single["triple_mask"].sum() == 1
    same = m(_raw("a red circle above a red circle"), random.Random(0))  # every swap renders the caption
    assert not bool(same["has_neg"])
    graph = {"objects": [{"name": "circle", "attributes": ["red"]}], "relations": []}
    from_json = m(_raw("anything at all", graph), random.Random(0))
    assert from_json["triple_mask"].sum() == 1
    from mm.scenegraph import parse_simple
    assert sample_negative(parse_simple("a red circle"), "a red circle", random.Random(0),
                           ["relation", "attribute"]) is None


def test_kee_changes_text_features_only_when_enabled(task_cfg):
    task, cfg = task_cfg
    torch.manual_seed(0)
    model = get_task(task.name, cfg).build_model().eval()
    s = _map(cfg)(_raw("a red circle to the left of a blue square"), random.Random(0))
    args = [s[k][None] for k in ("image", "text", "neg_text", "triples", "triple_mask")]
    with torch.no_grad():
        plain = model.encode_text(args[1])
        neg_plain = model.encode_text(args[2])
        out = model(*args)
        with_triples = model.encode_text_with_triples(args[1], args[3], args[4])
        model.kee.enabled = False
        off = model(*args)["text_features"]
    assert not torch.allclose(plain, out["text_features"], atol=1e-4)
    assert torch.allclose(with_triples, out["text_features"], atol=1e-6)
    # The hard-negative hinge compares the plain tower's embeddings of the caption and the negative.
    assert torch.allclose(out["tower_text_features"], plain, atol=1e-6)
    assert torch.allclose(out["neg_text_features"], neg_plain, atol=1e-6)
    assert torch.allclose(plain, off, atol=1e-6)
    no_kee = get_task(task.name, load_config(ROOT / "configs/structure_clip/tiny.yaml", TINY + ["model.kee=false"],
                                             task.config_class)).build_model()
    assert no_kee.kee is None


def test_two_ranks_zero1_2_and_3_train_and_export(shapes, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(ROOT / "tests/dist/structure_clip_check.py"), shapes["train"], shapes["val"], str(tmp_path), "1,2,3"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for stage in ("1", "2", "3"):
        r = results[stage]
        assert r["step"] == 8 and len(r["losses"]) == 8
        assert sum(r["losses"][-3:]) / 3 < sum(r["losses"][:3]) / 3 - 0.05
        assert r["export_output_diff"] < 1e-5
        assert all(0 < x <= 1 for x in r["neg_share"])
    # mm-zeroshot on the ZeRO-3 export reproduces the trainer's final evaluation (run on every rank).
    from mm.evaluate.zeroshot import main

    out = tmp_path / "zs.json"
    assert main(["--checkpoint", results["3"]["export"], "--data", str(shapes["val"]), "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert metrics[key] == pytest.approx(results["3"]["eval"][f"zeroshot/{key}"], abs=1e-6), key


def test_fine_tunes_from_a_clip_export(task_cfg, tmp_path):
    """model.pretrained takes a CLIP run's export (the demo fine-tunes its CLIP this way): every CLIP
    weight is loaded, and the KEE's word embedding is a copy of the loaded one."""
    from mm.exports import save_export
    from mm.models.clip import build_clip

    task, cfg = task_cfg
    torch.manual_seed(1)
    clip = build_clip(cfg.model)
    path = tmp_path / "clip.safetensors"
    save_export({k: v.contiguous() for k, v in clip.state_dict().items()}, path, {})
    ft_cfg = load_config(ROOT / "configs/structure_clip/tiny.yaml", [*TINY, f"model.pretrained={path}"],
                         task.config_class)
    torch.manual_seed(2)
    model = get_task(task.name, ft_cfg).build_model()
    for name, value in clip.state_dict().items():
        assert torch.equal(model.clip.state_dict()[name], value), name
    assert torch.equal(model.kee.token_embedding.weight, clip.text.token_embedding.weight)
