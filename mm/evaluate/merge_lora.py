"""mm-merge-lora: fold a TopoLoRA-SAM export's LoRA into the image-encoder weights.

    mm-merge-lora runs/topolora/export/model.safetensors --out sam_merged.safetensors \
        [--base-checkpoint checkpoints/sam_vit_b_01ec64.pth]

The input is either kind of export (trainable-only ones are completed from their base SAM checkpoint,
see mm.tasks.load_exported). The output is a full export whose state dict is a
segment_anything SAM state dict (image_encoder.*, prompt_encoder.*, mask_decoder.*, the keys of
sam_model_registry[variant]()) plus `adapter.*`; its config has LoRA off (model.lora_r = 0), so
load_exported and every mm command read it as a plain full export. At model.image_size 1024 the SAM
part loads into segment_anything's own builder; at other sizes its position embeddings have that
size's shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from mm.errors import UserError, cli_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm-merge-lora", description=__doc__.split("\n\n")[0])
    p.add_argument("export", help="a topolora_sam export (.safetensors), full or trainable-only")
    p.add_argument("--out", required=True, help="the merged .safetensors to write")
    p.add_argument("--base-checkpoint", default=None,
                   help="the base SAM checkpoint of a trainable-only export, when it is not at the "
                        "recorded path")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def merge_export(export: str | Path, out: str | Path, base_checkpoint: str | None = None,
                 overwrite: bool = False) -> dict:
    """Write the merged export to `out`; returns {'out', 'lora_layers', 'tensors', 'bytes'}."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from mm.config import config_json
    from mm.exports import read_export_metadata, save_export
    from mm.models.sam import merge_lora
    from mm.tasks import load_exported

    export, out = Path(export), Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name, e.g. {out / 'merged.safetensors'}")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it")
    if out.resolve() == export.resolve():
        raise UserError(f"--out {out} is the export itself; write the merged file elsewhere")
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: the merged file is safetensors, name it *.safetensors")
    _, cfg, model = load_exported(export, expect_task="topolora_sam", base_checkpoint=base_checkpoint)
    layers = sum(isinstance(m, BaseTunerLayer) for m in model.modules())
    if layers == 0:
        raise UserError(f"{export}: has no LoRA layers to merge (model.lora_r = {cfg.model.lora_r}; "
                        f"already merged?)")
    merge_lora(model)
    merged_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora_r=0),
                                     train=dataclasses.replace(cfg.train, export="full"))
    source = read_export_metadata(export)
    meta = {"mm_task": "topolora_sam", "mm_config": config_json(merged_cfg), "mm_export": "full",
            "mm_step": source.get("mm_step", ""),
            "mm_merged_from": json.dumps({"export": str(export.resolve()), "lora_layers": layers,
                                          "base_checkpoint": cfg.model.checkpoint})}
    if source.get("mm_data"):  # normalisation and training scale, for mm-segment
        meta["mm_data"] = source["mm_data"]
    state = model.state_dict()
    if out.exists():
        print(f"--out: replacing {out}", file=sys.stderr)
    try:
        save_export(state, out, meta)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write ({e.strerror})") from None
    return {"out": str(out), "lora_layers": layers, "tensors": len(state), "bytes": out.stat().st_size}


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = merge_export(args.export, args.out, args.base_checkpoint, args.overwrite)
    print(f"merged {result['lora_layers']} LoRA layers; wrote {result['out']} ({result['tensors']} tensors, "
          f"{result['bytes'] / 2**20:.1f} MiB): segment_anything SAM keys + adapter.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
