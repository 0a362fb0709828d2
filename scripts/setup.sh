# Sourced by scripts/demo.sh and scripts/test.sh: create .venv if missing, install the package once
# (again only when pyproject.toml or constraints.txt changes) at the versions constraints.txt pins (the
# tested ones; pyproject.toml gives ranges), and set the environment every command here expects.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv"
  "$PYTHON" -m venv .venv
fi
STAMP=.venv/.mm-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ constraints.txt -nt "$STAMP" ]; then
  echo "installing mm and its dependencies into .venv (a few minutes the first time)"
  # pip, not uv or poetry: pip takes torch from the local wheel cache instead of downloading 3 GB.
  .venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import mm, torch, open_clip, deepspeed, webdataset" 
  touch "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export HF_HUB_OFFLINE=1          # never look models up on a hub (the look-up alone hangs ~47 s offline)
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
export TORCH_EXTENSIONS_DIR="$ROOT/.cache/torch_extensions"  # DeepSpeed's comm op is compiled once, here
