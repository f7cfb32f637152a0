"""DuckDB's time for Tally's billing query over the raw events of one month.

Usage: python duckdb_billing.py LAKE_DIR YYYY-MM RUNS

Reads <LAKE_DIR>/events/date=YYYY-MM-*/*.parquet (a compacted lake with no superseded
files left, as `tally bench query` makes it) and computes the month's billing lines in
three ways, each materialised inside DuckDB (no transfer to Python):

- `billing.sql`: Tally's own query (crates/tally-query/queries/billing.sql), word for word,
  over the files with `events` = 1 per row, as Tally runs it;
- `codes, WHERE`: the billable rows picked by a WHERE on `decision_code`, split by it;
- `names, WHERE`: the same by the decision's name, as a query written without the codes
  would be.

DuckDB's time is the fastest of the three medians of RUNS runs: Tally is measured against
DuckDB's best way over the same files, not against one it runs slowly. Prints one JSON
object: that time, each form's median, and the answer's lines, events and quantity, which
must be the same in every form and which `tally bench query` checks against its own.
DuckDB runs on 2 threads, as many as the machine has cores. Installed by benches/query.sh
into the project's virtual environment: DuckDB is never a dependency of Tally.
"""

import json
import pathlib
import statistics
import sys
import time

import duckdb

BILLING_SQL = (
    pathlib.Path(__file__).resolve().parent.parent
    / "crates/tally-query/queries/billing.sql"
)


def forms(files: str, period: str) -> dict:
    events = f"(SELECT *, 1 AS events FROM read_parquet('{files}')) AS billed_events"
    tally = (
        BILLING_SQL.read_text()
        .replace("FROM billed_events", f"FROM {events}")
        .replace("$1", f"'{period}'")
    )
    where = """
        SELECT customer, plan, feature, '{period}' AS period,
               COUNT(*) AS events,
               SUM(quantity) AS quantity,
               SUM(quantity * CAST({accepted} AS DOUBLE)) AS accepted,
               SUM(quantity * CAST({overage} AS DOUBLE)) AS overage
        FROM read_parquet('{files}')
        WHERE {billable}
        GROUP BY customer, plan, feature
        ORDER BY customer, plan, feature
    """
    by = {
        "codes, WHERE": ("decision_code = 0", "decision_code = 1", "decision_code < 2"),
        "names, WHERE": (
            "decision = 'accepted'",
            "decision = 'overage'",
            "decision IN ('accepted', 'overage')",
        ),
    }
    queries = {"billing.sql": tally}
    for name, (accepted, overage, billable) in by.items():
        queries[name] = where.format(
            period=period,
            files=files,
            accepted=accepted,
            overage=overage,
            billable=billable,
        )
    return queries


def main() -> None:
    lake, period, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    con = duckdb.connect()
    con.execute("SET threads = 2")
    files = f"{lake}/events/date={period}-*/*.parquet"
    medians, answers = {}, {}
    for name, query in forms(files, period).items():
        times = []
        for _ in range(max(runs, 1)):
            start = time.perf_counter()
            con.execute(f"CREATE OR REPLACE TEMP TABLE billed AS {query}")
            times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times)
        lines, events, quantity = con.execute(
            "SELECT COUNT(*), SUM(events), SUM(quantity) FROM billed"
        ).fetchone()
        answers[name] = (lines, int(events), float(quantity))
    if len(set(answers.values())) != 1:
        sys.exit(f"the forms' answers differ: {answers}")
    lines, events, quantity = next(iter(answers.values()))
    print(
        json.dumps(
            {
                "seconds": min(medians.values()),
                "forms": medians,
                "lines": lines,
                "events": events,
                "quantity": quantity,
            }
        )
    )


if __name__ == "__main__":
    main()
