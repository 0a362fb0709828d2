"""Scene graphs: rendering, the simple and spaCy-rule parsers, graph-based hard negatives."""

from __future__ import annotations

import random

import pytest

from mm.data.synthetic import render_scene
from mm.errors import UserError
from mm.scenegraph import (
    Relation,
    SceneGraph,
    SGObject,
    attribute_swap,
    hard_negative,
    parse_caption,
    parse_doc,
    parse_simple,
    relation_swap,
)
from mm.scenegraph import parse as parse_module
from mm.scenegraph.negatives import negative_captions
from mm.scenegraph.parse import CaptionParseError

SHAPES_PAIR = {"objects": [{"name": "circle", "attributes": ["red"]}, {"name": "square", "attributes": ["blue"]}],
               "relations": [{"subject": 0, "predicate": "left of", "object": 1}]}


# --- the graph ---------------------------------------------------------------------------------------

def test_dict_round_trip_and_render():
    g = SceneGraph.from_dict(SHAPES_PAIR)
    assert g.objects == [SGObject("circle", ["red"]), SGObject("square", ["blue"])]
    assert g.relations == [Relation(0, "left of", 1)]
    assert g.to_dict() == SHAPES_PAIR
    assert g.render() == "a red circle to the left of a blue square"
    assert SceneGraph([SGObject("circle", ["red"])]).render() == "a red circle"
    assert SceneGraph([SGObject("apple", ["orange"]), SGObject("egg")]).render() == "an orange apple and an egg"
    with pytest.raises(ValueError, match="outside"):
        SceneGraph.from_dict({"objects": [{"name": "x"}], "relations": [{"subject": 0, "predicate": "on",
                                                                        "object": 3}]})


def test_render_repeated_mentions_and_loose_objects():
    g = SceneGraph([SGObject("man"), SGObject("horse", ["brown"]), SGObject("beach"), SGObject("dog")],
                   [Relation(0, "riding", 1), Relation(1, "on", 2)])
    assert g.render() == "a man riding a brown horse and the brown horse on a beach and a dog"
    assert parse_simple(g.render(), strict=True) == g


def test_triples_relations_first_attributes_as_is_capped():
    g = SceneGraph.from_dict(SHAPES_PAIR)
    assert g.triples() == [("circle", "left of", "square"), ("circle", "is", "red"), ("square", "is", "blue")]
    many = SceneGraph([SGObject("cube", ["a", "b", "c", "d"]), SGObject("ball", ["e", "f"])],
                      [Relation(0, "on", 1)])
    assert len(many.triples()) == 6 and many.triples()[0] == ("cube", "on", "ball")
    assert many.triples(max_triples=2) == [("cube", "on", "ball"), ("cube", "is", "a")]


# --- hard negatives --------------------------------------------------------------------------------

def test_relation_swap_shapes_caption():
    g = parse_simple("a red circle to the left of a blue square", strict=True)
    assert [n.render() for n in relation_swap(g)] == ["a blue square to the left of a red circle"]
    assert [n.render() for n in attribute_swap(g)] == ["a blue circle to the left of a red square"]
    assert g.render() == "a red circle to the left of a blue square"  # the positive is untouched


def test_attribute_swap_two_objects():
    g = parse_simple("a red cube and a blue ball", strict=True)
    assert [n.render() for n in attribute_swap(g)] == ["a blue cube and a red ball"]
    assert relation_swap(g) == []
    assert hard_negative(g, random.Random(0)) == "a blue cube and a red ball"
    assert hard_negative(g, random.Random(0), kinds=("relation",)) is None


def test_relation_swap_astronaut():
    g = parse_simple("an astronaut rides a horse", strict=True)
    assert [n.render() for n in relation_swap(g)] == ["a horse rides an astronaut"]


def test_identical_negatives_dropped():
    same = parse_simple("a red cube and a red ball", strict=True)
    assert attribute_swap(same) == []
    assert hard_negative(same, random.Random(0)) is None
    # Swapping two identical objects renders the positive again: dropped.
    twins = parse_simple("a red circle above a red circle", strict=True)
    assert len(relation_swap(twins)) == 1
    assert negative_captions(twins) == {"relation": [], "attribute": []}
    assert hard_negative(twins, random.Random(0)) is None
    # Single objects and symmetric relations have none.
    assert hard_negative(parse_simple("a red circle"), random.Random(0)) is None
    assert relation_swap(parse_simple("a cat next to a dog", strict=True)) == []
    assert hard_negative(SceneGraph(), random.Random(0)) is None


