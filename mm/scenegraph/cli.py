"""mm-scenegraph: what Structure-CLIP makes of captions — scene graph, in-caption negatives, reasons.

    mm-scenegraph --caption "a man riding a horse on a beach" --caption "a black and white cat"
    mm-scenegraph --captions captions.txt --parser spacy --json > graphs.jsonl
    mm-scenegraph --data "shards/coco-{000000..000009}.tar" --limit 200
    mm-scenegraph --expected tests/data/captions_real.jsonl     # figures against hand-written graphs

Prints one block per caption (or, with --json, one JSON object per line: caption, parser, graph,
negatives {relation, attribute} — the first in-caption swap of each kind or null — and reasons), then
a summary line with the captions without a negative counted by reason (on stderr with --json).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mm.errors import UserError, cli_main
from mm.scenegraph.captions import _MISSING, CaptionAnalysis, analyse_caption
from mm.scenegraph.graph import SceneGraph
from mm.scenegraph.negatives import KINDS, caption_words
from mm.scenegraph.parse import PARSERS, caption_parser, describe_parser, resolve_parser


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm-scenegraph", description=__doc__.split("\n\n")[0])
    p.add_argument("--caption", action="append", default=[], metavar="TEXT", help="a caption (repeatable)")
    p.add_argument("--captions", metavar="FILE", help="a text file with one caption per line")
    p.add_argument("--data", metavar="SHARDS", help="WebDataset shards (brace patterns allowed): each sample's "
                   "txt caption, with its json scene_graph when it has one (as training reads it)")
    p.add_argument("--expected", metavar="FILE", help="a JSON-lines file of captions with hand-written 'graph' "
                   "and 'negatives': prints how many graphs and negatives match")
    p.add_argument("--limit", type=int, default=0, help="read at most this many shard samples (0: all)")
    p.add_argument("--parser", choices=PARSERS, default="auto",
                   help="auto: spaCy when an English pipeline loads, else the simple parser for the captions "
                        "it reads completely; spacy; simple")
    p.add_argument("--negatives", nargs="+", choices=KINDS, default=list(KINDS), help="swap kinds")
    p.add_argument("--json", action="store_true", help="one JSON object per caption and line")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _shard_captions(pattern: str, limit: int) -> Iterator[tuple[str, Any]]:
    import braceexpand
    import webdataset as wds

    urls = list(braceexpand.braceexpand(pattern))
    missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
    if missing:
        raise UserError(f"--data: no such shard {missing[0]}")
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        if "txt" not in sample:
            continue
        caption = sample["txt"].decode("utf-8", "replace").strip()
        graph: Any = _MISSING
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except ValueError:
                meta = {"scene_graph": None}  # unreadable json: counted as a malformed graph
            if isinstance(meta, dict) and "scene_graph" in meta:
                graph = meta["scene_graph"]
        yield caption, graph
        n += 1
        if limit and n >= limit:
            return


def _read_expected(path: str) -> list[dict[str, Any]]:
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--expected: no such file {path}") from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                record = json.loads(line)
                SceneGraph.from_dict(record["graph"])
                records.append(record)
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"--expected {path}:{n}: not a caption record ({e})") from None
    return records


def canonical_graph(graph: SceneGraph) -> tuple:
    """A graph up to the order of its relations and of each object's attributes."""
    objects = tuple((o.name, tuple(sorted(o.attributes))) for o in graph.objects)
    return objects, tuple(sorted((r.subject, r.predicate, r.object) for r in graph.relations))


def is_permutation(negative: str, caption: str) -> bool:
    return Counter(caption_words(negative)) == Counter(caption_words(caption))


