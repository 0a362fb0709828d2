"""mm-shards: turn raw data into the WebDataset shards every trainer reads.

  mm-shards synthetic --out data/shapes --num-samples 2000
  mm-shards synthetic --world vessels --out data/vessels --num-samples 500
  mm-shards synthetic --world clutter --out data/clutter/val --num-samples 240 --balanced --seed 1
  mm-shards folder --images imgs/ --captions captions.csv --out data/pairs
  mm-shards coco --annotations captions_val2017.json --images val2017/ --out data/coco --scene-graphs auto
  mm-shards seg --images DRIVE/training/images --masks DRIVE/training/1st_manual --image-suffix _training \
      --mask-suffix _manual1 --fov DRIVE/training/mask --fov-suffix _training_mask --out data/drive
  mm-shards dataset --name drive --root DRIVE/ --split train --out data/drive
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from mm.data.shards import (
    ENCODINGS,
    ShardReport,
    write_coco_shards,
    write_image_text_shards,
)
from mm.data.synthetic import CLASSNAMES, write_clutter, write_shapes_world, write_vessels
from mm.errors import UserError, cli_main
from mm.scenegraph.parse import INSTALL_HINT, PARSERS

_SHOWN_SKIPS = 10
EXIT_SOME_SKIPPED = 1
WORLDS = ("shapes", "vessels", "clutter")

_DESCRIPTION = """\
Write WebDataset shards named OUT/PREFIX-000000.tar, OUT/PREFIX-000001.tar, ...

Image-text samples hold the image (jpg, png or webp), its caption (txt) and a json metadata object;
segmentation samples hold the image (png), its binary mask (mask.png, 0/255) and optionally a
field-of-view mask (fov.png). Unreadable images, missing files and mismatched masks are skipped and
listed in the summary; they never stop the run.

Exit codes (as mm-segment): 0 every input written; 1 some inputs skipped (listed), the rest written;
2 nothing written (bad argument, no usable input), with one `error:` line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm-shards", description=_DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "synthetic", help="the synthetic shapes, vessels or clutter world (demo and tests)",
        description="shapes: coloured shapes on a dark background, alone (labelled with one of "
                    f"{len(CLASSNAMES)} classes such as '{CLASSNAMES[0]}') or two in a spatial relation, "
                    "with captions, scene graphs and masks. vessels: segmentation only, 2-5 thin "
                    "branching curves (1-3 px) on a dark reddish fundus-like background, with their "
                    "masks. clutter: 4-6 small objects among faint strokes, captions naming one or two "
                    "by colour, shape and position (json 'named': their indices); with --balanced one "
                    "object of a labelled class among neutral-coloured distractors. Deterministic for a "
                    "given seed.")
    p.add_argument("--world", choices=WORLDS, default="shapes", help="which world (default shapes)")
    p.add_argument("--num-samples", type=int, default=2000, help="number of samples (default 2000)")
    p.add_argument("--image-size", type=int, default=64,
                   help="image side in pixels, at least 32, clutter 48 (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data (default 0)")
    p.add_argument("--single-fraction", type=float,
                   help="shapes only: share of single-object scenes; the rest show two related objects "
                        "(default 0.5)")
    p.add_argument("--balanced", action="store_true",
                   help="shapes and clutter: write a zero-shot evaluation set instead: single labelled "
                        "objects (clutter: among neutral distractors), every class equally often "
                        f"(--num-samples must be a multiple of {len(CLASSNAMES)}); use another --seed than "
                        "the training set")
    _add_output_options(p, prefix="", shard_size=500, images=False, default_prefix="the world's name")

    p = commands.add_parser(
        "folder", help="an image folder and a CSV or JSONL captions file",
        description="Image-text shards from a folder of images and a captions file: CSV with a header "
                    "row, or JSONL with one object per line. Each row names the image in a 'filepath' "
                    "or 'image' column (relative to --images, or absolute) and its caption in a "
                    "'caption' or 'text' column; other columns go into the json metadata ('label' "
                    "must be an integer class index).")
    p.add_argument("--images", required=True, help="folder the image paths are relative to")
    p.add_argument("--captions", required=True, help="captions file (.csv or .jsonl)")
    _add_output_options(p, prefix="shard", shard_size=1000, images=True)
    _add_scene_graph_option(p, "each caption")

    p = commands.add_parser(
        "coco", help="COCO-style captions (annotations json + image folder)",
        description="One sample per image of a COCO captions file: txt holds the first caption, the "
                    "json field 'captions' all of them (retrieval counts each as correct; training draws "
                    "one per epoch, data.captions) and 'image_id'.")
    p.add_argument("--annotations", required=True, help="captions json with 'images' and 'annotations'")
    p.add_argument("--images", required=True, help="folder holding the images' file_name paths")
    _add_output_options(p, prefix="coco", shard_size=1000, images=True)
    _add_scene_graph_option(p, "every caption (json 'scene_graphs', one per caption; 'scene_graph' the first's)")
    p.add_argument("--pair-per-caption", action="store_true",
                   help="one sample per caption (keys <image>_<n>) instead of one per image: for a task "
                        "that must see every pair each epoch; not for retrieval evaluation")

    p = commands.add_parser(
        "seg", help="binary segmentation: image folder + mask folder (+ field-of-view folder)",
        description="Pairs each image <stem><image-suffix>.* with the mask <stem><mask-suffix>.* (any "
                    "image extension). Images are read and normalised exactly as mm-segment reads them "
                    "(16-bit, float and multi-channel TIFF; --stretch/--percentiles/--db/--channels) and "
                    "stored as 8-bit PNG; each sample's json records the normalisation, which training "
                    "writes into its export for mm-segment. Masks: any non-zero label is foreground (> 127 "
                    "for JPEG masks; --mask-threshold), stored as 0/255. Images without a mask and masks "
                    "of another size are skipped and listed (exit code 1).")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--masks", required=True, help="folder of masks (may be the image folder)")
    p.add_argument("--mask-suffix", default="",
                   help="text after the image stem in mask names, e.g. '_1stHO' for Image_01L_1stHO.png")
    p.add_argument("--image-suffix", default="",
                   help="text at the end of image stems that the mask and FOV suffixes replace, e.g. "
                        "'_training' (DRIVE: 21_training.tif -> 21_manual1.gif) or '_fram' (CVC-612: "
                        "1_fram.png -> 1_mask.png); only images whose stem ends with it are read")
    p.add_argument("--fov", help="folder of field-of-view masks (optional)")
    p.add_argument("--fov-suffix", default="", help="text after the image stem in field-of-view mask names")
    p.add_argument("--max-size", type=int, help="shrink images (and masks) so the longest side is at most "
                                                "this many pixels; default: keep the size")
    _add_seg_options(p)
    _add_output_options(p, prefix="seg", shard_size=None, images=False)

    p = commands.add_parser(
        "dataset", help="a segmentation dataset in its distributed layout (DRIVE, STARE, CHASE_DB1, "
                        "Kvasir-SEG, SL-SSDD)",
        description="Reads the dataset's own folder layout (see mm/data/seg_readers.py), derives "
                    "field-of-view masks where the dataset has none, and writes segmentation shards "
                    "as `mm-shards seg` does.")
    p.add_argument("--name", required=True, help="drive, stare, chase_db1, kvasir_seg or sl_ssdd")
    p.add_argument("--root", required=True, help="the dataset's top folder as downloaded")
    p.add_argument("--split", default="train", choices=("train", "test", "all"))
    p.add_argument("--max-size", type=int, help="shrink images (and masks) so the longest side is at most "
                                                "this many pixels; default: keep the size")
    p.add_argument("--no-derive-fov", action="store_true",
                   help="STARE, CHASE_DB1: write no field-of-view mask instead of deriving one")
    _add_seg_options(p)
    _add_output_options(p, prefix="", shard_size=None, images=False)
    return parser


