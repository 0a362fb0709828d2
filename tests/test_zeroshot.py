"""Zero-shot metrics against a reference built from open_clip's own classifier builder."""

import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from mm.data.classnames import load_classnames, load_templates
from mm.data.streams import labelled_shard_batches
from mm.errors import DataError
from mm.metrics.zeroshot import build_classifier, classification_metrics, evaluate_zeroshot_batches
from mm.models.clip import ClipModelConfig, build_clip, clip_preprocess, clip_tokenizer

CFG = ClipModelConfig(arch={"embed_dim": 32,
                            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                           "head_width": 16},
                            "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2,
                                         "layers": 1}})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_clip(CFG).eval()


def test_classifier_equals_open_clip(model):
    names, templates = load_classnames("shapes"), load_templates("shapes")
    tok = clip_tokenizer(CFG)
    ours = build_classifier(model.encode_text, tok, names, templates)
    ref = build_zero_shot_classifier(model, tok, names, templates, num_classes_per_batch=5)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_metrics_equal_a_plain_reference(model, shapes):
    names, templates = load_classnames("shapes"), load_templates("shapes")
    tok, pre = clip_tokenizer(CFG), clip_preprocess(CFG, False)
    ours = evaluate_zeroshot_batches(model, tok, labelled_shard_batches(pre, tok, shapes["val"], len(names), 7),
                                     names, templates)

    # Reference: open_clip's classifier, images decoded plainly with webdataset, metrics by hand.
    import webdataset as wds

    classifier = build_zero_shot_classifier(model, tok, names, templates)
    logits, labels = [], []
    for image, meta in wds.WebDataset(shapes["val"], shardshuffle=False).decode("pil").to_tuple("png", "json"):
        with torch.no_grad():
            f = F.normalize(model.encode_image(pre(image)[None]), dim=-1)
        logits.append(100 * f @ classifier)
        labels.append(meta["label"])
    logits, labels = torch.cat(logits), torch.tensor(labels)
    pred = logits.argmax(1)
    acc1 = (pred == labels).float().mean().item()
    acc5 = sum(labels[i].item() in logits[i].topk(5).indices.tolist() for i in range(len(labels))) / len(labels)
    recall = sum((pred[labels == c] == c).float().mean().item() for c in range(len(names))) / len(names)
    assert ours["n_images"] == len(labels) == 24
    assert ours["acc1"] == pytest.approx(acc1)
    assert ours["acc5"] == pytest.approx(acc5)
    assert ours["mean_per_class_recall"] == pytest.approx(recall)


def test_acc5_only_with_five_or_more_classes():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    out = classification_metrics(logits, torch.tensor([0, 1]), 3)
    assert "acc5" not in out and out["acc1"] == 0.5 and out["mean_per_class_recall"] == 0.5


def test_label_outside_the_class_list_names_the_shard(model, shapes):
    tok, pre = clip_tokenizer(CFG), clip_preprocess(CFG, False)
    with pytest.raises(DataError, match=r"shapes-000000.tar.*outside the 3 class names"):
        evaluate_zeroshot_batches(model, tok, labelled_shard_batches(pre, tok, shapes["val"], 3), ["a", "b", "c"],
                                  ["{}"])
