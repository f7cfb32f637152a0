#!/usr/bin/env bash
# Makes sure the project's virtual environment (.venv/, the one scripts/install-nats.sh
# fills; TALLY_VENV for another place) has the engines that read the lake's Delta tables
# from outside Tally, deltalake (delta-rs's Python binding, with pyarrow, which it reads
# through) and polars, at the pinned
# versions, and prints the path of its python. A test reads the lake with them to show
# that the tables are plain Delta that any engine reads. Quiet when already installed;
# progress goes to stderr: stdout is the path alone.
set -euo pipefail

DELTALAKE_VERSION="1.6.6"
POLARS_VERSION="2.1.0"
PYARROW_VERSION="26.0.1"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TALLY_VENV:-$root/.venv}"
python="$venv/bin/python"

installed() {
  "$python" - "$DELTALAKE_VERSION" "$POLARS_VERSION" "$PYARROW_VERSION" 2>/dev/null <<'EOF'
import sys
from importlib.metadata import version
wanted = tuple(sys.argv[1:4])
sys.exit(0 if (version("deltalake"), version("polars"), version("pyarrow")) == wanted else 1)
EOF
}

[ -x "$python" ] || python3 -m venv "$venv" >&2
if ! installed; then
  echo "installing deltalake $DELTALAKE_VERSION, pyarrow $PYARROW_VERSION and polars $POLARS_VERSION into $venv (PyPI)" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "deltalake==$DELTALAKE_VERSION" "pyarrow==$PYARROW_VERSION" "polars==$POLARS_VERSION" >&2
  installed || { echo "deltalake, pyarrow and polars are not all at their pinned versions in $venv" >&2; exit 1; }
fi
echo "$python"
