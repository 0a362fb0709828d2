"""`mm export --format peft`: a TopoLoRA-SAM export as a folder that peft and segment_anything load, no mm.

    mm export runs/topolora_sam-vit_b-drive/export/model.safetensors --format peft --out drive-peft

The folder:
  adapter_config.json, adapter_model.safetensors
      peft's own adapter folder, written by `PeftModel.save_pretrained` for the LoRA of the image encoder
      (keys `base_model.model.blocks.N.mlp.lin1.lora_A.weight`, ...; target_modules a regex relative to
      `sam.image_encoder`). `PeftModel.from_pretrained(sam.image_encoder, DIR)` puts it into a
      segment_anything Sam in place.
  topolora_sam_extra.safetensors
      what segment_anything has no place for or does not ship: `adapter.*` (the spatial adapter,
      mm.models.sam.SpatialAdapter: depthwise, pointwise, norm (BatchNorm2d with its statistics), out) and
      `mask_decoder.*` (the trained mask decoder, segment_anything's MaskDecoder keys).
  sam_config.json
      the Sam's sizes (encoder width, depth, heads, global-attention blocks, input size), pixel statistics,
      LoRA settings and the base weights.
  base_sam.safetensors (only when segment_anything cannot rebuild the base itself)
      the base SAM state dict (segment_anything keys, LoRA not merged; its mask_decoder.* are the trained
      ones). Written when the model has no base checkpoint (randomly initialised SAM), a custom encoder,
      or an input size other than 1024 (position embeddings resized from the checkpoint). Otherwise the
      base is the released checkpoint the export names (sha256 in sam_config.json), loaded with
      `sam_model_registry[variant](checkpoint=...)`, and is not copied.
  training_config.yaml, README.md (the model card, with the exact loading lines)
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mm.errors import UserError

EXTRA_FILE = "topolora_sam_extra.safetensors"
BASE_FILE = "base_sam.safetensors"
CONFIG_FILE = "sam_config.json"

_IMPORTS_CLASSES = """\
import json
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

folder = Path("PATH_TO_THIS_FOLDER")
"""

_BUILD_CLASSES = """\
# The Sam at this export's sizes (segment_anything's own classes, as its build_sam.py makes them):
c = json.loads((folder / "sam_config.json").read_text())
grid = c["image_size"] // 16
sam = Sam(
    image_encoder=ImageEncoderViT(
        depth=c["encoder_depth"], embed_dim=c["encoder_embed_dim"], img_size=c["image_size"], mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=c["encoder_num_heads"], patch_size=16,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=c["encoder_global_attn_indexes"],
        window_size=14, out_chans=256),
    prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                 input_image_size=(c["image_size"], c["image_size"]), mask_in_chans=16),
    mask_decoder=MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
    pixel_mean=c["pixel_mean"], pixel_std=c["pixel_std"])
sam.load_state_dict(load_file(folder / "base_sam.safetensors"))
"""

_IMPORTS_REGISTRY = """\
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from segment_anything import sam_model_registry
from segment_anything.utils.transforms import ResizeLongestSide

folder = Path("PATH_TO_THIS_FOLDER")
"""

_BUILD_REGISTRY = """\
# The base SAM it was trained on (file name, size and sha256 in sam_config.json):
sam = sam_model_registry["{variant}"](checkpoint="{checkpoint}")
"""

_LOAD = """\
PeftModel.from_pretrained(sam.image_encoder, str(folder))  # peft puts the LoRA into sam.image_encoder
extra = load_file(folder / "topolora_sam_extra.safetensors")
sam.mask_decoder.load_state_dict({k.removeprefix("mask_decoder."): v for k, v in extra.items()
                                  if k.startswith("mask_decoder.")})
"""

_ADAPTER = """\


class SpatialAdapter(torch.nn.Module):
    \"\"\"TopoLoRA-SAM's residual conv adapter on the (B, 256, H/16, W/16) image embedding.\"\"\"

    def __init__(self, c: int = 256) -> None:
        super().__init__()
        self.depthwise = torch.nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.pointwise = torch.nn.Conv2d(c, c, 1, bias=False)
        self.norm = torch.nn.BatchNorm2d(c)
        self.act = torch.nn.GELU()
        self.out = torch.nn.Conv2d(c, c, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.act(self.norm(self.pointwise(self.depthwise(x)))))


