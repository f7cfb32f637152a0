//! `tally_query::sql`: read-only queries over a lake of real Parquet files, what is
//! refused, the memory and time limits, and the streamed formats.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
    UInt8Array, UInt16Array, UInt64Array,
};
use datafusion::arrow::compute::{cast, concat_batches};
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::catalog::{MemTable, TableFunctionArgs, TableFunctionImpl, TableProvider};
use futures::StreamExt;
use tally_core::schema::lake_schema;
use tally_core::{Decision, Fence, SealedBatch};
use tally_query::output::{OutputFormat, write_stream};
use tally_query::sql::{self, Refusal, SqlError};
use tally_query::{Lakehouse, LakehouseOptions};
use tally_store::Lake;

/// 60 events of partition 5 on 2026-11-01, one a minute: event `i` (0..60) is of customer
/// `acme`, `globex`, `initech` by `i % 3`, feature `calls` / `storage` by `i % 2`,
/// quantity `i`, region null when `i % 4 == 0`, else `eu` / `us` by `i % 2`.
fn write_lake(root: &Path) {
    let n = 60_u64;
    let i: Vec<u64> = (0..n).collect();
    let strings = |f: &dyn Fn(u64) -> Option<String>| -> ArrayRef {
        Arc::new(StringArray::from(
            i.iter().map(|&i| f(i)).collect::<Vec<_>>(),
        ))
    };
    let t0 = 20_758 * 86_400_000_000_i64; // 2026-11-01T00:00:00Z
    let ts = |v: Vec<i64>| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
    };
    let batch = RecordBatch::try_new(
        lake_schema(),
        vec![
            strings(&|i| Some(format!("e{i}"))),
            strings(&|i| Some(["acme", "globex", "initech"][(i % 3) as usize].to_owned())),
            strings(&|i| Some(["calls", "storage"][(i % 2) as usize].to_owned())),
            Arc::new(Float64Array::from_iter_values(i.iter().map(|&i| i as f64))),
            ts(i.iter().map(|&i| t0 + i as i64 * 60_000_000).collect()),
            strings(&|i| (i % 4 != 0).then(|| ["eu", "us"][(i % 2) as usize].to_owned())),
            strings(&|_| None),
            strings(&|_| Some("src".to_owned())),
            strings(&|_| Some("type".to_owned())),
            strings(&|_| None),
            strings(&|_| Some("accepted".to_owned())),
            ts(vec![t0; n as usize]),
            Arc::new(UInt64Array::from_iter_values(i.iter().map(|i| i + 1))),
            Arc::new(UInt16Array::from(vec![5; n as usize])),
            strings(&|_| Some("pro".to_owned())),
            Arc::new(UInt8Array::from(vec![
                Decision::Accepted.code();
                n as usize
            ])),
        ],
    )
    .unwrap();
    let sealed = SealedBatch {
        partition: 5,
        first_seq: 1,
        last_seq: n,
        after_seq: None,
        batch,
    };
    Lake::new(root).write(&sealed, &Fence::open()).unwrap();
}

async fn lake(options: LakehouseOptions) -> (tempfile::TempDir, Lakehouse) {
    let dir = tempfile::tempdir().unwrap();
    write_lake(dir.path());
    let house = Lakehouse::open_with(&tally_store::Location::Local(dir.path().into()), options)
        .await
        .unwrap();
    (dir, house)
}

/// Runs `query` and collects its stream into one batch.
async fn collect(house: &Lakehouse, query: &str) -> Result<RecordBatch, SqlError> {
    let mut stream = sql::run(house, query).await?;
    let schema = stream.schema();
    let mut batches = Vec::new();
    while let Some(batch) = stream.next().await {
        batches.push(batch?);
    }
    Ok(concat_batches(&schema, &batches).unwrap())
}

fn strings(batch: &RecordBatch, column: &str) -> Vec<String> {
    let column = cast(batch.column_by_name(column).unwrap(), &DataType::Utf8).unwrap();
    column
        .as_string::<i32>()
        .iter()
        .map(|v| v.unwrap_or("NULL").to_owned())
        .collect()
}

