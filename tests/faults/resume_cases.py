"""Run by tests/faults/test_resume_safety.py in ONE process (one process group for all the runs): a
tiny single-rank CLIP trained, damaged and rerun in the ways the tests check. Writes a JSON record of
every call ({name: {code, stderr}} plus file observations) to RESULTS.

    python tests/faults/resume_cases.py SHARDS WORK RESULTS.json
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.arch.embed_dim=32", "model.arch.vision_cfg.width=32", "model.arch.vision_cfg.head_width=16",
        "model.arch.vision_cfg.layers=1", "model.arch.text_cfg.width=32", "model.arch.text_cfg.layers=1",
        "model.arch.text_cfg.context_length=12", "data.batch_size=4", "data.num_workers=0", "eval.zeroshot_data=",
        "train.ckpt_every=1", "train.keep_checkpoints=3", "train.log_every=1", "optim.warmup_steps=4"]


class Boom:
    """What a planted checkpoint file could hold: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def main(shards: str, work: str, results_path: str) -> None:
    import torch

    from mm.cli import train_main
    from mm.engine.checkpoint import RUN_STATE, _sha256, checkpoint_root, complete_tags

    work = Path(work)
    run = work / "run"
    results: dict = {}

    def call(name: str, *sets: str, out: Path = run, ds: str = "configs/ds/zero2.json") -> dict:
        argv = ["--config", "configs/clip/tiny.yaml", "--deepspeed_config", ds]
        for s in [*TINY, f"data.train={shards}", f"train.out_dir={out}", *sets]:
            argv += ["--set", s]
        err = io.StringIO()
        code = 0
        with contextlib.redirect_stderr(err):
            try:
                train_main("clip", argv)
            except SystemExit as e:
                code = e.code
        record = {"code": code, "stderr": err.getvalue(), "tags": complete_tags(out) if out.exists() else None}
        if (out / "metrics.jsonl").is_file():
            record["steps"] = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
                               if "loss" in line]
        results[name] = record
        return record

    ckpt = checkpoint_root(run)
    call("first", "train.steps=3")

    # A truncated model file in the newest checkpoint: resumed from the one before, finished.
    model_file = ckpt / "step00000003" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    call("truncated_model", "train.steps=4")

    # A zero-filled run state in the newest checkpoint.
    state_file = ckpt / "step00000004" / RUN_STATE
    state_file.write_bytes(b"\0" * state_file.stat().st_size)
    # ... rerun with another learning rate: applied (re-derived at the restored step), listed, old config kept.
    call("zeroed_run_state", "train.steps=5", "optim.lr=0.125")
    results["zeroed_run_state"]["lr"] = {json.loads(line)["step"]: json.loads(line)["lr"]
                                         for line in (run / "metrics.jsonl").read_text().splitlines() if '"lr"' in line}
    results["zeroed_run_state"]["kept_configs"] = sorted(p.name for p in run.glob("config.*.yaml"))

    # A planted checkpoint, newest, with digests that match it: weights-only loading refuses it.
    marker = work / "code-ran"
    planted = ckpt / "step00000099"
    planted.mkdir()
    torch.save({"module": Boom(marker)}, planted / "mp_rank_00_model_states.pt")
    name = "mp_rank_00_model_states.pt"
    (planted / RUN_STATE).write_text(json.dumps({
        "step": 99, "task": "clip", "world_size": 1, "zero_stage": 2,
        "files": {name: {"bytes": (planted / name).stat().st_size, "sha256": _sha256(planted / name)}}}))
    call("planted", "train.steps=5")
    results["planted"]["code_ran"] = marker.exists()
    results["planted"]["export_after"] = (run / "export" / "model.safetensors").stat().st_mtime
    os.system(f"rm -rf {planted}")

    # A second run into the same out_dir while the first holds it: refused, nothing of it written.
    hold = ("import sys, time\nfrom mm.engine.run_dir import RunLock\n"
            "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "held"
    metrics_before = (run / "metrics.jsonl").read_text()
    call("locked", "train.steps=6")
    results["locked"]["metrics_unchanged"] = (run / "metrics.jsonl").read_text() == metrics_before
    results["locked"]["holder_pid"] = holder.pid
    holder.kill()
    holder.wait()

    # train.resume=false into the finished run: the old run is set aside, the new one is not pruned by it.
    export_before = (run / "export" / "model.safetensors").read_bytes()
    call("fresh", "train.steps=2", "train.resume=false")
    previous = sorted((run / "previous").iterdir())
    results["fresh"]["previous"] = [str(p) for p in previous]
    kept = (previous[0] / "export" / "model.safetensors").read_bytes()
    results["fresh"]["previous_export_kept"] = kept == export_before
    results["fresh"]["previous_tags"] = complete_tags(previous[0])
    # ... and a crash-free rerun of a plain command resumes the NEW run (finished at step 2: nothing to do).
    call("fresh_rerun", "train.steps=2")

    # Bad inputs (one line, exit 2, nothing left behind).
    ds = work / "ds"
    ds.mkdir()
    bad = {
        "ds_optimizer_section": ('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}', []),
        "ds_bf16_contradiction": ('{"zero_optimization": {"stage": 2}, "bf16": {"enabled": true}}', []),
        "ds_a_list": ("[1, 2]", []),
        "ds_stage_7": ('{"zero_optimization": {"stage": 7}}', []),
        "seed_negative": ('{"zero_optimization": {"stage": 2}}', ["train.seed=-1"]),
        "betas_above_one": ('{"zero_optimization": {"stage": 2}}', ["optim.betas=[0.9,1.5]"]),
        "betas_three": ('{"zero_optimization": {"stage": 2}}', ["optim.betas=[0.9,0.9,0.9]"]),
        "grace_negative": ('{"zero_optimization": {"stage": 2}}', ["train.stop_grace_s=-1"]),
    }
    for case, (text, sets) in bad.items():
        (ds / f"{case}.json").write_text(text)
        out = work / "bad" / case
        call(f"bad_{case}", *sets, out=out, ds=str(ds / f"{case}.json"))
        results[f"bad_{case}"]["left_behind"] = out.exists() or any((work / "bad").glob("**/*.tmp"))
    results["seconds"] = time.time()
    Path(results_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
