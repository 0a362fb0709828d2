"""Zero-shot accuracy of a FILIP export scored by each half of the token-wise similarity.

    python bench/filip_directions.py EXPORT 'data/clutter/val/clutter-000000.tar' [--classnames shapes]

`mm zeroshot --scoring tokenwise` ranks classes by s^I (image->text: the mean over ALL patches of
each patch's best prompt token). When the class is one small object among distractors, most patches
are background or distractors, and s^I mostly measures them. s^T (text->image: the mean over prompt
tokens of each token's best patch) looks only where the prompt's words match. This prints the
accuracy of s^I, s^T, their mean and the pooled embedding, on the same images and prompts.
`mm zeroshot --scoring tokenwise` and `--scoring tokenwise-mean` give the s^I and mean figures.
"""

from __future__ import annotations

import argparse
import json

import torch


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export")
    ap.add_argument("data")
    ap.add_argument("--classnames", default="shapes")
    ap.add_argument("--templates", default="shapes")
    args = ap.parse_args()

    from mm.data.classnames import load_classnames, load_templates
    from mm.data.streams import labelled_shard_batches
    from mm.evaluate.models import load_embedding_model
    from mm.losses.filip import filip_similarity
    from mm.metrics.zeroshot import tokenwise_classifier_tokens

    _, _, model, tokenizer, preprocess = load_embedding_model(args.export)
    model.eval()
    classnames, templates = load_classnames(args.classnames), load_templates(args.templates)
    class_tokens, class_mask = tokenwise_classifier_tokens(model, tokenizer, classnames, templates)
    prompts = tokenizer([t.format(c) for c in classnames for t in templates])
    pooled_text = torch.nn.functional.normalize(
        model.encode_text(prompts).view(len(classnames), len(templates), -1).mean(1), dim=-1)
    scores: dict[str, list[torch.Tensor]] = {"s_i2t": [], "s_t2i": [], "mean": [], "pooled": []}
    labels = []
    for batch in labelled_shard_batches(preprocess, tokenizer, args.data, len(classnames), 64, 0):
        img, img_mask = model.encode_image_tokens(batch["image"])
        i2t, t2i = filip_similarity(img.float(), img_mask, class_tokens, class_mask)
        i2t = i2t.view(len(img), len(classnames), -1).mean(2)
        t2i = t2i.view(len(img), len(classnames), -1).mean(2)
        scores["s_i2t"].append(i2t)
        scores["s_t2i"].append(t2i)
        scores["mean"].append((i2t + t2i) / 2)
        scores["pooled"].append(model.encode_image(batch["image"]) @ pooled_text.T)
        labels.append(batch["label"])
    y = torch.cat(labels)
    result = {name: float((torch.cat(s).argmax(1) == y).float().mean()) for name, s in scores.items()}
    print(json.dumps({"export": args.export, "data": args.data, "n_images": len(y), "acc1": result}))


if __name__ == "__main__":
    main()
