"""mm-compositional: compositional image-text evaluation (SugarCrepe, ARO VG-Relation / VG-Attribution,
and relation / attribute swaps on the synthetic shapes world) of an exported model.

Each item is an image, its true caption and a false (perturbed) caption. The model scores both with
the cosine of encode_image and encode_text; an item is correct when the true caption scores strictly
higher (a tie is wrong). Any model with encode_image / encode_text works (CLIP, FILIP pooled,
Structure-CLIP, whose encode_text is the plain text tower). `--kee` scores a Structure-CLIP model's
captions with its Knowledge-Enhanced Encoder instead, each caption fused with the triples of its own
scene graph (parsed from the caption by --parser), as the authors' code evaluates VG-Relation /
VG-Attribution.

* SugarCrepe: json {id: {"filename", "caption", "negative_caption"}}, one file per perturbation type
  (the file stem, e.g. swap_att.json -> swap_att); accuracy per type.
* ARO VG-Relation: json list of {"image_path", "true_caption", "false_caption", "relation"} (also
  "relation_name"); accuracy per relation, macro-averaged over relations.
* ARO VG-Attribution: same with "attributes" (the attribute pair); accuracy per pair, averaged over
  pairs with at least --min-pair-items (25) items.
  ARO items with bbox_x/bbox_y/bbox_w/bbox_h are cropped to that box, as ARO does.
* Synthetic shapes: for each shard sample's scene graph (json `scene_graph`, else the caption read by
  --parser), the true caption is the graph rendered, the false ones its relation swaps (shapes_relation)
  and attribute swaps (shapes_attribute) from mm.scenegraph; accuracy overall and per predicate.

An item whose image file is missing or unreadable is skipped and counted (per file: `n` items scored,
`skipped` left out, `n_items` in the file), so part of COCO val2017 is enough for SugarCrepe; only a
file none of whose images can be read is an error. `--clip-benchmark-output` also writes each SugarCrepe
file's result as CLIP_benchmark does (task image_caption_selection, dataset sugar_crepe/<type>).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mm.cliargs import add_debug, command_prog
from mm.errors import DataError, UserError, check_output_file, cli_main, write_text_atomic
from mm.evaluate.models import add_model_arguments
from mm.evaluate.runtime import (
    add_output_arguments,
    add_runtime_arguments,
    announce_skip,
    plan_datasets,
    runtime_from_args,
)
from mm.scenegraph.parse import caption_parser, describe_parser, parse_simple, resolve_parser


@dataclass
class Item:
    image: Any  # a path (str) or an already preprocessed image tensor
    true_caption: str
    false_caption: str
    group: str = ""  # perturbation type, relation, attribute pair or predicate
    box: tuple[float, float, float, float] | None = None  # x, y, w, h crop (ARO)


# ---------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------

class _ImageSkip(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # "missing" or "unreadable"


def _load_image(item: Item, preprocess: Callable) -> torch.Tensor:
    if isinstance(item.image, torch.Tensor):
        return item.image
    from PIL import Image

    try:
        with Image.open(item.image) as image:
            image.load()
            rgb = image.convert("RGB")
    except FileNotFoundError:
        raise _ImageSkip("missing", f"{item.image}: no such image (set --images to the folder the file names "
                                    "are in)") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise _ImageSkip("unreadable", f"{item.image}: unreadable image ({type(e).__name__}: "
                                       f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if item.box is not None:
        x, y, w, h = item.box
        rgb = rgb.crop((int(x), int(y), int(x + w), int(y + h)))
    return preprocess(rgb)


@torch.no_grad()
def score_items(model: torch.nn.Module, tokenizer: Callable, preprocess: Callable, items: Sequence[Item],
                batch_size: int = 64, device: torch.device | str = "cpu", kee: bool = False,
                parse: Callable[[str], Any] = parse_simple, skipped: list | None = None,
                progress: str | None = None) -> torch.Tensor:
    """(N, 2) cosine similarities: column 0 the true caption's, column 1 the false caption's.

    kee: captions through the model's encode_captions (Structure-CLIP's KEE), each with the triples of
    its own graph as `parse` reads it, instead of encode_text.
    skipped: a list to collect (item index, kind, message) of items whose image is missing ("missing")
    or cannot be decoded ("unreadable"); their rows are NaN. Without it such an item is a DataError.
    progress: a progress bar with this label (on stderr when it is a terminal)."""
    from tqdm import tqdm

    def encode(captions: list[str]) -> torch.Tensor:
        if kee:
            return model.encode_captions(captions, tokenizer, parse)
        return model.encode_text(tokenizer(captions).to(device))

    was_training = model.training
    model.eval()
    bar = tqdm(total=len(items), desc=progress, unit="item", file=sys.stderr, leave=False,
               disable=progress is None or not sys.stderr.isatty())
    try:
        dtype = next(model.parameters(), torch.empty(0)).dtype
        scores = torch.full((len(items), 2), float("nan"))
        for start in range(0, len(items), batch_size):
            chunk, images, rows = items[start:start + batch_size], [], []
            for i, it in enumerate(chunk, start):
                try:
                    images.append(_load_image(it, preprocess))
                    rows.append(i)
                except _ImageSkip as e:
                    if skipped is None:
                        raise DataError(str(e)) from None
                    skipped.append((i, e.kind, str(e)))
            if rows:
                kept = [items[i] for i in rows]
                image = torch.stack(images).to(device)
                if image.is_floating_point():
                    image = image.to(dtype)
                v = F.normalize(model.encode_image(image).float(), dim=-1)
                t = F.normalize(encode([it.true_caption for it in kept]).float(), dim=-1)
                f = F.normalize(encode([it.false_caption for it in kept]).float(), dim=-1)
                scores[rows] = torch.stack([(v * t).sum(-1), (v * f).sum(-1)], 1).cpu()
            bar.update(len(chunk))
        return scores
    finally:
        bar.close()
        model.train(was_training)


def correct(scores: torch.Tensor) -> torch.Tensor:
    """True where the true caption scores strictly higher than the false one."""
    return scores[:, 0] > scores[:, 1]


def group_accuracy(items: Sequence[Item], hits: torch.Tensor) -> dict[str, dict[str, float]]:
    """{group: {"acc", "n"}} in sorted group order."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for item, hit in zip(items, hits.tolist()):
        counts[item.group][0] += int(hit)
        counts[item.group][1] += 1
    return {g: {"acc": c / n, "n": n} for g, (c, n) in sorted(counts.items())}