def figures(results: list[CaptionAnalysis], expected: list[dict[str, Any]]) -> dict[str, Any]:
    """Graph accuracy, negative agreement, permutation check and relation-negative coverage."""
    n = len(results)
    graphs_equal = sum(canonical_graph(r.graph) == canonical_graph(SceneGraph.from_dict(e["graph"]))
                       for r, e in zip(results, expected))
    negatives = [neg for r in results for texts in r.negatives.values() for neg in texts]
    permutations = sum(is_permutation(neg, r.caption) for r in results for texts in r.negatives.values()
                       for neg in texts)
    swaps_equal = sum(all(sorted(r.negatives.get(k, [])) == sorted(e.get("negatives", {}).get(k, []))
                          for k in r.negatives) for r, e in zip(results, expected))
    with_relation = [r for r, e in zip(results, expected) if e["graph"].get("relations")]
    relation_negative = sum(bool(r.negatives.get("relation")) for r in with_relation)
    return {"captions": n, "graphs_equal": graphs_equal, "graph_accuracy": graphs_equal / max(n, 1),
            "negatives_equal": swaps_equal, "negative_accuracy": swaps_equal / max(n, 1),
            "negatives": len(negatives), "word_permutations": permutations,
            "captions_with_relation": len(with_relation), "with_relation_negative": relation_negative,
            "relation_negative_share": relation_negative / max(len(with_relation), 1)}


def _graph_text(graph: SceneGraph) -> str:
    parts = [f"{graph.objects[r.subject].name} -{r.predicate}-> {graph.objects[r.object].name}"
             for r in graph.relations]
    parts += [f"{' '.join(o.attributes)} {o.name}".strip() for o in graph.objects if o.attributes]
    parts += [o.name for k, o in enumerate(graph.objects)
              if not o.attributes and not any(k in (r.subject, r.object) for r in graph.relations)]
    return "; ".join(parts) or "(empty)"


def _block(r: CaptionAnalysis) -> str:
    lines = [f"caption    {r.caption}", f"graph      {_graph_text(r.graph)}  [{r.parser}]"]
    for kind, texts in r.negatives.items():
        shown = texts[0] if texts else f"-  ({r.reasons.get(kind, '')})"
        more = f"  (+{len(texts) - 1} more)" if len(texts) > 1 else ""
        lines.append(f"{kind:<10} {shown}{more}")
    return "\n".join(lines)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def summary(results: list[CaptionAnalysis]) -> str:
    kinds = results[0].negatives if results else {}
    have = ", ".join(f"{sum(bool(r.negatives[k]) for r in results)} with {_article(k)} {k} negative"
                     for k in kinds)
    reasons = Counter(r.reason for r in results if r.reason)
    text = f"{len(results)} captions: {have}"
    if reasons:
        text += "; without a negative: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
    return text


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.limit < 0:
        raise UserError("--limit must be >= 0")
    sources = [bool(args.caption), bool(args.captions), bool(args.data), bool(args.expected)]
    if not any(sources):
        raise UserError("give captions: --caption TEXT, --captions FILE, --data SHARDS or --expected FILE")
    name = resolve_parser(args.parser, "--parser")  # a missing spaCy model fails before any caption is read
    parse = caption_parser(name)
    items: list[tuple[str, Any]] = [(c, _MISSING) for c in args.caption]
    if args.captions:
        try:
            text = Path(args.captions).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            raise UserError(f"--captions: no such file {args.captions}") from None
        items += [(line.strip(), _MISSING) for line in text.splitlines() if line.strip()]
    expected = _read_expected(args.expected) if args.expected else []
    first_expected = len(items)
    items += [(e["caption"], _MISSING) for e in expected]
    if args.data:
        items += list(_shard_captions(args.data, args.limit))
    if not args.json:
        print(f"parser: {describe_parser(name, args.parser)}")
    results = []
    for caption, graph_json in items:
        r = analyse_caption(caption, parse, name, args.negatives, graph_json)
        results.append(r)
        print(json.dumps(r.to_json(), ensure_ascii=False) if args.json else _block(r) + "\n", flush=True)
    out = sys.stderr if args.json else sys.stdout
    print(summary(results), file=out)
    if expected:
        f = figures(results[first_expected:first_expected + len(expected)], expected)
        print(f"graphs equal to the expected ones: {f['graphs_equal']}/{f['captions']} "
              f"({100 * f['graph_accuracy']:.1f}%); negatives equal: {f['negatives_equal']}/{f['captions']} "
              f"({100 * f['negative_accuracy']:.1f}%); word permutations of their caption: "
              f"{f['word_permutations']}/{f['negatives']}; captions with a relation that get a relation "
              f"negative: {f['with_relation_negative']}/{f['captions_with_relation']} "
              f"({100 * f['relation_negative_share']:.1f}%)", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
