"""STRUCTURE task: the feature cache (contents, stale detection), cached-feature batches, the heads'
encoder check, and the whole workflow with tiny encoders: mm-structure cache -> select -> train
(2 ranks, ZeRO-2 and ZeRO-3) -> mm-zeroshot on the export, unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mm.config import load_config
from mm.errors import DataError, UserError

ROOT = Path(__file__).resolve().parents[1]
VIT_ARGS = "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 3, num_heads: 2}"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    from tests.test_encoders import _save_tiny_bert

    return _save_tiny_bert(tmp_path_factory.mktemp("bert"))


def _overrides(shapes: dict, bert: str, cache: Path, out: Path) -> list[str]:
    return [f"data.train={shapes['train']}", f"model.vision.args={VIT_ARGS}", "model.text.kind=hf",
            f"model.text.path={bert}", "model.text.args={}", "model.text.context_length=12",
            "model.embed_dim=32", f"cache.dir={cache}", "cache.num_workers=0", "cache.batch_size=64",
            "data.batch_size=32", "select.n=320", "loss.warmup_steps=4", "loss.lam=1.0", "optim.lr=3e-3",
            "optim.warmup_steps=1", "train.steps=30", "train.log_every=1", "train.ckpt_every=0",
            f"train.out_dir={out}", f"eval.zeroshot_data={shapes['val']}", "eval.batch_size=32"]


def _config(overrides: list[str]):
    from mm.tasks.structure import StructureRunConfig

    return load_config(ROOT / "configs/structure/tiny.yaml", overrides, StructureRunConfig)


@pytest.fixture(scope="module")
def workflow(shapes, tiny_bert, tmp_path_factory) -> dict:
    """mm-structure cache and select, run once for the module."""
    from mm.tasks.structure_cli import main

    root = tmp_path_factory.mktemp("structure")
    overrides = _overrides(shapes, tiny_bert, root / "cache", root / "run")
    sets = [a for o in overrides for a in ("--set", o)]
    assert main(["cache", "--config", str(ROOT / "configs/structure/tiny.yaml"), *sets]) == 0
    assert main(["select", "--config", str(ROOT / "configs/structure/tiny.yaml"), *sets]) == 0
    return {"root": root, "overrides": overrides, "cfg": _config(overrides),
            "train_yaml": root / "cache" / "select" / "train.yaml"}


def test_cache_rows_are_each_samples_features_of_every_layer(workflow, shapes):
    import io
    import tarfile

    from PIL import Image

    from mm.data.feature_cache import FeatureCache
    from mm.models.encoders import build_encoder, text_tokenizer, vision_preprocess

    cfg = workflow["cfg"]
    cache = FeatureCache(cfg.cache.dir)
    assert len(cache) == 320 and len(set(cache.keys)) == 320
    assert len(cache.vision_dims) == 3 and len(cache.text_dims) == 3  # 3 blocks; embeddings + 2 layers
    # Pick one sample straight from a shard and encode it here.
    with tarfile.open(shapes["train_shards"][3]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    key = sorted(n.rsplit(".", 1)[0] for n in members)[5]
    image = Image.open(io.BytesIO(members[f"{key}.png"])).convert("RGB")
    caption = members[f"{key}.txt"].decode().strip()
    row = cache.keys.index(key)
    vision, text = build_encoder(cfg.model.vision, "vision"), build_encoder(cfg.model.text, "text")
    with torch.no_grad():
        v = vision.layers(vision_preprocess(cfg.model.vision)(image)[None])
        t = text.layers(text_tokenizer(cfg.model.text)([caption]))
    for i in range(3):
        torch.testing.assert_close(cache.layer("vision", i)[row], v[i][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cache.layer("text", i)[row], t[i][0], atol=1e-5, rtol=1e-4)


def test_a_stale_cache_is_detected(workflow, tmp_path):
    from mm.tasks.structure import open_checked_cache

    base = workflow["overrides"]
    open_checked_cache(_config(base))  # the config it was built from: accepted
    with pytest.raises(DataError, match=r"stale feature cache.*vision\.seed"):
        open_checked_cache(_config(base + ["model.vision.seed=1"]))
    with pytest.raises(DataError, match=r"stale feature cache.*vision\.preprocess"):
        open_checked_cache(_config(base + ["model.vision.image_size=28"]))
    with pytest.raises(DataError, match=r"stale feature cache.*text\.context_length"):
        open_checked_cache(_config(base + ["model.text.context_length=10"]))
    with pytest.raises(DataError, match=r"stale feature cache.*data"):
        open_checked_cache(_config(base + [f"data.train={workflow['cfg'].data.train.replace('000007', '000006')}"]))
    # Changed weights at the same path are stale too.
    bert = tmp_path / "bert"
    shutil.copytree(workflow["cfg"].model.text.path, bert)
    assert open_checked_cache(_config(base + [f"model.text.path={bert}"]))  # same weights elsewhere: fine
    from transformers import BertModel

    m = BertModel.from_pretrained(bert)
    with torch.no_grad():
        m.embeddings.word_embeddings.weight.mul_(2)
    m.save_pretrained(bert)
    with pytest.raises(DataError, match=r"stale feature cache.*text\.weights"):
        open_checked_cache(_config(base + [f"model.text.path={bert}"]))
    # An interrupted build (no meta.json) and a missing cache are errors, not empty caches.
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "part-000000.safetensors").write_bytes(b"")
    with pytest.raises(DataError, match="interrupted"):
        open_checked_cache(_config(base + [f"cache.dir={partial}"]))
    with pytest.raises(DataError, match="missing"):
        open_checked_cache(_config(base + [f"cache.dir={tmp_path / 'none'}"]))


def test_cache_refuses_to_overwrite_without_asking(workflow):
    from mm.tasks.structure_cli import main

    with pytest.raises(SystemExit) as e:
        main(["cache", "--config", str(ROOT / "configs/structure/tiny.yaml"),
              *[a for o in workflow["overrides"] for a in ("--set", o)]])
    assert e.value.code == 2


def test_select_writes_scores_heatmaps_and_a_train_config(workflow):
    out = Path(workflow["cfg"].cache.dir) / "select"
    for metric in ("mutual_knn", "cka"):
        record = json.loads((out / f"alignment_{metric}.json").read_text())
        assert record["shape"] == [3, 3] and record["n"] == 320
        assert (out / f"alignment_{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "alignment_mutual_knn.json").read_text())
    assert record["k"] == 14  # ceil(2 * 320^(1/3))
    chosen = yaml.safe_load(workflow["train_yaml"].read_text())["model"]
    assert (chosen["vision_layer"], chosen["text_layer"]) == (record["selected"]["vision_layer"],
                                                              record["selected"]["text_layer"])
    m = torch.tensor(record["matrix"])
    assert m[chosen["vision_layer"], chosen["text_layer"]] == m.max()


def test_select_again_says_it_replaces_the_earlier_selection(workflow, capsys):
    from mm.tasks.structure_cli import main

    before = workflow["train_yaml"].read_text()
    assert main(["select", "--config", str(ROOT / "configs/structure/tiny.yaml"),
                 *[a for o in workflow["overrides"] for a in ("--set", o)]]) == 0
    err = capsys.readouterr().err
    assert "note: replacing the earlier layer selection" in err and "train.yaml" in err
    assert workflow["train_yaml"].read_text() == before  # same cache, same seed: the same choice


def test_cached_batches_resume_exactly_and_split_the_global_batch():
    from mm.tasks.structure import CachedFeatureBatches

    v, t = torch.arange(50.0)[:, None], -torch.arange(50.0)[:, None]

    def take(it, k):
        return [next(it) for _ in range(k)]

    full = take(iter(CachedFeatureBatches(v, t, 4, 0, 0, 1)), 30)  # crosses epochs (12 batches each)
    first = CachedFeatureBatches(v, t, 4, 0, 0, 1)
    it = iter(first)
    take(it, 17)
    resumed = take(iter(CachedFeatureBatches(v, t, 4, 0, 0, 1, state=first.state_dict())), 13)
    for a, b in zip(full[17:], resumed):
        assert torch.equal(a["vision"], b["vision"])
    assert torch.equal(full[0]["text"], -full[0]["vision"])  # pairs stay paired
    r0 = take(iter(CachedFeatureBatches(v, t, 2, 0, 0, 2)), 6)
    r1 = take(iter(CachedFeatureBatches(v, t, 2, 0, 1, 2)), 6)
    for a, b, g in zip(r0, r1, full):  # rank slices of the global batch of 4
        assert torch.equal(torch.cat([a["vision"], b["vision"]]), g["vision"])
    with pytest.raises(DataError, match="fewer than one global batch"):
        CachedFeatureBatches(v, t, 32, 0, 0, 2)


def test_heads_refuse_an_encoder_they_were_not_trained_on(workflow):
    from mm.models.encoders import build_encoder, encoder_identity, identity_digest
    from mm.models.structure import build_structure_model

    cfg = workflow["cfg"]
    model = build_structure_model(cfg.model, [32] * 3, [24] * 3)
    model.set_encoder_digest(identity_digest(encoder_identity(cfg.model.vision, "vision")),
                             identity_digest(encoder_identity(cfg.model.text, "text")))
    other = build_encoder(type(cfg.model.vision)(**{**cfg.model.vision.__dict__, "seed": 5}), "vision")
    model.attach_encoders(other, build_encoder(cfg.model.text, "text"))
    with pytest.raises(UserError, match="not the one these heads were trained on"):
        model.encode_image(torch.zeros(1, 3, 32, 32))


@pytest.fixture(scope="module")
def dist_results(workflow, torchrun) -> dict:
    out = workflow["root"] / "dist"
    proc = torchrun(ROOT / "tests/dist/structure_check.py", str(workflow["train_yaml"]), str(out), "1,2,3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_two_rank_training_lowers_the_loss_and_exports(dist_results, stage):
    r = dist_results[stage]
    assert r["step"] == 30 and len(r["losses"]) == 30
    assert r["lambda"][:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # warm-up over 4 steps
    assert sum(r["info_nce"][-3:]) / 3 < sum(r["info_nce"][:3]) / 3 - 0.05
    assert r["export_output_diff"] < 1e-5
    assert r["digest_recorded"]
    assert 0.0 <= r["eval"]["zeroshot/acc1"] <= 1.0 and r["eval"]["zeroshot/n_images"] == 24


def test_end_to_end_zeroshot_cli_runs_unchanged_on_the_export(dist_results, shapes, capsys, tmp_path):
    from mm.evaluate.zeroshot import main

    assert main(["--checkpoint", dist_results["2"]["export"], "--data", str(shapes["val"]),
                 "--output", str(tmp_path / "zs.json")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("zero-shot structure (pooled): acc1 ")
    record = json.loads((tmp_path / "zs.json").read_text())
    assert record["model_task"] == "structure" and record["metrics"]["n_images"] == 24
    # The CLI's number is the training-time evaluation of the same heads.
    assert record["metrics"]["acc1"] == pytest.approx(dist_results["2"]["eval"]["zeroshot/acc1"])


def test_retrieval_and_compositional_clis_run_unchanged_on_the_export(dist_results, shapes, tmp_path):
    from mm.evaluate.compositional import main as compositional
    from mm.evaluate.retrieval import main as retrieval

    export = dist_results["3"]["export"]
    assert retrieval(["--checkpoint", export, "--data", str(shapes["val"]), "--output", str(tmp_path / "r.json")]) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["model_task"] == "structure" and record["metrics"]["n_images"] == 24
    assert record["metrics"]["text_to_image_recall@10"] >= record["metrics"]["text_to_image_recall@1"]
    assert compositional(["--checkpoint", export, "--synthetic-shapes", str(shapes["train_shards"][0]),
                          "--output", str(tmp_path / "c.json")]) == 0
    results = json.loads((tmp_path / "c.json").read_text())["results"]
    assert results["shapes_relation"]["n"] > 0 and 0 <= results["shapes_relation"]["acc"] <= 1


def test_cli_errors_are_one_line(workflow, capsys):
    from mm.tasks.structure_cli import main

    sets = [a for o in workflow["overrides"] for a in ("--set", o)]
    for extra, message in ((["--set", "select.metric=cosine"], "select.metric must be one of"),
                           (["--set", "select.nn=5"], "unknown key 'select.nn'"),
                           (["--set", "model.vision.kind=tf"], "model.vision.kind must be one of")):
        with pytest.raises(SystemExit) as e:
            main(["select", "--config", str(ROOT / "configs/structure/tiny.yaml"), *sets, *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
