#!/usr/bin/env bash
# Create (idempotently) the virtualenv that runs the MONAI Label server for medsegdiff_bundle.
#   bash scripts/setup_label_env.sh            # venv at ${MEDSEGDIFF_LABEL_VENV:-$HOME/.cache/medsegdiff/label-venv}
# Skips the install when the venv already imports monailabel and our package. Takes ~4 min the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
VENV="${MEDSEGDIFF_LABEL_VENV:-$HOME/.cache/medsegdiff/label-venv}"
PY="${PYTHON:-python3}"

# run the checks from / so that the checkout itself is not importable from the working directory
if [ -x "$VENV/bin/python" ] && (cd / && "$VENV/bin/python" - "$REPO" >/dev/null 2>&1) <<'PYEOF'
import os, sys
import torchvision, medsegdiff_bundle
import monailabel.interfaces.app, monailabel.tasks.infer.basic_infer  # what the server imports
# the editable install must point at this checkout (CI clones to a fresh folder)
assert os.path.realpath(os.path.dirname(os.path.dirname(medsegdiff_bundle.__file__))) == os.path.realpath(sys.argv[1])
PYEOF
then
    echo "setup_label_env: $VENV ready (monailabel importable), skipping install"
    exit 0
fi

echo "setup_label_env: installing requirements-label.txt into $VENV (several GB, a few minutes the first time)"
mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements-label.txt
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e .
(cd / && "$VENV/bin/python" -c "import torchvision, medsegdiff_bundle, monailabel, monailabel.interfaces.app; print('setup_label_env: monailabel', monailabel.__version__, 'ready in $VENV')")
