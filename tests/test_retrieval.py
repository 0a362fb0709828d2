"""Retrieval recall@k against a plain brute-force count, and mm-retrieval on a tiny exported model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mm.metrics.retrieval import recall_from_scores, retrieval_recall
from mm.models.clip import ClipModelConfig, build_clip

ROOT = Path(__file__).resolve().parents[1]
CFG = ClipModelConfig(arch={"embed_dim": 32,
                            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                           "head_width": 16},
                            "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2,
                                         "layers": 1}})


def brute_force(image_emb, text_emb, owner, k):
    """Recall@k of cosine scores (see brute_force_scores)."""
    img = torch.nn.functional.normalize(image_emb, dim=-1)
    txt = torch.nn.functional.normalize(text_emb, dim=-1)
    return brute_force_scores(lambda i, t: (img[i] @ txt[t]).item(), lambda i, t: (txt[t] @ img[i]).item(),
                              len(img), len(txt), owner, k)


def brute_force_scores(score_i2t, score_t2i, n_img, n_txt, owner, k):
    """Recall@k by sorting every query's candidates, wrong candidates first among equal scores;
    score_i2t(i, t) ranks captions t for image i, score_t2i(i, t) ranks images i for caption t."""
    i2t_hits = queries = 0
    for i in range(n_img):
        captions = [t for t in range(n_txt) if owner[t] == i]
        if not captions:
            continue
        queries += 1
        candidates = [(-score_i2t(i, t), t in captions, t) for t in range(n_txt)]
        candidates.sort(key=lambda c: (c[0], c[1]))  # best score first; a wrong one before a tied right one
        if any(correct for _, correct, _ in candidates[:k]):
            i2t_hits += 1
    t2i_hits = 0
    for t in range(n_txt):
        candidates = [(-score_t2i(i, t), i == owner[t], i) for i in range(n_img)]
        candidates.sort(key=lambda c: (c[0], c[1]))
        if any(correct for _, correct, _ in candidates[:k]):
            t2i_hits += 1
    return i2t_hits / queries, t2i_hits / n_txt


def test_recall_equals_brute_force_with_duplicate_captions():
    g = torch.Generator().manual_seed(0)
    n_images, d = 12, 8
    image_emb = torch.randn(n_images, d, generator=g)
    # 1 to 5 captions per image; image 11 has none (a gallery distractor only)
    owner = [i for i in range(n_images - 1) for _ in range(1 + i % 5)]
    text_emb = image_emb[owner] + 1.5 * torch.randn(len(owner), d, generator=g)
    # duplicate captions: the same text under two images, and twice under one image
    text_emb[3] = text_emb[0]  # caption of image 0 repeated for image 2 (owner[3] == 2)
    text_emb[7] = text_emb[6]  # two identical captions of image 3
    owner_t = torch.tensor(owner)
    assert owner[0] == 0 and owner[3] == 2 and owner[6] == owner[7] == 3
    got = retrieval_recall(image_emb, text_emb, owner_t, ks=(1, 2, 5, 10), chunk_size=5)
    for k in (1, 2, 5, 10):
        i2t, t2i = brute_force(image_emb, text_emb, owner, k)
        assert got[f"image_to_text_recall@{k}"] == pytest.approx(i2t), k
        assert got[f"text_to_image_recall@{k}"] == pytest.approx(t2i), k
        assert got[f"text_retrieval_recall@{k}"] == got[f"image_to_text_recall@{k}"]
        assert got[f"image_retrieval_recall@{k}"] == got[f"text_to_image_recall@{k}"]
    assert got["n_images"] == 12 and got["n_texts"] == len(owner)


def test_hand_counted_case_and_ties_count_against_the_query():
    # 3 images on the axes; captions: 0 -> [e0, e1], 1 -> [e1], 2 -> [e0 + e2]
    image_emb = torch.eye(3)
    text_emb = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [1.0, 0, 1.0]])
    owner = torch.tensor([0, 0, 1, 2])
    got = retrieval_recall(image_emb, text_emb, owner, ks=(1, 2, 3))
    # image->text: image 0 best caption e0 (score 1, wrong e0+e2 at 0.71 below): hit@1.
    # image 1: its caption e1 ties with image 0's e1 -> rank 1: miss@1, hit@2.
    # image 2: its caption scores 0.71, above everything else: hit@1.
    assert got["image_to_text_recall@1"] == pytest.approx(2 / 3)
    assert got["image_to_text_recall@2"] == 1.0
    # text->image: e0 -> image 0 (hit@1); e1 of image 0 scores 0 on image 0, below image 1 and tied
    # with image 2 -> rank 2: hit only at 3; e1 of image 1 -> hit@1; e0+e2 of image 2 ties images 0
    # and 2 -> rank 1: miss@1, hit@2.
    assert got["text_to_image_recall@1"] == pytest.approx(2 / 4)
    assert got["text_to_image_recall@2"] == pytest.approx(3 / 4)
    assert got["text_to_image_recall@3"] == 1.0
    # a collapsed model (all equal) gets no credit at k=1
    flat = retrieval_recall(torch.ones(3, 3), torch.ones(4, 3), owner, ks=(1,))
    assert flat["image_to_text_recall@1"] == 0.0 and flat["text_to_image_recall@1"] == 0.0


def test_recall_from_two_score_matrices_ranks_each_direction_by_its_own():
    g = torch.Generator().manual_seed(1)
    owner = [0, 0, 1, 2, 2, 2, 3, 5]  # image 4 has no caption
    s_i2t, s_t2i = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    s_t2i[1, 0] = s_t2i[0, 0]  # a tie: counts against the query
    got = recall_from_scores(s_i2t, s_t2i, torch.tensor(owner), ks=(1, 2, 3))
    for k in (1, 2, 3):
        i2t, t2i = brute_force_scores(lambda i, t: s_i2t[i, t].item(), lambda i, t: s_t2i[i, t].item(),
                                      6, 8, owner, k)
        assert got[f"image_to_text_recall@{k}"] == pytest.approx(i2t), k
        assert got[f"text_to_image_recall@{k}"] == pytest.approx(t2i), k
    # with the cosine matrix in both directions it is retrieval_recall
    img, txt = torch.randn(6, 5, generator=g), torch.randn(8, 5, generator=g)
    cos = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
    assert recall_from_scores(cos, cos, torch.tensor(owner)) == retrieval_recall(img, txt, torch.tensor(owner))
    with pytest.raises(ValueError, match="score matrices"):
        recall_from_scores(s_i2t, s_t2i.T, torch.tensor(owner))


def test_text_to_image_must_index_the_gallery():
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_recall(torch.eye(2), torch.eye(2), torch.tensor([0, 2]))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from mm.config import config_json
    from mm.tasks.clip import ClipRunConfig

    torch.manual_seed(0)
    model = build_clip(CFG).eval()
    path = tmp_path_factory.mktemp("export") / "model.safetensors"
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {"mm_task": "clip", "mm_config": config_json(ClipRunConfig(model=CFG)), "mm_step": "0"}
    save_file(state, str(path), metadata=meta)
    return path, model


@pytest.fixture(scope="module")
def filip_exported(tmp_path_factory):
    from mm.config import config_json
    from mm.models.filip import FilipModel, FilipModelConfig
    from mm.tasks.filip import FilipRunConfig

    cfg = FilipModelConfig(arch=CFG.arch, embed_dim=24)
    torch.manual_seed(0)
    model = FilipModel(cfg).eval()
    path = tmp_path_factory.mktemp("filip") / "model.safetensors"
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {"mm_task": "filip", "mm_config": config_json(FilipRunConfig(model=cfg)), "mm_step": "0"}
    save_file(state, str(path), metadata=meta)
    return path, model, cfg


def _coco_shards(tmp_path):
    from mm.data.shards import write_coco_shards

    images = tmp_path / "images"
    images.mkdir()
    colours = ["red", "green", "blue", "yellow", "white", "black"]
    rgb = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255), (0, 0, 0)]
    entries, annotations = [], []
    for i, (name, c) in enumerate(zip(colours, rgb)):
        Image.new("RGB", (40, 40), c).save(images / f"{i}.png")
        entries.append({"id": i, "file_name": f"{i}.png"})
        for j, caption in enumerate([f"a {name} square", f"a plain {name} image", "a picture"][: 1 + i % 3]):
            annotations.append({"id": 100 * i + j, "image_id": i, "caption": caption})
    ann = tmp_path / "captions.json"
    ann.write_text(json.dumps({"images": entries, "annotations": annotations}))
    write_coco_shards(ann, images, tmp_path / "shards", shard_size=4)
    return f"{tmp_path}/shards/coco-{{000000..000001}}.tar", len(annotations)


def _run_cli(path, urls, out, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "eval/retrieval.py", "--checkpoint", str(path), "--data", urls,
                           "--batch-size", "4", "--output", str(out), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    return proc


def test_cli_on_coco_style_shards(exported, tmp_path):
    from mm.evaluate.retrieval import retrieval_batches, retrieval_embeddings
    from mm.models.clip import clip_preprocess, clip_tokenizer

    path, model = exported
    urls, n_annotations = _coco_shards(tmp_path)
    out = tmp_path / "retrieval.json"
    proc = _run_cli(path, urls, out)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    assert record["task"] == "zeroshot_retrieval"
    metrics = record["metrics"]
    assert metrics["n_images"] == 6 and metrics["n_texts"] == n_annotations == 12
    assert metrics["text_to_image_recall@10"] == 1.0  # only 6 images in the gallery
    i2t = [metrics[f"image_to_text_recall@{k}"] for k in (1, 5, 10)]
    assert i2t == sorted(i2t)

    # The CLI's figures are the metric on the model's own embeddings of the same shards.
    tok, pre = clip_tokenizer(CFG), clip_preprocess(CFG, False)
    img, txt, owner = retrieval_embeddings(model, tok, retrieval_batches(pre, urls, batch_size=5))
    assert owner.tolist() == sorted(owner.tolist())
    assert sorted(owner.bincount().tolist()) == [1, 1, 2, 2, 3, 3]
    expected = retrieval_recall(img, txt, owner)
    for k in (1, 5):
        assert metrics[f"image_to_text_recall@{k}"] == pytest.approx(expected[f"image_to_text_recall@{k}"])
        assert metrics[f"text_to_image_recall@{k}"] == pytest.approx(expected[f"text_to_image_recall@{k}"])


def test_cli_tokenwise_scoring_of_a_filip_export(filip_exported, exported, tmp_path):
    """FILIP's token-wise retrieval: each direction ranked by its own token-wise similarity, computed
    here pair by pair from the model's tokens."""
    from mm.evaluate.retrieval import retrieval_batches
    from mm.losses.filip import filip_similarity
    from mm.models.clip import clip_preprocess, clip_tokenizer

    path, model, cfg = filip_exported
    urls, _ = _coco_shards(tmp_path)
    out = tmp_path / "tokenwise.json"
    proc = _run_cli(path, urls, out, "--scoring", "tokenwise", "--ks", "1,2,5")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    assert record["scoring"] == "tokenwise" and record["model_task"] == "filip"

    tok, pre = clip_tokenizer(cfg), clip_preprocess(cfg, False)
    images, captions, owner = [], [], []
    for batch in retrieval_batches(pre, urls, batch_size=3):
        for image, caps in zip(batch["image"], batch["captions"]):
            owner.extend([len(images)] * len(caps))
            images.append(image)
            captions.extend(caps)
    with torch.no_grad():
        img = [model.encode_image_tokens(x[None]) for x in images]
        txt = [model.encode_text_tokens(tok([c])) for c in captions]

    def pair(i, t):
        return filip_similarity(img[i][0], img[i][1], txt[t][0], txt[t][1])

    for k in (1, 2, 5):
        i2t, t2i = brute_force_scores(lambda i, t: pair(i, t)[0].item(), lambda i, t: pair(i, t)[1].item(),
                                      len(images), len(captions), owner, k)
        assert record["metrics"][f"image_to_text_recall@{k}"] == pytest.approx(i2t), k
        assert record["metrics"][f"text_to_image_recall@{k}"] == pytest.approx(t2i), k

    # a CLIP export has no tokens to match: one line naming it, exit 2, nothing written
    proc = _run_cli(exported[0], urls, tmp_path / "no.json", "--scoring", "tokenwise")
    assert proc.returncode == 2 and "token-wise scoring needs a FILIP model" in proc.stderr
    assert not (tmp_path / "no.json").exists()


def test_txt_lines_are_separate_captions():
    """A sample's txt holds one caption per line (CLIP_benchmark's retrieval shards): each non-blank line
    is a caption of its own, never the whole file as one; json `captions` still win."""
    import io
    import random

    from PIL import Image

    from mm.evaluate.retrieval import captions_map

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    sample_map = captions_map(lambda image: image.size)
    raw = {"__key__": "k", "png": buf.getvalue(), "txt": b"a dog\r\n  a brown dog  \n\nthe dog runs\n"}
    assert sample_map(raw, random.Random(0))["captions"] == ["a dog", "a brown dog", "the dog runs"]
    raw["json"] = json.dumps({"captions": ["from json"]}).encode()
    assert sample_map(raw, random.Random(0))["captions"] == ["from json"]