def test_hard_negative_differs_and_is_seeded():
    g = parse_simple("a red circle to the left of a blue square", strict=True)
    seen = {hard_negative(g, random.Random(s)) for s in range(40)}
    assert seen == {"a blue square to the left of a red circle", "a blue circle to the left of a red square"}
    assert hard_negative(g, random.Random(3)) == hard_negative(g, random.Random(3))
    with pytest.raises(ValueError, match="kind"):
        hard_negative(g, random.Random(0), kinds=("colour",))


# --- the simple parser -----------------------------------------------------------------------------

def test_simple_parser_round_trips_shapes_world():
    rng = random.Random(0)
    pairs = 0
    for _ in range(200):
        scene = render_scene(rng, 32, single_fraction=0.3)
        g = parse_simple(scene.caption, strict=True)
        assert g.render() == scene.caption
        assert g.to_dict() == scene.scene_graph
        assert SceneGraph.from_dict(scene.scene_graph).render() == scene.caption
        pairs += bool(g.relations)
    assert pairs > 100  # both kinds of scene were covered


def test_simple_parser_forms():
    assert parse_simple("A red circle.").to_dict() == {"objects": [{"name": "circle", "attributes": ["red"]}],
                                                        "relations": []}
    g = parse_simple("the cat is on the mat", strict=True)
    assert g == SceneGraph([SGObject("cat"), SGObject("mat")], [Relation(0, "on", 1)])
    g = parse_simple("a small dog in front of a big red house, a tree", strict=True)
    assert g == SceneGraph([SGObject("dog", ["small"]), SGObject("house", ["big", "red"]), SGObject("tree")],
                           [Relation(0, "in front of", 1)])
    for bad in ("", "to the left of a square", "a circle above", "a circle and and a square"):
        assert parse_simple(bad) == SceneGraph()
        with pytest.raises(CaptionParseError):
            parse_simple(bad, strict=True)


# --- the spaCy rules ---------------------------------------------------------------------------------

try:
    import spacy  # noqa: F401  (only Doc and Vocab are used: no model is needed)
    HAS_SPACY = True
except ImportError:
    HAS_SPACY = False
requires_spacy = pytest.mark.skipif(not HAS_SPACY, reason="spaCy not installed (pip install spacy)")


def make_doc(spec: str):
    """'word/POS/dep/head ...' with head the index of the head word (itself for ROOT)."""
    from spacy.tokens import Doc
    from spacy.vocab import Vocab

    parts = [t.split("/") for t in spec.split()]
    return Doc(Vocab(), words=[p[0] for p in parts], pos=[p[1] for p in parts], deps=[p[2] for p in parts],
               heads=[int(p[3]) for p in parts])


def graph(objects, relations=()):
    return SceneGraph([SGObject(n, list(a)) for n, a in objects], [Relation(*r) for r in relations])