def _summary(items: Sequence[Item], hits: torch.Tensor) -> dict[str, Any]:
    return {"acc": float(hits.float().mean()) if len(hits) else float("nan"), "n": len(items)}


def _counts(n_items: int, skipped: list) -> dict[str, int]:
    """Item counts of one file: scored (`n`), in the file, skipped, and skipped by kind."""
    kinds = [kind for _, kind, _ in skipped]
    return {"n": n_items - len(skipped), "n_items": n_items, "skipped": len(skipped),
            "missing_images": kinds.count("missing"), "unreadable_images": kinds.count("unreadable")}


# ---------------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------------

def _read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def _image_path(name: str, images: str | Path | None) -> str:
    return name if images is None or os.path.isabs(name) else str(Path(images) / name)


def sugarcrepe_items(path: str | Path, images: str | Path | None) -> list[Item]:
    """Items of one SugarCrepe file; the group is the perturbation type (the file stem)."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: SugarCrepe files map ids to {{filename, caption, negative_caption}}")
    kind = Path(path).stem
    items = []
    for key, rec in data.items():
        if not isinstance(rec, dict) or not all(k in rec for k in ("filename", "caption", "negative_caption")):
            raise DataError(f"{path}: item {key!r} lacks filename / caption / negative_caption")
        items.append(Item(_image_path(str(rec["filename"]), images), str(rec["caption"]),
                          str(rec["negative_caption"]), kind))
    return items


def aro_items(path: str | Path, images: str | Path | None, kind: str) -> list[Item]:
    """Items of an ARO-style list; kind "relation" (group = relation) or "attribute" (group = the
    attribute pair joined with '|')."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise UserError(f"{path}: an ARO file is a JSON list of items")
    items = []
    for k, rec in enumerate(data):
        where = f"{path}: item {k}"
        if not isinstance(rec, dict) or not all(f in rec for f in ("image_path", "true_caption", "false_caption")):
            raise DataError(f"{where} lacks image_path / true_caption / false_caption")
        if kind == "relation":
            group = rec.get("relation", rec.get("relation_name"))
            if group is None:
                raise DataError(f"{where} has no 'relation'")
            group = str(group)
        else:
            attributes = rec.get("attributes")
            if attributes is None:
                raise DataError(f"{where} has no 'attributes'")
            group = "|".join(map(str, attributes)) if isinstance(attributes, list) else str(attributes)
        box = None
        if all(f"bbox_{c}" in rec for c in "xywh"):
            box = tuple(float(rec[f"bbox_{c}"]) for c in "xywh")
        items.append(Item(_image_path(str(rec["image_path"]), images), str(rec["true_caption"]),
                          str(rec["false_caption"]), group, box))
    return items


