"""Zero-shot classification as CLIP_benchmark does it: prompt-ensembled class embeddings, 100 x cos."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F


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


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, n_classes: int) -> dict[str, float]:
    """acc1, acc5 (only with >= 5 classes) and mean per-class recall, as CLIP_benchmark reports them."""
    pred = logits.argmax(1)
    out = {"acc1": (pred == labels).float().mean().item()}
    if n_classes >= 5:
        top5 = logits.topk(5, dim=1).indices
        out["acc5"] = (top5 == labels[:, None]).any(1).float().mean().item()
    recalls = [(pred[labels == c] == c).float().mean().item() for c in range(n_classes) if (labels == c).any()]
    out["mean_per_class_recall"] = sum(recalls) / len(recalls)
    return out


@torch.no_grad()
def zero_shot_logits(encode_image: Callable[[torch.Tensor], torch.Tensor], classifier: torch.Tensor,
                     batches: Iterable[dict], device: torch.device | str = "cpu",
                     input_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (100 x cosine) and labels for every labelled image in `batches`."""
    all_logits, all_labels = [], []
    dtype = classifier.dtype if input_dtype is None else input_dtype
    for batch in batches:
        feats = F.normalize(encode_image(batch["image"].to(device, dtype)).float(), dim=-1)
        all_logits.append(100.0 * feats @ classifier)
        all_labels.append(batch["label"])
    return torch.cat(all_logits).cpu(), torch.cat(all_labels).cpu()


def labelled_map(image_map: Callable, n_classes: int) -> Callable:
    """Wrap an image sample map so samples carry an int `label` from their json, checked against
    the class list (a label outside it is a DataError naming the shard)."""
    from mm.data.loader import SampleError
    from mm.errors import DataError

    def sample_map(raw: dict, rng) -> dict:
        sample = image_map(raw, rng)
        label = sample["meta"].get("label")
        if label is None:
            raise SampleError("missing_label", raw.get("__key__", "?"))
        if not isinstance(label, int) or not 0 <= label < n_classes:
            raise DataError(f"{raw.get('__url__', '?')}: sample {raw.get('__key__')} has label {label!r}, "
                            f"outside the {n_classes} class names")
        sample["label"] = torch.tensor(label)
        return sample

    return sample_map


def labelled_shard_batches(preprocess: Callable, tokenizer: Callable, urls: str, n_classes: int,
                           batch_size: int = 64, num_workers: int = 0):
    """One pass over labelled shards through the shared loader: batches with `image` and `label`.
    (`tokenizer` is unused: captions are not needed, so they are not tokenised per sample.)"""
    from mm.data.image_text import decode_image, decode_json
    from mm.data.loader import Loader, StreamSpec, default_collate

    def image_map(raw: dict, rng) -> dict:
        return {"image": preprocess(decode_image(raw)), "key": raw["__key__"], "meta": decode_json(raw)}

    sample_map = labelled_map(image_map, n_classes)
    spec = StreamSpec(urls=urls, sample_map=sample_map, collate=default_collate, batch_size=batch_size,
                      num_workers=num_workers, shuffle_buffer=0, repeat=False, drop_last=False)
    return Loader(spec)


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


def evaluate_zeroshot_batches(model: torch.nn.Module, tokenizer: Callable, batches: Iterable[dict],
                              classnames: list[str], templates: list[str],
                              device: torch.device | str = "cpu") -> dict[str, float]:
    """acc1, acc5 (>= 5 classes), mean_per_class_recall and n_images over any iterable of batches."""
    logits, labels = zeroshot_predictions(model, tokenizer, batches, classnames, templates, device)
    metrics = classification_metrics(logits, labels, len(classnames))
    metrics["n_images"] = float(len(labels))
    return metrics


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, n_classes) counts: row = true class, column = predicted class."""
    pred = logits.argmax(1)
    counts = torch.bincount(labels * n_classes + pred, minlength=n_classes * n_classes)
    return counts.view(n_classes, n_classes)


def evaluate_zeroshot(model: torch.nn.Module, tokenizer: Callable, preprocess: Callable, urls: str,
                      classnames: list[str], templates: list[str], batch_size: int = 64,
                      num_workers: int = 0, device: torch.device | str = "cpu") -> dict[str, float]:
    """Zero-shot classification of labelled shards with any model exposing encode_image/encode_text.

    Every rank evaluates the whole set: under ZeRO-3 each forward gathers parameters collectively, so
    all ranks must run the same batches.
    """
    batches = labelled_shard_batches(preprocess, tokenizer, urls, len(classnames), batch_size, num_workers)
    return evaluate_zeroshot_batches(model, tokenizer, batches, classnames, templates, device)
