#!/usr/bin/env bash
# Makes sure tally-s3-server (s3s-fs, an S3-compatible server over a local directory, with
# its conditional writes made atomic: the object store that tests, the chaos tool and
# benchmarks run against; tools/s3-server) is available and prints its path.
#
# Order: $TALLY_S3_SERVER if set, then the project's own .tools/bin/tally-s3-server, which
# this script builds from tools/s3-server (s3s-fs and s3s from crates.io, the versions its
# Cargo.lock pins) when it is missing or not the version of tools/s3-server/Cargo.toml. The
# build takes a few minutes on two cores; its target directory stays under ~/.cache/tally/
# so that a later change rebuilds only what changed. Progress goes to stderr: stdout is the
# path alone.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
bin="$tools/bin/tally-s3-server"
build_dir="$HOME/.cache/tally/s3s-fs-target"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/tools/s3-server/Cargo.toml" | head -n 1)"

# tally-s3-server --version prints "tally-s3-server 0.1.0".
version_of() { "$1" --version 2>/dev/null | sed -n 's/^tally-s3-server \([0-9][0-9.]*\)$/\1/p'; }

if [ -n "${TALLY_S3_SERVER:-}" ]; then
  [ -n "$(version_of "$TALLY_S3_SERVER")" ] || {
    echo "TALLY_S3_SERVER=$TALLY_S3_SERVER is not a tally-s3-server binary" >&2
    exit 1
  }
  echo "$TALLY_S3_SERVER"; exit 0
fi
if [ -x "$bin" ] && [ "$(version_of "$bin")" = "$VERSION" ]; then
  echo "$bin"; exit 0
fi

mkdir -p "$tools"
# Two runs at once (two checkouts' scripts/test.sh) build it once.
exec 9>"$tools/.install.lock"
flock 9
if [ ! -x "$bin" ] || [ "$(version_of "$bin")" != "$VERSION" ]; then
  echo "building tally-s3-server $VERSION into $tools (s3s-fs from crates.io; a few minutes)" >&2
  cargo install --path "$root/tools/s3-server" --locked --force --root "$tools" \
    --target-dir "$build_dir" --quiet >&2
fi
[ "$(version_of "$bin")" = "$VERSION" ] || {
  echo "cargo install left no tally-s3-server $VERSION at $bin" >&2
  exit 1
}
echo "$bin"
