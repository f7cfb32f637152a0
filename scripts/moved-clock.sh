#!/usr/bin/env bash
# Runs a command (a test binary, as cargo's target runner) with the system clock moved by
# $MOVED_CLOCK (a faketime offset such as +34214400, in seconds), so that no test passes
# only on today's date. (Not TALLY_…: tally reads those variables as configuration.) An
# offset, not a fixed start, so that every process of a test (the `tally` it runs, Python)
# shares one moved clock. Only the wall clock moves: timers and timeouts keep the real
# monotonic clock.
set -euo pipefail
export FAKETIME_DONT_FAKE_MONOTONIC=1
exec faketime -f "${MOVED_CLOCK:?set MOVED_CLOCK to a faketime offset}" "$@"