def _add_seg_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mask-threshold", default="auto",
                   help="foreground of a label: 'nonzero' (any non-zero value in any channel), a number T "
                        "(value > T, e.g. 127 for anti-aliased drawings) or auto (default: nonzero, > 127 "
                        "for lossy JPEG/WebP masks)")
    p.add_argument("--stretch", choices=("auto", "always"), default="auto",
                   help="percentile stretch of 16-bit/float images (auto) or of every image (always, e.g. "
                        "8-bit SAR); the same option as mm-segment's")
    p.add_argument("--percentiles", type=float, nargs=2, default=(1.0, 99.0), metavar=("LO", "HI"),
                   help="stretch limits (default 1 99)")
    p.add_argument("--db", action="store_true", help="SAR: intensities to dB (10 log10) before the stretch")
    p.add_argument("--channels", type=_channel_list, help="stored channels to use as R,G,B, e.g. 0,1,0")


def _channel_list(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected channel numbers like 0,1,0, got {text!r}") from None


def _shard_size(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _add_output_options(p: argparse.ArgumentParser, prefix: str, shard_size: int | None, images: bool,
                        default_prefix: str = "<dataset>-<split>") -> None:
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    if shard_size is None:
        p.add_argument("--shard-size", type=_shard_size, default=None,
                       help="samples per shard; default auto: one shard per image up to 64 images, then 64 "
                            "shards (every rank x loader worker needs shards of its own)")
    else:
        p.add_argument("--shard-size", type=int, default=shard_size,
                       help=f"samples per shard (default {shard_size})")
    p.add_argument("--prefix", default=prefix, help=f"shard file name prefix (default {prefix or default_prefix})")
    if images:
        p.add_argument("--reencode", choices=ENCODINGS,
                       help="re-encode every image in this format; default: keep the original bytes "
                            "(images in other formats than jpg/png/webp become png)")
        p.add_argument("--max-size", type=int,
                       help="shrink images so the longest side is at most this many pixels (re-encodes "
                            "those images); default: keep the size")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards with the same prefix already in the output folder")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON line on stdout (the summary goes to stderr)")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")


def _add_scene_graph_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--scene-graphs", choices=("none", *PARSERS), default="none",
                   help=f"parse {what} into a scene graph stored as json 'scene_graph' (Structure-CLIP "
                        "then never parses): simple (built-in, simple captions only), spacy (dependency "
                        f"rules; needs spaCy and its model: {INSTALL_HINT}), auto (spacy if installed, "
                        "else simple for the captions it reads completely); empty graphs are not stored; "
                        "captions without a hard negative are counted by reason (default none)")


