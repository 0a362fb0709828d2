"""FILIP: token-wise late-interaction contrastive pretraining (METHODS.md §1) on the shared engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mm.config import RunConfig
from mm.data.classnames import load_classnames, load_templates
from mm.data.loader import Loader
from mm.losses.filip import filip_loss, filip_similarity
from mm.metrics.zeroshot import classification_metrics, evaluate_zeroshot
from mm.models.clip import clip_preprocess, clip_tokenizer
from mm.models.filip import FilipModel, FilipModelConfig
from mm.tasks.base import Task
from mm.tasks.clip import image_text_batches


@dataclass
class FilipRunConfig(RunConfig):
    model: FilipModelConfig = field(default_factory=FilipModelConfig)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


@torch.no_grad()
def tokenwise_classifier_tokens(model: torch.nn.Module, tokenizer: Callable, classnames: list[str],
                                templates: list[str], device: torch.device | str = "cpu"
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected tokens and masks of every filled prompt, class-major: row c * T + t is class c, template t."""
    tokens, masks = [], []
    for name in classnames:
        t, m = model.encode_text_tokens(tokenizer([tpl.format(name) for tpl in templates]).to(device))
        tokens.append(t.float())
        masks.append(m)
    return torch.cat(tokens), torch.cat(masks)


@torch.no_grad()
def tokenwise_logits(image_tokens: torch.Tensor, image_mask: torch.Tensor, class_tokens: torch.Tensor,
                     class_mask: torch.Tensor, n_classes: int, chunk_size: int | None = None) -> torch.Tensor:
    """(B, n_classes) = 100 x mean over templates of s^I(image, filled template).

    FILIP's prompt ensemble for token-wise scoring: token features of different prompts cannot be
    averaged into one class embedding the way CLIP averages sentence embeddings, so each image is
    scored against every filled template with the image->text token-wise similarity s^I (mean over
    image patches of the best-matching prompt token) and the scores are averaged over templates.
    """
    s_i2t, _ = filip_similarity(image_tokens.float(), image_mask, class_tokens, class_mask, chunk_size=chunk_size)
    return 100.0 * s_i2t.view(s_i2t.shape[0], n_classes, -1).mean(2)


@torch.no_grad()
def tokenwise_zeroshot(model: torch.nn.Module, tokenizer: Callable, preprocess: Callable, urls: str,
                       classnames: list[str], templates: list[str], batch_size: int = 64,
                       device: torch.device | str = "cpu", num_workers: int = 0) -> dict[str, float]:
    """Zero-shot classification with FILIP's token-wise score (see `tokenwise_logits`).

    `model` exposes encode_image_tokens / encode_text_tokens. Every rank evaluates the whole set (ZeRO-3
    gathers are collective). Returns acc1, acc5 (>= 5 classes), mean_per_class_recall, n_images.
    """
    from mm.data.image_text import image_text_map
    from mm.data.loader import StreamSpec, default_collate
    from mm.metrics.zeroshot import labelled_map

    was_training = model.training
    model.eval()
    class_tokens, class_mask = tokenwise_classifier_tokens(model, tokenizer, classnames, templates, device)
    sample_map = labelled_map(image_text_map(preprocess, tokenizer, False, captions="first"), len(classnames))
    spec = StreamSpec(urls=urls, sample_map=sample_map,
                      collate=default_collate, batch_size=batch_size, num_workers=num_workers,
                      shuffle_buffer=0, repeat=False, drop_last=False)
    all_logits, all_labels = [], []
    dtype = next(model.parameters()).dtype  # bf16 engines hold bf16 weights
    for batch in Loader(spec):
        img, img_mask = model.encode_image_tokens(batch["image"].to(device, dtype))
        all_logits.append(tokenwise_logits(img, img_mask, class_tokens, class_mask, len(classnames)).cpu())
        all_labels.append(batch["label"])
    model.train(was_training)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    metrics = classification_metrics(logits, labels, len(classnames))
    metrics["n_images"] = float(len(labels))
    return metrics


def filip_zeroshot_metrics(model: torch.nn.Module, cfg: FilipRunConfig) -> dict[str, float]:
    """Pooled (CLIP-style, mean of normalised tokens) and token-wise zero-shot metrics."""
    if not cfg.eval.zeroshot_data:
        return {}
    model = _unwrap(model)
    device = next(model.parameters()).device
    tokenizer, preprocess = clip_tokenizer(cfg.model), clip_preprocess(cfg.model, False)
    classnames, templates = load_classnames(cfg.eval.classnames), load_templates(cfg.eval.templates)
    pooled = evaluate_zeroshot(model, tokenizer, preprocess, cfg.eval.zeroshot_data, classnames, templates,
                               cfg.eval.batch_size, device=device)
    tokenwise = tokenwise_zeroshot(model, tokenizer, preprocess, cfg.eval.zeroshot_data, classnames, templates,
                                   cfg.eval.batch_size, device=device)
    out = {f"zeroshot/{k}": v for k, v in pooled.items()}
    out.update({f"zeroshot_tokenwise/{k}": v for k, v in tokenwise.items() if k != "n_images"})
    return out


class FilipTask(Task):
    name = "filip"
    config_class = FilipRunConfig

    def build_model(self, cfg: FilipRunConfig, load_pretrained: bool = True) -> torch.nn.Module:
        return FilipModel(cfg.model, load_pretrained)

    def batches(self, cfg: FilipRunConfig, split: str, rank: int = 0, world_size: int = 1,
                state: dict | None = None) -> Loader:
        return image_text_batches(cfg, split, rank, world_size, state)

    def losses(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        # Through the model's own forward (the engine's), so ZeRO-3 gathers every parameter it uses.
        out = model(batch["image"], batch["text"])
        opts = _unwrap(model)
        result = filip_loss(out["image_tokens"], out["image_mask"], out["text_tokens"], out["text_mask"],
                            out["logit_scale"], chunk_size=opts.chunk_size, gather_dtype=opts.gather_dtype,
                            keep_image_tokens=opts.keep_image_tokens)
        # The engine logs every entry as a float: keep only the scalars.
        return {k: v for k, v in result.items() if not k.startswith("logits_")}

    def evaluate(self, model: torch.nn.Module, cfg: FilipRunConfig) -> dict[str, float]:
        return filip_zeroshot_metrics(model, cfg)
