"""ZeRO offload variants, bf16 on the CPU and pipe: shard URLs, in one single-rank process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def variants(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    proc = subprocess.run([sys.executable, str(ROOT / "tests/dist/variants_check.py"), shapes["train"], str(out)],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "variants.json").read_text())


@pytest.mark.parametrize("name", ["zero2_offload", "zero3_offload", "bf16_zero2", "pipe_urls", "grad_accum_2"])
def test_variant_trains_and_exports_fp32(variants, name):
    r = variants[name]
    assert r["step"] == 3
    assert r["finite"]
    assert r["dtype"] == "torch.float32"


def test_gradient_accumulation_counts_steps_and_epochs(variants):
    r = variants["grad_accum_2"]
    # 3 optimizer steps x 2 micro-batches of 8 samples, on one rank; the epoch is 64 samples.
    assert r["batches"] == 6
    assert r["epoch"] == pytest.approx(3 * 16 / 64)
