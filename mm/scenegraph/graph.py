"""Scene graphs of captions: objects with attributes, and relations between objects.

The json form is the one the shapes world writes in each sample's metadata:
``{"objects": [{"name", "attributes"}], "relations": [{"subject", "predicate", "object"}]}``, with
subject and object as indices into ``objects``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Predicates whose caption phrase differs from the graph's name for them; others are written as given.
PREDICATE_PHRASES = {"left of": "to the left of", "right of": "to the right of"}
# The reverse map (phrase -> predicate), used by the parsers so that parse(render(g)) == g.
PHRASE_PREDICATES = {phrase: predicate for predicate, phrase in PREDICATE_PHRASES.items()}

MAX_TRIPLES = 6  # Structure-CLIP keeps at most 6 triples per caption


@dataclass
class SGObject:
    name: str
    attributes: list[str] = field(default_factory=list)


@dataclass
class Relation:
    subject: int  # index into SceneGraph.objects
    predicate: str
    object: int


@dataclass
class SceneGraph:
    objects: list[SGObject] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SceneGraph:
        """From the json form; raises ValueError on a relation that points outside the objects."""
        objects = [SGObject(str(o["name"]), [str(a) for a in o.get("attributes", [])])
                   for o in data.get("objects", [])]
        relations = [Relation(int(r["subject"]), str(r["predicate"]), int(r["object"]))
                     for r in data.get("relations", [])]
        for r in relations:
            if not (0 <= r.subject < len(objects) and 0 <= r.object < len(objects)):
                raise ValueError(f"scene graph relation {r} points outside its {len(objects)} objects")
        return cls(objects, relations)

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [{"name": o.name, "attributes": list(o.attributes)} for o in self.objects],
                "relations": [{"subject": r.subject, "predicate": r.predicate, "object": r.object}
                              for r in self.relations]}

    def __bool__(self) -> bool:
        return bool(self.objects)

    def triples(self, max_triples: int = MAX_TRIPLES) -> list[tuple[str, str, str]]:
        """(head, relation, tail) strings: relations first as (subject, predicate, object), then
        attributes as (object, "is", attribute), in order; at most max_triples of them.

        Relations come first so that truncation drops attributes before the structure between objects.
        """
        out = [(self.objects[r.subject].name, r.predicate, self.objects[r.object].name) for r in self.relations]
        out += [(o.name, "is", a) for o in self.objects for a in o.attributes]
        return out[:max_triples]

    def render(self) -> str:
        """A caption for the graph: "a red circle to the left of a blue square", "a red circle".

        One clause per relation ("<subject> <phrase> <object>"), then every object no relation
        mentions, joined with " and ": "a red cube and a blue ball". An object's first mention takes
        "a"/"an", later mentions "the".
        """
        mentioned: set[int] = set()

        def phrase(i: int) -> str:
            o = self.objects[i]
            words = " ".join([*o.attributes, o.name])
            if i in mentioned:
                return f"the {words}"
            mentioned.add(i)
            return f"{_article(words)} {words}"

        clauses = []
        for r in self.relations:
            subject = phrase(r.subject)
            clauses.append(f"{subject} {PREDICATE_PHRASES.get(r.predicate, r.predicate)} {phrase(r.object)}")
        clauses += [phrase(i) for i in range(len(self.objects)) if i not in mentioned]
        return " and ".join(clauses)


def _article(words: str) -> str:
    return "an" if words and words[0].lower() in "aeiou" else "a"
