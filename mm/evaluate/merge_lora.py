"""mm-merge-lora (= `mm export --format sam`): fold a TopoLoRA-SAM export's LoRA into the image-encoder weights.

    mm export runs/topolora/export/model.safetensors --format sam --out sam_merged.safetensors \
        [--base-checkpoint checkpoints/sam_vit_b_01ec64.pth] [--compare-data SHARDS] [--compare-images N]

The input is either kind of export (trainable-only ones are completed from their base SAM checkpoint,
see mm.tasks.load_exported). It writes three files:
  OUT.safetensors  a full mm export whose state dict is a segment_anything SAM state dict (image_encoder.*,
                   prompt_encoder.*, mask_decoder.*, the keys of sam_model_registry[variant]()) plus
                   `adapter.*`; its config has LoRA off (model.lora_r = 0), so load_exported and every mm
                   command read it as a plain full export (the trained model, adapter included).
  OUT.pth          the SAM part alone, torch.save'd as SAM's released checkpoints are:
                   `sam_model_registry[variant](checkpoint="OUT.pth")` loads it at model.image_size 1024; at
                   other sizes or custom encoders, a Sam built from segment_anything's classes at those sizes
                   loads it with load_state_dict(torch.load(...)).
  OUT.md           the model card.
Stock SAM has no place for the spatial adapter, so OUT.pth is not the trained model: at export time the
two are compared on validation shards (the export's data.val, or --compare-data) and the difference is
printed as one line and written into the card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from mm.errors import UserError, cli_main

COMPARE_IMAGES = 32


def add_sam_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the sam format (mm export --format sam and mm-merge-lora)."""
    p.add_argument("--compare-data", default=None, metavar="SHARDS",
                   help="sam: segmentation shards on which stock SAM (without the adapter) is compared with "
                        "the trained model (default: the export's data.val)")
    p.add_argument("--compare-images", type=int, default=COMPARE_IMAGES, metavar="N",
                   help=f"sam: compare on at most N images (default {COMPARE_IMAGES}; 0: do not compare)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm-merge-lora", description=__doc__.split("\n\n")[0])
    p.add_argument("export", help="a topolora_sam export (.safetensors), full or trainable-only")
    p.add_argument("--out", required=True, help="the merged .safetensors to write (OUT.pth and OUT.md beside it)")
    p.add_argument("--base-checkpoint", default=None,
                   help="the base SAM checkpoint of a trainable-only export, when it is not at the "
                        "recorded path")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and OUT.pth, OUT.md) if they exist")
    add_sam_arguments(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def sibling_paths(out: Path) -> tuple[Path, Path]:
    """(OUT.pth, OUT.md) beside OUT.safetensors."""
    return out.with_suffix(".pth"), out.with_suffix(".md")


def stock_sam_logits(sam: Any, images: Any) -> Any:
    """(B, 1, S, S) logits of a segment_anything Sam without prompts, from images already normalised and
    padded (B, 3, S, S), through its own modules and postprocess_masks: what stock SAM computes."""
    import torch

    embeddings = sam.image_encoder(images)
    sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    pe = sam.prompt_encoder.get_dense_pe()
    low = torch.cat([sam.mask_decoder(image_embeddings=e[None], image_pe=pe, sparse_prompt_embeddings=sparse,
                                      dense_prompt_embeddings=dense, multimask_output=False)[0]
                     for e in embeddings])
    size = tuple(images.shape[-2:])
    return sam.postprocess_masks(low, size, size)


def compare_stock_sam(model: Any, sam_state: dict, cfg: Any, data: str, limit: int) -> dict[str, Any]:
    """Stock SAM (segment_anything's Sam holding `sam_state`, no adapter) against mm's `model` on up to
    `limit` images of the shards `data`, inside each image's valid area (field of view, padding
    excluded): mean |sigmoid difference|, Dice between the two masks (> 0.5) pooled over every valid
    pixel, and each one's pooled Dice against the ground truth."""
    import torch

    from mm.models.sam import build_sam
    from mm.tasks.segmentation import seg_batches

    sam = build_sam(cfg.model)
    sam.load_state_dict(sam_state, strict=True)
    sam.eval()
    run = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val=data, num_workers=0),
                              eval=dataclasses.replace(cfg.eval, batch_size=min(cfg.eval.batch_size, 8)))
    sums = dict.fromkeys(("absdiff", "valid", "both", "mm", "stock", "gt", "mm_gt", "stock_gt"), 0.0)
    n = 0
    with torch.no_grad():
        for batch in seg_batches(run, "val"):
            take = min(limit - n, len(batch["image"]))
            x, gt, valid = batch["image"][:take], batch["mask"][:take] > 0.5, batch["valid"][:take] > 0.5
            p, q = model(x).sigmoid(), stock_sam_logits(sam, x).sigmoid()
            a, b = (p > 0.5) & valid, (q > 0.5) & valid
            sums["absdiff"] += float(((p - q).abs() * valid).sum())
            sums["valid"] += float(valid.sum())
            sums["both"] += float((a & b).sum())
            sums["mm"] += float(a.sum())
            sums["stock"] += float(b.sum())
            sums["gt"] += float((gt & valid).sum())
            sums["mm_gt"] += float((a & gt).sum())
            sums["stock_gt"] += float((b & gt).sum())
            n += take
            if n >= limit:
                break

    def dice(inter: float, x: float, y: float) -> float:
        return 2 * inter / (x + y) if x + y else 1.0

    return {"images": n, "data": data, "mean_abs_prob_diff": sums["absdiff"] / max(sums["valid"], 1.0),
            "mask_dice": dice(sums["both"], sums["mm"], sums["stock"]),
            "mm_dice": dice(sums["mm_gt"], sums["mm"], sums["gt"]),
            "stock_dice": dice(sums["stock_gt"], sums["stock"], sums["gt"])}


