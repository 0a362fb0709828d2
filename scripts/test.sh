#!/usr/bin/env bash
# Set up (as scripts/demo.sh does), then run the whole test suite. Extra arguments go to pytest.
source "$(dirname "$0")/setup.sh"
ruff check .        # the style rules of pyproject.toml [tool.ruff.lint]
python -m pytest -q "$@"
