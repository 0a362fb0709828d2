"""`--scoring tokenwise-mean`: FILIP's pair score (s^I + s^T) / 2 in mm zeroshot and mm retrieval,
checked against pair-by-pair loops over a tiny FILIP export's own tokens."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mm.config import load_config
from mm.metrics.zeroshot import tokenwise_logits
from mm.tasks.filip import FilipRunConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
    "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1",
    "model.embed_dim=24",
]


def _pair(v: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """(s^I, s^T) of one image's and one text's valid tokens, by the FILIP paper's definition."""
    sim = F.normalize(v.double(), dim=-1) @ F.normalize(w.double(), dim=-1).T  # (patches, words)
    return sim.max(1).values.mean().item(), sim.max(0).values.mean().item()


def _mean(s_i: float, s_t: float) -> float:
    return (s_i + s_t) / 2


def _class_sums(img: torch.Tensor, img_mask: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor,
                n_classes: int, n_templates: int, score: Callable[[float, float], float]) -> torch.Tensor:
    """(images, classes): per image and class, the sum over the class's templates (text rows
    c * n_templates + t) of score(s^I, s^T), computed pair by pair."""
    out = torch.zeros(len(img), n_classes, dtype=torch.float64)
    for i in range(len(img)):
        for c in range(n_classes):
            for t in range(n_templates):
                row = c * n_templates + t
                out[i, c] += score(*_pair(img[i][img_mask[i]], txt[row][txt_mask[row]]))
    return out


def test_both_halves_logits_equal_a_plain_reference():
    gen = torch.Generator().manual_seed(5)
    n_classes, n_templates = 4, 3
    img = torch.randn(5, 7, 8, generator=gen)
    img_mask = torch.rand(5, 7, generator=gen) > 0.3
    img_mask[:, 0] = True
    txt = torch.randn(n_classes * n_templates, 6, 8, generator=gen)
    txt_mask = torch.rand(n_classes * n_templates, 6, generator=gen) > 0.4
    txt_mask[:, 0] = True
    want = 100.0 * _class_sums(img, img_mask, txt, txt_mask, n_classes, n_templates, _mean) / n_templates
    want_i = 100.0 * _class_sums(img, img_mask, txt, txt_mask, n_classes, n_templates, lambda s_i, _: s_i) / n_templates
    got = tokenwise_logits(img, img_mask, txt, txt_mask, n_classes, chunk_size=5, both_halves=True)
    assert torch.allclose(got.double(), want, atol=1e-4)
    # the default is still s^I alone
    assert torch.allclose(tokenwise_logits(img, img_mask, txt, txt_mask, n_classes).double(), want_i, atol=1e-4)


@pytest.fixture(scope="module")
def filip_export(tmp_path_factory):
    from mm.config import config_json
    from mm.tasks import get_task

    cfg = load_config(ROOT / "configs/filip/tiny.yaml", TINY, FilipRunConfig)
    torch.manual_seed(0)
    model = get_task("filip", cfg).build_model().eval()
    path = tmp_path_factory.mktemp("filip") / "model.safetensors"
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"mm_task": "filip", "mm_config": config_json(cfg), "mm_step": "0"})
    return path, model, cfg


def _items(cfg, url):
    """Every (image tensor, label, caption) of a shard, through the evaluators' own preprocessing."""
    from mm.evaluate.retrieval import retrieval_batches
    from mm.models.clip import clip_preprocess, clip_tokenizer

    tok, pre = clip_tokenizer(cfg.model), clip_preprocess(cfg.model, False)
    images, captions, owner = [], [], []
    for batch in retrieval_batches(pre, url, batch_size=7):
        for image, caps in zip(batch["image"], batch["captions"]):
            owner.extend([len(images)] * len(caps))
            images.append(image)
            captions.extend(caps)
    return tok, images, captions, owner


def test_zeroshot_cli_scores_by_the_mean_of_both_halves(filip_export, shapes, tmp_path):
    from mm.data.classnames import load_classnames, load_templates
    from mm.data.image_text import image_text_map
    from mm.data.loader import Loader, StreamSpec, default_collate
    from mm.data.streams import labelled_map
    from mm.evaluate.zeroshot import main
    from mm.metrics.zeroshot import classification_metrics
    from mm.models.clip import clip_preprocess, clip_tokenizer

    path, model, cfg = filip_export
    out = tmp_path / "zs.json"
    assert main(["--checkpoint", str(path), "--data", str(shapes["val"]), "--classnames", "shapes",
                 "--scoring", "tokenwise-mean", "--batch-size", "5", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["scoring"] == "tokenwise-mean"

    classnames, templates = load_classnames("shapes"), load_templates("shapes")
    tok = clip_tokenizer(cfg.model)
    spec = StreamSpec(urls=str(shapes["val"]),
                      sample_map=labelled_map(image_text_map(clip_preprocess(cfg.model, False), tok, False),
                                              len(classnames)),
                      collate=default_collate, batch_size=1000, shuffle_buffer=0, repeat=False, drop_last=False)
    batch = next(iter(Loader(spec)))
    labels = batch["label"]
    with torch.no_grad():
        img, img_mask = model.encode_image_tokens(batch["image"])
        txt, txt_mask = model.encode_text_tokens(tok([t.format(c) for c in classnames for t in templates]))
    scores = _class_sums(img, img_mask, txt, txt_mask, len(classnames), len(templates), _mean)
    want = classification_metrics(scores, labels, len(classnames))
    assert record["metrics"]["n_images"] == len(labels) == 2 * len(classnames)
    for k, v in want.items():
        assert record["metrics"][k] == pytest.approx(v), k


def test_retrieval_cli_ranks_both_directions_by_the_mean(filip_export, shapes, tmp_path):
    from mm.evaluate.retrieval import main

    path, model, cfg = filip_export
    out = tmp_path / "ret.json"
    assert main(["--checkpoint", str(path), "--data", str(shapes["val"]), "--scoring", "tokenwise-mean",
                 "--ks", "1,3", "--batch-size", "5", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["scoring"] == "tokenwise-mean"

    tok, images, captions, owner = _items(cfg, str(shapes["val"]))
    with torch.no_grad():
        img = [model.encode_image_tokens(x[None]) for x in images]
        txt = [model.encode_text_tokens(tok([c])) for c in captions]
    score = [[sum(_pair(img[i][0][0][img[i][1][0]], txt[t][0][0][txt[t][1][0]])) / 2 for t in range(len(txt))]
             for i in range(len(img))]
    for k in (1, 3):
        # an image query is right when one of its captions is among the k best-scored captions, a caption
        # query when its image is among the k best-scored images; a wrong candidate goes before a right one
        # with the same score (the shapes world repeats captions)
        i2t = sum(any(owner[t] == i for t in sorted(range(len(txt)), key=lambda t: (-score[i][t], owner[t] == i))[:k])
                  for i in range(len(img))) / len(img)
        t2i = sum(owner[t] in sorted(range(len(img)), key=lambda i: (-score[i][t], owner[t] == i))[:k]
                  for t in range(len(txt))) / len(txt)
        assert record["metrics"][f"image_to_text_recall@{k}"] == pytest.approx(i2t), k
        assert record["metrics"][f"text_to_image_recall@{k}"] == pytest.approx(t2i), k