adapter = SpatialAdapter()
adapter.load_state_dict({k.removeprefix("adapter."): v for k, v in extra.items() if k.startswith("adapter.")})
"""

_NO_ADAPTER = """\
adapter = torch.nn.Identity()  # this model was trained without the spatial adapter (model.adapter: false)
"""

_SEGMENT = """\
sam.eval()
adapter.eval()


@torch.no_grad()
def segment(image):  # (H, W, 3) uint8 RGB array -> (H, W) mask logits; foreground where > 0
    resized = ResizeLongestSide(sam.image_encoder.img_size).apply_image(image)
    x = torch.as_tensor(resized).permute(2, 0, 1)[None].float()
    embedding = adapter(sam.image_encoder(sam.preprocess(x)))
    sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)  # no prompt
    low_res, _ = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False)
    return sam.postprocess_masks(low_res, x.shape[-2:], image.shape[:2])[0, 0]
"""


def user_script(ship_base: bool, variant: str = "vit_b", checkpoint: str = "sam_vit_b_01ec64.pth",
                adapter: bool = True) -> str:
    """The Python a user runs to rebuild the model from the folder with segment_anything, peft and
    safetensors only (PATH_TO_THIS_FOLDER to be replaced); the model card prints it."""
    head = (_IMPORTS_CLASSES + _BUILD_CLASSES if ship_base
            else _IMPORTS_REGISTRY + _BUILD_REGISTRY.format(variant=variant, checkpoint=checkpoint))
    return head + _LOAD + (_ADAPTER if adapter else _NO_ADAPTER) + _SEGMENT


def _needs_base_file(model_cfg: Any) -> bool:
    """True when segment_anything cannot rebuild the base from a released checkpoint by itself."""
    from mm.models.sam import NATIVE_IMAGE_SIZE, VARIANTS

    return (not model_cfg.checkpoint or model_cfg.variant not in VARIANTS
            or model_cfg.image_size != NATIVE_IMAGE_SIZE)


def _peft_encoder(model: Any) -> Any:
    """A peft PeftModel around a copy of the image encoder holding the trained LoRA: what peft's own
    save_pretrained writes from. mm injects LoRA with inject_adapter_in_model (no PeftModel), so the copy
    is stripped to its base layers and wrapped again with the same LoraConfig."""
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    encoder = model.image_encoder
    plain = copy.deepcopy(encoder)
    for name, module in [(n, m) for n, m in plain.named_modules() if isinstance(m, BaseTunerLayer)]:
        parent, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent) if parent else plain, child, module.get_base_layer())
    if hasattr(plain, "peft_config"):
        del plain.peft_config
    wrapped = get_peft_model(plain, copy.deepcopy(encoder.peft_config["default"]))
    wrapped.base_model.model.load_state_dict(encoder.state_dict(), strict=True)
    return wrapped


def base_sam_state(model: Any) -> dict[str, Any]:
    """The SAM state dict under the LoRA (base weights, unmerged) in segment_anything's keys."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
            if ".lora_" not in k and not k.startswith("adapter.")}


def _card(export: Path, meta: dict[str, str], cfg: Any, cfg_tree: dict[str, Any], info: dict[str, Any],
          script: str) -> str:
    from mm.evaluate.model_card import model_card

    m = cfg.model
    base = info["base"]
    base_line = (f"`{BASE_FILE}` in this folder (segment_anything keys; LoRA not merged)" if info["ship_base"]
                 else f"the released checkpoint `{Path(base['path']).name}` (sha256 {base.get('sha256')}), "
                      "not copied: pass your copy's path to `sam_model_registry`")
    usage = [
        "Load it with segment_anything, peft and safetensors (no mm needed); `segment(image)` gives the "
        "same logits as mm's model:",
        "",
        "```python",
        script.rstrip("\n"),
        "```",
    ]
    task_lines = ["TopoLoRA-SAM: prompt-free binary segmentation with SAM; LoRA in the frozen image encoder, a "
                  "spatial conv adapter on its embedding and a trainable mask decoder, trained with BCE + soft "
                  "Dice + soft clDice."]
    architecture = [
        f"- SAM image encoder {m.variant}: width {info['sizes']['encoder_embed_dim']}, depth "
        f"{info['sizes']['encoder_depth']}, {info['sizes']['encoder_num_heads']} heads, global attention in "
        f"blocks {info['sizes']['encoder_global_attn_indexes']}; input {m.image_size} x {m.image_size}.",
        f"- LoRA (peft): r {m.lora_r}, alpha {m.lora_alpha} on {', '.join(m.lora_targets)} of every encoder "
        f"block ({info['lora_layers']} layers): `adapter_config.json`, `adapter_model.safetensors`.",
        f"- spatial adapter: {'yes' if m.adapter else 'no (model.adapter false)'}; mask decoder trained: "
        f"`{EXTRA_FILE}` (`adapter.*`, `mask_decoder.*`).",
        f"- base SAM weights: {base_line}.",
        f"- sizes, pixel statistics and LoRA settings: `{CONFIG_FILE}`.",
    ]
    base_weights = Path(m.checkpoint).name if m.checkpoint else ""
    return model_card(export, meta, cfg_tree, library_name="peft", pipeline_tag="image-segmentation",
                      tags=["segment-anything", "sam", "lora", "peft", "mm", "topolora_sam"], usage=usage,
                      task_lines=task_lines, architecture=architecture, base_weights=base_weights)