def _comparison(model: Any, sam_state: dict, cfg: Any, compare_data: str | None, limit: int) -> dict[str, Any]:
    """compare_stock_sam's figures, or {'skipped': why}. An explicit --compare-data that cannot be read is a
    UserError; the export's own data.val being absent (another machine) only skips the comparison."""
    from mm.data.loader import check_local_shards

    if not cfg.model.adapter:
        return {"skipped": "no spatial adapter (model.adapter false): stock SAM computes the trained model"}
    if limit <= 0:
        return {"skipped": "not measured (--compare-images 0)"}
    if compare_data:
        check_local_shards(compare_data, "--compare-data")
        data = compare_data
    else:
        data = cfg.data.val
        if not data:
            return {"skipped": "not measured (the export's config has no data.val; pass --compare-data SHARDS)"}
        try:
            check_local_shards(data, "data.val")
        except UserError as e:
            return {"skipped": f"not measured ({e}; pass --compare-data SHARDS)"}
    result = compare_stock_sam(model, sam_state, cfg, data, limit)
    if result["images"] == 0:
        return {"skipped": f"not measured ({data} gave no readable image)"}
    return result


def comparison_line(comparison: dict[str, Any], pth: str = "OUT.pth") -> str:
    """The one line `mm export --format sam` prints about what stock SAM (no adapter) loses."""
    head = f"stock segment_anything SAM ({pth}, no spatial adapter) vs the trained model"
    if "skipped" in comparison:
        return f"{head}: {comparison['skipped']}"
    c = comparison
    return (f"{head} on {c['images']} images of {c['data']}: mean |prob diff| {c['mean_abs_prob_diff']:.4f}, "
            f"Dice between their masks {c['mask_dice']:.4f}; Dice vs ground truth {c['mm_dice']:.4f} (trained) "
            f"vs {c['stock_dice']:.4f} (stock)")


def _card(export: Path, out: Path, meta: dict[str, str], cfg: Any, layers: int, comparison: dict[str, Any]) -> str:
    from mm.evaluate.model_card import model_card
    from mm.exports import export_config_tree
    from mm.models.sam import NATIVE_IMAGE_SIZE, VARIANTS, encoder_sizes

    m = cfg.model
    pth = sibling_paths(out)[0].name
    sizes = encoder_sizes(m)
    if m.variant in VARIANTS and m.image_size == NATIVE_IMAGE_SIZE:
        build = ["from segment_anything import sam_model_registry", "",
                 f"sam = sam_model_registry[\"{m.variant}\"](checkpoint=\"{pth}\")  # stock SAM: no adapter"]
    else:
        build = ["import torch", "",
                 f"# segment_anything's builder makes 1024 models of the released sizes; build a Sam from its "
                 f"classes (as build_sam.py does) with img_size={m.image_size}, encoder_embed_dim="
                 f"{sizes['encoder_embed_dim']}, encoder_depth={sizes['encoder_depth']}, encoder_num_heads="
                 f"{sizes['encoder_num_heads']}, encoder_global_attn_indexes={sizes['encoder_global_attn_indexes']}, "
                 f"image_embedding_size={m.image_size // 16}, then:",
                 f"sam.load_state_dict(torch.load(\"{pth}\"))  # stock SAM: no adapter"]
    usage = [f"`{out.name}` is an mm export (the trained model, adapter included): `mm segment`, or in Python",
             "", "```python", "from mm.tasks import load_exported", "",
             f"task, cfg, model = load_exported(\"{out.name}\")  # model(images) -> mask logits", "```", "",
             f"`{pth}` is a segment_anything checkpoint of the same model without the spatial adapter:", "",
             "```python", *build, "```"]
    sections = ["## What stock SAM cannot carry", "",
                "segment_anything's Sam has no place for the spatial adapter on the image embedding "
                f"(`adapter.*` in `{out.name}`), so `{pth}` is SAM with LoRA merged and the trained mask "
                "decoder, without the adapter. Measured at export time:", "",
                f"    {comparison_line(comparison, pth)}"]
    base_weights = Path(m.checkpoint).name if m.checkpoint else ""
    return model_card(export, meta, export_config_tree(meta), library_name="segment-anything",
                      pipeline_tag="image-segmentation", tags=["segment-anything", "sam", "mm", "topolora_sam"],
                      usage=usage, task_lines=[
                          "TopoLoRA-SAM: prompt-free binary segmentation with SAM; LoRA in the frozen image "
                          f"encoder ({layers} layers, merged into the weights here), a spatial conv adapter on "
                          "its embedding and a trainable mask decoder, trained with BCE + soft Dice + soft clDice."],
                      architecture=[f"- SAM image encoder {m.variant}: width {sizes['encoder_embed_dim']}, depth "
                                    f"{sizes['encoder_depth']}, {sizes['encoder_num_heads']} heads; input "
                                    f"{m.image_size} x {m.image_size}; adapter: {'yes' if m.adapter else 'no'}."],
                      base_weights=base_weights, sections=sections, config_file=None)


