"""One run per out_dir: the lock, setting an earlier run aside, and what a resume may change.

The lock is a file `run.lock` in out_dir holding who has it (pid, host, start time, command); rank 0
holds a POSIX record lock on it for the whole run. The kernel drops that lock when the process dies
(also on SIGKILL), so a lock file left by a dead run is taken over, with a message; a live holder is
refused in one line. POSIX locks are per process (a forked DataLoader worker does not inherit one) and
work over NFS.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from mm.errors import UserError

LOCK_NAME = "run.lock"
# What a run writes into its out_dir (besides the lock): set aside together by train.resume=false.
RUN_FILES = ("checkpoints", "export", "metrics.jsonl", "tensorboard", "config.yaml", "launches.jsonl")


class RunLock:
    """Exclusive use of an out_dir by one run (rank 0 only)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> str:
        """Take the lock; returns a message when a stale lock was taken over ("" otherwise).
        Raises UserError naming the holder when another live run has it."""
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _describe(_read(self.path))
                os.close(fd)
                raise UserError(f"train.out_dir {self.path.parent} is in use by another run ({holder}); wait "
                                f"for it, or use another train.out_dir") from None
            # The previous holder may have removed the file between our open and lock: lock the file
            # that is at the path now, or two runs could each hold a lock on a different inode.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            # Read through our own descriptor: closing any other descriptor of this file would drop
            # the POSIX lock (they are per process and file, not per descriptor).
            stale = _parse(os.pread(fd, 1 << 16, 0))
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                      "argv": sys.argv}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
            self.fd = fd
            if stale:
                return (f"took over the lock of a run that is no longer running ({_describe(stale)}); "
                        f"its checkpoints are resumed as usual")
            return ""
        raise UserError(f"{self.path}: the lock file keeps changing; is another run starting in the same out_dir?")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still locked, so no one locks the old file afterwards
        os.close(self.fd)
        self.fd = None


def _read(path: Path) -> dict:
    try:
        return _parse(path.read_bytes())
    except OSError:
        return {"unreadable": True}


def _parse(data: bytes) -> dict:
    try:
        return json.loads(data or b"{}")
    except ValueError:
        return {"unreadable": True}


