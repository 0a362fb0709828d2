"""The evaluation commands on a plain open_clip architecture with a local pretrained file
(--model/--pretrained): the metrics equal a reference built from open_clip's own classifier and
transforms; bad model arguments are one-line errors."""

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from mm.data.classnames import load_classnames, load_templates
from mm.evaluate import compositional, retrieval, zeroshot

ARCH = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory):
    """An open_clip model-config JSON and a checkpoint of that architecture saved as open_clip saves one."""
    root = tmp_path_factory.mktemp("open_clip")
    config = root / "mm-test-tiny.json"
    config.write_text(json.dumps(ARCH))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("mm-test-tiny")
    weights = root / "tiny.pt"
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, weights)
    return config, weights, model.eval()


def _exit_message(capsys, fn, argv):
    with pytest.raises(SystemExit) as e:
        fn(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_zeroshot_equals_open_clip_reference(open_clip_files, shapes, tmp_path, capsys):
    config, weights, model = open_clip_files
    out = tmp_path / "zs.json"
    assert zeroshot.main(["--model", str(config), "--pretrained", str(weights), "--data", shapes["val"],
                          "--classnames", "shapes", "--templates", "shapes", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["model_task"] == "open_clip" and record["model"] == "mm-test-tiny"

    import webdataset as wds

    _, _, preprocess = open_clip.create_model_and_transforms("mm-test-tiny")
    tokenizer = open_clip.get_tokenizer("mm-test-tiny")
    classifier = build_zero_shot_classifier(model, tokenizer, load_classnames("shapes"), load_templates("shapes"))
    correct, n = 0, 0
    for image, meta in wds.WebDataset(shapes["val"], shardshuffle=False).decode("pil").to_tuple("png", "json"):
        with torch.no_grad():
            f = F.normalize(model.encode_image(preprocess(image)[None]), dim=-1)
        correct += int((f @ classifier).argmax().item() == meta["label"])
        n += 1
    assert record["metrics"]["n_images"] == n
    assert record["metrics"]["acc1"] == pytest.approx(correct / n)


def test_retrieval_and_compositional_take_the_same_model(open_clip_files, shapes, tmp_path, capsys):
    config, weights, _ = open_clip_files
    model_args = ["--model", str(config), "--pretrained", str(weights)]
    out = tmp_path / "r.json"
    assert retrieval.main([*model_args, "--data", shapes["val"], "--output", str(out)]) == 0
    assert json.loads(out.read_text())["model_task"] == "open_clip"
    out = tmp_path / "c.json"
    assert compositional.main([*model_args, "--synthetic-shapes", shapes["train_shards"][0],
                               "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["model_task"] == "open_clip" and record["results"]


def test_bad_model_arguments(open_clip_files, shapes, tmp_path, capsys):
    config, weights, _ = open_clip_files
    data = ["--data", shapes["val"]]
    assert "either --checkpoint" in _exit_message(capsys, zeroshot.main, data)
    assert "either --checkpoint" in _exit_message(
        capsys, zeroshot.main, [*data, "--checkpoint", str(weights), "--model", str(config)])
    assert "--pretrained FILE" in _exit_message(capsys, zeroshot.main, [*data, "--model", str(config)])
    err = _exit_message(capsys, zeroshot.main, [*data, "--model", str(config), "--pretrained", "ViT-B-32"])
    assert "no such file" in err
    err = _exit_message(capsys, zeroshot.main, [*data, "--model", "no-such-arch", "--pretrained", str(weights)])
    assert "not an open_clip architecture" in err

    other = tmp_path / "other.json"
    other.write_text(json.dumps({**ARCH, "embed_dim": 16}))
    err = _exit_message(capsys, retrieval.main, [*data, "--model", str(other), "--pretrained", str(weights)])
    assert "weights do not fit other" in err

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    err = _exit_message(capsys, zeroshot.main, [*data, "--model", str(config), "--pretrained", str(junk)])
    assert "not a readable checkpoint" in err
