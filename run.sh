#!/usr/bin/env bash
# Set up (first run only) and start flamingo-bot; arguments go to main.py. Ray Serve is installed only
# when the settings choose service.backend = "ray", or when asked with WITH_RAY=1.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
if [[ ${WITH_RAY:-0} == 1 ]] || .venv/bin/python scripts/uses_ray.py "$@"; then
    scripts/setup.sh --ray
fi
exec .venv/bin/python main.py "$@"
