#!/usr/bin/env bash
# Create or update .venv from the pinned requirements, every transitive package held to constraints.txt;
# a no-op when none of them changed.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "Python 3.11 or newer is needed; $python is $("$python" -V 2>&1). Set PYTHON=/path/to/python3.11." >&2
    exit 1
fi
wanted=$(cat requirements.txt requirements-dev.txt requirements-nodeps.txt constraints.txt | sha256sum | cut -d' ' -f1)
stamp=.venv/.requirements.sha256

if [[ -f $stamp && $(cat "$stamp") == "$wanted" ]]; then
    exit 0
fi
echo "Setting up .venv (first run or changed requirements)..." >&2
"$python" -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements-dev.txt
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt -r requirements-nodeps.txt
echo "$wanted" > "$stamp"
