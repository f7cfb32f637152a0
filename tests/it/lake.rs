//! The lake's Delta tables from outside: read by engines that are not Tally (delta-rs's
//! Python binding and polars, installed in `.venv` by `scripts/install-lake-readers.sh`)
//! while a compaction replaces files and after it, and made from a lake of the directory
//! layout by `tally lake migrate`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Datelike;
use serde_json::Value;

/// How an engine reads the events table at `table`: prints `<engine> <table version>
/// <rows> <distinct event ids>`, read from the files' data.
const READ: &str = r#"
import sys
from deltalake import DeltaTable
import polars as pl

def read(table, engine):
    dt = DeltaTable(table)
    if engine == "deltalake":
        ids = dt.to_pyarrow_dataset().to_table(columns=["event_id"])
        n, distinct = ids.num_rows, ids.group_by(["event_id"]).aggregate([]).num_rows
    else:
        counts = pl.scan_delta(dt).select(
            pl.len().alias("n"), pl.col("event_id").n_unique().alias("d")
        ).collect()
        n, distinct = counts["n"][0], counts["d"][0]
    print(engine, dt.version(), n, distinct, flush=True)
"#;

/// Reads the events table `argv[1]` in a loop, alternating delta-rs and polars, until the
/// file `argv[2]` exists.
const LOOP: &str = r#"
import os
table, stop = sys.argv[1], sys.argv[2]
i = 0
while not os.path.exists(stop):
    read(table, ("deltalake", "polars")[i % 2])
    i += 1
print("stopped", flush=True)
"#;

fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/install-lake-readers.sh",
        python.display()
    );
    python
}

/// Runs `command`, which must succeed: its stdout.
fn stdout_of(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `tally … --data-dir <data>`, which must succeed: its stdout.
fn tally(data: &Path, args: &[&str]) -> String {
    stdout_of(
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .env("TALLY_INGEST__FLUSH_MESSAGES", "10")
            .env("TALLY_LOG", "warn")
            .args(args)
            .arg("--data-dir")
            .arg(data),
    )
}

/// One read by the other engine: `(engine, version, rows, distinct events)`.
fn read_once(table: &Path, engine: &str) -> Read {
    let script = format!("{READ}\nread(sys.argv[1], sys.argv[2])\n");
    let out = stdout_of(
        Command::new(python())
            .args(["-c", &script])
            .arg(table)
            .arg(engine),
    );
    parse(out.trim())
}

type Read = (String, u64, u64, u64);

fn parse(line: &str) -> Read {
    let mut parts = line.split_whitespace();
    let mut next = || {
        parts
            .next()
            .unwrap_or_else(|| panic!("a reader's line: {line}"))
    };
    let engine = next().to_owned();
    (
        engine,
        next().parse().unwrap(),
        next().parse().unwrap(),
        next().parse().unwrap(),
    )
}

#[test]
fn delta_rs_and_polars_count_every_event_once_during_and_after_a_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    // Last month, every date of it closed: compaction merges them whole, whatever the day.
    let today = chrono::Utc::now().date_naive();
    let last_month = (today - chrono::Days::new(u64::from(today.day())))
        .format("%Y-%m")
        .to_string();
    let demo = tally(
        &data,
        &[
            "demo",
            "--month",
            &last_month,
            "--events",
            "20000",
            "--customers",
            "100",
            "--format",
            "json",
        ],
    );
    let report: Value = serde_json::from_str(demo.lines().last().unwrap()).unwrap();
    let events = report["events_in_lake"].as_u64().unwrap();
    assert!(events > 0, "{report}");
    let table = data.join("lake/events");

    let stop = dir.path().join("stop");
    let mut reader = Command::new(python())
        .args(["-c", &format!("{READ}{LOOP}")])
        .arg(&table)
        .arg(&stop)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(reader.stdout.take().unwrap()).lines();
    let mut reads = Vec::new();
    reads.push(parse(&lines.next().unwrap().unwrap()));
    let before = reads[0].1;

    // Compaction commits while the reader reads: the inputs stay on disk for the
    // retention, so a read planned before a commit finds its files.
    let compacted: Value =
        serde_json::from_str(&tally(&data, &["compact", "--format", "json"])).unwrap();
    assert!(compacted["written"].as_u64().unwrap() > 0, "{compacted}");
    // Reads go on until both engines have read a version after the compaction.
    let started = Instant::now();
    let mut after = std::collections::HashSet::new();
    while after.len() < 2 {
        assert!(started.elapsed() < Duration::from_secs(120), "{reads:?}");
        let read = parse(
            &lines
                .next()
                .expect("the reader ended (its error is above)")
                .unwrap(),
        );
        if read.1 > before {
            after.insert(read.0.clone());
        }
        reads.push(read);
    }
    std::fs::write(&stop, "").unwrap();
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert_eq!(rest.last().map(String::as_str), Some("stopped"));
    reads.extend(rest[..rest.len() - 1].iter().map(|l| parse(l)));
    let status = reader.wait().unwrap();
    assert!(status.success());

    let wrong: Vec<_> = reads
        .iter()
        .filter(|r| (r.2, r.3) != (events, events))
        .collect();
    assert!(wrong.is_empty(), "{events} events, read {wrong:?}");

    // After the retention (none asked for), the replaced files are gone from the disk, and
    // both engines still count every event once.
    let vacuumed: Value = serde_json::from_str(&tally(
        &data,
        &["compact", "--retain-secs", "0", "--format", "json"],
    ))
    .unwrap();
    assert!(vacuumed.is_object(), "{vacuumed}");
    for engine in ["deltalake", "polars"] {
        let (_, version, rows, distinct) = read_once(&table, engine);
        assert!(version > before);
        assert_eq!((rows, distinct), (events, events), "{engine}");
    }
}

