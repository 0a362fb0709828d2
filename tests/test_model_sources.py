"""Model folders as model sources: open_clip's `local-dir:PATH`, `hf-hub:ORG/NAME` read offline from a
Hugging Face cache tree, and a folder path, in a training config (model.pretrained) and in the
evaluators' --model. Reference: open_clip.create_model_and_transforms on the same folder."""

import argparse
import json
import shutil

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mm.config import load_config
from mm.errors import UserError
from mm.evaluate import zeroshot
from mm.evaluate.models import load_eval_model
from mm.models.clip import resolve_model_folder
from mm.models.structure_clip import StructureClipModel, StructureClipModelConfig
from mm.tasks.clip import ClipRunConfig, ClipTask

ARCH = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
# Not open_clip's defaults, so a source that dropped the folder's preprocess_cfg would give other pixels.
PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear",
              "resize_mode": "squash", "size": 32}
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An open_clip local-dir folder (standard CLIP weight layout, as open_clip saves it) and the same
    files in a hub cache tree: models--mm-test--tiny/{refs/main, blobs/, snapshots/REV/ -> blobs}."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**ARCH)
    local = root / "tiny-local"
    local.mkdir()
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": ARCH, "preprocess_cfg": PREPROCESS}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(local / "open_clip_model.safetensors"))
    hub = root / "hub"
    repo = hub / "models--mm-test--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for i, name in enumerate(("open_clip_config.json", "open_clip_model.safetensors")):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copy(local / name, blob)
        (snapshot / name).symlink_to(f"../../blobs/{blob.name}")
    return {"local": local, "hub": hub, "repo": repo}


@pytest.fixture(scope="module")
def reference(folders):
    """open_clip's own model, transform and tokenizer of the local-dir folder."""
    spec = f"local-dir:{folders['local']}"
    model, _, preprocess = open_clip.create_model_and_transforms(spec)
    return model.eval(), preprocess, open_clip.get_tokenizer(spec)


def _inputs():
    g = torch.Generator().manual_seed(1)
    image = Image.fromarray((torch.rand(48, 40, 3, generator=g) * 255).byte().numpy())
    return image, ["a red circle left of a blue square", "two green triangles"]


def _embeddings(model, preprocess, tokenizer):
    image, texts = _inputs()
    with torch.no_grad():
        return (model.encode_image(preprocess(image)[None], normalize=True),
                model.encode_text(tokenizer(texts), normalize=True))


def _assert_same(ours, ref):
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.fixture
def hub_env(folders, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(folders["hub"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _specs(folders):
    return {"local-dir": f"local-dir:{folders['local']}", "folder": str(folders["local"]),
            "hf-hub": "hf-hub:mm-test/tiny", "cache folder": str(folders["repo"])}


def test_open_clip_reads_the_cache_tree_as_the_local_folder(folders, reference, hub_env):
    # The fake cache tree is what hf-hub:mm-test/tiny resolves to offline, for open_clip itself too.
    model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:mm-test/tiny", cache_dir=str(folders["hub"]))
    _assert_same(_embeddings(model.eval(), preprocess, reference[2]), _embeddings(*reference))


@pytest.mark.parametrize("kind", ["local-dir", "folder", "hf-hub", "cache folder"])
def test_training_config_and_evaluator_equal_open_clip(folders, reference, hub_env, tmp_path, kind):
    spec = _specs(folders)[kind]
    ref = _embeddings(*reference)

    # A training config naming only the folder: architecture, weights and preprocessing come from it.
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  pretrained: '{spec}'\n")
    cfg = load_config(config, [], ClipRunConfig)
    task = ClipTask(cfg)
    model = task.build_model().eval()
    tokenizer, preprocess = task.eval_inputs()
    _assert_same(_embeddings(model, preprocess, tokenizer), ref)
    # The folder's architecture is recorded in the run's config, so the export rebuilds without it.
    assert cfg.model.arch["embed_dim"] == 32 and cfg.model.arch["preprocess_cfg"]["resize_mode"] == "squash"
    rebuilt = ClipTask(cfg).build_model(load_pretrained=False)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()

    # The evaluators' --model.
    loaded = load_eval_model(argparse.Namespace(checkpoint=None, model=spec, pretrained=None))
    _assert_same(_embeddings(loaded.model, loaded.preprocess, loaded.tokenizer), ref)
    assert loaded.name == ("tiny" if kind in ("hf-hub", "cache folder") else "tiny-local")


def test_structure_clip_config_loads_the_folder(folders, reference):
    model = StructureClipModel(StructureClipModelConfig(pretrained=f"local-dir:{folders['local']}")).eval()
    image, texts = _inputs()
    with torch.no_grad():
        ours = (model.encode_image(reference[1](image)[None]), model.encode_text(reference[2](texts)))
    _assert_same(ours, _embeddings(*reference))


def test_zeroshot_command_with_a_model_folder(folders, shapes, tmp_path, capsys):
    out = tmp_path / "zs.json"
    assert zeroshot.main(["--model", f"local-dir:{folders['local']}", "--data", shapes["val"],
                          "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["model"] == "tiny-local" and record["model_task"] == "open_clip"
    assert record["pretrained"].endswith("open_clip_model.safetensors")
    assert record["metrics"]["n_images"] == 24


@pytest.mark.parametrize("spec, message", [
    ("local-dir:{t}/absent", "no such folder"),
    ("{t}/absent", "no such folder"),
    ("local-dir:{t}", "no open_clip_config.json"),
    ("hf-hub:mm-test/absent", "not in the Hugging Face cache"),
    ("hf-hub:absent", "hf-hub:ORG/NAME"),
])
def test_missing_sources_are_one_line(folders, hub_env, shapes, tmp_path, capsys, spec, message):
    spec = spec.format(t=tmp_path)
    with pytest.raises(SystemExit) as e:
        zeroshot.main(["--model", spec, "--data", shapes["val"], "--output", str(tmp_path / "zs.json")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert message in err, err
    assert not (tmp_path / "zs.json").exists()


def test_missing_folder_in_a_training_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  pretrained: 'local-dir:{tmp_path}/absent'\n")
    with pytest.raises(UserError, match="model.pretrained local-dir:.*absent: no such folder"):
        ClipTask(load_config(config, [], ClipRunConfig)).build_model()
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "open_clip_config.json").write_text(json.dumps({"model_cfg": ARCH}))
    with pytest.raises(UserError, match="no weights in"):
        resolve_model_folder(str(tmp_path / "w"))
