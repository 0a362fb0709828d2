"""CLIP_benchmark's WebDataset sets read as they are published (a root with classnames.txt,
zeroshot_classification_templates.txt, dataset_type.txt, <split>/nshards.txt and <split>/N.tar of
webp/png images with .cls labels or one caption per .txt line), SugarCrepe on part of its images, and
results JSON that `clip_benchmark build` turns into its CSV.

References: a tiny open_clip model loaded by open_clip itself from the saved weights file, the shards
read with tarfile + PIL, the classifier built from classnames x templates and top-1 / recall@k computed
with plain torch (no mm); where the clip_benchmark package is installed, its own metrics too."""

import csv
import io
import json
import tarfile
from argparse import Namespace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mm.evaluate import compositional, retrieval, zeroshot

ARCH = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
NAME = "mm-test-cb-tiny"
CLASSNAMES = ["red square", "green circle", "blue triangle", "yellow star"]
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}", "{c}"]
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 50, 220), (230, 220, 30)]
CAPTIONS = ["a red thing", "something green", "a blue picture", "yellow", "a dark image", "noise"]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("open_clip")
    config = root / f"{NAME}.json"
    config.write_text(json.dumps(ARCH))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(NAME)
    weights = root / "tiny.pt"
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, weights)
    return config, weights


@pytest.fixture(scope="module")
def reference(model_files):
    """(model, preprocess, tokenizer) as open_clip loads them from the weights file."""
    _, weights = model_files
    model, _, preprocess = open_clip.create_model_and_transforms(NAME, pretrained=str(weights))
    return model.eval(), preprocess, open_clip.get_tokenizer(NAME)


def _image(rng, colour, fmt):
    """A noisy image tinted `colour`, encoded as webp (lossless, as CLIP_benchmark exports) or png."""
    pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 60, (40, 40, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="WEBP", lossless=True) if fmt == "webp" else \
        Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(split_dir, samples, sizes):
    """samples [(key, {ext: bytes})] into split_dir/0.tar, 1.tar ... of the given sizes, + nshards.txt."""
    split_dir.mkdir(parents=True)
    it = iter(samples)
    for n, size in enumerate(sizes):
        with tarfile.open(split_dir / f"{n}.tar", "w") as tar:
            for _ in range(size):
                key, fields = next(it)
                for ext, data in fields.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (split_dir / "nshards.txt").write_text(f"{len(sizes)}\n")


@pytest.fixture(scope="module")
def classification_root(tmp_path_factory, reference):
    """12 images in 3 shards (webp and png), with CLIP_benchmark's text files. The tiny model is random,
    so labels are set from its own predictions: 8 images labelled as it predicts them, 4 one class off,
    which makes the expected top-1 2/3 and per-class recalls uneven."""
    root = tmp_path_factory.mktemp("wds_classification")
    rng = np.random.default_rng(0)
    images = [_image(rng, COLOURS[i % 4], "webp" if i % 2 else "png") for i in range(12)]
    preprocess = reference[1]
    with torch.no_grad():
        pred = (_classifier_scores(reference, CLASSNAMES, TEMPLATES,
                                   torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]))
                .argmax(1).tolist())
    samples = []
    for i, data in enumerate(images):
        label = pred[i] if i % 3 else (pred[i] + 1) % 4
        samples.append((f"s{i:07d}", {"webp" if i % 2 else "png": data, "cls": str(label).encode()}))
    _write_shards(root / "test", samples, [5, 5, 2])
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root


