"""Rank discovery from srun / mpirun environments and the one-line port error (mm/engine/launch.py).

The multi-process cases fake the launcher's environment on 2 real processes and check that they
form ONE 2-rank group (an all_reduce sums both ranks), not two one-rank runs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mm.engine.launch import discover_ranks, first_slurm_host
from mm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
JOIN = """
import json, sys
import torch, torch.distributed as dist
from mm.engine.launch import init_distributed
init_distributed()
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item()}), flush=True)
dist.destroy_process_group()
"""
# What torchrun / deepspeed would set: removed so that only the faked launcher's variables remain.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(envs: list[dict]) -> list[dict]:
    base = {k: v for k, v in os.environ.items()
            if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    procs = [subprocess.Popen([sys.executable, "-c", JOIN], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**base, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env})
             for env in envs]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_srun_tasks_form_one_group():
    port = str(_free_port())
    common = {"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "4242", "MASTER_PORT": port}
    results = _run_two([{**common, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)} for r in (0, 1)])
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in results)


def test_open_mpi_ranks_form_one_group():
    port = str(_free_port())
    common = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_PORT": port}
    results = _run_two([{**common, "OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_LOCAL_RANK": str(r)}
                        for r in (0, 1)])
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in results)


@pytest.mark.parametrize("nodelist,first", [
    ("localhost", "localhost"), ("node07", "node07"), ("node[01-04]", "node01"), ("node[3,5-6]", "node3"),
    ("gpu[010-012],cpu1", "gpu010"), ("a,b", "a"), ("rack1-n[2-3].cluster", "rack1-n2.cluster"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "n[1-2]x[3-4]", "n[a-b]"])
def test_an_unreadable_node_list_is_one_line(nodelist):
    with pytest.raises(UserError, match="set MASTER_ADDR"):
        first_slurm_host(nodelist)


def test_discovery_mapping():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "n[04-05]",
           "SLURM_JOB_ID": "77"}
    got = discover_ranks(env)
    assert got["RANK"] == "5" and got["WORLD_SIZE"] == "8" and got["LOCAL_RANK"] == "1"
    assert got["MASTER_ADDR"] == "n04"
    # every task of the job derives the same port; another job another one
    assert got["MASTER_PORT"] == discover_ranks({**env, "SLURM_PROCID": "0"})["MASTER_PORT"]
    assert got["MASTER_PORT"] != discover_ranks({**env, "SLURM_JOB_ID": "78"})["MASTER_PORT"]
    assert discover_ranks({**env, "MASTER_PORT": "12345"})["MASTER_PORT"] == "12345"
    assert discover_ranks({"RANK": "0", **env}) == {}  # torchrun / deepspeed set everything already
    single = discover_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert single["WORLD_SIZE"] == "1" and single["MASTER_ADDR"] == "127.0.0.1"


@pytest.mark.parametrize("env,fragment", [
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
      "MASTER_PORT": "1234"}, "mpirun -x MASTER_ADDR"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},
     "mpirun -x MASTER_PORT"),
    ({"PMI_RANK": "0", "PMI_SIZE": "4"}, "PMI_SIZE=4"),
    ({"MV2_COMM_WORLD_RANK": "1", "MV2_COMM_WORLD_SIZE": "2"}, "MV2_COMM_WORLD_SIZE=2"),
])
def test_a_launch_that_cannot_be_mapped_is_refused_not_run_as_separate_ranks(env, fragment):
    with pytest.raises(UserError, match=fragment.replace(".", r"\.")) as e:
        discover_ranks(env)
    assert "\n" not in str(e.value)


def test_a_taken_port_is_one_line():
    """Two launches on one host on the same port: the second says so, without a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
        env.update(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=str(ROOT))
        code = ("from mm.errors import cli_main\nfrom mm.engine.launch import init_distributed\n"
                "cli_main(init_distributed)()")
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"port {port}" in lines[0] and "--master_port" in lines[0]
    assert "Traceback" not in proc.stderr


def test_sigterm_asks_the_run_to_stop_and_the_handler_is_restored():
    from mm.engine.launch import GracefulStop

    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop(grace_s=60, rank=0) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process goes on
        deadline = time.time() + 5
        while not stop.requested and time.time() < deadline:  # taken by another thread, so not at once
            time.sleep(0.01)
        assert stop.reason == "SIGTERM received"
        stop.saving()  # disarms the grace timer
    assert signal.getsignal(signal.SIGTERM) == before
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())


class _SignalledStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield 1
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler signalling every process of the job
        yield 2


def test_a_dataloader_worker_survives_sigterm_during_a_run():
    """torch's workers exit on SIGTERM, which killed the rank mid-step; the rank decides when to stop."""
    from torch.utils.data import DataLoader

    from mm.engine.launch import GracefulStop

    with GracefulStop(grace_s=60, rank=0) as stop:
        got = list(DataLoader(_SignalledStream(), batch_size=None, num_workers=1))
        stop.saving()
    assert got == [1, 2]
    assert not stop.requested  # the worker's signal is not the rank's


def test_no_step_boundary_within_the_grace_period_exits_143_without_saving():
    code = ("import os, signal, time\nfrom mm.engine.launch import GracefulStop\n"
            "with GracefulStop(grace_s=0.5, rank=0):\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 143
    assert "no step ended within train.stop_grace_s=0.5 s" in proc.stderr


def test_a_checkpoint_of_another_zero_stage_is_refused(tmp_path):
    from mm.engine.checkpoint import check_compatible

    state = {"step": 4, "task": "clip", "world_size": 2, "zero_stage": 3}
    with pytest.raises(UserError, match="ZeRO stage 3, this run uses stage 2"):
        check_compatible(tmp_path, "step00000004", state, "clip", 2, "", 2)
    check_compatible(tmp_path, "step00000004", state, "clip", 2, "", 3)