def export_peft(export: str | Path, out: str | Path, base_checkpoint: str | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """Write a TopoLoRA-SAM export as a peft adapter folder plus the adapter and decoder (module
    docstring); returns what was written. Bad input is a UserError and leaves nothing behind."""
    import yaml
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import save_file

    from mm.evaluate.model_card import prepare_out_folder
    from mm.exports import export_config_tree, read_export_metadata
    from mm.models.sam import PIXEL_MEAN, PIXEL_STD, checkpoint_identity, encoder_sizes
    from mm.tasks import load_exported

    export, out = Path(export), Path(out)
    meta = read_export_metadata(export)
    if meta["mm_task"] != "topolora_sam":
        raise UserError(f"{export}: --format peft writes TopoLoRA-SAM exports (peft LoRA on a segment_anything "
                        f"SAM), not {meta['mm_task']}")
    prepare_out_folder(out, export, overwrite)
    _, cfg, model = load_exported(export, expect_task="topolora_sam", base_checkpoint=base_checkpoint)
    layers = sum(isinstance(m, BaseTunerLayer) for m in model.image_encoder.modules())
    if layers == 0:
        raise UserError(f"{export}: has no LoRA layers (model.lora_r = {cfg.model.lora_r}; a merged export?); "
                        f"--format peft needs the unmerged export, or use --format sam")
    ship_base = _needs_base_file(cfg.model)
    if cfg.model.checkpoint:
        recorded = json.loads(meta.get("mm_base", "{}"))
        base = recorded if recorded.get("sha256") else {"variant": cfg.model.variant,
                                                        **checkpoint_identity(cfg.model.checkpoint)}
    else:
        base = {}
    sizes = encoder_sizes(cfg.model)
    sam_config = {"variant": cfg.model.variant, **sizes, "image_size": cfg.model.image_size,
                  "pixel_mean": list(PIXEL_MEAN), "pixel_std": list(PIXEL_STD),
                  "lora": {"r": cfg.model.lora_r, "alpha": cfg.model.lora_alpha,
                           "targets": list(cfg.model.lora_targets)},
                  "adapter": bool(cfg.model.adapter),
                  "base": {"file": BASE_FILE} if ship_base else {"checkpoint": Path(base["path"]).name,
                                                                  "size": base.get("size"),
                                                                  "sha256": base.get("sha256")}}
    state = model.state_dict()
    extra = {k: v for k, v in state.items() if k.startswith(("adapter.", "mask_decoder."))}
    extra = {k: v.detach().contiguous().clone() for k, v in extra.items()}
    cfg_tree = export_config_tree(meta)
    script = user_script(ship_base, cfg.model.variant, sam_config["base"].get("checkpoint", ""),
                         bool(cfg.model.adapter))
    info = {"base": base, "ship_base": ship_base, "sizes": sizes, "lora_layers": layers}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _peft_encoder(model).save_pretrained(str(tmp))
        save_file(extra, str(tmp / EXTRA_FILE), metadata={"format": "pt"})
        if ship_base:
            save_file({k: v.detach().contiguous().clone() for k, v in base_sam_state(model).items()},
                      str(tmp / BASE_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(sam_config, indent=2) + "\n")
        (tmp / "training_config.yaml").write_text(yaml.safe_dump(cfg_tree, sort_keys=False))
        # peft's save_pretrained wrote a template README.md; the model card replaces it.
        (tmp / "README.md").write_text(_card(export, meta, cfg, cfg_tree, info, script))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"--out {out}: cannot write ({e.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "lora_layers": layers, "ship_base": ship_base, "extra_tensors": len(extra),
            "base_checkpoint": sam_config["base"].get("checkpoint", "")}
