"""One run per out_dir (the lock), train.resume=false setting an earlier run aside, and what a resume
may change (mm/engine/run_dir.py), without training."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mm.engine import run_dir
from mm.engine.run_dir import RunLock, config_changes, keep_previous_config, policy, set_aside
from mm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from mm.engine.run_dir import RunLock
lock = RunLock(sys.argv[1]); lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(out_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out_dir)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(UserError) as e:
            RunLock(tmp_path).acquire()
        message = str(e.value)
        assert "\n" not in message and "in use by another run" in message
        assert f"pid {holder.pid} on {socket.gethostname()}" in message
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_run_is_taken_over_with_a_message(tmp_path):
    holder = _holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)  # no clean-up: the lock file stays behind
    holder.wait()
    assert (tmp_path / "run.lock").is_file()
    lock = RunLock(tmp_path)
    message = lock.acquire()
    assert f"pid {holder.pid}" in message and "no longer running" in message
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "run.lock").exists()  # a finished run leaves no lock behind
    assert RunLock(tmp_path).acquire() == ""  # and the next one takes it silently


def test_a_released_lock_can_be_taken_by_another_process(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()
    holder = _holder(tmp_path)  # would block forever (and fail readline) if the lock were still held
    holder.kill()
    holder.wait()


def test_resume_false_sets_the_earlier_run_aside_and_overwrites_nothing(tmp_path):
    (tmp_path / "checkpoints" / "step00000010").mkdir(parents=True)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.safetensors").write_bytes(b"old weights")
    (tmp_path / "metrics.jsonl").write_text('{"step": 10}\n')
    (tmp_path / "config.yaml").write_text("old: 1\n")
    moved = set_aside(tmp_path)
    assert moved.parent == tmp_path / "previous"
    assert (moved / "export" / "model.safetensors").read_bytes() == b"old weights"
    assert (moved / "checkpoints" / "step00000010").is_dir()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert set_aside(tmp_path) is None  # nothing left to move


def test_the_previous_config_is_kept_when_it_changes(tmp_path):
    assert keep_previous_config(tmp_path, "a: 1\n") is None  # no config yet
    (tmp_path / "config.yaml").write_text("a: 1\n")
    assert keep_previous_config(tmp_path, "a: 1\n") is None  # same content: nothing to keep
    kept = keep_previous_config(tmp_path, "a: 2\n")
    assert kept.name.startswith("config.") and kept.read_text() == "a: 1\n"
    (tmp_path / "config.yaml").write_text("a: 2\n")
    again = keep_previous_config(tmp_path, "a: 3\n")  # within the same second: a name of its own
    assert again != kept and again.read_text() == "a: 2\n" and kept.read_text() == "a: 1\n"


@pytest.mark.parametrize("key,expected", [
    ("model.arch.vision_cfg.width", "refuse"), ("model.embed_dim", "refuse"), ("task", "refuse"),
    ("train.precision", "refuse"),
    # FILIP's memory knobs, in either layout, and other speed/bookkeeping settings
    ("model.chunk_size", "free"), ("model.gather_dtype", "free"), ("model.keep_image_tokens", "free"),
    ("loss.chunk_size", "free"), ("loss.gather_dtype", "free"), ("loss.keep_image_tokens", "free"),
    ("data.num_workers", "free"), ("train.ckpt_every", "free"), ("eval.batch_size", "free"),
    ("model.pretrained", "free"),
    # settings that change the results: applied, and named
    ("optim.lr", "apply"), ("optim.warmup_steps", "apply"), ("train.steps", "apply"), ("data.batch_size", "apply"),
    ("loss.neg_weight", "apply"),
])
def test_resume_policy_per_key(key, expected):
    assert policy(key) == expected


def test_config_changes_sorts_every_changed_key_by_policy():
    old = {"model": {"arch": {"width": 64}, "chunk_size": 1024}, "optim": {"lr": 5e-4}, "data": {"num_workers": 2}}
    new = {"model": {"arch": {"width": 64}, "chunk_size": 256}, "optim": {"lr": 3e-4}, "data": {"num_workers": 2}}
    assert config_changes(old, new) == {"refuse": [], "apply": ["optim.lr was 0.0005, now 0.0003"],
                                        "free": ["model.chunk_size was 1024, now 256"]}
    new["model"]["arch"]["width"] = 32
    assert config_changes(old, new)["refuse"] == ["model.arch.width was 64, now 32"]


def _fake_checkpoint(out_dir: Path, step: int, config: dict) -> None:
    from mm.engine.checkpoint import RUN_STATE, checkpoint_root

    folder = checkpoint_root(out_dir) / f"step{step:08d}"
    folder.mkdir(parents=True)
    (folder / RUN_STATE).write_text(json.dumps({"step": step, "task": "clip", "world_size": 1,
                                                "config": json.dumps(config, sort_keys=True)}))


def test_prepare_refuses_an_architecture_change_before_writing_anything(tmp_path):
    from mm.config import load_config, to_dict
    from mm.tasks import get_task

    task = get_task("clip")
    cfg = load_config(ROOT / "configs/clip/tiny.yaml", [f"train.out_dir={tmp_path}"], task.config_class)
    old = to_dict(cfg)
    old["model"]["arch"]["embed_dim"] = 7
    _fake_checkpoint(tmp_path, 4, old)
    (tmp_path / "config.yaml").write_text("the old one\n")
    lock = RunLock(tmp_path)
    with pytest.raises(UserError, match=r"model\.arch\.embed_dim was 7, now \d+.*train\.resume=false"):
        run_dir.prepare(tmp_path, cfg, "clip", 1, "", 2, lock)
    lock.release()
    assert (tmp_path / "config.yaml").read_text() == "the old one\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "config.yaml"]


def test_prepare_lists_changes_in_one_line_and_keeps_the_old_config(tmp_path):
    from mm.config import load_config, save_config, to_dict
    from mm.tasks import get_task

    task = get_task("clip")
    old_cfg = load_config(ROOT / "configs/clip/tiny.yaml", [f"train.out_dir={tmp_path}"], task.config_class)
    save_config(old_cfg, tmp_path / "config.yaml")
    _fake_checkpoint(tmp_path, 4, to_dict(old_cfg))
    cfg = load_config(ROOT / "configs/clip/tiny.yaml", [f"train.out_dir={tmp_path}", "optim.lr=0.125",
                                                        "data.num_workers=0"], task.config_class)
    lock = RunLock(tmp_path)
    tag, lines, applied = run_dir.prepare(tmp_path, cfg, "clip", 1, "", 2, lock)
    lock.release()
    assert tag == "step00000004" and applied == ["optim.lr"]
    (line,) = [x for x in lines if x.startswith("resuming")]
    assert "optim.lr was" in line and "now 0.125" in line and "data.num_workers" in line
    (kept,) = tmp_path.glob("config.*.yaml")
    assert yaml.safe_load(kept.read_text())["optim"]["lr"] == old_cfg.optim.lr
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 0.125

