"""The engine with 2 real ranks (gloo on the CPU) under ZeRO 1, 2 and 3, in one launch."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results(torchrun, shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine")
    proc = torchrun(ROOT / "tests/dist/engine_check.py", shapes["train"], str(out), "1,2,3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_training_lowers_the_loss(results, stage):
    losses = results[stage]["losses"]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_resume_after_a_stop_equals_the_uninterrupted_run(results, stage):
    r = results[stage]
    assert r["steps"] == [10, 10]
    assert r["same_keys"]
    assert r["resume_max_diff"] < 1e-5


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_export_loads_into_a_plain_model_with_the_same_outputs(results, stage):
    assert results[stage]["export_output_diff"] < 1e-5


# --- training-time evaluation sharded over the ranks ----------------------------------------------


@pytest.fixture(scope="module")
def sharded_eval(torchrun, shapes, tmp_path_factory):
    """One launch: CLIP and FILIP (ZeRO-3) and the U-Net each evaluate a 3-shard val set (14, 14 and 8
    images: the ranks hold different numbers of batches) and a 1-shard one (rank 1 has none)."""
    from mm.data.synthetic import CLASSNAMES, write_shapes_world

    root = tmp_path_factory.mktemp("sharded_eval")
    val = write_shapes_world(root / "val", 3 * len(CLASSNAMES), image_size=32, seed=2, balanced=True, shard_size=14)
    assert len(val) == 3
    pattern = f"{root}/val/shapes-{{000000..000002}}.tar"
    # Three trainings and a dozen evaluations under gloo: 3.5 minutes on 2 shared cores, over 10 when busy.
    proc = torchrun(ROOT / "tests/dist/eval_shard_check.py", shapes["train"], pattern, shapes["val"], str(root),
                    timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((root / "results.json").read_text())


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-9, nan_ok=True), k


@pytest.mark.parametrize("name", ["clip", "filip"])
def test_zeroshot_evaluation_on_two_ranks_equals_the_whole_set_on_one(sharded_eval, name):
    r = sharded_eval[name]
    assert sharded_eval["world"] == 2 and r["zero_stage"] == 3
    assert r["whole"]["zeroshot/n_images"] == 36
    _same(r["sharded"], r["whole"])
    _same(r["trainer_eval"], r["whole"])  # what `mm train` logs and prints
    _same(r["one_shard_sharded"], r["one_shard_whole"])
    assert r["one_shard_whole"]["zeroshot/n_images"] == 24
    if name == "filip":
        assert "zeroshot_tokenwise/acc1" in r["sharded"]
    # Every rank ends with the whole set's figures, after the same number of image forwards: the longest
    # rank's batches (rank 0 reads two of the three shards, in batches of 5).
    assert r["sharded_per_rank"][0] == r["sharded_per_rank"][1]
    assert r["forwards_per_rank"][0] == r["forwards_per_rank"][1] >= 5


def test_segmentation_validation_on_two_ranks_equals_the_whole_set_on_one(sharded_eval):
    r = sharded_eval["unet"]
    assert r["zero_stage"] == 3
    assert r["whole"]["val/n_images"] == 36
    _same(r["sharded"], r["whole"])
    _same(r["trainer_eval"], r["whole"])
    assert r["sharded_per_rank"][0] == r["sharded_per_rank"][1]
    assert r["forwards_per_rank"][0] == r["forwards_per_rank"][1] >= 5
    # At native resolution (data.crop_mode patch, tiled as mm segment tiles): rank 0's 22 images need
    # more forwards (2 each) than rank 1's 14, and rank 1 pads up to them.
    r = sharded_eval["unet_native"]
    assert r["whole"]["val/n_images"] == 36
    _same(r["sharded"], r["whole"])
    assert r["sharded_per_rank"][0] == r["sharded_per_rank"][1]
    assert r["forwards_per_rank"][0] == r["forwards_per_rank"][1] >= 44