def macro_average(per_group: dict[str, dict[str, float]], min_items: int = 0) -> tuple[float, int]:
    """Mean of the per-group accuracies over groups with at least min_items items, and their number."""
    accs = [g["acc"] for g in per_group.values() if g["n"] >= min_items]
    return (sum(accs) / len(accs) if accs else float("nan")), len(accs)


def shapes_items(urls: str, preprocess: Callable, tokenizer: Callable,
                 parse: Callable[[str], Any] = parse_simple) -> tuple[list[Item], list[Item], int]:
    """Relation-swap and attribute-swap items from shapes-world shards (one item per distinct swap) and
    the number of images read. Groups: the swapped predicate / "attribute". A sample without a json
    scene graph is read with `parse`."""
    from mm.data.image_text import image_text_map
    from mm.data.loader import Loader, StreamSpec, default_collate
    from mm.scenegraph.negatives import attribute_swap, relation_swap
    from mm.scenegraph.samples import sample_graph

    spec = StreamSpec(urls=urls, sample_map=image_text_map(preprocess, tokenizer), collate=default_collate,
                      batch_size=64, num_workers=0, shuffle_buffer=0, repeat=False, drop_last=False)
    relation, attribute, n_images = [], [], 0
    for batch in Loader(spec):
        for image, caption, meta in zip(batch["image"], batch["caption"], batch["meta"]):
            n_images += 1
            graph = sample_graph(meta, caption, parse)
            if not graph:
                continue
            positive = graph.render()
            seen = {positive.lower()}
            for swapped, original in zip(relation_swap(graph), _swappable_relations(graph)):
                text = swapped.render()
                if text.lower() not in seen:
                    seen.add(text.lower())
                    relation.append(Item(image, positive, text, original.predicate))
            for swapped in attribute_swap(graph):
                text = swapped.render()
                if text.lower() not in seen:
                    seen.add(text.lower())
                    attribute.append(Item(image, positive, text, "attribute"))
    return relation, attribute, n_images


def _swappable_relations(graph: Any) -> list:
    from mm.scenegraph.negatives import SYMMETRIC_PREDICATES

    return [r for r in graph.relations if r.subject != r.object and r.predicate not in SYMMETRIC_PREDICATES]


# ---------------------------------------------------------------------------------------------------
# Evaluation of every requested benchmark
# ---------------------------------------------------------------------------------------------------

