"""Zero-shot classification: pooled as CLIP_benchmark does it (prompt-ensembled class embeddings,
100 x cos) and FILIP's token-wise scoring. Every function takes an iterable of {"image", "label"}
batches (the shared loader's mm.data.streams.labelled_shard_batches, a torch DataLoader over a folder,
a list); building them is the caller's business."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from mm.losses.filip import filip_similarity


@torch.no_grad()
def build_classifier(encode_text: Callable[[torch.Tensor], torch.Tensor],
                     tokenizer: Callable[[list[str]], torch.Tensor],
                     classnames: list[str], templates: list[str], device: torch.device | str = "cpu",
                     classes_per_batch: int = 10) -> torch.Tensor:
    """(embed_dim, n_classes): per class, embed every filled template, normalise, average, renormalise.

    The prompts of `classes_per_batch` classes go through the text tower in one forward."""
    weights = []
    for start in range(0, len(classnames), max(1, classes_per_batch)):
        names = classnames[start:start + max(1, classes_per_batch)]
        tokens = tokenizer([t.format(name) for name in names for t in templates]).to(device)
        emb = F.normalize(encode_text(tokens).float(), dim=-1).view(len(names), len(templates), -1).mean(1)
        weights.append(F.normalize(emb, dim=-1))
    return torch.cat(weights).T


def classification_counts(logits: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, 3) int64: per true class, its images, those right at top-1 and at top-5. The sufficient
    statistics of `classification_metrics`: summed over ranks, they give the metrics of the whole set."""
    pred = logits.argmax(1)
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits5 = (top5 == labels[:, None]).any(1)
    counts = torch.zeros(n_classes, 3, dtype=torch.int64)
    counts[:, 0] = torch.bincount(labels, minlength=n_classes)
    counts[:, 1] = torch.bincount(labels[pred == labels], minlength=n_classes)
    counts[:, 2] = torch.bincount(labels[hits5], minlength=n_classes)
    return counts


