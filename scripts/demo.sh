#!/usr/bin/env bash
# The main job on the embedded default: builds Tally, makes sure a nats-server is
# installed (scripts/install-nats.sh), and runs `tally demo` with any arguments given,
# e.g. `scripts/demo.sh --events 200000 --format json`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
TALLY_NATS_SERVER="$(scripts/install-nats.sh)"
export TALLY_NATS_SERVER
cargo build --bin tally
exec cargo run --quiet --bin tally -- demo "$@"