@pytest.fixture(scope="module")
def retrieval_root(tmp_path_factory):
    """8 images in 2 shards, each with a .txt of 1-3 captions, one per line."""
    root = tmp_path_factory.mktemp("wds_retrieval")
    rng = np.random.default_rng(1)
    samples = []
    for i in range(8):
        lines = [CAPTIONS[(i + j) % len(CAPTIONS)] + f" {i}" for j in range(1 + i % 3)]
        fmt = "webp" if i % 2 else "png"
        samples.append((f"s{i:07d}", {fmt: _image(rng, COLOURS[i % 4], fmt), "txt": "\n".join(lines).encode()}))
    _write_shards(root / "test", samples, [5, 3])
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def _read_shards(split_dir):
    """[(PIL image, {ext: bytes})] in shard order, read with tarfile alone."""
    out = []
    for n in range(int((split_dir / "nshards.txt").read_text())):
        with tarfile.open(split_dir / f"{n}.tar") as tar:
            groups = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                groups.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key in sorted(groups):
            fields = {**groups[key], "__key__": key}
            data = next(fields[e] for e in ("webp", "png", "jpg") if e in fields)
            out.append((Image.open(io.BytesIO(data)).convert("RGB"), fields))
    return out


@torch.no_grad()
def _classifier_scores(reference, classnames, templates, images):
    """100 x cosine of the images with each class's mean normalised template embedding."""
    model, _, tokenizer = reference
    weights = []
    for name in classnames:
        emb = F.normalize(model.encode_text(tokenizer([t.format(c=name) for t in templates])), dim=-1).mean(0)
        weights.append(emb / emb.norm())
    return 100 * F.normalize(model.encode_image(images), dim=-1) @ torch.stack(weights, 1)


def _reference_logits(reference, root, classnames, templates):
    """(logits, labels, keys) of every sample in the root's test split, in shard order."""
    samples = _read_shards(root / "test")
    images = torch.stack([reference[1](img) for img, _ in samples])
    labels = torch.tensor([int(f["cls"]) for _, f in samples])
    return _classifier_scores(reference, classnames, templates, images), labels, [f["__key__"] for _, f in samples]


