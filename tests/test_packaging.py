"""Installing mm next to other software: version ranges in pyproject.toml, the tested versions in
constraints.txt (what scripts/setup.sh installs with), and the package trained from an installed copy,
away from the repository, as DeepSpeed users launch their scripts."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        texts += extra
    return [Requirement(t) for t in texts]


def constraints(path: Path = ROOT / "constraints.txt") -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier  # one exact pin per line, nothing else
        assert spec.operator == "==" and "*" not in spec.version, line
        name = canonicalize_name(req.name)
        assert name not in pins, f"{name} pinned twice"
        pins[name] = Version(spec.version)
    return pins


def test_every_declared_dependency_is_a_range_that_admits_its_tested_version():
    pins = constraints()
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared but constraints.txt does not pin it"
        ops = {s.operator for s in req.specifier}
        # A range: a lower bound, and no exact pin that would clash with a user's own version.
        assert ">=" in ops and not ops & {"==", "==="}, str(req)
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} excludes the tested {pins[name]}"


def test_the_deepspeed_range_stops_before_the_release_that_breaks_0_dim_parameters():
    (ds,) = [r for r in declared() if r.name == "deepspeed"]
    assert not ds.specifier.contains("0.19.8") and ds.specifier.contains("0.19.7")


def test_constraints_pin_what_the_declared_packages_need_in_this_environment():
    """Every installed requirement of a declared package (recursively) is pinned at its installed version,
    so the file matches the environment the tests run in (scripts/freeze_constraints.py wrote it)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import freeze_constraints
    finally:
        sys.path.pop(0)
    pins = constraints()
    installed = {n: Version(v) for n, v in freeze_constraints.closure(declared()).items()}
    differ = [f"{n} {installed.get(n, 'not needed')} (pinned {pins.get(n, 'not pinned')})"
              for n in sorted(installed.keys() | pins.keys()) if installed.get(n) != pins.get(n)]
    assert not differ, ("constraints.txt is not this environment's set; once the tests pass here, "
                        "python scripts/freeze_constraints.py > constraints.txt: " + ", ".join(differ))
    assert {"torch", "deepspeed", "open-clip-torch", "timm", "webdataset", "numpy"} <= pins.keys()


def _fake_venv(root: Path) -> Path:
    """A copy of scripts/setup.sh in `root` whose .venv/bin/pip only records its arguments."""
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts/setup.sh", root / "scripts/setup.sh")
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    shutil.copy(ROOT / "constraints.txt", root / "constraints.txt")
    bin_dir = root / ".venv/bin"
    bin_dir.mkdir(parents=True)
    log = root / "pip.log"
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "python").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return log


def test_setup_installs_with_the_constraints_and_again_only_when_they_or_pyproject_change(tmp_path):
    log = _fake_venv(tmp_path)

    def setup() -> list[str]:
        before = log.read_text().splitlines() if log.exists() else []
        proc = subprocess.run(["bash", "scripts/setup.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return log.read_text().splitlines()[len(before):] if log.exists() else []

    def newer(path: Path) -> None:
        stamp = (tmp_path / ".venv/.mm-installed").stat().st_mtime
        os.utime(path, (stamp + 10, stamp + 10))

    calls = setup()
    assert len(calls) == 1
    args = calls[0].split()
    assert args[args.index("-c") + 1] == "constraints.txt" and '.[dev]' in args[args.index("-e") + 1]
    assert setup() == []  # installed, nothing changed
    newer(tmp_path / "constraints.txt")
    assert len(setup()) == 1
    newer(tmp_path / "pyproject.toml")
    assert len(setup()) == 1


def test_mm_train_accepts_the_flags_of_deepspeed_add_config_arguments():
    from mm.cli import train_parser

    args = train_parser(None).parse_args(["clip", "--config", "c.yaml", "--deepspeed", "--deepspeed_config",
                                          "ds.json", "--local_rank=1"])
    assert args.deepspeed and args.deepspeed_config == "ds.json" and args.local_rank == 1
    proc = subprocess.run([sys.executable, "-m", "mm", "train", "clip", "--deepspeed", "--print-config"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "deepspeed_config: configs/ds/zero2.json  # str" in proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """mm installed (not editable) into a folder of its own from a copy of the package's sources, as pip
    installs it into a user's environment: mm/ and its metadata, none of the repository's other files."""
    tmp = tmp_path_factory.mktemp("installed")
    src, site = tmp / "src", tmp / "site"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mm", src / "mm", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                           "--no-build-isolation", "--disable-pip-version-check", "--target", str(site), str(src)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"cannot build the package here: {proc.stderr.strip()[-300:]}")
    return site


def test_console_scripts_of_the_installed_copy_run(installed, tmp_path):
    """pip writes every [project.scripts] entry; mm-export (the issue's name for `mm export`) among them."""
    env = {**os.environ, "PYTHONPATH": str(installed)}
    for script, expect in (("mm-export", "--format {open_clip,peft,sam}"), ("mm", "export")):
        path = installed / "bin" / script
        assert path.is_file(), f"pip did not write {script}"
        proc = subprocess.run([sys.executable, str(path), "--help"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0 and expect in proc.stdout, proc.stdout + proc.stderr


def test_deepspeed_module_mm_trains_from_an_installed_copy_in_another_directory(installed, shapes, tmp_path):
    """`deepspeed --module mm train clip --deepspeed ...` in a user's own directory, with the user's own config
    (no train.deepspeed_config: the default ZeRO-2 settings, though configs/ds/ is not there): it trains,
    evaluates and exports under that directory, from the installed copy of mm."""
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    if not Path(launcher).exists():
        pytest.skip("the deepspeed launcher is not installed")
    work = tmp_path / "project"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(installed), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import mm; print(mm.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(installed / "mm" / "__init__.py"), where.stdout + where.stderr
    (work / "my_clip.yaml").write_text(
        "task: clip\n"
        "model:\n  arch:\n    embed_dim: 32\n"
        "    vision_cfg: {image_size: 32, patch_size: 8, width: 32, layers: 1, head_width: 16}\n"
        "    text_cfg: {context_length: 12, vocab_size: 49408, width: 32, heads: 2, layers: 1}\n"
        f"data:\n  train: {shapes['train']}\n  batch_size: 4\n  num_workers: 0\n  shuffle_buffer: 10\n"
        "train:\n  steps: 2\n  out_dir: runs/mine\n  ckpt_every: 0\n"
        f"eval:\n  zeroshot_data: {shapes['val']}\n  classnames: shapes\n  templates: shapes\n")
    cmd = [launcher, "--num_gpus", "1", "--master_port", str(_free_port()), "--module", "mm", "train", "clip",
           "--deepspeed", "--config", "my_clip.yaml"]
    # 3.5 minutes on 2 shared cores; over 10 on a machine at load 60.
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert any(line.startswith("clip: step 2 | loss ") and "zeroshot/acc1" in line for line in proc.stdout.splitlines())
    assert (work / "runs/mine/export/model.safetensors").is_file()
    assert not (ROOT / "runs/mine").exists()
