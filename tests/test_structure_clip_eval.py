"""Structure-CLIP at evaluation: the KEE scores a caption with the triples of its own scene graph
(mm-compositional --kee), and only models with a KEE accept --kee."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mm.config import load_config
from mm.errors import UserError
from mm.evaluate.compositional import evaluate
from mm.models.clip import clip_preprocess, clip_tokenizer
from mm.models.kee import encode_triples
from mm.scenegraph import parse_simple
from mm.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
        "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1"]
CAPTION, SWAP = "a red circle to the left of a blue square", "a blue square to the left of a red circle"


@pytest.fixture(scope="module")
def model_cfg():
    task = get_task("structure_clip")
    cfg = load_config(ROOT / "configs/structure_clip/tiny.yaml", TINY, task.config_class)
    torch.manual_seed(0)
    return get_task(task.name, cfg).build_model().eval(), cfg


def test_encode_captions_uses_each_captions_own_graph(model_cfg):
    model, cfg = model_cfg
    tok = clip_tokenizer(cfg.model)
    with torch.no_grad():
        got = model.encode_captions([CAPTION, SWAP], tok, parse_simple)
        for row, caption in zip(got, [CAPTION, SWAP]):
            ids, mask = encode_triples(parse_simple(caption).triples(), tok, cfg.model.max_triples,
                                       cfg.model.triple_tokens)
            want = model.encode_text_with_triples(tok([caption]), ids[None], mask[None])[0]
            assert torch.allclose(row, want, atol=1e-6)
            assert not torch.allclose(row, model.encode_text(tok([caption]))[0], atol=1e-4)
        # Same words, swapped graph: the KEE term differs between the two captions.
        kee = model.kee.encode(*(torch.stack(x) for x in zip(*(
            encode_triples(parse_simple(c).triples(), tok, cfg.model.max_triples, cfg.model.triple_tokens)
            for c in (CAPTION, SWAP)))))[0]
    assert not torch.allclose(kee[0], kee[1], atol=1e-4)


def test_compositional_kee_scores_by_hand(model_cfg, tmp_path):
    model, cfg = model_cfg
    tok, pre = clip_tokenizer(cfg.model), clip_preprocess(cfg.model, False)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "0.png")
    data = {"0": {"filename": "0.png", "caption": CAPTION, "negative_caption": SWAP}}
    (tmp_path / "swap_obj.json").write_text(json.dumps(data))
    res = evaluate(model, tok, pre, sugarcrepe=[str(tmp_path / "swap_obj.json")], images=str(tmp_path), kee=True)
    with torch.no_grad():
        v = torch.nn.functional.normalize(model.encode_image(pre(Image.open(tmp_path / "0.png"))[None]), dim=-1)
        t, f = model.encode_captions([CAPTION, SWAP], tok, parse_simple)
    got = res["sugarcrepe"]["swap_obj"]
    assert (got["acc"], got["n"]) == (float((v[0] @ t) > (v[0] @ f)), 1)


def test_kee_scoring_needs_a_kee_model(model_cfg):
    _, cfg = model_cfg
    clip_task = get_task("clip")
    clip_cfg = load_config(ROOT / "configs/clip/tiny.yaml", TINY, clip_task.config_class)
    with pytest.raises(UserError, match="--kee"):
        evaluate(get_task(clip_task.name, clip_cfg).build_model(), clip_tokenizer(cfg.model),
                 clip_preprocess(cfg.model, False), sugarcrepe=["unused.json"], kee=True)