#[tokio::test]
async fn a_group_by_over_the_lake_returns_the_right_rows() {
    let (_dir, house) = lake(LakehouseOptions::default()).await;
    let result = collect(
        &house,
        "SELECT customer, COUNT(*) AS events, SUM(quantity) AS quantity
         FROM events GROUP BY customer ORDER BY customer",
    )
    .await
    .unwrap();
    assert_eq!(strings(&result, "customer"), ["acme", "globex", "initech"]);
    let events: Vec<i64> = result
        .column_by_name("events")
        .unwrap()
        .as_primitive::<Int64Type>()
        .values()
        .to_vec();
    assert_eq!(events, [20, 20, 20]);
    let quantity: Vec<f64> = result
        .column_by_name("quantity")
        .unwrap()
        .as_primitive::<Float64Type>()
        .values()
        .to_vec();
    // 0 + 3 + … + 57, 1 + 4 + … + 58, 2 + 5 + … + 59.
    assert_eq!(quantity, [570.0, 590.0, 610.0]);

    // The rollups table, a CTE, a join and an allowed table function.
    let result = collect(
        &house,
        "WITH r AS (SELECT feature, SUM(events) AS n FROM rollups GROUP BY feature)
         SELECT r.feature, CAST(r.n AS BIGINT) AS n, s.value
         FROM r JOIN range(1, 3) s ON (s.value = 1 AND r.feature = 'calls')
                                   OR (s.value = 2 AND r.feature = 'storage')
         ORDER BY r.feature",
    )
    .await
    .unwrap();
    assert_eq!(strings(&result, "feature"), ["calls", "storage"]);
    assert_eq!(strings(&result, "n"), ["30", "30"]);
    assert_eq!(strings(&result, "value"), ["1", "2"]);
}

/// A table function that reads a "file", registered the way an extension would: the
/// allow-list refuses it although the session has it.
#[derive(Debug)]
struct ReadsFiles;

impl TableFunctionImpl for ReadsFiles {
    fn call_with_args(
        &self,
        _args: TableFunctionArgs,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let lines: ArrayRef = Arc::new(StringArray::from(vec!["root:x:0:0:root:/root"]));
        let batch = RecordBatch::try_from_iter([("line", lines)])?;
        Ok(Arc::new(MemTable::try_new(
            batch.schema(),
            vec![vec![batch]],
        )?))
    }
}

