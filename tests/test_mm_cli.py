"""The one command surface: `mm <command>` built from mm.cli.COMMANDS, `mm train <task>` for every
entry of TASKS (also under the deepspeed launcher), --print-config, and the old names as aliases."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from mm.cli import COMMANDS, _strip_leading_local_rank, describe_config, mm_main
from mm.config import load_config
from mm.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]


def run_mm(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mm", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_every_command_of_the_table():
    proc = run_mm("--help")
    assert proc.returncode == 0
    for name in COMMANDS:
        assert f"  {name} " in proc.stdout, name


def test_every_sub_command_answers_help_with_its_own_usage(capsys):
    for name in COMMANDS:
        if name == "scenegraph" and not (ROOT / "mm/scenegraph/cli.py").exists():
            continue
        with pytest.raises(SystemExit) as exit_:
            mm_main([name, "--help"])
        assert exit_.value.code == 0, name
        assert capsys.readouterr().out.startswith("usage: "), name


def test_unknown_command_fails_with_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        mm_main(["trian"])
    assert exit_.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err


def test_a_command_whose_module_is_missing_says_so(monkeypatch, capsys):
    from mm.cli import Command

    monkeypatch.setitem(COMMANDS, "later", Command("mm.not_written_yet", "a command still to come"))
    assert mm_main(["later"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: mm later: not available in this installation (mm.not_written_yet is missing)"


def test_console_scripts_are_mm_and_the_aliases_of_the_table():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.pop("mm") == "mm.cli:mm_main"
    aliases = {a: c.module for c in COMMANDS.values() for a in c.aliases}
    assert set(scripts) == set(aliases)
    for alias, target in scripts.items():
        # mm-merge-lora keeps its own argument order; its work is the `sam` format of `mm export`.
        expected = "mm.evaluate.merge_lora" if alias == "mm-merge-lora" else aliases[alias]
        assert target == f"{expected}:main", alias


def test_the_deepspeed_launchers_local_rank_reaches_mm_train():
    argv = ["--local_rank=1", "train", "clip", "--config", "c.yaml"]
    assert _strip_leading_local_rank(argv) == ["train", "clip", "--config", "c.yaml", "--local_rank=1"]
    assert _strip_leading_local_rank(["--local_rank", "0", "train", "clip"]) == \
        ["train", "clip", "--local_rank", "0"]
    assert _strip_leading_local_rank(["zeroshot", "--data", "x"]) == ["zeroshot", "--data", "x"]


def _leaves(tree, prefix=""):
    if isinstance(tree, dict) and not prefix.endswith(("arch", "args")):
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}.{key}".lstrip(".")).items()}
    return {prefix: tree}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_print_config_shows_every_key_with_its_type(name, capsys):
    config = ROOT / "configs" / name / "tiny.yaml"
    assert mm_main(["train", name, "--config", str(config), "--set", "train.steps=7", "--print-config"]) == 0
    out = capsys.readouterr().out
    want = dataclasses.asdict(load_config(config, ["train.steps=7"], TASKS[name].config_class))
    # The printout is YAML: read back, it is the resolved config, every key of it.
    assert _leaves(yaml.safe_load(out)) == _leaves(want)
    for line in out.splitlines():
        assert "  # " in line, line  # each key, section or leaf, names its type
    assert "steps: 7  # int" in out


def test_print_config_of_the_defaults_and_through_the_train_shim():
    proc = subprocess.run([sys.executable, "train/filip.py", "--print-config"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "loss:  # FilipLossConfig\n  chunk_size: 0  # int\n  gather_dtype: ''  # str\n" in proc.stdout
    cfg = TASKS["filip"].config_class()
    cfg.task = "filip"
    assert proc.stdout == describe_config(cfg)


def test_train_without_a_config_is_a_one_line_error():
    proc = run_mm("train", "clip")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: mm train clip: --config FILE is required (or "
                                                "--print-config for the defaults)"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mm_train_under_the_deepspeed_launcher_on_two_ranks(shapes, tmp_path):
    """`deepspeed --num_gpus 2 --module mm train clip ...`: the launcher runs `python -m mm --local_rank=N
    train clip ...` per rank; both ranks train, rank 0 alone prints the result, the export loads."""
    import json

    from mm.exports import read_export_metadata
    from mm.tasks import load_exported

    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    if not Path(launcher).exists():
        pytest.skip("the deepspeed launcher is not installed")
    out = tmp_path / "run"
    sets = [f"data.train={shapes['train']}", "train.steps=2", "data.batch_size=4", "data.num_workers=0",
            "eval.zeroshot_data=", f"train.out_dir={out}", "model.arch.vision_cfg.layers=1",
            "model.arch.text_cfg.layers=1"]
    port = _free_port()
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(port), "--module", "mm", "train", "clip",
           "--config", "configs/clip/tiny.yaml", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [line for line in proc.stdout.splitlines() if line.startswith("clip: step 2 | loss ")]
    assert len(results) == 1, proc.stdout[-3000:]
    state = json.loads((out / "checkpoints/step00000002/mm_run_state.json").read_text())
    assert state["world_size"] == 2 and state["task"] == "clip"
    task, cfg, _ = load_exported(out / "export/model.safetensors", expect_task="clip")
    assert cfg.train.steps == 2
    # The run records the command the user typed (the launcher's, not a rank's), for the model card.
    typed = shlex.join(["deepspeed", *cmd[1:]])
    [launch] = [json.loads(line) for line in (out / "launches.jsonl").read_text().splitlines()]
    assert launch["command"] == typed and launch["world_size"] == 2 and launch["cwd"] == str(ROOT)
    assert json.loads(read_export_metadata(out / "export/model.safetensors")["mm_command"]) == {
        k: launch[k] for k in ("command", "cwd", "world_size")}
    # DeepSpeed's CPU all-reduce buffers (66 MB of /dev/shm per rank) do not outlive the run.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
