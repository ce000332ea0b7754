#!/usr/bin/env bash
# The oldest software this project supports, which is the lent GPU machine's own: torch 2.11 and
# torchvision 0.26 (that machine's torch cannot be replaced), an older scipy (< 1.15, whose
# bootstrap takes `random_state`, not `rng`), and no textual. Outside CI: it downloads several GB.
#
#   bench/compat_check.sh [VENV]        (default /tmp/venv-torch211; reused when it is there)
#
# Installs them in a scratch venv, checks that `nas.py` imports without textual, runs the test
# suite but the UI's tests, and `nas.py all --preset tiny` on the CPU. Exit 3, with one line,
# when the packages cannot be installed here.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-/tmp/venv-torch211}"
LOG="$VENV.log"
PACKAGES=("torch==2.11.*" "torchvision==0.26.*" "scipy<1.15" typer rich matplotlib pytest)

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null
then
  python -m venv "$VENV" > "$LOG" 2>&1 && "$VENV/bin/pip" install -q "${PACKAGES[@]}" >> "$LOG" 2>&1
  if [ $? -ne 0 ]; then
    echo "compat check: torch 2.11 / torchvision 0.26 cannot be installed here (see $LOG)"
    exit 3
  fi
fi
PY="$VENV/bin/python"
"$PY" -c 'import torch, torchvision, scipy
print("torch", torch.__version__, "torchvision", torchvision.__version__, "scipy", scipy.__version__)'
cd "$ROOT"
"$PY" -c "import sys, nas; sys.exit('textual' in sys.modules)" \
  || { echo "compat check: nas.py imports textual without --tui"; exit 1; }
"$PY" -m pytest -q -p no:cacheprovider tests --ignore=tests/test_tui.py || exit 1
WORK="$(mktemp -d)"
cd "$WORK" && "$PY" "$ROOT/nas.py" all --preset tiny --device cpu --name compat --no-tui || exit 1
echo "compat check: passed with $("$PY" -c 'import torch; print(torch.__version__)') (runs in $WORK)"
