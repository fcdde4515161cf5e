#!/usr/bin/env bash
# Create or update .venv from the pinned requirements, every transitive package held to constraints.txt;
# a no-op when none of them changed. With --ray, also the Ray backend's packages (requirements-ray.txt),
# which only service.backend = "ray" uses.
set -euo pipefail
cd "$(dirname "$0")/.."

with_ray=0
for arg in "$@"; do
    case $arg in
        --ray) with_ray=1 ;;
        *) echo "usage: scripts/setup.sh [--ray]" >&2; exit 2 ;;
    esac
done

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "Python 3.11 or newer is needed; $python is $("$python" -V 2>&1). Set PYTHON=/path/to/python3.11." >&2
    exit 1
fi
pip=(.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt)

wanted=$(cat requirements.txt requirements-dev.txt requirements-nodeps.txt constraints.txt | sha256sum | cut -d' ' -f1)
stamp=.venv/.requirements.sha256
if [[ ! -f $stamp || $(cat "$stamp") != "$wanted" ]]; then
    echo "Setting up .venv (first run or changed requirements)..." >&2
    "$python" -m venv .venv
    "${pip[@]}" -r requirements-dev.txt
    "${pip[@]}" --no-deps -r requirements-nodeps.txt
    echo "$wanted" > "$stamp"
fi

if ((with_ray)); then
    wanted_ray=$(cat "$stamp" requirements-ray.txt | sha256sum | cut -d' ' -f1)
    ray_stamp=.venv/.ray.sha256
    if [[ ! -f $ray_stamp || $(cat "$ray_stamp") != "$wanted_ray" ]]; then
        echo "Installing Ray Serve into .venv (the ray backend)..." >&2
        "${pip[@]}" -r requirements-ray.txt
        echo "$wanted_ray" > "$ray_stamp"
    fi
fi
