"""mm-zeroshot on an image folder and on a CSV/JSONL list: same metrics as the shards path on the same
images; labels outside the class list; unreadable images; the built-in class-name sets."""

import csv
import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mm.data.classnames import load_classnames, load_templates
from mm.data.streams import labelled_shard_batches
from mm.errors import DataError
from mm.evaluate.datasets import FolderDataset, ListDataset, dataset_kind, image_label_loader
from mm.metrics.zeroshot import evaluate_zeroshot_batches
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


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """The tiny model as an mm export (weights + the metadata load_exported reads)."""
    from mm.config import config_json
    from mm.tasks.clip import ClipRunConfig

    path = tmp_path_factory.mktemp("export") / "model.safetensors"
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {"mm_task": "clip", "mm_config": config_json(ClipRunConfig(model=CFG)), "mm_step": "0"}
    save_file(state, str(path), metadata=meta)
    return path


@pytest.fixture(scope="module")
def val_images(shapes, tmp_path_factory):
    """The shapes val shard's images as files: [(relative path, label, classname)] under `root`."""
    root = tmp_path_factory.mktemp("val_images")
    names = load_classnames("shapes")
    rows = []
    with tarfile.open(shapes["val"]) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name in sorted(members):
            if not name.endswith(".png") or name.endswith(".mask.png"):
                continue
            key = name[: -len(".png")]
            meta = json.load(tar.extractfile(members[key + ".json"]))
            rel = f"{names[meta['label']]}/{key.replace('/', '_')}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(tar.extractfile(members[name]).read())
            rows.append((rel, meta["label"], names[meta["label"]]))
    return root, rows


def _shard_metrics(model, shapes):
    tok, pre = clip_tokenizer(CFG), clip_preprocess(CFG, False)
    names = load_classnames("shapes")
    return evaluate_zeroshot_batches(model, tok, labelled_shard_batches(pre, tok, shapes["val"], len(names), 7),
                                     names, load_templates("shapes"))


def _metrics(model, dataset):
    return evaluate_zeroshot_batches(model, clip_tokenizer(CFG), image_label_loader(dataset, batch_size=5),
                                     load_classnames("shapes"), load_templates("shapes"))


def test_dataset_kind(tmp_path):
    assert dataset_kind(str(tmp_path)) == "folder"
    assert dataset_kind("x/list.csv") == dataset_kind("x/list.JSONL") == "list"
    assert dataset_kind("x/shards-{000..009}.tar") == "shards"


def test_folder_gives_the_shard_metrics(model, shapes, val_images):
    root, rows = val_images
    pre = clip_preprocess(CFG, False)
    ours = _shard_metrics(model, shapes)
    # Folders named by class: mapped by name onto the shapes list.
    ds = FolderDataset(root, pre, load_classnames("shapes"))
    assert ds.label_mapping == "by_name" and len(ds) == len(rows) == 24
    assert _metrics(model, ds) == pytest.approx(ours)
    # Without --classnames the sorted folder names are the classes (here the same 12 names, sorted).
    plain = FolderDataset(root, pre)
    assert plain.classnames == sorted(load_classnames("shapes"))


def test_csv_and_jsonl_give_the_shard_metrics(model, shapes, val_images):
    root, rows = val_images
    pre = clip_preprocess(CFG, False)
    ours = _shard_metrics(model, shapes)
    with (root / "list.csv").open("w", newline="") as f:  # int labels, relative paths
        w = csv.writer(f)
        w.writerow(["filepath", "label"])
        w.writerows((rel, label) for rel, label, _ in rows)
    (root / "list.jsonl").write_text(  # class-name labels, absolute paths
        "".join(json.dumps({"image": str(root / rel), "label": name}) + "\n" for rel, _, name in rows))
    for name in ("list.csv", "list.jsonl"):
        ds = ListDataset(root / name, pre, load_classnames("shapes"))
        assert len(ds) == 24
        assert _metrics(model, ds) == pytest.approx(ours), name


def test_cli_on_a_folder_with_an_unreadable_image(exported, shapes, val_images, tmp_path, capsys):
    from mm.evaluate.zeroshot import main

    root, rows = val_images
    folder = tmp_path / "imgs"
    for rel, _, _ in rows:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes((root / rel).read_bytes())
    broken = folder / rows[0][0].split("/")[0] / "broken.png"
    broken.write_bytes(b"not a png")
    out, png = tmp_path / "zs.json", tmp_path / "confusion.png"
    assert main(["--checkpoint", str(exported), "--data", str(folder), "--classnames", "shapes",
                 "--batch-size", "5", "--output", str(out), "--confusion", str(png)]) == 0
    record = json.loads(out.read_text())
    assert record["task"] == "zeroshot_classification" and record["dataset_type"] == "folder"
    assert record["skipped_images"] == 1 and record["skipped"][0]["path"] == str(broken)
    assert record["metrics"]["n_images"] == 24
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "broken.png" in capsys.readouterr().err
    # The same images as shards give the same metrics through the CLI.
    assert main(["--checkpoint", str(exported), "--data", shapes["val"], "--output", str(out)]) == 0
    shard_record = json.loads(out.read_text())
    assert shard_record["metrics"] == pytest.approx(record["metrics"])
    assert shard_record["skipped_images"] == 0


