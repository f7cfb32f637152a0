//! `tally sql` as a person runs it, over a lake of real Parquet files.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMicrosecondArray, UInt8Array,
    UInt16Array, UInt64Array,
};
use tally_core::schema::lake_schema;
use tally_core::{Decision, Fence, SealedBatch};
use tally_store::Lake;

/// A data directory whose lake holds 60 events of 2026-11-01: event `i` of customer
/// `acme`, `globex`, `initech` by `i % 3`, quantity `i`.
fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let n = 60_usize;
    let i: Vec<u64> = (0..n as u64).collect();
    let text = |f: &dyn Fn(u64) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(i.iter().map(|&i| f(i))))
    };
    let t0 = 20_758 * 86_400_000_000_i64; // 2026-11-01T00:00:00Z
    let ts = |v: Vec<i64>| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
    };
    let batch = RecordBatch::try_new(
        lake_schema(),
        vec![
            text(&|i| format!("e{i}")),
            text(&|i| ["acme", "globex", "initech"][(i % 3) as usize].to_owned()),
            text(&|_| "calls".to_owned()),
            Arc::new(Float64Array::from_iter_values(i.iter().map(|&i| i as f64))),
            ts(i.iter().map(|&i| t0 + i as i64 * 60_000_000).collect()),
            Arc::new(StringArray::from(vec![None::<&str>; n])),
            Arc::new(StringArray::from(vec![None::<&str>; n])),
            text(&|_| "src".to_owned()),
            text(&|_| "type".to_owned()),
            Arc::new(StringArray::from(vec![None::<&str>; n])),
            text(&|_| "accepted".to_owned()),
            ts(vec![t0; n]),
            Arc::new(UInt64Array::from_iter_values(i.iter().map(|i| i + 1))),
            Arc::new(UInt16Array::from(vec![0; n])),
            text(&|_| "pro".to_owned()),
            Arc::new(UInt8Array::from(vec![Decision::Accepted.code(); n])),
        ],
    )
    .unwrap();
    let sealed = SealedBatch {
        partition: 0,
        first_seq: 1,
        last_seq: n as u64,
        after_seq: None,
        batch,
    };
    Lake::new(dir.path().join("lake"))
        .write(&sealed, &Fence::open())
        .unwrap();
    dir
}

fn tally_sql(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("sql")
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env("TALLY_LOG", "warn")
        .output()
        .unwrap()
}

const BY_CUSTOMER: &str = "SELECT customer, COUNT(*) AS events, SUM(quantity) AS quantity
                           FROM events GROUP BY customer ORDER BY customer";

#[test]
fn sql_prints_a_query_as_csv_json_and_arrow() {
    let data = data_dir();
    let output = tally_sql(data.path(), &[BY_CUSTOMER, "--format", "csv"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        "customer,events,quantity\nacme,20,570.0\nglobex,20,590.0\ninitech,20,610.0\n"
    );

    let output = tally_sql(data.path(), &[BY_CUSTOMER, "--format", "json"]);
    assert!(output.status.success());
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        json,
        serde_json::json!([
            {"customer": "acme", "events": 20, "quantity": 570.0},
            {"customer": "globex", "events": 20, "quantity": 590.0},
            {"customer": "initech", "events": 20, "quantity": 610.0},
        ])
    );

    let output = tally_sql(data.path(), &[BY_CUSTOMER, "--format", "arrow"]);
    assert!(output.status.success());
    let reader =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(output.stdout), None)
            .unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 3);

    let output = tally_sql(data.path(), &[BY_CUSTOMER]);
    assert!(output.status.success());
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(
        table.contains("| globex   | 20     | 590.0    |"),
        "{table}"
    );
}

#[test]
fn sql_refuses_what_is_not_a_query_and_exits_non_zero() {
    let data = data_dir();
    for (query, named) in [
        (
            "DROP TABLE events",
            "refused: DROP TABLE defines tables or views (DDL)",
        ),
        (
            "INSERT INTO events SELECT * FROM events",
            "refused: INSERT modifies data (DML)",
        ),
        (
            "COPY events TO '/tmp/tally-sql-copy.csv'",
            "refused: COPY reads or writes files",
        ),
        (
            "SELECT * FROM read_parquet('/etc/passwd')",
            "refused: table function read_parquet(…) is not allowed",
        ),
        ("SELECT 1; SELECT 2", "refused: 2 statements given"),
        ("SELECT * FROM invoices", "unknown table invoices"),
    ] {
        let output = tally_sql(data.path(), &[query, "--format", "csv"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{query} succeeded");
        assert!(stderr.contains(named), "{query}: {stderr}");
        assert!(output.stdout.is_empty(), "{query}");
    }
    assert!(!Path::new("/tmp/tally-sql-copy.csv").exists());
    let output = tally_sql(
        data.path(),
        &["SELECT COUNT(*) AS n FROM events", "--format", "csv"],
    );
    assert_eq!(String::from_utf8(output.stdout).unwrap(), "n\n60\n");
}

#[test]
fn sql_stops_a_query_at_its_time_limit() {
    let data = data_dir();
    let started = Instant::now();
    let output = tally_sql(
        data.path(),
        &[
            "SELECT SUM(a.value + b.value) AS s FROM range(100000) a CROSS JOIN range(100000) b",
            "--format",
            "csv",
            "--timeout-secs",
            "1",
        ],
    );
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("time limit of 1 s exceeded; the query was cancelled"),
        "{stderr}"
    );
    // The process ends with the query, not when the work it started would.
    assert!(elapsed < Duration::from_secs(8), "{elapsed:?}");
}

/// A query over the lake alone needs no NATS; one that names a definitions' table reads
/// them from NATS, and says so when it cannot.
#[test]
fn sql_reads_nats_only_for_the_definitions_tables() {
    let data = data_dir();
    let unreachable = ["--nats-url", "nats://127.0.0.1:9"];
    let csv = |query: &str| -> String {
        let output = tally_sql(
            data.path(),
            &[&[query, "--format", "csv"][..], &unreachable].concat(),
        );
        assert!(
            output.status.success(),
            "{query}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(csv(BY_CUSTOMER).lines().count(), 4);
    // The lake's decisions beside its events, no NATS either.
    assert_eq!(
        csv("SELECT d.decision, d.billable, COUNT(*) AS events
             FROM events e JOIN decisions d ON e.decision_code = d.code
             GROUP BY d.decision, d.billable"),
        "decision,billable,events\naccepted,true,60\n"
    );

    let output = tally_sql(
        data.path(),
        &[
            &["SELECT * FROM plans", "--format", "csv"][..],
            &unreachable,
        ]
        .concat(),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("reading the definitions the query's tables hold"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
}