def _run(args: argparse.Namespace) -> ShardReport:
    progress = sys.stderr.isatty()
    common = {"shard_size": args.shard_size, "prefix": args.prefix, "overwrite": args.overwrite,
              "progress": progress}
    if args.command == "synthetic":
        common["prefix"] = args.prefix or args.world
        if args.world == "vessels":
            if args.single_fraction is not None or args.balanced:
                raise UserError("--single-fraction and --balanced apply to --world shapes only")
            shards = write_vessels(args.out, args.num_samples, image_size=args.image_size, seed=args.seed,
                                   **common)
        elif args.world == "clutter":
            if args.single_fraction is not None:
                raise UserError("--single-fraction applies to --world shapes only")
            shards = write_clutter(args.out, args.num_samples, image_size=args.image_size, seed=args.seed,
                                   balanced=args.balanced, **common)
        else:
            single = 0.5 if args.single_fraction is None else args.single_fraction
            shards = write_shapes_world(args.out, args.num_samples, image_size=args.image_size,
                                        seed=args.seed, single_fraction=single, balanced=args.balanced,
                                        **common)
        return ShardReport(written=args.num_samples, shards=shards)
    if args.command == "folder":
        return write_image_text_shards(args.images, args.captions, args.out, reencode=args.reencode,
                                       max_size=args.max_size, scene_graphs=args.scene_graphs, **common)
    if args.command == "coco":
        return write_coco_shards(args.annotations, args.images, args.out, reencode=args.reencode,
                                 max_size=args.max_size, scene_graphs=args.scene_graphs,
                                 pair_per_caption=args.pair_per_caption, **common)
    from mm.data.seg_readers import MaskRule, Normalisation, write_dataset_shards, write_folder_shards

    seg = {"normalisation": Normalisation(args.stretch, tuple(args.percentiles), args.db,
                                          tuple(args.channels) if args.channels else None),
           "mask_rule": MaskRule(args.mask_threshold), "max_size": args.max_size}
    if args.command == "dataset":
        common["prefix"] = args.prefix or None  # default: <dataset>-<split>
        options = {"derive_fov_mask": False} if args.no_derive_fov else {}
        return write_dataset_shards(args.name, args.root, args.out, split=args.split, **seg, **common, **options)
    return write_folder_shards(args.images, args.masks, args.out, fov_dir=args.fov, mask_suffix=args.mask_suffix,
                               fov_suffix=args.fov_suffix, image_suffix=args.image_suffix, **seg, **common)


def format_summary(report: ShardReport, out_dir: str) -> str:
    """The human-readable summary: counts, then up to ten skipped inputs with their reasons."""
    lines = [f"wrote {report.written} samples in {len(report.shards)} shards to {out_dir}"]
    if report.shards:
        lines[0] += f" ({shard_pattern(report.shards)})"
    if report.scene_graphs is not None:
        lines[0] += f" ({report.scene_graphs} with a scene graph, {report.scene_graph_parser} parser)"
        if report.no_negative:
            lines.append("captions without a hard negative: " + ", ".join(
                f"{reason} {n}" for reason, n in sorted(report.no_negative.items())))
    if report.skipped:
        lines[0] += f"; skipped {len(report.skipped)}:"
        lines += [f"  {path}: {reason}" for path, reason in report.skipped[:_SHOWN_SKIPS]]
        if len(report.skipped) > _SHOWN_SKIPS:
            lines.append(f"  ... and {len(report.skipped) - _SHOWN_SKIPS} more")
    if report.stretched:
        lines.append(f"{report.stretched} image(s) had 16-bit or float pixels: stored as 8 bits, each stretched "
                     "from its 1st to its 99th percentile")
    lines += report.notes
    return "\n".join(lines)


def shard_pattern(shards: list[str]) -> str:
    """The brace pattern a config's data.train takes for these shards: out/x-{000000..000019}.tar."""
    if len(shards) == 1:
        return shards[0]
    first, last = shards[0], shards[-1]
    return f"{first[:-10]}{{{first[-10:-4]}..{last[-10:-4]}}}.tar"


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = _run(args)
    summary = format_summary(report, args.out)
    if args.json:
        print(summary, file=sys.stderr)
        result = dataclasses.asdict(report)
        result["skipped"] = [{"path": path, "reason": reason} for path, reason in report.skipped]
        print(json.dumps({"command": args.command, "out": args.out, **result}))
    else:
        print(summary)
    # As mm-segment: 1 when some inputs were skipped (named above) and the rest written.
    return EXIT_SOME_SKIPPED if report.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
