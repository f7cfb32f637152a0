#!/usr/bin/env bash
# The whole check, as CI runs it: formatting, clippy with warnings as errors, and every
# test (unit, schema, Parquet, end-to-end against real nats-server and S3 server processes),
# twice: on today's clock and on a moved one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
TALLY_NATS_SERVER="$(scripts/install-nats.sh)"
export TALLY_NATS_SERVER
echo "using $("$TALLY_NATS_SERVER" -v)"
# The S3-compatible server the lake's object-store tests run against (tools/s3-server, built
# the first time: a few minutes).
TALLY_S3_SERVER="$(scripts/install-s3.sh)"
export TALLY_S3_SERVER
echo "using $("$TALLY_S3_SERVER" --version)"
# deltalake and polars in .venv, for the test that reads the lake with another engine.
scripts/install-lake-readers.sh >/dev/null
# OpenMeter's JavaScript SDK (pinned) and node, for the test that drives Tally with it.
scripts/install-openmeter-sdk.sh >/dev/null
# The portal's browser test needs a headless Chromium; without one it skips (never fails).
scripts/install-browser.sh >/dev/null || true
scripts/install-faketime.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The tests whose subject is surviving faults and running on other engines rather than
# dates: process and node kills, a NATS cluster, the S3 server, Ballista, compose files,
# the engines that read the lake beside Tally, partition ownership, a query's time limit.
# They take half the suite's time; their events are dated by the same code as those of
# the tests that run on the moved clock too.
infrastructure='test(/^chaos::/) | test(/^ballista::/) | test(/^compose::/)
  | test(/^ownership::/) | package(tally-natsd)
  | test(=lake::delta_rs_and_polars_count_every_event_once_during_and_after_a_compaction)
  | test(=faults::ingest_rides_out_a_nats_restart_and_an_unwritable_lake)
  | test(=cli::serve_drains_on_sigterm_and_a_restart_loses_nothing)
  | test(=cli::a_killed_worker_strands_nothing_it_had_not_made_durable)
  | test(=a_query_over_the_time_limit_is_cancelled)'
if cargo nextest --version >/dev/null 2>&1; then
  run=(cargo nextest run --workspace --no-fail-fast)
  again=("${run[@]}" -E "not ($infrastructure)")
else
  run=(cargo test --workspace --no-fail-fast)
  again=("${run[@]}")
fi
"${run[@]}"
# Once more with the clock moved to 00:30 UTC on the first day of a month about a year
# ahead: no test may pass only on today's date, or only in the middle of a month. Each
# test binary runs under faketime (cargo's target runner); the build is the same. With
# nextest, the infrastructure tests above run once, on today's clock.
moved="$(date -u -d "$(date -u +%Y-%m-01) +13 months" +%Y-%m-01) 00:30:00"
offset=$(($(date -u -d "$moved" +%s) - $(date -u +%s)))
echo "the suite again with the clock at $moved UTC (+${offset} s)"
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$root/scripts/moved-clock.sh" \
  MOVED_CLOCK="+$offset" "${again[@]}"
