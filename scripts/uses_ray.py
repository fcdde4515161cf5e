"""Exit 0 when ``main.py ARGS`` would run the bot on the ray backend: ``run.sh`` installs Ray only then."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.config import ConfigError, load_settings  # after the project is on the path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", type=Path)
    parser.add_argument("command", nargs="?", default="run")
    known, _ = parser.parse_known_args(argv)
    if known.command != "run":  # describe and backup load no backend
        return 1
    try:
        settings = load_settings(known.config)
    except ConfigError:  # main.py says what is wrong, in its own words
        return 1
    return 0 if settings.service.backend == "ray" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
