#!/usr/bin/env bash
# Set up (first run only) and run the linter and the test suite; arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