def evaluate(model: torch.nn.Module, tokenizer: Callable, preprocess: Callable, *,
             sugarcrepe: Iterable[str] = (), aro_relation: str | None = None, aro_attribute: str | None = None,
             images: str | None = None, synthetic_shapes: str | None = None, min_pair_items: int = 25,
             batch_size: int = 64, device: torch.device | str = "cpu", kee: bool = False,
             parse: Callable[[str], Any] = parse_simple, skipped_images: list | None = None) -> dict[str, Any]:
    """Metrics per benchmark: sugarcrepe {type: {acc, n, ...counts}}; vg_relation {acc (macro over
    relations), micro_acc, n, ...counts, n_groups, per_relation}; vg_attribution {acc (mean over pairs
    with >= min_pair_items), micro_acc, n, ...counts, n_groups, per_pair}; shapes_relation /
    shapes_attribute {acc, n, per_predicate}. Counts of a file (see `_counts`): `n` items scored,
    `n_items` in the file, `skipped` (missing_images + unreadable_images); skipped items are left out of
    every accuracy, and `skipped_images` (a list, if given) collects {file, image, reason} of each.
    kee: score captions with the model's encode_captions (Structure-CLIP's KEE).
    parse: caption -> scene graph, for --kee triples and shapes samples without a json graph."""
    if kee and not hasattr(model, "encode_captions"):
        raise UserError("--kee needs a Structure-CLIP model (one with the Knowledge-Enhanced Encoder)")

    def run(items: list[Item], label: str) -> torch.Tensor:
        return correct(score_items(model, tokenizer, preprocess, items, batch_size, device, kee, parse,
                                   progress=label))

    def run_file(path: str, items: list[Item]) -> tuple[list[Item], torch.Tensor, dict[str, int]]:
        """The items of one file whose images could be read, their hits and the file's item counts."""
        skipped: list = []
        scores = score_items(model, tokenizer, preprocess, items, batch_size, device, kee, parse,
                             skipped=skipped, progress=Path(path).name)
        counts = _counts(len(items), skipped)
        if skipped:
            first = skipped[0][2]
            if not counts["n"]:
                raise DataError(f"{path}: none of its {len(items)} items has a readable image (first: {first})")
            print(f"warning: {path}: {len(skipped)} of {len(items)} items skipped "
                  f"({counts['missing_images']} images missing, {counts['unreadable_images']} unreadable; "
                  f"first: {first})", file=sys.stderr)
            if skipped_images is not None:
                skipped_images.extend({"file": str(path), "image": str(items[i].image), "reason": kind}
                                      for i, kind, _ in skipped)
        gone = {i for i, _, _ in skipped}
        keep = [i for i in range(len(items)) if i not in gone]
        return [items[i] for i in keep], correct(scores[keep]), counts

    results: dict[str, Any] = {}
    for path in sugarcrepe:
        items, hits, counts = run_file(path, sugarcrepe_items(path, images))
        results.setdefault("sugarcrepe", {})[Path(path).stem] = {**_summary(items, hits), **counts}
    for name, path, kind, min_items in (("vg_relation", aro_relation, "relation", 0),
                                        ("vg_attribution", aro_attribute, "attribute", min_pair_items)):
        if not path:
            continue
        items, hits, counts = run_file(path, aro_items(path, images, kind))
        per_group = group_accuracy(items, hits)
        acc, n_groups = macro_average(per_group, min_items)
        results[name] = {"acc": acc, "micro_acc": _summary(items, hits)["acc"], **counts,
                         "n_groups": n_groups, "min_group_items": min_items,
                         ("per_relation" if kind == "relation" else "per_pair"): per_group}
    if synthetic_shapes:
        relation, attribute, n_images = shapes_items(synthetic_shapes, preprocess, tokenizer, parse)
        if not n_images:
            raise DataError(f"{synthetic_shapes}: no readable samples")
        for name, items in (("shapes_relation", relation), ("shapes_attribute", attribute)):
            hits = run(items, name) if items else torch.zeros(0, dtype=torch.bool)
            results[name] = {**_summary(items, hits), "n_images": n_images,
                             "per_predicate": group_accuracy(items, hits) if name == "shapes_relation" else {}}
    return results


