"""mm export: write an export in another format.

    mm export runs/topolora/export/model.safetensors --format sam --out sam_merged.safetensors \
        [--base-checkpoint checkpoints/sam_vit_b_01ec64.pth]

Formats (FORMATS):
  sam   a TopoLoRA-SAM export with its LoRA folded into the image-encoder weights: a full export whose
        state dict is a segment_anything SAM state dict plus `adapter.*`, the SAM part alone as OUT.pth
        (sam_model_registry[variant](checkpoint=...) loads it; it cannot hold the adapter, and the
        difference this makes is measured on validation shards and printed) and a model card OUT.md
        (mm/evaluate/merge_lora.py; the old `mm-merge-lora EXPORT --out OUT` does the same).
  open_clip  a CLIP or Structure-CLIP export as a folder that open_clip loads unchanged
        (`open_clip.create_model_and_transforms("local-dir:DIR")`, `open_clip.get_tokenizer("local-dir:DIR")`)
        with a model card, README.md (mm/evaluate/open_clip_export.py). FILIP and STRUCTURE are refused.
  peft  a TopoLoRA-SAM export as peft's adapter folder for the image encoder of a segment_anything Sam
        (`peft.PeftModel.from_pretrained(sam.image_encoder, DIR)`), plus the spatial adapter and the
        trained mask decoder (topolora_sam_extra.safetensors), the base SAM where segment_anything cannot
        rebuild it, and a model card whose loading lines need no mm (mm/evaluate/peft_export.py).

    mm export runs/demo-clip/export/model.safetensors --format open_clip --out demo-clip-open_clip
    mm export runs/demo-topolora_sam/export/model.safetensors --format peft --out demo-topolora_sam-peft
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from mm.cliargs import add_debug, command_prog
from mm.errors import cli_main
from mm.evaluate.merge_lora import add_sam_arguments


def _sam(args: argparse.Namespace) -> str:
    from mm.evaluate.merge_lora import merge_export, result_lines

    return result_lines(merge_export(args.export, args.out, args.base_checkpoint, args.overwrite,
                                     args.compare_data, args.compare_images))


def _peft(args: argparse.Namespace) -> str:
    from mm.evaluate.peft_export import BASE_FILE, EXTRA_FILE, export_peft

    r = export_peft(args.export, args.out, args.base_checkpoint, args.overwrite)
    base = BASE_FILE if r["ship_base"] else f"the checkpoint {r['base_checkpoint']} (not copied)"
    return (f"wrote {r['out']}/ (peft LoRA, {r['lora_layers']} layers: adapter_config.json + "
            f"adapter_model.safetensors; spatial adapter + mask decoder: {EXTRA_FILE}; base SAM: {base}; "
            f"README.md): PeftModel.from_pretrained(sam.image_encoder, \"{r['out']}\")")


def _open_clip(args: argparse.Namespace) -> str:
    from mm.evaluate.open_clip_export import export_open_clip

    result = export_open_clip(args.export, args.out, args.overwrite)
    kee = "; the KEE is not carried (plain CLIP text tower)" if result["task"] == "structure_clip" else ""
    return (f"wrote {result['out']}/ ({result['tensors']} tensors, open_clip_config.json, README.md){kee}: "
            f"open_clip.create_model_and_transforms(\"local-dir:{result['out']}\")")


# format -> (what it writes, the function writing it and returning the line to print)
FORMATS: dict[str, tuple[str, Callable[[argparse.Namespace], str]]] = {
    "sam": ("TopoLoRA-SAM with LoRA merged: segment_anything keys + adapter.*", _sam),
    "peft": ("TopoLoRA-SAM as a peft adapter folder for a segment_anything SAM + adapter and decoder", _peft),
    "open_clip": ("CLIP / Structure-CLIP as an open_clip local-dir: folder with a model card", _open_clip),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=command_prog("export"), description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="formats:\n" + "\n".join(f"  {k:<10} {v[0]}" for k, v in FORMATS.items()))
    p.add_argument("export", help="an mm export (.safetensors)")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="the format to write")
    p.add_argument("--out", required=True,
                   help="sam: the file to write (OUT.safetensors; OUT.pth and OUT.md beside it); open_clip, "
                        "peft: the folder to write")
    p.add_argument("--base-checkpoint", default=None,
                   help="sam, peft: the base SAM checkpoint of a trainable-only export, when it is not at the "
                        "recorded path")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists (open_clip: a non-empty folder)")
    add_sam_arguments(p)
    add_debug(p)
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(FORMATS[args.format][1](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
