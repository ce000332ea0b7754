#!/usr/bin/env bash
# `--init` against Paddle itself: the challenge demo's own ResNet-48, saved with paddle.save,
# read by this project without Paddle, and the logits compared (bench/paddle_check.py).
# Outside CI: it downloads paddlepaddle (hundreds of MB) into a scratch venv.
#
#   bench/paddle_check.sh DEMO_DIR [VENV]   DEMO_DIR: a checkout of xiteng01/CVPR_2022_Track1_demo
#                                           VENV: default /tmp/venv-paddle, reused when there
#
# Exit 3, with one line, when Paddle cannot be installed here; 1 when the logits differ.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEMO="${1:?usage: bench/paddle_check.sh DEMO_DIR [VENV]}"
VENV="${2:-/tmp/venv-paddle}"
[ -f "$DEMO/hnas/models/resnet.py" ] || { echo "paddle check: $DEMO has no hnas/models/resnet.py"; exit 2; }
if ! "$VENV/bin/python" -c "import paddle" 2>/dev/null; then
  python -m venv "$VENV" > "$VENV.log" 2>&1 \
    && "$VENV/bin/pip" install -q "paddlepaddle==3.3.*" numpy >> "$VENV.log" 2>&1 \
    || { echo "paddle check: paddlepaddle cannot be installed here (see $VENV.log)"; exit 3; }
fi
WORK="$(mktemp -d)"
"$VENV/bin/python" "$ROOT/bench/paddle_check.py" reference "$DEMO" "$WORK" || exit 1
python "$ROOT/nas.py" import-weights "$WORK/resnet48.pdparams" --out "$WORK/import" || exit 1
python "$ROOT/bench/paddle_check.py" compare "$WORK"
