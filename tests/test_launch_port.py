"""The demo's launches do not depend on the launcher's default port (29500), which another job's
training often holds: the demo passes --master_port a free port, found by its own free_port helper."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
DEMO = (ROOT / "scripts" / "demo.sh").read_text()


def test_every_demo_launch_names_a_free_master_port():
    launches = [line for line in DEMO.splitlines() if re.match(r"\s*deepspeed\s", line)]
    assert launches
    assert all('--master_port "$(free_port)"' in line for line in launches), launches


def test_free_port_helper_gives_a_bindable_port():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # raises if it were taken


def test_demo_launch_works_while_the_default_port_is_taken(tmp_path):
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    if not Path(launcher).exists():
        pytest.skip("the deepspeed launcher is not installed")
    helper = re.search(r"^free_port\(\) \{.*?^\}", DEMO, re.DOTALL | re.MULTILINE)
    assert helper, "scripts/demo.sh has no free_port helper"
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", 29500))
        blocker.listen()  # another job's rendezvous, as far as a launcher can tell
    except OSError:
        pass  # already held by something else on this machine: just as good
    out = tmp_path / "seen.json"
    script = (f'{helper.group(0)}\nPATH="{Path(launcher).parent}:$PATH" '
              f'deepspeed --num_gpus 2 --master_port "$(free_port)" tests/dist/port_check.py {out}')
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    try:
        proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300, check=False)
    finally:
        blocker.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(out.read_text())
    assert seen["world_size"] == 2 and seen["sum"] == 3.0 and seen["port"] != 29500