#[tokio::test]
async fn every_kind_of_statement_that_is_not_a_query_is_refused() {
    let (dir, house) = lake(LakehouseOptions::default()).await;
    let target = dir.path().join("copied.csv");
    let copy_table = format!("COPY events TO '{}' STORED AS CSV", target.display());
    let copy_query = format!(
        "COPY (SELECT * FROM events) TO '{}' STORED AS CSV",
        target.display()
    );
    let ddl = |kind: &str| Refusal::Ddl(kind.to_owned());
    let dml = |kind: &str| Refusal::Dml(kind.to_owned());
    let cases: Vec<(&str, Refusal)> = vec![
        ("CREATE TABLE t (x INT)", ddl("CREATE TABLE")),
        (
            "CREATE TABLE t AS SELECT * FROM events",
            ddl("CREATE TABLE"),
        ),
        (
            "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
            ddl("CREATE EXTERNAL TABLE"),
        ),
        ("CREATE VIEW v AS SELECT * FROM events", ddl("CREATE VIEW")),
        ("CREATE SCHEMA s", ddl("CREATE SCHEMA")),
        ("DROP TABLE events", ddl("DROP TABLE")),
        ("DROP VIEW IF EXISTS v", ddl("DROP VIEW")),
        ("ALTER TABLE events RENAME TO e", ddl("ALTER TABLE")),
        ("SELECT * INTO t FROM events", ddl("SELECT … INTO")),
        ("INSERT INTO events SELECT * FROM events", dml("INSERT")),
        ("DELETE FROM events WHERE quantity > 0", dml("DELETE")),
        ("UPDATE events SET quantity = 0", dml("UPDATE")),
        ("TRUNCATE TABLE events", dml("TRUNCATE")),
        (&copy_table, Refusal::Copy("COPY".to_owned())),
        (&copy_query, Refusal::Copy("COPY".to_owned())),
        (
            "SET datafusion.execution.batch_size = 1",
            Refusal::Config("SET".to_owned()),
        ),
        (
            "RESET datafusion.execution.batch_size",
            Refusal::Config("RESET".to_owned()),
        ),
        ("EXPLAIN SELECT 1", Refusal::NotAQuery("EXPLAIN".to_owned())),
        ("SHOW TABLES", Refusal::NotAQuery("SHOW TABLES".to_owned())),
        ("SELECT 1; SELECT 2", Refusal::MultipleStatements(2)),
        (
            "SELECT * FROM events; DROP TABLE events",
            Refusal::MultipleStatements(2),
        ),
        ("  -- nothing\n", Refusal::Empty),
        (
            "SELECT * FROM read_parquet('/etc/passwd')",
            Refusal::TableFunction("read_parquet".to_owned()),
        ),
        (
            "SELECT COUNT(*) FROM (SELECT * FROM Read_CSV('/etc/passwd'))",
            Refusal::TableFunction("read_csv".to_owned()),
        ),
        (
            "WITH x AS (SELECT * FROM parquet_metadata('/etc/passwd')) SELECT * FROM x",
            Refusal::TableFunction("parquet_metadata".to_owned()),
        ),
        (
            "SELECT * FROM events WHERE customer IN (SELECT line FROM read_json('/etc/passwd'))",
            Refusal::TableFunction("read_json".to_owned()),
        ),
        (
            "SELECT * FROM read_avro('/etc/passwd')",
            Refusal::TableFunction("read_avro".to_owned()),
        ),
    ];
    // Registered, so DataFusion alone would run it.
    house
        .context()
        .register_udtf("read_csv", Arc::new(ReadsFiles));
    assert!(
        house
            .context()
            .sql("SELECT * FROM read_csv('/etc/passwd')")
            .await
            .is_ok()
    );
    for (query, expected) in cases {
        match sql::run(&house, query).await {
            Err(SqlError::Refused(refusal)) => {
                assert_eq!(refusal, expected, "{query}");
                let message = SqlError::Refused(refusal).to_string();
                assert!(message.starts_with("refused: "), "{message}");
                let named = match &expected {
                    Refusal::Ddl(k)
                    | Refusal::Dml(k)
                    | Refusal::Copy(k)
                    | Refusal::Config(k)
                    | Refusal::NotAQuery(k)
                    | Refusal::TableFunction(k) => k.clone(),
                    Refusal::MultipleStatements(n) => format!("{n} statements"),
                    Refusal::Empty => "no statement".to_owned(),
                    Refusal::Plan(m) => m.clone(),
                };
                assert!(message.contains(&named), "{message} should name {named}");
            }
            Err(e) => panic!("{query}: expected a refusal, got {e}"),
            Ok(_) => panic!("{query}: expected a refusal, it ran"),
        }
    }
    for (query, table) in [
        ("SELECT * FROM nope", "nope"),
        (
            "SELECT * FROM events e JOIN secrets s ON e.customer = s.customer",
            "secrets",
        ),
        (
            "WITH x AS (SELECT * FROM passwords) SELECT * FROM x",
            "passwords",
        ),
        ("SELECT * FROM other.public.events", "other.public.events"),
        // A path is not a table (DataFusion's URL tables are not enabled).
        ("SELECT * FROM '/etc/passwd'", "/etc/passwd"),
        (
            "SELECT * FROM information_schema.tables",
            "information_schema.tables",
        ),
    ] {
        match sql::run(&house, query).await {
            Err(e @ SqlError::UnknownTable { .. }) => {
                let message = e.to_string();
                assert_eq!(
                    message,
                    format!(
                        "unknown table {table}; the tables are: customer_addons, customers, \
                         decisions, events, plans, prices, rollups"
                    ),
                    "{query}"
                );
            }
            Err(e) => panic!("{query}: expected an unknown table, got {e}"),
            Ok(_) => panic!("{query}: expected an unknown table, it ran"),
        }
    }
    assert!(matches!(
        sql::run(&house, "SELEC 1").await,
        Err(SqlError::Syntax(_))
    ));

    // Nothing was created, changed or written.
    assert!(!target.exists());
    for table in ["t", "v", "e"] {
        assert!(!house.context().table_exist(table).unwrap(), "{table}");
    }
    let n = collect(&house, "SELECT COUNT(*) AS n FROM events")
        .await
        .unwrap();
    assert_eq!(strings(&n, "n"), ["60"]);
    // A CTE named like no table, and the table functions that are allowed, run.
    let n = collect(
        &house,
        "WITH x AS (SELECT value FROM generate_series(1, 3)) SELECT SUM(value) AS n FROM x",
    )
    .await
    .unwrap();
    assert_eq!(strings(&n, "n"), ["6"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_over_the_memory_limit_fails_and_the_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let spill = dir.path().join("spill");
    let (_lake_dir, house) = lake(LakehouseOptions {
        memory_limit: 1024 * 1024,
        spill_dir: Some(spill.clone()),
        ..LakehouseOptions::default()
    })
    .await;
    assert!(spill.is_dir());
    // An exact distinct count of 3,000,000 values holds them all, and cannot spill.
    let big = "SELECT COUNT(DISTINCT value) AS n FROM range(3000000)";
    for _ in 0..2 {
        match collect(&house, big).await {
            Err(e @ SqlError::MemoryLimit { .. }) => {
                let message = e.to_string();
                assert!(
                    message.starts_with("memory limit of 1 MiB exceeded"),
                    "{message}"
                );
            }
            Err(e) => panic!("expected the memory limit, got {e}"),
            Ok(_) => panic!("expected the memory limit, the query ran"),
        }
        // The failed query gives its memory back (its tasks end when aborted), and the
        // session answers the next one.
        let pool = house.context().runtime_env().memory_pool.clone();
        let since = Instant::now();
        while pool.reserved() > 0 && since.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pool.reserved(), 0);
        let n = collect(
            &house,
            "SELECT COUNT(*) AS n FROM events WHERE region = 'eu'",
        )
        .await
        .unwrap();
        assert_eq!(strings(&n, "n"), ["15"]);
    }
    // The same query fits the default limit.
    let (_other, roomy) = lake(LakehouseOptions::default()).await;
    let n = collect(&roomy, big).await.unwrap();
    assert_eq!(strings(&n, "n"), ["3000000"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_over_the_time_limit_is_cancelled() {
    let (_dir, house) = lake(LakehouseOptions {
        time_limit: Duration::from_secs(1),
        ..LakehouseOptions::default()
    })
    .await;
    // 10^12 rows: days of work. The cross join emits 1,000 × 8,192 rows from each batch
    // of `b` without yielding, so the runtime's worker threads are busy for seconds at a
    // time (in a debug build; a larger side `a` only makes the wait for the cancelled
    // task to end, below, longer).
    let started = Instant::now();
    let result = collect(
        &house,
        "SELECT SUM(a.value + b.value) FROM range(1000) a CROSS JOIN range(1000000000) b",
    )
    .await;
    let elapsed = started.elapsed();
    match result {
        Err(e @ SqlError::TimeLimit { .. }) => assert_eq!(
            e.to_string(),
            "time limit of 1 s exceeded; the query was cancelled"
        ),
        Err(e) => panic!("expected the time limit, got {e}"),
        Ok(_) => panic!("expected the time limit, the query finished"),
    }
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(6),
        "{elapsed:?}"
    );
    // The query was cancelled: its task ends at its next yield, dropping the memory it
    // held (the cross join's build side), where running on would hold it for hours.
    let pool = house.context().runtime_env().memory_pool.clone();
    let since = Instant::now();
    while pool.reserved() > 0 && since.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        pool.reserved(),
        0,
        "still running after {:?}",
        since.elapsed()
    );
    // And the session answers the next query.
    let n = collect(&house, "SELECT COUNT(*) AS n FROM events")
        .await
        .unwrap();
    assert_eq!(strings(&n, "n"), ["60"]);
}

/// Writes `query`'s stream in `format` and returns the bytes.
async fn written(house: &Lakehouse, query: &str, format: OutputFormat) -> (Vec<u8>, u64) {
    let stream = sql::run(house, query).await.unwrap();
    let mut out = Vec::new();
    let rows = write_stream(stream, format, &mut out).await.unwrap();
    (out, rows)
}

#[tokio::test]
async fn streamed_csv_json_and_arrow_read_back_as_the_result() {
    let (_dir, house) = lake(LakehouseOptions::default()).await;
    let query = "SELECT event_id, customer, quantity, event_time, region, stream_seq
                 FROM events ORDER BY stream_seq";
    let expected = collect(&house, query).await.unwrap();
    assert_eq!(expected.num_rows(), 60);
    assert_eq!(expected.column_by_name("region").unwrap().null_count(), 15);

    // Arrow IPC: the very same batches.
    let (bytes, rows) = written(&house, query, OutputFormat::Arrow).await;
    assert_eq!(rows, 60);
    let reader = StreamReader::try_new(Cursor::new(bytes), None).unwrap();
    let schema = reader.schema();
    let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
    assert_eq!(concat_batches(&schema, &batches).unwrap(), expected);

    // CSV: a header, then the rows, read back with the result's schema.
    let (bytes, rows) = written(&house, query, OutputFormat::Csv).await;
    assert_eq!(rows, 60);
    let text = String::from_utf8(bytes.clone()).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("event_id,customer,quantity,event_time,region,stream_seq")
    );
    assert_eq!(lines.next(), Some("e0,acme,0.0,2026-11-01T00:00:00Z,,1"));
    assert_eq!(text.lines().count(), 61);
    let reader = arrow::csv::ReaderBuilder::new(expected.schema())
        .with_header(true)
        .build(Cursor::new(bytes))
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
    let back = concat_batches(&expected.schema(), &batches).unwrap();
    for column in [
        "event_id",
        "customer",
        "quantity",
        "event_time",
        "region",
        "stream_seq",
    ] {
        assert_eq!(
            strings(&back, column),
            strings(&expected, column),
            "{column}"
        );
    }

    // JSON: one array of objects, every column in each, nulls as null.
    let (bytes, rows) = written(&house, query, OutputFormat::Json).await;
    assert_eq!(rows, 60);
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let objects = json.as_array().unwrap();
    assert_eq!(objects.len(), 60);
    assert_eq!(
        objects[0],
        serde_json::json!({
            "event_id": "e0", "customer": "acme", "quantity": 0.0,
            "event_time": "2026-11-01T00:00:00Z", "region": null, "stream_seq": 1
        })
    );
    for (i, o) in objects.iter().enumerate() {
        assert_eq!(o["event_id"], format!("e{i}"));
        assert_eq!(o["quantity"].as_f64(), Some(i as f64));
        assert_eq!(o["stream_seq"].as_u64(), Some(i as u64 + 1));
        let region = strings(&expected, "region")[i].clone();
        assert_eq!(o["region"].as_str().unwrap_or("NULL"), region);
    }

    // Several batches in a row (range yields 8,192 rows a batch), and no rows at all.
    let many = "SELECT value FROM range(20000)";
    let (bytes, rows) = written(&house, many, OutputFormat::Json).await;
    assert_eq!(rows, 20_000);
    let json: Vec<serde_json::Value> = serde_json::from_slice(&bytes).unwrap();
    assert!(json.iter().enumerate().all(|(i, o)| o["value"] == i as u64));
    let (bytes, _) = written(&house, many, OutputFormat::Csv).await;
    let text = String::from_utf8(bytes).unwrap();
    assert_eq!(text.lines().count(), 20_001);
    assert_eq!(text.lines().filter(|l| *l == "value").count(), 1);
    let none = "SELECT customer FROM events WHERE quantity < 0";
    assert_eq!(written(&house, none, OutputFormat::Json).await.0, b"[]\n");
    assert_eq!(
        written(&house, none, OutputFormat::Csv).await.0,
        b"customer\n"
    );
    let (bytes, rows) = written(&house, none, OutputFormat::Arrow).await;
    assert_eq!(rows, 0);
    let reader = StreamReader::try_new(Cursor::new(bytes), None).unwrap();
    assert_eq!(reader.schema().field(0).name(), "customer");
    assert_eq!(reader.count(), 0);
}