def merge_export(export: str | Path, out: str | Path, base_checkpoint: str | None = None,
                 overwrite: bool = False, compare_data: str | None = None,
                 compare_images: int = COMPARE_IMAGES) -> dict:
    """Write OUT.safetensors, OUT.pth and OUT.md (module docstring); returns {'out', 'pth', 'card',
    'lora_layers', 'tensors', 'bytes', 'comparison'}."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from mm.config import config_json
    from mm.exports import read_export_metadata, save_export
    from mm.models.sam import merge_lora
    from mm.tasks import load_exported

    export, out = Path(export), Path(out)
    pth, card = sibling_paths(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name, e.g. {out / 'merged.safetensors'}")
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: the merged file is safetensors, name it *.safetensors")
    for path in (out, pth, card):
        if path.resolve() == export.resolve():
            raise UserError(f"--out {out}: {path} is the export itself; write the merged file elsewhere")
        if path.exists() and not overwrite:
            raise UserError(f"--out {out}: {path} exists; pass --overwrite to replace it")
    _, cfg, model = load_exported(export, expect_task="topolora_sam", base_checkpoint=base_checkpoint)
    layers = sum(isinstance(m, BaseTunerLayer) for m in model.modules())
    if layers == 0:
        raise UserError(f"{export}: has no LoRA layers to merge (model.lora_r = {cfg.model.lora_r}; "
                        f"already merged?)")
    merge_lora(model)
    state = model.state_dict()
    sam_state = {k: v.detach().contiguous().clone() for k, v in state.items() if not k.startswith("adapter.")}
    comparison = _comparison(model, sam_state, cfg, compare_data, compare_images)
    merged_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora_r=0),
                                     train=dataclasses.replace(cfg.train, export="full"))
    source = read_export_metadata(export)
    meta = {"mm_task": "topolora_sam", "mm_config": config_json(merged_cfg), "mm_export": "full",
            "mm_step": source.get("mm_step", ""),
            "mm_merged_from": json.dumps({"export": str(export.resolve()), "lora_layers": layers,
                                          "base_checkpoint": cfg.model.checkpoint})}
    if source.get("mm_data"):  # normalisation and training scale, for mm-segment
        meta["mm_data"] = source["mm_data"]
    if out.exists():
        print(f"--out: replacing {out}", file=sys.stderr)
    text = _card(export, out, {**source, "mm_task": "topolora_sam"}, cfg, layers, comparison)
    try:
        save_export(state, out, meta)
        tmp = pth.with_name(pth.name + ".tmp")
        torch.save(sam_state, tmp)
        os.replace(tmp, pth)
        card.write_text(text)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write ({e.strerror})") from None
    return {"out": str(out), "pth": str(pth), "card": str(card), "lora_layers": layers, "tensors": len(state),
            "bytes": out.stat().st_size, "comparison": comparison}


def result_lines(result: dict) -> str:
    """What both spellings of the command print."""
    return (f"merged {result['lora_layers']} LoRA layers; wrote {result['out']} ({result['tensors']} tensors, "
            f"{result['bytes'] / 2**20:.1f} MiB): segment_anything SAM keys + adapter.*\n"
            f"wrote {result['pth']} (segment_anything checkpoint, no adapter) and the model card {result['card']}\n"
            f"{comparison_line(result['comparison'], Path(result['pth']).name)}")


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = merge_export(args.export, args.out, args.base_checkpoint, args.overwrite, args.compare_data,
                          args.compare_images)
    print(result_lines(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