def table(results: dict[str, Any]) -> str:
    rows = [("benchmark", "subset", "n", "skipped", "accuracy")]

    def fmt(acc: float) -> str:
        return "n/a" if acc is None or (isinstance(acc, float) and math.isnan(acc)) else f"{acc:.3f}"

    def skipped(r: dict) -> str:
        return str(r.get("skipped", 0))

    for kind, res in results.get("sugarcrepe", {}).items():
        rows.append(("sugarcrepe", kind, str(res["n"]), skipped(res), fmt(res["acc"])))
    if "vg_relation" in results:
        r = results["vg_relation"]
        rows.append(("vg_relation", f"macro over {r['n_groups']} relations", str(r["n"]), skipped(r),
                     fmt(r["acc"])))
    if "vg_attribution" in results:
        r = results["vg_attribution"]
        rows.append(("vg_attribution", f"mean over {r['n_groups']} pairs >= {r['min_group_items']}",
                     str(r["n"]), skipped(r), fmt(r["acc"])))
    for name in ("shapes_relation", "shapes_attribute"):
        if name in results:
            r = results[name]
            rows.append((name, "all", str(r["n"]), "0", fmt(r["acc"])))
            for group, g in r.get("per_predicate", {}).items():
                rows.append((name, group, str(g["n"]), "0", fmt(g["acc"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=command_prog("compositional"),
        description="Compositional evaluation of an exported model: an item is correct when its true caption "
                    "scores strictly higher (cosine of encode_image and encode_text) than its false caption.")
    add_model_arguments(p)
    p.add_argument("--sugarcrepe", action="append", default=[], metavar="FILE.json",
                   help="a SugarCrepe file {id: {filename, caption, negative_caption}}; the perturbation type "
                        "is the file stem (repeatable)")
    p.add_argument("--aro-relation", metavar="FILE.json",
                   help="ARO VG-Relation list of {image_path, true_caption, false_caption, relation}; "
                        "macro-averaged over relations")
    p.add_argument("--aro-attribute", metavar="FILE.json",
                   help="ARO VG-Attribution list of {image_path, true_caption, false_caption, attributes}; "
                        "averaged over attribute pairs with at least --min-pair-items items")
    p.add_argument("--min-pair-items", type=int, default=25,
                   help="VG-Attribution: attribute pairs with fewer items are left out of the average (25)")
    p.add_argument("--images", help="folder that relative image paths / file names are taken from")
    p.add_argument("--synthetic-shapes", metavar="SHARDS",
                   help="shapes-world shards: relation-swap and attribute-swap items from their scene graphs")
    p.add_argument("--kee", action="store_true",
                   help="Structure-CLIP: score each caption with the Knowledge-Enhanced Encoder and the triples of "
                        "its own scene graph (parsed from the caption) instead of the plain text tower")
    p.add_argument("--parser", default="auto", metavar="{auto,spacy,simple}",
                   help="how a caption becomes a scene graph (--kee triples; shapes samples without a json "
                        "graph): spaCy dependency rules, the built-in simple parser, or auto (spaCy when "
                        "en_core_web_sm is installed, as Structure-CLIP's loss.parser)")
    p.add_argument("--batch-size", type=int, default=64)
    add_output_arguments(p, "the results JSON (one file for every benchmark; {dataset} is 'compositional')")
    p.add_argument("--clip-benchmark-output", metavar="TEMPLATE",
                   help="also write each --sugarcrepe file's result as CLIP_benchmark's JSON (task "
                        "image_caption_selection, dataset sugar_crepe/<type>), to this path with {dataset}, "
                        "{model}, {pretrained}, {task} and {language} filled in as CLIP_benchmark's --output "
                        "does, e.g. 'results/{dataset}_{task}.json'")
    add_runtime_arguments(p)
    add_debug(p)
    return p


CLIP_BENCHMARK_FIELDS = ("dataset", "model", "pretrained", "pretrained_full_path", "task", "language")


def clip_benchmark_paths(template: str, sugarcrepe: Sequence[str], model: str, pretrained: str) -> dict[str, str]:
    """{SugarCrepe file: output path} from a CLIP_benchmark-style --output template (checked writable,
    one distinct path per file). {dataset} is sugar_crepe_<type>, {pretrained} the weights' file name."""
    if not sugarcrepe:
        raise UserError("--clip-benchmark-output: CLIP_benchmark's form is written for --sugarcrepe files; give one")
    paths = {}
    for path in sugarcrepe:
        fields = {"dataset": f"sugar_crepe_{Path(path).stem}", "model": model,
                  "pretrained": Path(pretrained).name, "pretrained_full_path": pretrained.replace("/", "_"),
                  "task": "image_caption_selection", "language": "en"}
        try:
            paths[path] = template.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"--clip-benchmark-output {template!r}: not a template of "
                            f"{', '.join('{' + f + '}' for f in CLIP_BENCHMARK_FIELDS)} ({type(e).__name__}: {e})") \
                from None
    if len(set(paths.values())) < len(paths):
        raise UserError(f"--clip-benchmark-output {template!r}: every --sugarcrepe file would be written to the same "
                        "path; put {dataset} in it")
    for out in paths.values():
        check_output_file(out, "--clip-benchmark-output")
    return paths


def clip_benchmark_record(kind: str, result: dict[str, Any], model: str, pretrained: str) -> dict[str, Any]:
    """One SugarCrepe type's result in CLIP_benchmark's image_caption_selection form (`clip_benchmark
    build` reads it), with the item counts beside it."""
    return {"dataset": f"sugar_crepe/{kind}", "model": model, "pretrained": pretrained,
            "task": "image_caption_selection", "metrics": {"acc": result["acc"]}, "language": "en",
            "n_items": result["n_items"], "n_scored": result["n"], "skipped_images": result["skipped"]}


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (args.sugarcrepe or args.aro_relation or args.aro_attribute or args.synthetic_shapes):
        raise UserError("nothing to evaluate: give --sugarcrepe, --aro-relation, --aro-attribute and/or "
                        "--synthetic-shapes")
    if args.min_pair_items < 1 or args.batch_size < 1:
        raise UserError("--min-pair-items and --batch-size must be >= 1")
    runtime = runtime_from_args(args)
    from mm.evaluate.models import model_fields

    # One results file for all benchmarks of the call: {dataset} is "compositional".
    run = plan_datasets(["compositional"], {"--output": args.output},
                        {**model_fields(args), "task": "compositional", "scoring": "pooled"}, args.skip_existing)[0]
    if run.skip:
        announce_skip(run)
        return 0
    output = run.outputs["--output"]
    parser = resolve_parser(args.parser, "--parser") if args.kee or args.synthetic_shapes else None
    parser_text = describe_parser(parser, args.parser) if parser else None
    from mm.evaluate.models import load_eval_model

    loaded = load_eval_model(args)
    cb_paths = (clip_benchmark_paths(args.clip_benchmark_output, args.sugarcrepe, loaded.name, loaded.source)
                if args.clip_benchmark_output else {})
    skipped_images: list[dict] = []
    loaded.model.to(runtime.device)
    with runtime.autocast():
        results = evaluate(loaded.model, loaded.tokenizer, loaded.preprocess,
                           sugarcrepe=args.sugarcrepe, aro_relation=args.aro_relation,
                           aro_attribute=args.aro_attribute, images=args.images,
                           synthetic_shapes=args.synthetic_shapes, min_pair_items=args.min_pair_items,
                           batch_size=args.batch_size, device=runtime.device, kee=args.kee,
                           parse=caption_parser(parser) if parser else parse_simple, skipped_images=skipped_images)
    record = {"checkpoint": loaded.source, "model_task": loaded.task,
              "model": loaded.name, "task": "compositional",
              "scoring": ("cosine(encode_image, KEE-fused caption)" if args.kee
                          else "cosine(encode_image, encode_text)")
              + "; correct = true caption strictly higher",
              "parser": parser_text, **runtime.describe(),
              "results": results, "skipped_images": len(skipped_images), "skipped": skipped_images[:1000]}
    text = json.dumps(record)
    if output:
        write_text_atomic(output, text + "\n", announce="--output")
    for path, out in cb_paths.items():
        cb_record = clip_benchmark_record(Path(path).stem, results["sugarcrepe"][Path(path).stem], loaded.name,
                                          loaded.source)
        write_text_atomic(out, json.dumps(cb_record) + "\n", announce="--clip-benchmark-output")
    print(f"compositional {loaded.task} ({loaded.source})")
    if parser:
        parsed = [what for what, on in (("shapes samples without a json scene graph", args.synthetic_shapes),
                                        ("--kee captions", args.kee)) if on]
        print(f"{' and '.join(parsed)} are parsed by {parser_text}")
    print(table(results))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
