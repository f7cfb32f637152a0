#!/usr/bin/env bash
# Runs a command (a test binary, as cargo's target runner) with the system clock moved by
# $MOVED_CLOCK (a libfaketime offset such as +34214400, in seconds), so that no test passes
# only on today's date. (Not TALLY_…: tally reads those variables as configuration.) An
# offset, not a fixed start, so that every process of a test (the `tally` it runs, Python)
# shares one moved clock. Only the wall clock moves: timers and timeouts keep the real
# monotonic clock. libfaketime is preloaded directly: the `faketime` wrapper names a
# semaphore after its process id, and one left by a killed process makes a later wrapper
# with that id fail.
set -euo pipefail
lib=/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1
[ -e "$lib" ] || lib="$(dpkg -L libfaketime 2>/dev/null | grep -m1 'libfaketimeMT.so.1$')"
export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
export FAKETIME="${MOVED_CLOCK:?set MOVED_CLOCK to a libfaketime offset}"
export FAKETIME_DONT_FAKE_MONOTONIC=1
exec "$@"
