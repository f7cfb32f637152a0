#!/usr/bin/env bash
# Makes sure an s3s-fs (an S3-compatible server over a local directory: the object store
# that tests, the chaos tool and benchmarks run against) is available and prints its path.
#
# Order: $TALLY_S3_SERVER if set, then the project's own .tools/bin/s3s-fs, which this
# script builds from crates.io (the pinned version below) when it is missing or another
# version. The build takes a few minutes on two cores; its target directory stays under
# ~/.cache/tally/ so that a later version bump rebuilds only what changed. Progress goes to
# stderr: stdout is the path alone.
set -euo pipefail

S3S_FS_VERSION="0.14.1"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
bin="$tools/bin/s3s-fs"
build_dir="$HOME/.cache/tally/s3s-fs-target"

# s3s-fs --version prints "s3s-fs 0.14.1".
version_of() { "$1" --version 2>/dev/null | sed -n 's/^s3s-fs \([0-9][0-9.]*\)$/\1/p'; }

if [ -n "${TALLY_S3_SERVER:-}" ]; then
  [ -n "$(version_of "$TALLY_S3_SERVER")" ] || {
    echo "TALLY_S3_SERVER=$TALLY_S3_SERVER is not an s3s-fs binary" >&2
    exit 1
  }
  echo "$TALLY_S3_SERVER"; exit 0
fi
if [ -x "$bin" ] && [ "$(version_of "$bin")" = "$S3S_FS_VERSION" ]; then
  echo "$bin"; exit 0
fi

mkdir -p "$tools"
# Two runs at once (two checkouts' scripts/test.sh) build it once.
exec 9>"$tools/.install.lock"
flock 9
if [ ! -x "$bin" ] || [ "$(version_of "$bin")" != "$S3S_FS_VERSION" ]; then
  echo "installing s3s-fs $S3S_FS_VERSION into $tools (cargo install from crates.io; a few minutes)" >&2
  # From the tools directory, so that no cargo configuration of the workspace applies.
  (cd "$tools" && cargo install "s3s-fs@$S3S_FS_VERSION" --features binary --locked --force \
    --root "$tools" --target-dir "$build_dir" --quiet) >&2
fi
[ "$(version_of "$bin")" = "$S3S_FS_VERSION" ] || {
  echo "cargo install left no s3s-fs $S3S_FS_VERSION at $bin" >&2
  exit 1
}
echo "$bin"
