#!/usr/bin/env bash
# Create .venv (if needed) and install prompt-ris with its test and app dependencies into it,
# and headless Chromium for the app's browser test (Debian's chromium + chromedriver) when missing.
# Re-running is cheap: the install is skipped while setup.py is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating virtual environment in .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.prompt_ris_installed
want=$(sha256sum setup.py | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing prompt-ris and its dependencies into .venv (first run: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev,app]"
  echo "$want" > "$stamp"
fi
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "[setup] installing chromium and chromium-driver (the app's browser test)"
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; } \
      || echo "[setup] could not install chromium: the browser test will be skipped" >&2
  else
    echo "[setup] no apt-get: install Chromium and chromedriver for the browser test" >&2
  fi
fi
