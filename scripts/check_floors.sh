#!/usr/bin/env bash
# Install every dependency at the floor setup.py gives it into a fresh virtual environment, install
# prompt-ris, and run the tests there.
#
#   bash scripts/check_floors.sh [VENV_DIR] [PYTEST_ARGS...]
#
# VENV_DIR (default: a new temporary folder) is deleted and created again. PYTEST_ARGS default to
# the tiny tests, -m "not full_size". Dependencies of the dependencies resolve to what pip picks
# for the pinned set. The frozen package list is written to VENV_DIR/floors-freeze.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${1:-$(mktemp -d -t prompt-ris-floors.XXXXXX)}
shift || true
[ $# -gt 0 ] || set -- -m "not full_size"

# Every ">=" requirement of setup.py (install_requires and the dev extra) pinned with "==".
pins=$("$PYTHON" - <<'EOF'
import ast
import re
from pathlib import Path

call = next(
    node
    for node in ast.walk(ast.parse(Path("setup.py").read_text()))
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"
)
given = {
    kw.arg: ast.literal_eval(kw.value)
    for kw in call.keywords
    if kw.arg in ("install_requires", "extras_require")
}
requirements = list(given["install_requires"])
for extra in given.get("extras_require", {}).values():
    requirements += extra
for requirement in requirements:
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([A-Za-z0-9_.+\-]+)", requirement)
    if match is None:
        raise SystemExit(f"setup.py: {requirement!r} has no floor of the form name>=version")
    print(f"{match[1]}=={match[2]}")
EOF
)

if [ -n "$(ls -A "$VENV" 2>/dev/null)" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then
  echo "[floors] $VENV holds files and is no virtual environment; give another folder" >&2
  exit 2
fi
echo "[floors] fresh environment in $VENV"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
quiet() {  # pip, without its notes on local index folders that lack a package
  "$@" 2>&1 | sed '/is ignored: it is neither a file nor a directory/d'
}
quiet "$PY" -m pip install -q --upgrade pip
echo "[floors] installing" $pins
# shellcheck disable=SC2086  # one argument per pin
quiet "$PY" -m pip install -q $pins
quiet "$PY" -m pip install -q --no-deps -e .
"$PY" -m pip check
# The installed versions are the floors themselves (nothing in the install moved a pin).
"$PY" - $pins <<'EOF'
import sys
from importlib.metadata import version

wrong = []
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    if version(name) != want:
        wrong.append(f"{name} {version(name)} (floor {want})")
if wrong:
    raise SystemExit("[floors] not at the floor: " + ", ".join(wrong))
EOF
"$PY" -m pip freeze > "$VENV/floors-freeze.txt"
"$PY" --version

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$PY" -c "import prompt_ris; print('[floors] prompt_ris from', prompt_ris.__file__)"
start=$(date +%s)
"$PY" -m pytest tests -q -rs -p no:cacheprovider "$@"
echo "[floors] passed at the floors in $(($(date +%s) - start)) s on $(date -u +%Y-%m-%d)"
