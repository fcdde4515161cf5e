#!/usr/bin/env bash
# Set up (first run only) and run the linter, the type checker and the test suite; arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh --ray  # everything, the ray backend included
.venv/bin/ruff check .
.venv/bin/mypy  # files and settings: [tool.mypy] in pyproject.toml
exec .venv/bin/python -m pytest "$@"
