import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed compiles a communication op on first use; keep it in the project so it is built once.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> dict:
    """A small shapes world: 8 training shards of 40 samples and a balanced held-out set."""
    from mm.data.synthetic import CLASSNAMES, write_shapes_world

    root = tmp_path_factory.mktemp("shapes")
    train = write_shapes_world(root / "train", 320, image_size=32, seed=0, shard_size=40)
    val = write_shapes_world(root / "val", 2 * len(CLASSNAMES), image_size=32, seed=1, balanced=True)
    return {"train": f"{root}/train/shapes-{{000000..{len(train) - 1:06d}}}.tar", "train_shards": train,
            "val": val[0], "root": root}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now: the default rendezvous port (29500) is often
    held by another job's training, and a launch on it fails. (The kernel may hand the port to another
    process before ours binds it; short of that it is free.)"""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def torchrun():
    """Run a script with `torchrun --standalone` and N real ranks (gloo on the CPU). --standalone
    rendezvouses on a free port of its own, never the default 29500."""
    import subprocess
    import sys

    def run(script: Path, *args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
               str(script), *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    return run


def pytest_configure(config):
    # GPU-marked tests run on a CUDA machine (bench/gpu_check.sh runs `pytest -m gpu`); elsewhere they skip.
    config.addinivalue_line("markers", "gpu: needs a CUDA device; run with `pytest -m gpu` on a GPU machine")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