DOCS = {
    "a red circle to the left of a blue square": (
        ("a/DET/det/2 red/ADJ/amod/2 circle/NOUN/ROOT/2 to/ADP/prep/2 the/DET/det/5 left/NOUN/pobj/3 "
        "of/ADP/prep/5 a/DET/det/9 blue/ADJ/amod/9 square/NOUN/pobj/6"),
        graph([("circle", ["red"]), ("square", ["blue"])], [(0, "left of", 1)])),
    "a man riding a horse": (
        "a/DET/det/1 man/NOUN/ROOT/1 riding/VERB/acl/1 a/DET/det/4 horse/NOUN/dobj/2",
        graph([("man", []), ("horse", [])], [(0, "riding", 1)])),
    "an astronaut rides a horse on the beach": (
        ("an/DET/det/1 astronaut/NOUN/nsubj/2 rides/VERB/ROOT/2 a/DET/det/4 horse/NOUN/dobj/2 "
        "on/ADP/prep/2 the/DET/det/7 beach/NOUN/pobj/5"),
        graph([("astronaut", []), ("horse", []), ("beach", [])], [(0, "rides", 1), (1, "on", 2)])),
    "a cat sits on a mat": (
        "a/DET/det/1 cat/NOUN/nsubj/2 sits/VERB/ROOT/2 on/ADP/prep/2 a/DET/det/5 mat/NOUN/pobj/3",
        graph([("cat", []), ("mat", [])], [(0, "sits on", 1)])),
    "the black cat is next to the white dog": (
        ("the/DET/det/2 black/ADJ/amod/2 cat/NOUN/nsubj/3 is/AUX/ROOT/3 next/ADV/advmod/3 to/ADP/prep/4 "
        "the/DET/det/8 white/ADJ/amod/8 dog/NOUN/pobj/5"),
        graph([("cat", ["black"]), ("dog", ["white"])], [(0, "next to", 1)])),
    "a red cube and a blue ball": (
        ("a/DET/det/2 red/ADJ/amod/2 cube/NOUN/ROOT/2 and/CCONJ/cc/2 a/DET/det/6 blue/ADJ/amod/6 "
        "ball/NOUN/conj/2"),
        graph([("cube", ["red"]), ("ball", ["blue"])])),
    "a traffic light above a red car": (
        ("a/DET/det/2 traffic/NOUN/compound/2 light/NOUN/ROOT/2 above/ADP/prep/2 a/DET/det/6 "
        "red/ADJ/amod/6 car/NOUN/pobj/3"),
        graph([("traffic light", []), ("car", ["red"])], [(0, "above", 1)])),
    "the cat is black and white": (
        "the/DET/det/1 cat/NOUN/nsubj/2 is/AUX/ROOT/2 black/ADJ/acomp/2 and/CCONJ/cc/3 white/ADJ/conj/3",
        graph([("cat", ["black", "white"])])),
    "a woman who holds an umbrella": (
        "a/DET/det/1 woman/NOUN/ROOT/1 who/PRON/nsubj/3 holds/VERB/relcl/1 an/DET/det/5 umbrella/NOUN/dobj/3",
        graph([("woman", []), ("umbrella", [])], [(0, "holds", 1)])),
    "a dog in front of a house": (
        ("a/DET/det/1 dog/NOUN/ROOT/1 in/ADP/prep/1 front/NOUN/pobj/2 of/ADP/prep/3 a/DET/det/6 "
        "house/NOUN/pobj/4"),
        graph([("dog", []), ("house", [])], [(0, "in front of", 1)])),
    "a cat and a dog on a sofa": (
        ("a/DET/det/1 cat/NOUN/ROOT/1 and/CCONJ/cc/1 a/DET/det/4 dog/NOUN/conj/1 on/ADP/prep/4 "
        "a/DET/det/7 sofa/NOUN/pobj/5"),
        graph([("cat", []), ("dog", []), ("sofa", [])], [(1, "on", 2)])),
    "a horse ridden by a man": (
        "a/DET/det/1 horse/NOUN/ROOT/1 ridden/VERB/acl/1 by/ADP/agent/2 a/DET/det/5 man/NOUN/pobj/3",
        graph([("horse", []), ("man", [])], [(0, "ridden by", 1)])),
}


@requires_spacy
@pytest.mark.parametrize("caption", list(DOCS))
def test_spacy_rules_on_hand_built_docs(caption):
    spec, expected = DOCS[caption]
    doc = make_doc(spec)
    assert doc.text.strip() == caption
    assert parse_doc(doc) == expected


@requires_spacy
def test_spacy_rules_subject_conjuncts_share_a_verb():
    doc = make_doc("a/DET/det/1 man/NOUN/nsubj/5 and/CCONJ/cc/1 a/DET/det/4 woman/NOUN/conj/1 "
                   "ride/VERB/ROOT/5 horses/NOUN/dobj/5")
    assert parse_doc(doc) == graph([("man", []), ("woman", []), ("horses", [])],
                                   [(0, "ride", 2), (1, "ride", 2)])


@requires_spacy
def test_parse_caption_uses_given_pipeline():
    spec, expected = DOCS["a man riding a horse"]
    assert parse_caption("a man riding a horse", nlp=lambda text: make_doc(spec)) == expected


def test_parse_caption_without_model(monkeypatch):
    monkeypatch.setattr(parse_module, "_default_nlp", lambda: None)
    with pytest.raises(UserError, match="python -m spacy download en_core_web_sm"):
        parse_caption("a red circle")
    assert parse_caption("a red circle above a blue square", fallback=True) == \
        graph([("circle", ["red"]), ("square", ["blue"])], [(0, "above", 1)])
