//! End to end through a real nats-server: publish, ingest, lake, billing.

use crate::common;
use std::collections::BTreeMap;
use std::fs::File;

use crate::common::{Harness, parquet_files, until};
use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, TimestampMicrosecondType};
use chrono::{DateTime, NaiveDate};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tally::pipeline;
use tally::workload::{self, Spec};
use tally_core::schema::lake_schema;
use tally_query::{Lakehouse, Period, Scope};

/// The compact Arrow IPC encoding lands exactly like JSON: once each, same totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrow_batches_land_exactly_once() {
    let h = Harness::start().await;
    h.entitle_everyone(100).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let mut spec = Spec::new(30_000, NaiveDate::from_ymd_opt(2026, 8, 1).unwrap());
    spec.customers = 100;
    spec.batch = 100;
    spec.duplicate_rate = 0.01;
    spec.arrow = true;
    spec.until = DateTime::from_timestamp(4_000_000_000, 0).unwrap();
    let (messages, totals) = workload::generate(&spec);
    assert!(messages.iter().filter(|m| m.arrow).count() > messages.len() / 2);
    workload::publish(&h.nats.jetstream, &messages, 1_024, |_| {})
        .await
        .unwrap();
    h.drain(&pipeline, totals.events_valid).await;
    pipeline.shutdown().await.unwrap();
    let (ids, rows, quantity) = common::read_lake(&h);
    assert_eq!(rows, totals.events_valid);
    assert_eq!(ids.len() as u64, totals.events_valid);
    assert_eq!(quantity, totals.quantity);
    let lake = Lakehouse::open(&h.config.lake()).await.unwrap();
    let billed = tally_query::BillingTotals::of(
        &lake
            .billing(&Scope::Month(Period::of(spec.start)), None)
            .await
            .unwrap(),
    );
    assert_eq!(
        (billed.events, billed.quantity),
        (totals.events_valid, totals.quantity)
    );
}

/// 200,000 events, mixed single and batched messages, 1 % published twice with the same
/// id, 1 % malformed: the lake holds each valid event exactly once, the dead letters hold
/// each malformed one with its reason, and billing equals what was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_valid_event_lands_once_and_bills_exactly() {
    let h = Harness::start().await;
    h.entitle_everyone(300).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();

    let month = NaiveDate::from_ymd_opt(2026, 10, 1).unwrap();
    let mut spec = Spec::new(200_000, month);
    spec.customers = 300;
    spec.batch = 50;
    spec.single_rate = 0.3;
    spec.invalid_rate = 0.01;
    spec.duplicate_rate = 0.01;
    spec.until = DateTime::from_timestamp(4_000_000_000, 0).unwrap();
    let (messages, totals) = workload::generate(&spec);
    assert!(totals.duplicates_published > 1_000 && totals.events_invalid > 1_000);

    let published = workload::publish(&h.nats.jetstream, &messages, 2_048, |_| {})
        .await
        .unwrap();
    assert_eq!(published.messages, messages.len() as u64);
    h.drain(&pipeline, totals.events_valid).await;
    let stats = pipeline.stats.clone();
    pipeline.shutdown().await.unwrap();

    // The lake, read with the plain Parquet reader: each valid event once.
    let (ids, rows, quantity) = common::read_lake(&h);
    assert_eq!(rows, totals.events_valid);
    assert_eq!(ids.len() as u64, totals.events_valid);
    assert_eq!(quantity, totals.quantity);
    // The documented schema and hive layout: every row under the date of its event time.
    let files = parquet_files(&h.lake_events());
    for path in &files {
        let date_dir = path
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap();
        let date = date_dir
            .strip_prefix("date=")
            .expect("hive layout date=YYYY-MM-DD");
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch: RecordBatch = batch.unwrap();
            assert_eq!(
                batch.schema().fields(),
                lake_schema().fields(),
                "{}",
                path.display()
            );
            for t in batch
                .column_by_name("event_time")
                .unwrap()
                .as_primitive::<TimestampMicrosecondType>()
                .values()
            {
                let day = DateTime::from_timestamp_micros(*t).unwrap().date_naive();
                assert_eq!(day.to_string(), date, "row filed under the wrong date");
            }
        }
    }
    assert!(stats.duplicates.load(std::sync::atomic::Ordering::Relaxed) > 0);

    // Dead letters: one per malformed event, with the reason the generator intended.
    let dead = h.dead_letters().await;
    assert_eq!(dead.len() as u64, totals.events_invalid);
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    for d in &dead {
        *by_reason.entry(d.reason.clone()).or_default() += 1;
        assert!(!d.body.is_empty() && !d.error.is_empty());
    }
    assert_eq!(by_reason, totals.invalid_by_reason);

    // Billing through DataFusion equals the generator's own per-line totals.
    let lake = Lakehouse::open(&h.config.lake()).await.unwrap();
    let billing = lake
        .billing(&Scope::Month(Period::of(month)), None)
        .await
        .unwrap();
    let mut billed = BTreeMap::new();
    for b in &billing {
        let customers = b.column_by_name("customer").unwrap().as_string::<i32>();
        let features = b.column_by_name("feature").unwrap().as_string::<i32>();
        let events = b
            .column_by_name("events")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>();
        let qty = b
            .column_by_name("quantity")
            .unwrap()
            .as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            billed.insert(
                (customers.value(i).to_owned(), features.value(i).to_owned()),
                (events.value(i) as u64, qty.value(i)),
            );
        }
    }
    assert_eq!(billed, totals.by_line);
    // Nothing bills outside the month.
    let next = lake
        .billing(&Scope::Month(Period::of(month).next()), None)
        .await
        .unwrap();
    assert_eq!(next.iter().map(RecordBatch::num_rows).sum::<usize>(), 0);
}

