"""Kill-and-resume fault suite: real 2-rank training runs of every landed trainer, SIGKILLed inside a
checkpoint save (deterministic test hook) and at a random step from outside, then restarted with the
same command; the final weights must equal an uninterrupted run's.

One module fixture drives all launches (each costs tens of seconds): the first launch trains the
uninterrupted references, then every launch resumes whatever the previous one left. The random kill
points come from MM_FAULT_SEED (random when unset; the seed is in the failure message).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mm.engine.checkpoint import RUN_STATE, checkpoint_root, latest_tag

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests/faults/fault_run.py"
# MM_FAULT_TASKS=clip,filip narrows the suite (e.g. while working on one trainer).
TASKS = [t for t in os.environ.get("MM_FAULT_TASKS", "clip,filip,structure_clip,structure,topolora_sam").split(",")
         if t]
STEPS = 6  # as in fault_run.py; checkpoints every 2 steps, the newest 2 kept
# (task, kill inside this checkpoint save: point:step:rank, the newest complete checkpoint it must leave)
SAVE_KILLS = [
    ("clip", "after_rank_files:4:1", "step00000002"),      # rank 1 wrote its shard, rank 0 not marked
    ("filip", "after_run_state:4:0", "step00000004"),      # marked complete, `latest` not yet updated
    ("structure_clip", "after_rank_files:2:0", None),      # the first save: nothing complete, start afresh
    ("structure", "after_rank_files:4:1", "step00000002"),
    ("topolora_sam", "after_rank_files:4:0", "step00000002"),
]
SAVE_KILLS = [k for k in SAVE_KILLS if k[0] in TASKS]


def _launch(shards: str, out: Path, run: str, tasks: list[str], kill: str = "") -> subprocess.Popen:
    for pid_file in (out / "pids").glob("rank*"):
        pid_file.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(SCRIPT),
           shards, str(out), run, ",".join(tasks)] + ([kill] if kill else [])
    log = open(out / "launches.log", "a")  # noqa: SIM115 - the launch's stdout, closed after it ends
    log.write(f"\n=== {' '.join(cmd)}\n")
    log.flush()
    launched_at = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    proc.launched_at = launched_at  # metrics lines older than this belong to an earlier launch
    return proc


def _wait(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def _steps_logged_since(run_dir: Path, since: float) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if record["time"] >= since and "loss" in record:
            steps.append(record["step"])
    return max(steps)


def _kill_at_random_step(proc: subprocess.Popen, out: Path, run_dir: Path, rng: random.Random) -> dict:
    """SIGKILL rank 0, rank 1 or both once the run logged step >= k, after a random delay."""
    k, delay, victims = rng.randint(1, STEPS - 1), rng.uniform(0.0, 0.3), rng.choice([[0], [1], [0, 1]])
    pid_files = [out / "pids" / f"rank{r}" for r in victims]
    while _steps_logged_since(run_dir, proc.launched_at) < k or not all(p.is_file() for p in pid_files):
        if proc.poll() is not None:
            return {"k": k, "killed": False}
        time.sleep(0.02)
    time.sleep(delay)
    for pid_file in pid_files:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
    return {"k": k, "delay": round(delay, 3), "ranks": victims, "killed": True,
            "logged_step": _steps_logged_since(run_dir, proc.launched_at)}


@pytest.fixture(scope="module")
def faults(shapes, tmp_path_factory):
    seed = int(os.environ.get("MM_FAULT_SEED", random.SystemRandom().randrange(10**6)))
    rng = random.Random(seed)
    out = tmp_path_factory.mktemp("faults")
    (out / "pids").mkdir()
    shards = shapes["train"]
    log: list[dict] = []
    t0 = time.time()
    # Launch 1: the uninterrupted references, then the first faulted task dies inside a save.
    proc = _launch(shards, out, "ref", TASKS)
    assert _wait(proc) == 0, f"reference runs failed, see {out / 'launches.log'}"
    for task, kill, expect_tag in SAVE_KILLS:
        run_dir = out / "fault" / task
        rc = _wait(_launch(shards, out, "fault", TASKS, f"{task}/{kill}"))
        left = latest_tag(run_dir)
        partial = [p.name for p in checkpoint_root(run_dir).glob("step*") if not (p / RUN_STATE).exists()]
        log.append({"task": task, "kind": "in_save", "spec": kill, "rc": rc, "latest_after_kill": left,
                    "incomplete_dirs": partial, "expected": expect_tag})
        # The next launch resumes this task and is killed from outside at a random step.
        proc = _launch(shards, out, "fault", TASKS)
        record = _kill_at_random_step(proc, out, run_dir, rng)
        record.update(task=task, kind="random", rc=_wait(proc), latest_after_kill=latest_tag(run_dir))
        log.append(record)
    assert _wait(_launch(shards, out, "fault", TASKS)) == 0, f"final resume failed, see {out / 'launches.log'}"
    summary = {"seed": seed, "kills": log, "seconds": round(time.time() - t0, 1), "dir": str(out)}
    print(json.dumps(summary))
    return summary


def _context(faults) -> str:
    return f"(MM_FAULT_SEED={faults['seed']}, logs in {faults['dir']}/launches.log)"


@pytest.mark.parametrize("task,kill,expect_tag", SAVE_KILLS)
def test_a_kill_inside_a_save_leaves_only_complete_checkpoints_to_resume(faults, task, kill, expect_tag):
    (record,) = [r for r in faults["kills"] if r["task"] == task and r["kind"] == "in_save"]
    assert record["rc"] != 0, f"the launch was not killed {_context(faults)}"
    assert record["latest_after_kill"] == expect_tag, _context(faults)
    if kill.startswith("after_rank_files"):
        # The half-written step is on disk but not marked complete, so it is never picked.
        assert f"step{int(kill.split(':')[1]):08d}" in record["incomplete_dirs"], _context(faults)


@pytest.mark.parametrize("task", TASKS)
def test_a_kill_at_a_random_step_is_survived(faults, task):
    (record,) = [r for r in faults["kills"] if r["task"] == task and r["kind"] == "random"]
    assert record["killed"] and record["rc"] != 0, f"{record} {_context(faults)}"


@pytest.mark.parametrize("task", TASKS)
def test_the_resumed_run_ends_with_the_uninterrupted_weights(faults, task):
    ref = load_file(Path(faults["dir"]) / "ref" / task / "export" / "model.safetensors")
    got = load_file(Path(faults["dir"]) / "fault" / task / "export" / "model.safetensors")
    assert sorted(ref) == sorted(got)
    worst = max((ref[k].float() - got[k].float()).abs().max().item() for k in ref)
    assert worst < 1e-5, f"max |difference| {worst} {_context(faults)}"
    run_dir = Path(faults["dir"]) / "fault" / task
    assert latest_tag(run_dir) == f"step{STEPS:08d}"
    assert not list(run_dir.rglob("*.tmp")), "a temporary file was left behind"
    # Training is deterministic, so equal weights alone would not show a resume: every launch appends
    # to metrics.jsonl, and only the first launch and those after a kill that left no complete
    # checkpoint may start from scratch (log step 1).
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    fresh_starts = 1 + sum(r["latest_after_kill"] is None for r in faults["kills"] if r["task"] == task)
    assert steps.count(1) == fresh_starts and set(steps) == set(range(1, STEPS + 1)), f"{steps} {_context(faults)}"