def _exit_message(capsys, fn, argv):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def _build_csv(files, out):
    """`clip_benchmark build FILES --output out`, in-process; the rows it wrote."""
    cli = pytest.importorskip("clip_benchmark.cli")
    cli.main_build(Namespace(files=[str(f) for f in files], output=str(out)))
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def test_zeroshot_reads_a_clip_benchmark_root(model_files, reference, classification_root, tmp_path):
    config, weights = model_files
    out = tmp_path / "zs.json"
    assert zeroshot.main(["--model", str(config), "--pretrained", str(weights), "--data", str(classification_root),
                          "--batch-size", "4", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    logits, labels, keys = _reference_logits(reference, classification_root, CLASSNAMES, TEMPLATES)
    pred = logits.argmax(1)
    assert record["metrics"]["n_images"] == 12 and record["n_classes"] == 4 and record["n_templates"] == 3
    assert record["metrics"]["acc1"] == pytest.approx((pred == labels).float().mean().item()) == pytest.approx(8 / 12)
    recalls = [(pred[labels == c] == c).float().mean().item() for c in labels.unique()]
    assert record["metrics"]["mean_per_class_recall"] == pytest.approx(sum(recalls) / len(recalls))
    assert record["split"] == "test" and record["n_shards"] == 3 and record["dataset_type"] == "clip_benchmark"
    assert record["classnames"].endswith("classnames.txt")

    # The same images through mm's loader give the reference's logits, not only its accuracy.
    from mm.evaluate.datasets import cls_shard_batches, read_clip_benchmark_root
    from mm.evaluate.models import load_open_clip
    from mm.metrics.zeroshot import zeroshot_predictions

    model, tokenizer, preprocess = load_open_clip(str(config), str(weights))
    cb = read_clip_benchmark_root(classification_root)
    assert cb.templates == [t.replace("{c}", "{}") for t in TEMPLATES] and cb.classnames == CLASSNAMES
    seen = []

    def batches():  # the loader's shard order is its own: match samples by key
        for batch in cls_shard_batches(preprocess, cb.urls, 4, 5):
            seen.extend(batch["key"])
            yield batch

    got, got_labels = zeroshot_predictions(model, tokenizer, batches(), cb.classnames, cb.templates)
    order = [keys.index(k) for k in seen]
    assert sorted(order) == list(range(12))
    assert torch.equal(got_labels, labels[order]) and torch.allclose(got, logits[order], atol=1e-3)

    # --classnames / --templates override the root's files.
    (tmp_path / "names.txt").write_text("\n".join(reversed(CLASSNAMES)))
    (tmp_path / "templates.txt").write_text("an image of {}\n")
    out2 = tmp_path / "zs2.json"
    assert zeroshot.main(["--model", str(config), "--pretrained", str(weights), "--data", str(classification_root),
                          "--classnames", str(tmp_path / "names.txt"), "--templates", str(tmp_path / "templates.txt"),
                          "--split", "test", "--output", str(out2)]) == 0
    logits2, _, _ = _reference_logits(reference, classification_root, list(reversed(CLASSNAMES)), ["an image of {c}"])
    record2 = json.loads(out2.read_text())
    assert record2["metrics"]["acc1"] == pytest.approx((logits2.argmax(1) == labels).float().mean().item())
    assert record2["templates"] == str(tmp_path / "templates.txt")

    # clip_benchmark's own reading of the root and its classifier, where the package is installed. (Its
    # evaluate() asks for top-5, which 4 classes do not have: top-1 is taken from its logits here.)
    builder = pytest.importorskip("clip_benchmark.datasets.builder")
    from clip_benchmark.metrics import zeroshot_classification

    ref_model, ref_preprocess, ref_tokenizer = reference
    ds = builder.build_dataset("wds/tiny", root=str(classification_root), transform=ref_preprocess, split="test")
    assert ds.classes == CLASSNAMES and ds.templates == TEMPLATES
    loader = torch.utils.data.DataLoader(ds.batched(4), batch_size=None, shuffle=False, num_workers=0)
    classifier = zeroshot_classification.zero_shot_classifier(ref_model, ref_tokenizer, ds.classes, ds.templates,
                                                              "cpu", amp=False)
    their_logits, their_labels = zeroshot_classification.run_classification(ref_model, classifier, loader, "cpu",
                                                                            amp=False)
    assert len(their_labels) == 12
    assert record["metrics"]["acc1"] == pytest.approx((their_logits.argmax(1) == their_labels).float().mean().item())

    rows = _build_csv([out, out2], tmp_path / "benchmark.csv")
    assert [float(r["acc1"]) for r in rows] == pytest.approx([record["metrics"]["acc1"], record2["metrics"]["acc1"]])
    assert rows[0]["task"] == "zeroshot_classification" and rows[0]["language"] == "en"
    assert rows[0]["model_fullname"] == f"{NAME} {weights}"


def test_retrieval_counts_every_txt_line_as_a_caption(model_files, reference, retrieval_root, tmp_path):
    config, weights = model_files
    out = tmp_path / "ret.json"
    assert retrieval.main(["--model", str(config), "--pretrained", str(weights), "--data", str(retrieval_root),
                           "--ks", "1,2,5", "--batch-size", "3", "--output", str(out)]) == 0
    record = json.loads(out.read_text())

    model, preprocess, tokenizer = reference
    samples = _read_shards(retrieval_root / "test")
    captions, owner = [], []
    for i, (_, fields) in enumerate(samples):
        lines = fields["txt"].decode().splitlines()
        captions += lines
        owner += [i] * len(lines)
    owner = torch.tensor(owner)
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([preprocess(im) for im, _ in samples])), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    scores = img @ txt.T  # (images, captions)
    assert record["metrics"]["n_images"] == 8 and record["metrics"]["n_texts"] == len(captions) == 15
    for k in (1, 2, 5):
        top_t = scores.topk(k, dim=1).indices  # image -> text: one of its captions among the k best
        i2t = torch.stack([(owner[top_t[i]] == i).any() for i in range(len(samples))]).float().mean().item()
        top_i = scores.T.topk(k, dim=1).indices  # text -> image: its image among the k best
        t2i = (top_i == owner[:, None]).any(1).float().mean().item()
        assert record["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
        assert record["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(t2i)

    builder = pytest.importorskip("clip_benchmark.datasets.builder")
    from clip_benchmark.metrics import zeroshot_retrieval

    ds = builder.build_dataset("wds/tiny", root=str(retrieval_root), transform=preprocess, split="test",
                               task="zeroshot_retrieval")
    loader = torch.utils.data.DataLoader(ds.batched(3), batch_size=None, shuffle=False, num_workers=0)
    theirs = zeroshot_retrieval.evaluate(model, loader, tokenizer, recall_k_list=[1, 2, 5], device="cpu", amp=False)
    for key, value in theirs.items():
        assert record["metrics"][key] == pytest.approx(value), key
    rows = _build_csv([out], tmp_path / "benchmark.csv")
    assert float(rows[0]["image_retrieval_recall@5"]) == pytest.approx(record["metrics"]["image_retrieval_recall@5"])


def test_clip_benchmark_root_errors(model_files, classification_root, retrieval_root, tmp_path, capsys):
    config, weights = model_files
    model = ["--model", str(config), "--pretrained", str(weights)]
    out = tmp_path / "out.json"
    err = _exit_message(capsys, zeroshot.main, [*model, "--data", str(classification_root), "--split", "train",
                                                "--output", str(out)])
    assert "no split 'train'" in err and "splits here: test" in err
    err = _exit_message(capsys, retrieval.main, [*model, "--data", str(classification_root), "--output", str(out)])
    assert "classification set" in err and "mm zeroshot" in err
    err = _exit_message(capsys, zeroshot.main, [*model, "--data", str(retrieval_root), "--output", str(out)])
    assert "retrieval set" in err and "mm retrieval" in err
    err = _exit_message(capsys, retrieval.main, [*model, "--data", str(retrieval_root / "test" / "0.tar"),
                                                 "--split", "test", "--output", str(out)])
    assert "--split test: only for a CLIP_benchmark root" in err

    broken = tmp_path / "broken"
    (broken / "test").mkdir(parents=True)
    (broken / "test" / "nshards.txt").write_text("3\n")
    for n in range(2):
        (broken / "test" / f"{n}.tar").write_bytes((classification_root / "test" / f"{n}.tar").read_bytes())
    (broken / "classnames.txt").write_text("\n".join(CLASSNAMES))
    (broken / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    err = _exit_message(capsys, zeroshot.main, [*model, "--data", str(broken), "--output", str(out)])
    assert "2.tar: no such shard" in err and "1 of the 3 shards" in err
    (broken / "test" / "nshards.txt").write_text("2\n")
    (broken / "zeroshot_classification_templates.txt").write_text("a photo of a {name}.\n")
    err = _exit_message(capsys, zeroshot.main, [*model, "--data", str(broken), "--output", str(out)])
    assert "zeroshot_classification_templates.txt" in err and "{c}" in err
    (broken / "zeroshot_classification_templates.txt").unlink()
    err = _exit_message(capsys, zeroshot.main, [*model, "--data", str(broken), "--output", str(out)])
    assert "no zeroshot_classification_templates.txt; give --templates" in err
    (broken / "classnames.txt").write_text("a\nb\n")  # labels up to 3 with 2 names: the shard is named
    err = _exit_message(capsys, zeroshot.main, [*model, "--data", str(broken), "--templates", "shapes",
                                                "--output", str(out)])
    assert ".tar: sample" in err and "outside the 2 class names" in err
    assert not out.exists()


def test_sugarcrepe_on_part_of_its_images(model_files, reference, tmp_path, capsys):
    """Items whose image is missing or corrupt are skipped and counted per file; the accuracy of the rest
    equals the reference's; CLIP_benchmark's image_caption_selection JSON is written per file."""
    config, weights = model_files
    images = tmp_path / "val2017"
    images.mkdir()
    rng = np.random.default_rng(2)
    for i in range(6):
        (images / f"{i:012d}.jpg").write_bytes(_image(rng, COLOURS[i % 4], "png"))  # PIL reads by content
    (images / "000000000006.jpg").write_bytes(b"not an image")
    files = []
    for kind, ids in (("swap_att", range(0, 9)), ("add_obj", range(3, 7))):
        data = {str(j): {"filename": f"{j:012d}.jpg", "caption": CAPTIONS[j % 6],
                         "negative_caption": CAPTIONS[(j + 1) % 6]} for j in ids}
        (tmp_path / f"{kind}.json").write_text(json.dumps(data))
        files.append(tmp_path / f"{kind}.json")
    out = tmp_path / "comp.json"
    template = str(tmp_path / "cb" / "{dataset}_{task}.json")
    argv = ["--model", str(config), "--pretrained", str(weights), "--images", str(images), "--batch-size", "4",
            "--output", str(out), "--clip-benchmark-output", template]
    for f in files:
        argv += ["--sugarcrepe", str(f)]
    assert compositional.main(argv) == 0
    err = capsys.readouterr().err
    assert "swap_att.json: 3 of 9 items skipped (2 images missing, 1 unreadable" in err
    res = json.loads(out.read_text())["results"]["sugarcrepe"]
    assert {k: res["swap_att"][k] for k in ("n", "n_items", "skipped", "missing_images", "unreadable_images")} == \
        {"n": 6, "n_items": 9, "skipped": 3, "missing_images": 2, "unreadable_images": 1}
    assert (res["add_obj"]["n"], res["add_obj"]["skipped"]) == (3, 1)

    model, preprocess, tokenizer = reference
    for kind, ids in (("swap_att", range(0, 6)), ("add_obj", range(3, 6))):
        with torch.no_grad():
            img = F.normalize(model.encode_image(torch.stack(
                [preprocess(Image.open(images / f"{j:012d}.jpg").convert("RGB")) for j in ids])), dim=-1)
            pos = F.normalize(model.encode_text(tokenizer([CAPTIONS[j % 6] for j in ids])), dim=-1)
            neg = F.normalize(model.encode_text(tokenizer([CAPTIONS[(j + 1) % 6] for j in ids])), dim=-1)
        want = ((img * pos).sum(1) > (img * neg).sum(1)).float().mean().item()
        assert res[kind]["acc"] == pytest.approx(want)
        cb = json.loads((tmp_path / "cb" / f"sugar_crepe_{kind}_image_caption_selection.json").read_text())
        assert cb["dataset"] == f"sugar_crepe/{kind}" and cb["task"] == "image_caption_selection"
        assert cb["metrics"] == {"acc": pytest.approx(want)} and cb["pretrained"] == str(weights)
    rows = _build_csv(sorted((tmp_path / "cb").glob("*.json")), tmp_path / "benchmark.csv")
    assert sorted(r["dataset"] for r in rows) == ["sugar_crepe/add_obj", "sugar_crepe/swap_att"]


def test_compositional_bad_inputs(model_files, tmp_path, capsys):
    config, weights = model_files
    (tmp_path / "img").mkdir()
    data = {"0": {"filename": "gone.jpg", "caption": "a", "negative_caption": "b"}}
    for kind in ("swap_att", "swap_obj"):
        (tmp_path / f"{kind}.json").write_text(json.dumps(data))
    out = tmp_path / "o.json"
    model = ["--model", str(config), "--pretrained", str(weights), "--images", str(tmp_path / "img")]
    err = _exit_message(capsys, compositional.main, [*model, "--sugarcrepe", str(tmp_path / "swap_att.json"),
                                                     "--output", str(out)])
    assert "none of its 1 items has a readable image" in err and "gone.jpg" in err
    err = _exit_message(capsys, compositional.main, [
        *model, "--sugarcrepe", str(tmp_path / "swap_att.json"), "--sugarcrepe", str(tmp_path / "swap_obj.json"),
        "--clip-benchmark-output", str(tmp_path / "cb.json")])
    assert "put {dataset} in it" in err
    err = _exit_message(capsys, compositional.main, [*model, "--sugarcrepe", str(tmp_path / "swap_att.json"),
                                                     "--clip-benchmark-output", str(tmp_path / "{nope}.json")])
    assert "not a template" in err
    assert not out.exists() and not list(tmp_path.glob("cb*"))
