"""Bad input to the command lines: a one-line `error:` and exit code 2, no traceback."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_train_with_misspelt_config_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: clip\ntrain:\n  stepz: 3\n")
    assert_one_line_error(run("train/clip.py", "--config", str(bad)), str(bad), "train.stepz", "train.steps")


def test_train_with_missing_config():
    assert_one_line_error(run("train/clip.py", "--config", "nope.yaml"), "nope.yaml")


def test_train_with_config_of_another_task(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("task: filip\n")
    assert_one_line_error(run("train/clip.py", "--config", str(other)), "filip")


def test_zeroshot_with_a_file_that_is_not_a_checkpoint(tmp_path):
    junk = tmp_path / "model.safetensors"
    junk.write_text("not weights")
    shard = tmp_path / "x.tar"  # the data are checked first, so they must exist for the checkpoint to be reached
    shard.write_bytes(b"")
    assert_one_line_error(run("eval/zeroshot.py", "--checkpoint", str(junk), "--data", str(shard)), str(junk))


def test_zeroshot_with_unknown_classnames(tmp_path):
    assert_one_line_error(run("eval/zeroshot.py", "--checkpoint", "x", "--data", "x.tar", "--classnames",
                              "nonexistent.txt"), "nonexistent.txt")


@pytest.mark.parametrize("flag", ["--help"])
def test_help_explains(flag):
    for script in ("train/clip.py", "eval/zeroshot.py", "-m mm.data.cli"):
        proc = run(*script.split(), flag)
        assert proc.returncode == 0 and "usage" in proc.stdout.lower()


def test_result_files_are_written_whole(tmp_path, monkeypatch):
    """Evaluators' --output goes through write_text_atomic: a temporary name, then a rename, so a run
    stopped while writing leaves the previous file (or none), never a truncated one."""
    import os

    from mm.errors import write_text_atomic

    target = tmp_path / "new" / "metrics.json"
    write_text_atomic(target, '{"acc1": 0.5}\n')
    assert target.read_text() == '{"acc1": 0.5}\n' and os.listdir(target.parent) == ["metrics.json"]

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with contextlib.suppress(KeyboardInterrupt):
        write_text_atomic(target, '{"acc1": 0.9}\n')
    assert target.read_text() == '{"acc1": 0.5}\n'
