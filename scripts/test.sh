#!/usr/bin/env bash
# The whole check, as CI runs it: formatting, clippy with warnings as errors, and every
# test (unit, schema, Parquet, end-to-end against real nats-server processes).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
TALLY_NATS_SERVER="$(scripts/install-nats.sh)"
export TALLY_NATS_SERVER
echo "using $("$TALLY_NATS_SERVER" -v)"
# The portal's browser test needs a headless Chromium; without one it skips (never fails).
scripts/install-browser.sh >/dev/null || true
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
