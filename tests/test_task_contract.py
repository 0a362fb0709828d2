"""The Task contract, for every entry of mm.tasks.TASKS: built from its shipped tiny config, one
optimizer step on the engine, export, reload, evaluate; and the engine's Protocol is what each task
satisfies. A new trainer is covered by adding its module and configs/<task>/tiny.yaml."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from mm.engine.task import Task
from mm.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_ships_a_tiny_config_and_satisfies_the_protocol(name):
    cls = TASKS[name]
    assert cls.name == name
    assert (ROOT / "configs" / name / "tiny.yaml").is_file()
    task = cls(None)  # the config class's defaults
    assert isinstance(task, Task)
    # The engine passes the step and the world explicitly; nothing is read off the model.
    assert list(inspect.signature(cls.losses).parameters) == ["self", "model", "batch", "step"]
    assert list(inspect.signature(cls.batches).parameters) == ["self", "split", "world", "state"]


@pytest.fixture(scope="module")
def contract(torchrun, shapes, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("contract")
    proc = torchrun(ROOT / "tests/dist/contract_check.py", shapes["train"], str(shapes["val"]), str(out),
                    ",".join(sorted(TASKS)), nproc=1, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("name", sorted(TASKS))
def test_builds_trains_one_step_exports_reloads_and_evaluates(contract, name):
    r = contract[name]
    assert r["is_task"] and r["is_batches"]
    assert r["step"] == 1 and r["finite"]
    assert r["same_config"], "the export's metadata does not rebuild the run's config"
    assert r["eval"], "the tiny config evaluates nothing"
    # The reloaded fp32 export evaluates exactly as the engine's model did at the end of training.
    assert r["eval_of_export"].keys() == r["eval"].keys()
    for key, value in r["eval"].items():
        assert r["eval_of_export"][key] == pytest.approx(value, abs=1e-5), key
