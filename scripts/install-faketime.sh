#!/usr/bin/env bash
# Makes sure `faketime` (Debian's package, libfaketime) is available for the suite's
# moved-clock run, installing it with apt-get when it is missing.
set -euo pipefail
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 ] && exit 0
echo "installing faketime (Debian package) for the moved-clock run" >&2
if [ "$(id -u)" -ne 0 ]; then
  echo "faketime is missing and this is not root: run 'sudo apt-get install faketime'" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq faketime >/dev/null 2>&1 || {
  apt-get update -qq >/dev/null
  apt-get install -y -qq faketime >/dev/null
}
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 ]
