"""DuckDB's time for a meter query over the raw events of one month: the SUM of
`$.tokens` of the `prompt` events by customer and UTC day, read from each event's `data`
with the same JSON extraction Tally's raw meter query does.

Usage: python duckdb_meters.py LAKE_DIR YYYY-MM RUNS

Reads <LAKE_DIR>/events/date=YYYY-MM-*/*.parquet (a compacted lake with no superseded
files left, as `tally bench meters` makes it), materialises the answer inside DuckDB RUNS
times and prints one JSON object: the median time, the answer's rows and the total of its
values, which `tally bench meters` checks against its own. DuckDB runs on 2 threads, as
many as the machine has cores. Installed by benches/query.sh into the project's virtual
environment: DuckDB is never a dependency of Tally.
"""

import json
import statistics
import sys
import time

import duckdb


def main() -> None:
    lake, period, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    con = duckdb.connect()
    con.execute("SET threads = 2")
    con.execute("SET TimeZone = 'UTC'")
    files = f"{lake}/events/date={period}-*/*.parquet"
    query = f"""
        CREATE OR REPLACE TEMP TABLE answer AS
        SELECT customer, date_trunc('day', event_time) AS day, SUM(tokens) AS value
        FROM (
            SELECT customer, event_time,
                   TRY_CAST(json_extract_string(data, '$.tokens') AS DOUBLE) AS tokens
            FROM read_parquet('{files}')
            WHERE event_type = 'prompt'
              AND decision IN ('accepted', 'overage', 'late', 'metered')
        )
        WHERE tokens IS NOT NULL
        GROUP BY customer, day
    """
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        con.execute(query)
        times.append(time.perf_counter() - start)
    rows, total = con.execute("SELECT COUNT(*), SUM(value) FROM answer").fetchone()
    print(json.dumps({"seconds": statistics.median(times), "rows": rows, "total": total}))


if __name__ == "__main__":
    main()