def _describe(record: dict) -> str:
    if not record or record.get("unreadable"):
        return "holder unknown"
    started = _dt.datetime.fromtimestamp(record.get("started", 0), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"pid {record.get('pid')} on {record.get('host')}, started {started}"


def _stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def set_aside(out_dir: str | os.PathLike) -> Path | None:
    """Move an earlier run's files (checkpoints, export, metrics, config) into out_dir/previous/<time>/,
    so a fresh run (train.resume=false) neither mixes with nor overwrites them. None if there were none."""
    out_dir = Path(out_dir)
    present = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not present:
        return None
    target = out_dir / "previous" / _stamp()
    n = 1
    while target.exists():
        target = out_dir / "previous" / f"{_stamp()}-{n}"
        n += 1
    target.mkdir(parents=True)
    for name in present:
        os.replace(out_dir / name, target / name)
    return target


def keep_previous_config(out_dir: str | os.PathLike, new_text: str) -> Path | None:
    """Before config.yaml is rewritten with other content, keep the old one as config.<time>.yaml."""
    path = Path(out_dir) / "config.yaml"
    if not path.is_file() or path.read_text() == new_text:
        return None
    stamp = _stamp()
    kept, n = path.with_name(f"config.{stamp}.yaml"), 1
    while kept.exists():  # two changes within one second: never write over a kept config
        kept, n = path.with_name(f"config.{stamp}-{n}.yaml"), n + 1
    shutil.copy2(path, kept)
    return kept


# --- what a resume may change -------------------------------------------------------------------------
# Settings that change only memory use, speed, logging or bookkeeping: they change freely on resume.
FREE = {
    # FILIP's memory knobs, under model: (older configs) or loss: (newer layout)
    "model.chunk_size", "model.gather_dtype", "model.keep_image_tokens",
    "loss.chunk_size", "loss.gather_dtype", "loss.keep_image_tokens",
    # where starting weights come from, not what the model is (a resume loads its own weights)
    "model.pretrained", "model.checkpoint", "model.base_checkpoint",
    "data.num_workers", "data.val", "train.log_every", "train.ckpt_every", "train.keep_checkpoints",
    "train.eval_every", "train.resume", "train.out_dir", "train.stop_grace_s", "train.max_nonfinite_steps",
    "cache.num_workers", "cache.batch_size",
}
FREE_PREFIXES = ("eval.",)
# Settings that make the checkpoint another model or another optimizer layout: a resume is refused.
REFUSE_PREFIXES = ("task", "model.")
REFUSE = {"train.precision"}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def policy(key: str) -> str:
    """'free', 'refuse' or 'apply' (changes the results; applied, and named in the resume line)."""
    if key in FREE or key.startswith(FREE_PREFIXES):
        return "free"
    if key in REFUSE or key == "task" or key.startswith(REFUSE_PREFIXES):
        return "refuse"
    return "apply"


def config_changes(old: dict, new: dict) -> dict[str, list[str]]:
    """The keys that differ between the checkpoint's config and this run's, by policy:
    {'refuse': [...], 'apply': [...], 'free': [...]}, each item 'key was old, now new'."""
    a, b = flatten(old), flatten(new)
    out: dict[str, list[str]] = {"refuse": [], "apply": [], "free": []}
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out[policy(key)].append(f"{key} was {a.get(key)!r}, now {b.get(key)!r}")
    return out


def prepare(out_dir: Path, cfg: Any, task_name: str, world_size: int, model_config: str, zero_stage: int,
            lock: RunLock, launch: dict[str, Any] | None = None) -> tuple[str | None, list[str], list[str]]:
    """Rank 0, before any training: lock out_dir, set an earlier run aside (train.resume=false) or pick
    the checkpoint to resume (the newest intact one, checked against this run's config), keep the
    previous config.yaml if this one differs, write config.yaml, append `launch` (how this launch was
    started, mm.engine.launch.launch_command) with the step it starts from to launches.jsonl.

    Returns (tag to resume or None, message lines, the applied keys that change results). Raises
    UserError for a refusal, having written nothing."""
    import yaml

    from mm.config import config_json, to_dict
    from mm.engine import checkpoint

    lines = []
    out_dir.mkdir(parents=True, exist_ok=True)
    taken = lock.acquire()
    if taken:
        lines.append(f"warning: {out_dir}: {taken}")
    tag, applied = None, []
    if not cfg.train.resume:
        moved = set_aside(out_dir)
        if moved:
            lines.append(f"train.resume=false: the earlier run in {out_dir} was moved to {moved}")
    else:
        tag, state, notes = checkpoint.newest_intact(out_dir)
        lines += [f"warning: {note}" for note in notes]
        if notes and tag:
            lines.append(f"warning: resuming from {tag}, the newest intact checkpoint")
        elif notes:
            lines.append("warning: no intact checkpoint is left; training starts from step 0")
        if tag:
            checkpoint.check_compatible(out_dir, tag, state, task_name, world_size, model_config, zero_stage,
                                        type(cfg))
            if state.get("config"):
                changes = config_changes(json.loads(state["config"]), json.loads(config_json(cfg)))
                if changes["refuse"]:
                    raise UserError(f"{checkpoint.checkpoint_root(out_dir) / tag}: cannot resume with "
                                    f"{'; '.join(changes['refuse'])} (these change what the checkpoint "
                                    f"holds); use another train.out_dir, or --set train.resume=false to set "
                                    f"that run aside")
                applied = changes["apply"]
                if applied or changes["free"]:
                    lines.append(f"resuming {tag} with changed settings: {'; '.join(applied + changes['free'])}")
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    kept = keep_previous_config(out_dir, text)
    if kept:
        lines.append(f"{out_dir / 'config.yaml'} rewritten; the previous one is kept as {kept.name}")
    from mm.errors import write_text_atomic

    write_text_atomic(out_dir / "config.yaml", text)
    if launch is not None:
        record = {"started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                  "resumed_from": tag, **launch}
        with open(out_dir / "launches.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    return tag, lines, [item.split(" ", 1)[0] for item in applied]
