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
