#!/usr/bin/env bash
# Makes sure OpenMeter's own JavaScript SDK (@openmeter/sdk, the version pinned in
# tests/openmeter/package-lock.json) is installed in tests/openmeter/node_modules for the
# test that drives Tally with it (tests/it/openmeter.rs), and prints the path of node.
# Installs Debian's nodejs and npm with apt-get when node is missing and this runs as
# root (or with passwordless sudo). Quiet when already installed; progress goes to
# stderr: stdout is the path alone.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$root/tests/openmeter"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    sudo -n true 2>/dev/null || { echo "node and npm are missing and this is not root: apt-get install nodejs npm" >&2; exit 1; }
    sudo="sudo -n"
  fi
  echo "installing nodejs and npm (apt-get) for the OpenMeter SDK test" >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm >&2 \
    || { $sudo apt-get update >&2 && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm >&2; }
fi

wanted="$(sed -n 's/.*"@openmeter\/sdk": "\(.*\)".*/\1/p' "$dir/package.json" | head -1)"
have="$(sed -n 's/.*"version": "\(.*\)".*/\1/p' "$dir/node_modules/@openmeter/sdk/package.json" 2>/dev/null | head -1 || true)"
if [ "$have" != "$wanted" ]; then
  echo "installing @openmeter/sdk $wanted into $dir/node_modules (npm registry)" >&2
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
fi
command -v node
