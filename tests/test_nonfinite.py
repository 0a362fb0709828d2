"""Numerical faults: a NaN/inf loss on any rank skips that step on every rank (agreed before backward,
so no rank waits in a gradient all-reduce the others never join), is counted and logged with the
names of the losses that went bad; train.max_nonfinite_steps in a row stop the run with a UserError
naming the step and the losses."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results(torchrun, shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("nonfinite")
    proc = torchrun(ROOT / "tests/dist/nonfinite_check.py", shapes["train"], str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = json.loads((out / "results.json").read_text())
    return {"ranks": ranks, "stderr": proc.stderr}


def test_a_nan_on_one_rank_skips_the_step_on_both(results):
    r0, r1 = (r["asymmetric"] for r in results["ranks"])
    for r in (r0, r1):
        assert "error" not in r, r
        assert r["step"] == 6 and r["global_steps"] == 6  # the run still makes its 6 optimizer steps
        assert r["skipped"] == 2
        assert r["calls"] == 8  # 6 good micro-batches + 2 skipped ones
        assert r["finite"]


def test_skipped_steps_are_logged_with_the_bad_loss_names(results):
    records = results["ranks"][0]["asymmetric"]["records"]
    skips = [r for r in records if "nonfinite_losses" in r]
    assert [(s["step"], s["nonfinite_losses"]) for s in skips] == [(3, ["loss"]), (5, ["aux"])]
    assert records[-1]["skipped_steps"] == 2
    logged = [r for r in records if "loss" in r]
    assert all(r["loss"] == r["loss"] for r in logged)  # no NaN in the averaged losses
    assert "warning: step 3: non-finite loss; step skipped" in results["stderr"]


def test_repeated_nonfinite_losses_stop_the_run_naming_step_and_losses(results):
    for r in (rank["diverged"] for rank in results["ranks"]):
        assert r["error"] == "UserError"
        assert r["message"].startswith("step 2: non-finite loss in 3 consecutive steps")
        assert "train.max_nonfinite_steps=3" in r["message"]
        assert r["calls"] == 4


def test_a_skipped_step_under_zero3(results):
    for r in (rank["zero3"] for rank in results["ranks"]):
        assert "error" not in r, r
        assert r["step"] == 3 and r["skipped"] == 1 and r["finite"]


def test_max_nonfinite_steps_must_be_positive(tmp_path):
    from mm.config import load_config
    from mm.errors import ConfigError

    with pytest.raises(ConfigError, match="train.max_nonfinite_steps"):
        load_config(None, ["train.max_nonfinite_steps=0"])
