#!/usr/bin/env bash
# Train one experiment on this machine (CPU, or one GPU when jax sees one).
#   bash launch/local.sh experiments/moe_char_lm.py:tiny workdir/quickstart [--config.KEY=VALUE ...]
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG[:ARG] WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || python=python3
exec "$python" -m modjax.train --config "$config" --workdir "$workdir" "$@"