def metrics_from_counts(counts: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 (only with >= 5 classes) and mean per-class recall (over the classes with images)
    from `classification_counts`, as CLIP_benchmark reports them."""
    n_classes = counts.shape[0]
    images, top1, top5 = (c.tolist() for c in counts.T)
    total = sum(images)
    out = {"acc1": sum(top1) / total}
    if n_classes >= 5:
        out["acc5"] = sum(top5) / total
    recalls = [right / n for right, n in zip(top1, images) if n]
    out["mean_per_class_recall"] = sum(recalls) / len(recalls)
    return out


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, n_classes: int) -> dict[str, float]:
    """acc1, acc5 (only with >= 5 classes) and mean per-class recall, as CLIP_benchmark reports them."""
    return metrics_from_counts(classification_counts(logits, labels, n_classes))


@torch.no_grad()
def zero_shot_logits(encode_image: Callable[[torch.Tensor], torch.Tensor], classifier: torch.Tensor,
                     batches: Iterable[dict], device: torch.device | str = "cpu",
                     input_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (100 x cosine) and labels for every labelled image in `batches`."""
    all_logits, all_labels = [], []
    dtype = classifier.dtype if input_dtype is None else input_dtype
    for batch in batches:
        feats = F.normalize(encode_image(batch["image"].to(device, dtype)).float(), dim=-1)
        if batch.get("pad"):
            continue
        all_logits.append(100.0 * feats @ classifier)
        all_labels.append(batch["label"])
    if not all_logits:  # a rank without a shard of the set (its batches were all padding)
        return torch.zeros(0, classifier.shape[1]), torch.zeros(0, dtype=torch.int64)
    return torch.cat(all_logits).cpu(), torch.cat(all_labels).cpu()


@torch.no_grad()
def zeroshot_predictions(model: torch.nn.Module, tokenizer: Callable, batches: Iterable[dict],
                         classnames: list[str], templates: list[str], device: torch.device | str = "cpu"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (100 x cos against the prompt-ensembled classifier) and labels over any iterable of
    {"image", "label"} batches (shared-loader shards, a torch DataLoader over a folder or a list)."""
    was_training = model.training
    model.eval()
    try:
        classifier = build_classifier(model.encode_text, tokenizer, classnames, templates, device)
        dtype = next(model.parameters()).dtype
        return zero_shot_logits(model.encode_image, classifier, batches, device, dtype)
    finally:
        model.train(was_training)


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, n_classes) counts: row = true class, column = predicted class."""
    pred = logits.argmax(1)
    counts = torch.bincount(labels * n_classes + pred, minlength=n_classes * n_classes)
    return counts.view(n_classes, n_classes)


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
                     class_mask: torch.Tensor, n_classes: int, chunk_size: int | None = None,
                     both_halves: bool = False) -> torch.Tensor:
    """(B, n_classes) = 100 x mean over templates of s^I(image, filled template), or with `both_halves`
    of (s^I + s^T) / 2.

    FILIP's prompt ensemble for token-wise scoring: token features of different prompts cannot be
    averaged into one class embedding the way CLIP averages sentence embeddings, so each image is
    scored against every filled template with the image->text token-wise similarity s^I (mean over
    image patches of the best-matching prompt token) and the scores are averaged over templates.
    `both_halves` adds the text->image half s^T (mean over prompt tokens of the best-matching patch), as
    the FILIP loss averages its two directions: a class named by one small object is then also scored
    by how well that object's words find a patch, not only by how well every patch finds a word.
    """
    s_i2t, s_t2i = filip_similarity(image_tokens.float(), image_mask, class_tokens, class_mask,
                                    chunk_size=chunk_size)
    s = (s_i2t + s_t2i) / 2 if both_halves else s_i2t
    return 100.0 * s.view(s.shape[0], n_classes, -1).mean(2)


@torch.no_grad()
def tokenwise_predictions(model: torch.nn.Module, tokenizer: Callable, batches: Iterable[dict],
                          classnames: list[str], templates: list[str], device: torch.device | str = "cpu",
                          both_halves: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """FILIP token-wise logits (see `tokenwise_logits`) and labels; `model` exposes
    encode_image_tokens / encode_text_tokens."""
    was_training = model.training
    model.eval()
    try:
        class_tokens, class_mask = tokenwise_classifier_tokens(model, tokenizer, classnames, templates, device)
        dtype = next(model.parameters()).dtype  # bf16 engines hold bf16 weights
        logits, labels = [], []
        for batch in batches:
            img, img_mask = model.encode_image_tokens(batch["image"].to(device, dtype))
            if batch.get("pad"):
                continue
            logits.append(tokenwise_logits(img, img_mask, class_tokens, class_mask, len(classnames),
                                           both_halves=both_halves).cpu())
            labels.append(batch["label"])
        if not logits:  # a rank without a shard of the set
            return torch.zeros(0, len(classnames)), torch.zeros(0, dtype=torch.int64)
        return torch.cat(logits), torch.cat(labels)
    finally:
        model.train(was_training)


def tokenwise_mean_predictions(model: torch.nn.Module, tokenizer: Callable, batches: Iterable[dict],
                               classnames: list[str], templates: list[str], device: torch.device | str = "cpu"
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokenwise_predictions` scored with both halves, (s^I + s^T) / 2 (the FILIP paper's choice)."""
    return tokenwise_predictions(model, tokenizer, batches, classnames, templates, device, both_halves=True)


# pooled: every model; tokenwise: s^I only; tokenwise-mean: (s^I + s^T) / 2. The token-wise ones need a
# model with encode_image_tokens / encode_text_tokens (FILIP).
SCORINGS = {"pooled": zeroshot_predictions, "tokenwise": tokenwise_predictions,
            "tokenwise-mean": tokenwise_mean_predictions}


def zeroshot_counts(model: torch.nn.Module, tokenizer: Callable, batches: Iterable[dict],
                    classnames: list[str], templates: list[str], device: torch.device | str = "cpu",
                    scoring: str = "pooled") -> torch.Tensor:
    """`classification_counts` of the images in `batches` (none: all zeros)."""
    logits, labels = SCORINGS[scoring](model, tokenizer, batches, classnames, templates, device)
    return classification_counts(logits, labels, len(classnames))


def evaluate_zeroshot_batches(model: torch.nn.Module, tokenizer: Callable, batches: Iterable[dict],
                              classnames: list[str], templates: list[str], device: torch.device | str = "cpu",
                              scoring: str = "pooled") -> dict[str, float]:
    """acc1, acc5 (>= 5 classes), mean_per_class_recall and n_images over any iterable of batches.

    Under ZeRO-3 each forward gathers parameters collectively: every rank must make the same forward
    passes, so either each evaluates the whole set or each its own share through
    mm.data.streams.lockstep, with the `zeroshot_counts` summed over the ranks (mm.tasks.base does)."""
    logits, labels = SCORINGS[scoring](model, tokenizer, batches, classnames, templates, device)
    metrics = classification_metrics(logits, labels, len(classnames))
    metrics["n_images"] = float(len(labels))
    return metrics
