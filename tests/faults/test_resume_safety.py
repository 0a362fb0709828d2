"""Damaged, planted and foreign state in an out_dir, and bad engine inputs: one tiny single-rank CLIP
run, damaged and rerun in one subprocess (tests/faults/resume_cases.py), then checked here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mm.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cases(shapes, tmp_path_factory):
    work = tmp_path_factory.mktemp("resume")
    out = work / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests/faults/resume_cases.py"), shapes["train"], str(work),
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def _errors(record: dict) -> list[str]:
    return [line for line in record["stderr"].splitlines() if line.startswith("error:")]


def test_a_truncated_newest_checkpoint_falls_back_and_says_so(cases):
    r = cases["truncated_model"]
    assert r["code"] == 0, r["stderr"][-2000:]
    assert "step00000003: damaged (mp_rank_00_model_states.pt has" in r["stderr"]
    assert "resuming from step00000002" in r["stderr"]
    # steps 3 and 4 trained again after the fallback, then the run finished
    assert r["steps"] == [1, 2, 3, 3, 4] and r["tags"][0] == "step00000004"


def test_a_zero_filled_run_state_falls_back_and_says_so(cases):
    r = cases["zeroed_run_state"]
    assert r["code"] == 0, r["stderr"][-2000:]
    assert "step00000004: damaged (mm_run_state.json is unreadable" in r["stderr"]
    assert "resuming from step00000003" in r["stderr"] and "Traceback" not in r["stderr"]
    assert r["steps"][-2:] == [4, 5] and r["tags"][0] == "step00000005"


def test_a_changed_learning_rate_is_applied_on_resume_and_listed(cases):
    """optim.lr changed on the rerun: the restored optimizer takes the new value at the restored step of
    the schedule (before, the checkpoint's lr silently won while config.yaml claimed the new one)."""
    from mm.config import load_config
    from mm.engine.trainer import warmup_cosine
    from mm.tasks import get_task

    r = cases["zeroed_run_state"]
    assert "optim.lr was 0.002, now 0.125" in r["stderr"] and "train.steps was 4, now 5" in r["stderr"]
    cfg = load_config(ROOT / "configs/clip/tiny.yaml", ["optim.warmup_steps=4"], get_task("clip").config_class)
    schedule = warmup_cosine(4, 5, cfg.optim.min_lr_ratio)
    for step in (4, 5):
        assert abs(r["lr"][str(step)] - 0.125 * schedule(step)) < 1e-12, (step, r["lr"])
    assert len(r["kept_configs"]) == 2  # one per rerun that changed the config (train.steps, then optim.lr)


def test_a_planted_checkpoint_runs_no_code(cases):
    r = cases["planted"]
    assert not r["code_ran"]
    assert r["code"] == 2
    (line,) = _errors(r)
    assert "step00000099" in line and "system" in line and "not loaded" in line


def test_a_second_run_into_a_locked_out_dir_is_refused(cases):
    r = cases["locked"]
    assert r["code"] == 2
    (line,) = _errors(r)
    assert "in use by another run" in line and f"pid {r['holder_pid']}" in line
    assert r["metrics_unchanged"]


def test_resume_false_sets_the_finished_run_aside(cases):
    r = cases["fresh"]
    assert r["code"] == 0, r["stderr"][-2000:]
    assert "train.resume=false: the earlier run" in r["stderr"]
    # the new run's checkpoints are its own and were not pruned in favour of the old run's higher steps
    assert r["tags"] == ["step00000002", "step00000001"] and r["steps"] == [1, 2]
    assert r["previous_export_kept"] and r["previous_tags"][0] == "step00000005"
    rerun = cases["fresh_rerun"]
    assert rerun["code"] == 0 and rerun["tags"][0] == "step00000002" and rerun["steps"] == [1, 2]


@pytest.mark.parametrize("case,fragment", [
    ("ds_optimizer_section", "'optimizer' section"), ("ds_bf16_contradiction", "'bf16.enabled' is True"),
    ("ds_a_list", "must be a JSON object"), ("ds_stage_7", "zero_optimization.stage"),
    ("seed_negative", "train.seed"), ("betas_above_one", "optim.betas"), ("betas_three", "two numbers"),
    ("grace_negative", "train.stop_grace_s"),
])
def test_bad_engine_inputs_are_one_line_and_leave_nothing(cases, case, fragment):
    r = cases[f"bad_{case}"]
    assert r["code"] == 2, r["stderr"][-2000:]
    (line,) = _errors(r)
    assert fragment in line and "Traceback" not in r["stderr"]
    assert not r["left_behind"]


def test_malformed_export_metadata_is_one_line(tmp_path):
    from mm.tasks import load_exported

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"mm_task": "clip", "mm_config": "{not json"})
    with pytest.raises(UserError, match="mm_config metadata is not a JSON object"):
        load_exported(path)
