#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then lint and run the default (CPU) test suite.
# This is the README's test command; CI runs exactly this script.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
if ! command -v redis-server >/dev/null; then
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi
python -m pip install -q torch==2.13.0 2>/dev/null || python -m pip install -q "torch>=2.5"
python -m pip install -q -e '.[test]'

ruff check .
lint-imports
python -m pytest -q "$@"
