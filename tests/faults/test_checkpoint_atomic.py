"""Unit checks of what makes a checkpoint 'complete' and of atomic writes, without training."""

import json
import os

import pytest
import torch

from mm.engine import checkpoint
from mm.engine.checkpoint import RUN_STATE, checkpoint_root, latest_tag
from mm.errors import write_text_atomic


def make_tag(out_dir, step: int, complete: bool, files: bool = True) -> str:
    tag = f"step{step:08d}"
    d = checkpoint_root(out_dir) / tag
    d.mkdir(parents=True)
    if files:
        (d / "mp_rank_00_model_states.pt").write_bytes(b"\x80half a pickle")
    if complete:
        (d / RUN_STATE).write_text(json.dumps({"step": step, "task": "clip", "world_size": 2}))
    return tag


def test_no_checkpoints(tmp_path):
    assert latest_tag(tmp_path) is None
    checkpoint_root(tmp_path).mkdir()
    assert latest_tag(tmp_path) is None


def test_a_newer_half_written_checkpoint_is_never_picked(tmp_path):
    make_tag(tmp_path, 2, complete=True)
    make_tag(tmp_path, 4, complete=True)
    make_tag(tmp_path, 6, complete=False)  # killed before its run state was written
    make_tag(tmp_path, 8, complete=False, files=False)  # killed before any file
    (checkpoint_root(tmp_path) / "latest").write_text("step00000006")  # even if `latest` says so
    assert latest_tag(tmp_path) == "step00000004"


def test_a_complete_checkpoint_is_picked_when_latest_was_not_updated(tmp_path):
    make_tag(tmp_path, 2, complete=True)
    make_tag(tmp_path, 10, complete=True)  # killed between the run state and `latest`
    (checkpoint_root(tmp_path) / "latest").write_text("step00000002")
    assert latest_tag(tmp_path) == "step00000010"


def test_a_leftover_temporary_run_state_does_not_count(tmp_path):
    make_tag(tmp_path, 2, complete=True)
    tag = make_tag(tmp_path, 4, complete=False)
    (checkpoint_root(tmp_path) / tag / (RUN_STATE + ".tmp")).write_text('{"step": 4')  # cut mid-write
    assert latest_tag(tmp_path) == "step00000002"


def test_run_state_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / RUN_STATE
    target.write_text("old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_text_atomic(target, "new")
    assert target.read_text() == "old"


def test_fault_hook_is_inert_without_the_variable(monkeypatch):
    monkeypatch.delenv("MM_FAULT_KILL", raising=False)
    checkpoint._fault_point("after_rank_files", 4)  # returns; the kill paths run in test_kill_resume.py


def test_export_is_replaced_atomically(tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous export intact and nothing at the final name."""
    import safetensors.torch
    from safetensors.torch import load_file

    from mm.exports import save_export

    path = tmp_path / "export" / "model.safetensors"
    save_export({"w": torch.ones(3)}, path, {"mm_task": "clip"})

    def die_half_way(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt  # as a kill would stop it

    monkeypatch.setattr(safetensors.torch, "save_file", die_half_way)  # save_export imports it when called
    with pytest.raises(KeyboardInterrupt):
        save_export({"w": torch.zeros(3)}, path, {"mm_task": "clip"})
    assert torch.equal(load_file(str(path))["w"], torch.ones(3))
