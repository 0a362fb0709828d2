"""mm export: write an export in another format.

    mm export runs/topolora/export/model.safetensors --format sam --out sam_merged.safetensors \
        [--base-checkpoint checkpoints/sam_vit_b_01ec64.pth]

Formats (FORMATS):
  sam   a TopoLoRA-SAM export with its LoRA folded into the image-encoder weights: a full export whose
        state dict is a segment_anything SAM state dict plus `adapter.*` (mm/evaluate/merge_lora.py;
        the old `mm-merge-lora EXPORT --out OUT` does the same).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from mm.cliargs import add_debug, command_prog
from mm.errors import cli_main


def _sam(args: argparse.Namespace) -> str:
    from mm.evaluate.merge_lora import merge_export

    result = merge_export(args.export, args.out, args.base_checkpoint, args.overwrite)
    return (f"merged {result['lora_layers']} LoRA layers; wrote {result['out']} ({result['tensors']} tensors, "
            f"{result['bytes'] / 2**20:.1f} MiB): segment_anything SAM keys + adapter.*")


# format -> (what it writes, the function writing it and returning the line to print)
FORMATS: dict[str, tuple[str, Callable[[argparse.Namespace], str]]] = {
    "sam": ("TopoLoRA-SAM with LoRA merged: segment_anything keys + adapter.*", _sam),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=command_prog("export"), description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="formats:\n" + "\n".join(f"  {k:<6} {v[0]}" for k, v in FORMATS.items()))
    p.add_argument("export", help="an mm export (.safetensors)")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="the format to write")
    p.add_argument("--out", required=True, help="the file to write (.safetensors)")
    p.add_argument("--base-checkpoint", default=None,
                   help="sam: the base SAM checkpoint of a trainable-only export, when it is not at the "
                        "recorded path")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_debug(p)
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(FORMATS[args.format][1](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
