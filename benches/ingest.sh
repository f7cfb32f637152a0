#!/usr/bin/env bash
# The ingest figures of BENCHMARKS.md: each configuration run RUNS times (default 3) with
# `tally bench ingest --format json`, medians printed as a Markdown table.
#
#   benches/ingest.sh            # release build, then every configuration
#   RUNS=5 benches/ingest.sh
#   RAW=runs.tsv benches/ingest.sh   # also keep every run's JSON line
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
RUNS="${RUNS:-3}"
TALLY_NATS_SERVER="$(scripts/install-nats.sh)"
export TALLY_NATS_SERVER TALLY_LOG=error
cargo build --release --bin tally
tally="${CARGO_TARGET_DIR:-target}/release/tally"

configs=(
  "json-batch100|--events 3000000 --batch 100 --baseline"
  "arrow-batch100|--events 3000000 --batch 100 --arrow --baseline"
  "json-batch100-month-replay|--events 3000000 --batch 100 --replay-month"
  "json-single|--events 600000 --batch 1 --baseline"
  "json-batch100-at-200k/s|--events 2000000 --batch 100 --rate 200000"
  "json-single-at-30k/s|--events 300000 --batch 1 --rate 30000"
  "json-batch100-1M-events|--events 1000000 --batch 100"
  "arrow-batch100-1M-events|--events 1000000 --batch 100 --arrow"
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
print("| configuration | runs | events/s (median) | JetStream alone, events/s | ratio | latency p50 / p99 / p999 ms | CPU µs per event: Tally process / nats-server (JetStream alone) |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for name, runs in rows.items():
    def med(k, sub=None):
        vals = [r[k] if sub is None else r[k][sub] for r in runs if r.get(k) is not None]
        return statistics.median(vals) if vals else None
    eps, base, ratio = med("events_per_sec"), med("baseline_events_per_sec"), med("ratio_to_baseline")
    lat = "/".join(str(round(med(k))) for k in ("latency_ms_p50", "latency_ms_p99", "latency_ms_p999"))
    cpu = ""
    if med("cpu_us_per_event", "this_process") is not None:
        cpu = f"{med('cpu_us_per_event', 'this_process'):.2f} / {med('cpu_us_per_event', 'nats_server'):.2f}"
        if base is not None:
            cpu += f" ({med('baseline_cpu_us_per_event', 'this_process'):.2f} / {med('baseline_cpu_us_per_event', 'nats_server'):.2f})"
    print(f"| {name} | {len(runs)} | {eps:,.0f} | {'' if base is None else f'{base:,.0f}'} | {'' if ratio is None else f'{ratio:.0%}'} | {lat} | {cpu} |")
PY
if [ -n "${RAW:-}" ]; then cp "$out" "$RAW"; fi
rm -f "$out"
