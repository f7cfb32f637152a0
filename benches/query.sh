#!/usr/bin/env bash
# `tally bench query` with DuckDB beside it: installs DuckDB (pinned) from PyPI into the
# project's virtual environment (never a dependency of Tally), builds Tally in release and
# runs the benchmark with any arguments given, e.g.
#   benches/query.sh --events 100000000 --dir /var/tmp/tally-query --format json
# or, with `meters` first, `tally bench meters`:
#   benches/query.sh meters --events 100000000 --dir /var/tmp/tally-meters --format json
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
DUCKDB_VERSION="2.0.1"
venv="${TALLY_VENV:-$root/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if ! "$venv/bin/python" -c "import duckdb, sys; sys.exit(duckdb.__version__ != '$DUCKDB_VERSION')" 2>/dev/null; then
  echo "installing duckdb $DUCKDB_VERSION into $venv (for the comparison only)" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "duckdb==$DUCKDB_VERSION" >&2
fi
bench=query
if [ "${1:-}" = meters ]; then
  bench=meters
  shift
fi
cargo build --release --bin tally
exec "${CARGO_TARGET_DIR:-$root/target}/release/tally" bench "$bench" --duckdb "$venv/bin/python" "$@"