def test_label_outside_the_class_list_names_the_file(tmp_path):
    pre = clip_preprocess(CFG, False)
    bad = tmp_path / "bad.csv"
    bad.write_text("filepath,label\na.png,0\nb.png,12\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: label 12 outside the 12 class names"):
        ListDataset(bad, pre, load_classnames("shapes"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"filepath": "a.png", "label": "purple hexagon"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: label 'purple hexagon' is not one of the 12"):
        ListDataset(bad, pre, load_classnames("shapes"))
    # An image folder with a class folder that is not in the list (and no positional match).
    for name in ("red circle", "purple hexagon"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
    with pytest.raises(DataError, match=r"imgs/purple hexagon: folder 'purple hexagon' is not one of"):
        FolderDataset(tmp_path / "imgs", pre, load_classnames("shapes"))


@pytest.mark.parametrize("name,n_classes,n_templates", [("cifar10", 10, 18), ("cifar100", 100, 18),
                                                        ("imagenet", 1000, 80), ("shapes", 12, 3)])
def test_builtin_sets(name, n_classes, n_templates):
    names, templates = load_classnames(name), load_templates(name)
    assert len(names) == n_classes  # (open_clip's curated ImageNet names repeat two, as CLIP's notebook does)
    assert len(templates) == len(set(templates)) == n_templates
    assert all(t.count("{}") == 1 for t in templates)
    if name != "shapes":
        assert "a photo of a {}." in templates



def test_tokenwise_scoring_on_a_folder_equals_the_shards_path(shapes, val_images):
    from mm.config import load_config
    from mm.metrics.zeroshot import classification_metrics, tokenwise_predictions
    from mm.tasks import get_task

    task = get_task("filip")
    tiny = ["model.arch.embed_dim=32", "model.arch.vision_cfg.width=32",
            "model.arch.vision_cfg.head_width=16",
            "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1",
            "model.embed_dim=24"]
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/filip/tiny.yaml", tiny, task.config_class)
    torch.manual_seed(0)
    filip = get_task(task.name, cfg).build_model().eval()
    tok, pre = clip_tokenizer(cfg.model), clip_preprocess(cfg.model, False)
    names, templates = load_classnames("shapes"), load_templates("shapes")
    ref = evaluate_zeroshot_batches(filip, tok, labelled_shard_batches(pre, tok, shapes["val"], len(names), 7),
                                    names, templates, scoring="tokenwise")
    ds = FolderDataset(val_images[0], pre, names)
    logits, labels = tokenwise_predictions(filip, tok, image_label_loader(ds, batch_size=5), names, templates)
    got = classification_metrics(logits, labels, len(names))
    assert len(labels) == ref["n_images"] == 24
    assert got == pytest.approx({k: v for k, v in ref.items() if k != "n_images"})


def test_cli_on_a_folder_equals_open_clip_reference(model, exported, val_images, tmp_path, capsys):
    """The issue's check as one piece: mm-zeroshot on a tiny open_clip model and a tiny image folder
    against a plain reference built from open_clip's own build_zero_shot_classifier."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    from PIL import Image

    from mm.evaluate.zeroshot import main

    root, rows = val_images
    names, templates = load_classnames("shapes"), load_templates("shapes")
    out = tmp_path / "zs.json"
    assert main(["--checkpoint", str(exported), "--data", str(root), "--classnames", "shapes",
                 "--output", str(out)]) == 0
    capsys.readouterr()
    ours = json.loads(out.read_text())["metrics"]

    tok, pre = clip_tokenizer(CFG), clip_preprocess(CFG, False)
    classifier = build_zero_shot_classifier(model, tok, names, templates)
    with torch.no_grad():
        images = torch.stack([pre(Image.open(root / rel)) for rel, _, _ in rows])
        logits = 100 * torch.nn.functional.normalize(model.encode_image(images), dim=-1) @ classifier
    labels = torch.tensor([label for _, label, _ in rows])
    pred = logits.argmax(1)
    acc5 = sum(labels[i].item() in logits[i].topk(5).indices.tolist() for i in range(len(labels))) / len(labels)
    recall = sum((pred[labels == c] == c).float().mean().item() for c in range(len(names))) / len(names)
    assert ours["n_images"] == len(rows) == 24
    assert ours["acc1"] == pytest.approx((pred == labels).float().mean().item())
    assert ours["acc5"] == pytest.approx(acc5)
    assert ours["mean_per_class_recall"] == pytest.approx(recall)
