"""Preemption: SIGTERM to the `deepspeed` runner (what a scheduler sends) must stop the whole run, ranks
included, leave a checkpoint of the step it stopped at, and the same command must then resume it.

Before, the runner died alone: DeepSpeed's launch.py and both ranks went on as orphans, finished and
wrote the export a minute later, and a rerun collided with them in the same out_dir."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mm.engine.checkpoint import complete_tags

ROOT = Path(__file__).resolve().parents[2]
STEPS = 60  # enough that a fast machine is still mid-run when the signal lands (CI once finished 10)
TINY = ["model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
        "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1",
        "model.arch.text_cfg.context_length=12", "data.batch_size=4", "data.num_workers=1", "eval.zeroshot_data=",
        "train.log_every=1", f"train.steps={STEPS}", "train.ckpt_every=0", "optim.warmup_steps=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(shards: str, out: Path, log) -> subprocess.Popen:
    cmd = [sys.executable, shutil.which("deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           "train/clip.py", "--config", "configs/clip/tiny.yaml", "--deepspeed_config", "configs/ds/zero2.json"]
    for s in [*TINY, f"data.train={shards}", f"train.out_dir={out}"]:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def _alive(procs: list) -> list:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not installed")
def test_sigterm_to_the_launcher_stops_every_rank_with_a_checkpoint_and_the_rerun_resumes(shapes, tmp_path):
    out = tmp_path / "run"
    log_path = tmp_path / "launch.log"
    with open(log_path, "w") as log:
        runner = _launch(shapes["train"], out, log)
        try:
            deadline = time.time() + 400
            while max(_logged_steps(out), default=0) < 2:
                assert runner.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, "no step logged in time"
                time.sleep(0.2)
            tree = psutil.Process(runner.pid).children(recursive=True)
            assert len(tree) >= 3  # launch.py and two ranks (and their loader workers)
            runner.send_signal(signal.SIGTERM)
            runner.wait(timeout=60)
            deadline = time.time() + 120
            while _alive(tree) and time.time() < deadline:
                time.sleep(0.5)
            survivors = [(p.pid, " ".join(p.cmdline())[:120]) for p in _alive(tree)]
        finally:
            # Whatever is left of the launch (its own process group), so a failure leaves no orphans.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(runner.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert not survivors, f"processes of the run outlived the launcher: {survivors}\n{text[-3000:]}"
    stopped_at = max(_logged_steps(out))
    assert stopped_at < STEPS, "the run finished before the signal; nothing was tested"
    # the checkpoint was written by the stop itself (train.ckpt_every=0: none otherwise before the end)
    assert complete_tags(out) == [f"step{stopped_at:08d}"], text[-3000:]
    assert "the launcher that started this rank" in text and "stopped at step" in text
    assert not (out / "export").exists()  # no orphan went on to finish and export
    assert not (out / "run.lock").exists()

    with open(log_path, "a") as log:
        rerun = _launch(shapes["train"], out, log)
        assert rerun.wait(timeout=600) == 0, log_path.read_text()[-3000:]
    steps = _logged_steps(out)
    # the rerun picked up after the saved step instead of starting over
    assert steps == list(range(1, STEPS + 1)), steps
    assert (out / "export" / "model.safetensors").is_file()
