"""DuckDB's time for Tally's billing query over the raw events of one month.

Usage: python duckdb_billing.py LAKE_DIR YYYY-MM RUNS

Reads <LAKE_DIR>/events/date=YYYY-MM-*/*.parquet (a compacted lake with no superseded
files left, as `tally bench query` makes it) with the same SQL as Tally's
queries/billing.sql, materialises the result inside DuckDB (no transfer to Python) and
prints one JSON object: the median seconds of RUNS runs and the answer's lines, events and
quantity, which `tally bench query` checks against its own. DuckDB runs on 2 threads, as
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
    files = f"{lake}/events/date={period}-*/*.parquet"
    query = f"""
        CREATE OR REPLACE TEMP TABLE billed AS
        SELECT customer, plan, feature, '{period}' AS period,
               COUNT(*) AS events,
               SUM(quantity) AS quantity,
               SUM(quantity * CAST(decision = 'accepted' AS DOUBLE)) AS accepted,
               SUM(quantity * CAST(decision = 'overage' AS DOUBLE)) AS overage
        FROM read_parquet('{files}')
        WHERE decision IN ('accepted', 'overage')
        GROUP BY customer, plan, feature
        ORDER BY customer, plan, feature
    """
    times = []
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        con.execute(query)
        times.append(time.perf_counter() - start)
    lines, events, quantity = con.execute(
        "SELECT COUNT(*), SUM(events), SUM(quantity) FROM billed"
    ).fetchone()
    print(
        json.dumps(
            {
                "seconds": statistics.median(times),
                "runs": times,
                "lines": lines,
                "events": int(events),
                "quantity": float(quantity),
            }
        )
    )


if __name__ == "__main__":
    main()