/// A running worker compacts its partitions' settled files of closed dates by itself (here
/// every second, with a checkpoint every second): compacted files appear, and the lake still holds each event once and
/// bills exactly what was sent. After a clean stop, `tally compact` leaves one file per
/// partition and date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_compact_closed_dates_and_nothing_changes() {
    let mut h = Harness::start().await;
    h.config.ingest.compact_every_secs = 1;
    // Compaction merges what checkpoints have settled.
    h.config.ingest.checkpoint_secs = 1;
    h.config.ingest.flush_messages = 40;
    h.config.ingest.partitions = 4;
    h.entitle_everyone(50).await;
    let pipeline = pipeline::start(&h.config, &h.nats, None).await.unwrap();
    let month = NaiveDate::from_ymd_opt(2026, 7, 1).unwrap();
    let mut spec = Spec::new(40_000, month);
    spec.customers = 50;
    spec.batch = 20;
    spec.until = DateTime::from_timestamp(4_000_000_000, 0).unwrap();
    let (messages, totals) = workload::generate(&spec);
    workload::publish(&h.nats.jetstream, &messages, 512, |_| {})
        .await
        .unwrap();
    h.drain(&pipeline, totals.events_valid).await;
    let visible_before = parquet_files(&h.lake_events()).len();
    let lake = tally_store::Lake::new(h.config.lake_dir());
    until("a worker compacts", || async {
        parquet_files(&h.lake_events())
            .iter()
            .any(|p| compacted(p).is_some())
    })
    .await;
    pipeline.shutdown().await.unwrap();

    let (ids, rows, quantity) = common::read_lake(&h);
    assert_eq!(
        (ids.len() as u64, rows),
        (totals.events_valid, totals.events_valid)
    );
    assert_eq!(quantity, totals.quantity);
    assert_eq!(lake.rows().unwrap(), totals.events_valid);

    // The rest, on demand: every partition settled at its clean stop.
    let options = tally_store::CompactOptions {
        retain: std::time::Duration::ZERO,
        ..tally_store::CompactOptions::default()
    };
    let report = tally::compact::compact(&lake, None, &options).unwrap();
    assert!(report.unsettled.is_empty(), "{report:?}");
    let files = parquet_files(&h.lake_events());
    let mut per_day = std::collections::HashSet::new();
    for f in &files {
        let day = f.parent().unwrap().to_owned();
        let name = f.file_name().unwrap().to_str().unwrap();
        let partition = tally_store::parse_name(name).unwrap().0;
        assert!(
            per_day.insert((day, partition)),
            "two files for {}",
            f.display()
        );
    }
    assert!(
        files.len() < visible_before,
        "{} ≥ {visible_before}",
        files.len()
    );
    // Nothing superseded is left on disk with no retention.
    let on_disk = walk(&h.lake_events());
    assert_eq!(on_disk, files.len());
    let (ids, rows, quantity) = common::read_lake(&h);
    assert_eq!(
        (ids.len() as u64, rows),
        (totals.events_valid, totals.events_valid)
    );
    assert_eq!(quantity, totals.quantity);
    let house = Lakehouse::open(&h.config.lake()).await.unwrap();
    let billed = tally_query::BillingTotals::of(
        &house
            .billing(&Scope::Month(Period::of(month)), None)
            .await
            .unwrap(),
    );
    assert_eq!(
        (billed.events, billed.quantity),
        (totals.events_valid, totals.quantity)
    );
}

/// How many files a compacted file merged, from its metadata.
fn compacted(path: &std::path::Path) -> Option<usize> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader = SerializedFileReader::new(File::open(path).ok()?).ok()?;
    reader
        .metadata()
        .file_metadata()
        .key_value_metadata()?
        .iter()
        .find(|k| k.key == tally_store::META_COMPACTED)?
        .value
        .as_deref()?
        .parse()
        .ok()
}

/// Parquet files on disk under a table's directory, superseded ones included (its log's
/// checkpoints left out).
fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.ends_with("_delta_log"))
        .map(|p| {
            if p.is_dir() {
                walk(&p)
            } else {
                usize::from(p.extension().is_some_and(|x| x == "parquet"))
            }
        })
        .sum()
}
