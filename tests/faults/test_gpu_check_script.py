"""What of bench/gpu_check.sh can be checked without a GPU: every trainer's realistic and smoke
configs resolve (strict keys, ranges, files), and without CUDA the script stops at once in one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_a_spent_budget_skips_stages_and_still_writes_the_json(tmp_path):
    """The time budget: a stage gets at most what is left of --budget; what no longer fits is skipped
    and named in the JSON, which is rewritten after every stage."""
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--budget", "1", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["budget_s"] == 1
    assert set(report["trainers"]) == {"filip_vit_b16", "filip_vit_b16_ckpt_accum2", "topolora_sam_vit_b_1024",
                                       "topolora_sam_vit_b_1024_ckpt", "structure_clip_vit_b32",
                                       "structure_heads_b4096"}
    assert all(e == {"skipped": "--budget 1 s spent"} for e in report["trainers"].values())
    assert report["seg_infer"] == report["filip_loss"] == {"skipped": "--budget 1 s spent"}
    assert "skipped: filip_vit_b16" in proc.stdout


def test_dry_run_resolves_every_config():
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("filip_vit_b16", "topolora_sam_vit_b_1024", "structure_clip_vit_b32", "structure_heads_b4096"):
        assert f"{name} (real): ok" in proc.stdout
    assert "filip_vit_b16 (real): ok, batch 128, bf16, zero2.json" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_it_fails_fast_in_one_line():
    proc = subprocess.run(["bash", "bench/gpu_check.sh", str(ROOT / "runs" / "never.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "error: bench/gpu_check.sh needs a CUDA device (torch.cuda.is_available() is False); try --dry-run"]
    assert not (ROOT / "runs" / "never.json").exists()
