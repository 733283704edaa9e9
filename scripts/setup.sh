#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the project with its pinned dependencies.
# Idempotent: re-installs only when pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null \
  || { echo "setup.sh: ERROR: Python 3.11 is required (found: $("$PYTHON" --version 2>&1))" >&2; exit 1; }

if [[ ! -x .venv/bin/python ]]; then
  echo "setup.sh: creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.heimdex-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "setup.sh: installing dependencies (first time: several minutes, torch is large)" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet --progress-bar off -e ".[dev]"
  echo "$want" > "$stamp"
fi
