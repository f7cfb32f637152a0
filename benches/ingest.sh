#!/usr/bin/env bash
# The ingest figures of BENCHMARKS.md: each configuration run RUNS times (default 3) with
# `tally bench ingest --format json`, medians printed as a Markdown table.
#
#   benches/ingest.sh            # release build, then every configuration
#   RUNS=5 benches/ingest.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
RUNS="${RUNS:-3}"
TALLY_NATS_SERVER="$(scripts/install-nats.sh)"
export TALLY_NATS_SERVER TALLY_LOG=error
cargo build --release --bin tally
tally="${CARGO_TARGET_DIR:-target}/release/tally"

configs=(
  "json-batch100|--events 1000000 --batch 100 --baseline"
  "arrow-batch100|--events 1000000 --batch 100 --arrow --baseline"
  "json-batch100-month-replay|--events 1000000 --batch 100 --replay-month"
  "json-single|--events 200000 --batch 1 --baseline"
  "json-batch100-at-200k/s|--events 2000000 --batch 100 --rate 200000"
  "json-single-at-30k/s|--events 300000 --batch 1 --rate 30000"
)
out="$(mktemp)"
for c in "${configs[@]}"; do
  name="${c%%|*}"; args="${c#*|}"
  for _ in $(seq "$RUNS"); do
    # shellcheck disable=SC2086
    printf '%s\t%s\n' "$name" "$("$tally" bench ingest $args --format json | tail -n 1)" >> "$out"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, doc = line.rstrip("\n").split("\t", 1)
    rows.setdefault(name, []).append(json.loads(doc))
print("| configuration | runs | events/s (median) | JetStream alone, events/s | ratio | latency p50 / p99 / p999 ms |")
print("| --- | --- | --- | --- | --- | --- |")
for name, runs in rows.items():
    med = lambda k: statistics.median(r[k] for r in runs if r.get(k) is not None) if any(r.get(k) is not None for r in runs) else None
    eps, base, ratio = med("events_per_sec"), med("baseline_events_per_sec"), med("ratio_to_baseline")
    lat = "/".join(str(round(med(k))) for k in ("latency_ms_p50", "latency_ms_p99", "latency_ms_p999"))
    print(f"| {name} | {len(runs)} | {eps:,.0f} | {'' if base is None else f'{base:,.0f}'} | {'' if ratio is None else f'{ratio:.0%}'} | {lat} |")
PY
rm -f "$out"
