"""What the memory benches share: each side runs in a fresh Python process of the same script
(`--worker JSON`), so its peak resident memory (VmHWM) is its own, and reports one JSON line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def status_kib(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM, ...) in KiB."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def run_worker(script: str, spec: list, env: dict[str, str] | None = None) -> dict:
    """Run `python SCRIPT --worker JSON(spec)` with the repository importable and large buffers straight
    from mmap (freed memory goes back to the OS, so VmHWM is the real peak); its last stdout line as a
    dict, or {"error": its last stderr line} when it fails."""
    full = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", HF_HUB_OFFLINE="1", **(env or {}))
    full["PYTHONPATH"] = f"{ROOT}{os.pathsep}{full.get('PYTHONPATH', '')}"
    out = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], check=False, env=full,
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])
