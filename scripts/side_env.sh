#!/usr/bin/env bash
# Print the path of a side environment built from requirements/<name>.txt, building it if
# missing. Side environments live under ~/.cache/verl_r3/envs, keyed by a hash of their
# requirements (and this script), so they are rebuilt only when those change. verl_r3 is
# not installed there (the cache outlives any one checkout): run them with PYTHONPATH set
# to the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=$1
REQ="requirements/$NAME.txt"
[ -f "$REQ" ] || { echo "no requirements file $REQ" >&2; exit 2; }
HASH=$(cat "$REQ" requirements/dev.txt "$0" | sha256sum | cut -c1-12)
ENV_DIR="${VERL_R3_CACHE:-$HOME/.cache/verl_r3}/envs/$NAME-$HASH"
if [ ! -f "$ENV_DIR/.ready" ]; then
    echo "building side environment $NAME in $ENV_DIR" >&2
    rm -rf "$ENV_DIR"
    "${PYTHON:-python3}" -m venv "$ENV_DIR"
    pip() { "$ENV_DIR/bin/python" -m pip --disable-pip-version-check -q "$@"; }
    pip install torch==2.13.0 >&2
    pip install -r "$REQ" -r requirements/dev.txt >&2
    touch "$ENV_DIR/.ready"
fi
echo "$ENV_DIR"