/// Rows, billable rows and billable quantity of Parquet files read directly.
fn fold(files: &[PathBuf]) -> (u64, u64, f64) {
    use arrow::array::{AsArray, Float64Array};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let (mut rows, mut billable, mut quantity) = (0, 0, 0.0);
    for f in files {
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            rows += batch.num_rows() as u64;
            let decisions = batch.column_by_name("decision").unwrap().as_string::<i32>();
            let quantities = batch
                .column_by_name("quantity")
                .unwrap()
                .as_any()
                .downcast_ref::<Float64Array>()
                .unwrap();
            for i in 0..batch.num_rows() {
                if matches!(decisions.value(i), "accepted" | "overage") {
                    billable += 1;
                    quantity += quantities.value(i);
                }
            }
        }
    }
    (rows, billable, quantity)
}

#[tokio::test]
async fn a_directory_lake_migrates_to_tables_with_every_event_once_and_the_same_bill() {
    // Part of a lake the directory layout wrote (a demo's): five events files of two
    // partitions over two dates (one batch spans midnight), their rollups, a rollup whose
    // events file never appeared (an orphan) and an unfinished `.tmp` write.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/legacy-lake");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let lake_dir = data.join("lake");
    copy_dir(&fixture, &lake_dir);
    let events_files: Vec<PathBuf> = walk(&lake_dir.join("events"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    assert_eq!(events_files.len(), 5);
    let (rows, billable, quantity) = fold(&events_files);
    assert!(billable > 0 && billable < rows);

    let out: Value =
        serde_json::from_str(&tally(&data, &["lake", "migrate", "--format", "json"])).unwrap();
    assert_eq!(out["events_files"], 5, "{out}");
    assert_eq!(out["events_rows"], rows, "{out}");
    assert_eq!(out["rollup_files"], 5, "{out}");
    assert_eq!(
        out["left_out"], 2,
        "the orphan rollup and the .tmp file: {out}"
    );
    assert_eq!(out["partitions"], serde_json::json!({"0": 1573, "1": 2003}));

    // Tally reads the tables: every event once, and billing's usage from the rollups
    // equals the fold over the events files.
    let lake = tally_store::Lake::new(&lake_dir);
    assert_eq!(lake.rows().unwrap(), rows);
    assert_eq!(
        (lake.version_of(0).unwrap(), lake.version_of(1).unwrap()),
        (1573, 2003)
    );
    let house = tally_query::Lakehouse::open(&tally_store::Location::Local(lake_dir.clone()))
        .await
        .unwrap();
    let month = chrono::NaiveDate::from_ymd_opt(2026, 12, 1).unwrap();
    let billed = tally_query::BillingTotals::of(
        &house
            .billing(
                &tally_query::Scope::Month(tally_query::Period::of(month)),
                None,
            )
            .await
            .unwrap(),
    );
    assert_eq!(billed.events, billable);
    assert!(
        (billed.quantity - quantity).abs() < 1e-6,
        "{} ≠ {quantity}",
        billed.quantity
    );
    // And so does another engine.
    for engine in ["deltalake", "polars"] {
        let (_, _, read, distinct) = read_once(&lake_dir.join("events"), engine);
        assert_eq!((read, distinct), (rows, rows), "{engine}");
    }

    // A second run refuses: the tables are Delta tables already.
    let again = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["lake", "migrate", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("is a Delta table already"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
