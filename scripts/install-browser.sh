#!/usr/bin/env bash
# Makes sure a headless Chromium is available for the portal's browser test
# (tests/api_portal.rs) and prints its path; installs Debian's `chromium` package with
# apt-get when it is missing and this runs as root (or with passwordless sudo).
# Never fails the check: without a browser the test prints why it skipped.
set -uo pipefail

for name in chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; exit 0; fi
done
sudo=""
if [ "$(id -u)" != 0 ]; then
  if sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    echo "no chromium, and not root: the portal's browser test will skip (apt-get install chromium)" >&2
    exit 0
  fi
fi
echo "installing chromium (apt-get) for the portal's browser test" >&2
if $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >&2 \
  || { $sudo apt-get update >&2 && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >&2; }; then
  command -v chromium || true
else
  echo "could not install chromium: the portal's browser test will skip" >&2
fi
exit 0
