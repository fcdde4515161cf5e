#!/usr/bin/env bash
# Set up (first run only) and start flamingo-bot; arguments go to main.py.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/python main.py "$@"
