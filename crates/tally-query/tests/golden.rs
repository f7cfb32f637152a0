//! Golden outputs of every named query over a small lake whose answers are worked out by
//! hand in `golden/november.txt`: each decision kind, a plan change inside the month, a
//! late event, an event of the month before, halves in quantities. The same answers must
//! come from the raw events, from the hourly rollups, and after compaction from the
//! monthly rollups.
//!
//! `TALLY_BLESS=1 cargo test -p tally-query --test golden` rewrites the file from the
//! queries' answers; check every line of the difference by hand before committing it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arrow::array::{
    Array, ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
    UInt16Array, UInt64Array,
};
use chrono::{NaiveDate, NaiveDateTime};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tally_core::schema::{self, decision_codes, lake_schema};
use tally_core::{Fence, SealedBatch};
use tally_query::analytics::{DateRange, Window};
use tally_query::{Lakehouse, Period, Scope, Source};
use tally_store::{CompactOptions, Lake, Location, S3Location};

/// (customer, feature, quantity, time, region, user, decision, plan)
type Row = (
    &'static str,
    &'static str,
    f64,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    &'static str,
    Option<&'static str>,
);

#[rustfmt::skip]
const ROWS: [Row; 16] = [
    ("acme", "api_calls", 10.0, "2026-11-02 10:15", Some("eu"), Some("u1"), "accepted", Some("pro")),
    ("acme", "api_calls", 5.0, "2026-11-02 10:45", Some("eu"), Some("u2"), "accepted", Some("pro")),
    ("acme", "api_calls", 7.0, "2026-11-03 09:00", Some("eu"), Some("u1"), "overage", Some("pro")),
    ("acme", "storage", 2.5, "2026-11-03 12:00", Some("eu"), Some("u1"), "accepted", Some("pro")),
    ("acme", "api_calls", 3.0, "2026-11-04 08:00", Some("eu"), Some("u3"), "limit_reached", Some("pro")),
    ("acme", "exports", 1.0, "2026-11-05 08:00", Some("eu"), Some("u1"), "not_entitled", Some("pro")),
    ("globex", "api_calls", 4.0, "2026-11-10 13:00", Some("us"), Some("g1"), "accepted", Some("free")),
    ("globex", "api_calls", 6.0, "2026-11-16 13:00", Some("us"), Some("g1"), "accepted", Some("pro")),
    ("globex", "api_calls", 2.0, "2026-11-17 13:00", Some("us"), Some("g2"), "overage", Some("pro")),
    ("globex", "reports", 1.0, "2026-11-18 14:00", Some("us"), Some("g2"), "region_blocked", Some("pro")),
    ("initech", "api_calls", 1.0, "2026-11-20 09:00", Some("ap"), Some("i1"), "expired", Some("free")),
    ("initech", "api_calls", 1.0, "2026-11-21 09:00", Some("ap"), Some("i1"), "seat_limit", Some("free")),
    ("ghost", "api_calls", 1.0, "2026-11-21 10:00", None, None, "unknown_customer", None),
    ("acme", "api_calls", 8.0, "2026-11-01 00:30", Some("eu"), Some("u2"), "late", Some("pro")),
    ("acme", "api_calls", 2.0, "2026-10-31 23:00", Some("eu"), Some("u1"), "accepted", Some("pro")),
    ("acme", "api_calls", 1.0, "2026-11-01 09:00", Some("eu"), Some("u1"), "accepted", Some("pro")),
];

fn micros(t: &str) -> i64 {
    NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M")
        .unwrap()
        .and_utc()
        .timestamp_micros()
}

/// Rows `from..to` of [`ROWS`] as a sealed batch of partition 0, sequences from `from + 1`.
fn sealed(from: usize, to: usize) -> SealedBatch {
    sealed_in(0, from, to)
}

/// [`sealed`], of `partition`.
fn sealed_in(partition: u16, from: usize, to: usize) -> SealedBatch {
    let rows = &ROWS[from..to];
    let n = rows.len();
    let text = |f: fn(&Row) -> Option<&'static str>| -> ArrayRef {
        Arc::new(StringArray::from_iter(rows.iter().map(f)))
    };
    let times = |v: Vec<i64>| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
    };
    let decisions = StringArray::from_iter_values(rows.iter().map(|r| r.6));
    let batch = RecordBatch::try_new(
        lake_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(
                (from..to).map(|i| format!("event-{i}")),
            )),
            text(|r| Some(r.0)),
            text(|r| Some(r.1)),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.2))),
            times(rows.iter().map(|r| micros(r.3)).collect()),
            text(|r| r.4),
            text(|r| r.5),
            text(|_| Some("app")),
            text(|_| Some("usage")),
            text(|_| None),
            Arc::new(decisions.clone()),
            times(rows.iter().map(|r| micros(r.3) + 1_000_000).collect()),
            Arc::new(UInt64Array::from_iter_values(from as u64 + 1..=to as u64)),
            Arc::new(UInt16Array::from(vec![partition; n])),
            text(|r| r.7),
            Arc::new(decision_codes(&decisions)),
        ],
    )
    .unwrap();
    SealedBatch {
        partition,
        first_seq: from as u64 + 1,
        last_seq: to as u64,
        after_seq: None,
        batch,
    }
}

fn table(batches: &[RecordBatch]) -> String {
    arrow::util::pretty::pretty_format_batches(batches)
        .unwrap()
        .to_string()
}

fn lines<T: std::fmt::Debug>(rows: &[T]) -> String {
    rows.iter().map(|r| format!("{r:?}\n")).collect()
}

/// The answers worked out by hand.
fn golden() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/november.txt")
}

/// The billing sections of [`answers`] (those before `# late`).
fn billing(answers: &str) -> String {
    answers[..answers.find("# late").unwrap()].to_owned()
}

/// Asserts that billing from each of `sources` over the lake at `root` is the bill worked
/// out by hand (`when` names the lake's state in a failure).
async fn billed_by_hand(root: &Path, sources: &[Source], when: &str) {
    let expected = billing(&std::fs::read_to_string(golden()).unwrap());
    for &source in sources {
        assert_eq!(
            billing(&answers(root, source).await),
            expected,
            "{when}: from {source:?}"
        );
    }
}

/// Every named query's answer for November 2026, as text.
async fn answers(root: &Path, source: Source) -> String {
    answers_at(&Location::Local(root.into()), source).await
}

/// [`answers`] of the lake at `location`.
async fn answers_at(location: &Location, source: Source) -> String {
    let house = Lakehouse::open(location).await.unwrap();
    let november: Period = "2026-11".parse().unwrap();
    let month = Scope::Month(november);
    let range = DateRange::new(
        NaiveDate::from_ymd_opt(2026, 11, 1).unwrap(),
        NaiveDate::from_ymd_opt(2026, 11, 30).unwrap(),
    )
    .unwrap();
    let mut out = String::new();
    out += "# billing\n";
    out += &table(&house.billing_from(source, &month, None).await.unwrap());
    out += "\n# billing of one customer\n";
    out += &table(
        &house
            .billing_from(source, &month, Some("globex"))
            .await
            .unwrap(),
    );
    out += "\n# billing by anniversary: acme from 2026-11-03, globex from 2026-11-15\n";
    let periods = [
        (
            "acme".to_owned(),
            micros("2026-11-03 00:00"),
            micros("2026-12-03 00:00"),
        ),
        (
            "globex".to_owned(),
            micros("2026-11-15 00:00"),
            micros("2026-12-15 00:00"),
        ),
    ];
    let anniversary = Scope::Periods {
        name: november,
        periods: &periods,
    };
    out += &table(
        &house
            .billing_from(source, &anniversary, None)
            .await
            .unwrap(),
    );
    out += "\n# late\n";
    out += &table(&house.late(&month, None).await.unwrap());
    out += "\n# usage per day\n";
    out += &lines(&house.usage_windows(november, Window::Day).await.unwrap());
    out += "# usage per month\n";
    out += &lines(&house.usage_windows(november, Window::Month).await.unwrap());
    out += "# hard-limit rejections\n";
    out += &lines(&house.limit_rejections(november).await.unwrap());
    out += "# feature use\n";
    out += &lines(&house.feature_use(range, None).await.unwrap());
    out += "# first uses\n";
    out += &lines(&house.first_uses(range.end(), None).await.unwrap());
    out += "# use by region\n";
    out += &lines(&house.region_use(range, None).await.unwrap());
    out += "# distinct users\n";
    out += &lines(&house.active_users(range, None).await.unwrap());
    // A range across two months: the week of 2026-10-26 holds 2026-10-31 and 2026-11-01.
    out += "# distinct users of api_calls, 2026-10-26 to 2026-11-08\n";
    let across = DateRange::new(
        NaiveDate::from_ymd_opt(2026, 10, 26).unwrap(),
        NaiveDate::from_ymd_opt(2026, 11, 8).unwrap(),
    )
    .unwrap();
    out += &lines(&house.active_users(across, Some("api_calls")).await.unwrap());
    out += "# feature use, 2026-10-26 to 2026-11-08\n";
    out += &lines(&house.feature_use(across, None).await.unwrap());
    out
}

#[tokio::test]
async fn every_named_query_answers_as_worked_out_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    named_queries_answer_as_worked_out_by_hand(&Location::Local(dir.path().into())).await;
}

/// The same with the lake in a bucket of a real S3-compatible server: the tables, the
/// monthly rollups and billing lines, and every query read through the object store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s3_every_named_query_answers_as_worked_out_by_hand() {
    let server = tokio::task::spawn_blocking(tally_s3d::S3Server::start_temp)
        .await
        .unwrap()
        .expect("s3s-fs (scripts/install-s3.sh) starts");
    let location = Location::S3(S3Location {
        bucket: server.bucket().to_owned(),
        prefix: "lake".to_owned(),
        endpoint: Some(server.endpoint()),
        region: server.region().to_owned(),
        access_key_id: server.access_key().to_owned(),
        secret_access_key: server.secret_key().to_owned(),
    });
    named_queries_answer_as_worked_out_by_hand(&location).await;
    // Nothing of the lake was written to local disk: every table is in the bucket.
    let bucket = server.root().join(server.bucket()).join("lake");
    for table in ["events", "rollups", "monthly", "billing"] {
        assert!(
            bucket.join(table).join("_delta_log").is_dir(),
            "{table} is a Delta table in the bucket"
        );
    }
}

async fn named_queries_answer_as_worked_out_by_hand(location: &Location) {
    let lake = {
        let location = location.clone();
        tokio::task::spawn_blocking(move || {
            let lake = Lake::open(&location).unwrap();
            for (from, to) in [(0, 6), (6, 12), (12, 16)] {
                lake.write(&sealed(from, to), &Fence::open()).unwrap();
            }
            lake
        })
        .await
        .unwrap()
    };
    let golden = golden();
    let from_events = answers_at(location, Source::Events).await;
    if std::env::var_os("TALLY_BLESS").is_some() {
        std::fs::write(&golden, &from_events).unwrap();
    }
    let expected = std::fs::read_to_string(&golden).unwrap();
    assert_eq!(from_events, expected, "from the raw events");
    assert_eq!(
        answers_at(location, Source::Rollups).await,
        expected,
        "from the hourly rollups"
    );

    // Compacted on 2026-12-02, October and November closed: dates merged, the monthly
    // rollups written.
    let december = SystemTime::UNIX_EPOCH + Duration::from_secs(20_789 * 86_400);
    let (done, sources) = tokio::task::spawn_blocking(move || {
        let done = lake
            .compact(0, 16, &Fence::open(), &CompactOptions::default(), december)
            .unwrap();
        (
            done,
            lake.month_sources("2026-11".parse().unwrap()).unwrap(),
        )
    })
    .await
    .unwrap();
    assert_eq!((done.written, done.monthly), (1, 2), "{done:?}");
    // November is read from its monthly rollup alone: billing merges its lines.
    assert!(
        sources.hourly.is_empty() && sources.lines.is_some(),
        "{sources:?}"
    );
    assert_eq!(
        answers_at(location, Source::Rollups).await,
        expected,
        "from the monthly rollups and their billing lines"
    );
    assert_eq!(
        answers_at(location, Source::Events).await,
        expected,
        "after compaction"
    );
}

/// Billing from raw events aggregates each worker partition's files apart and merges the
/// answers: spread over three partitions, with acme's api_calls in two of them (as after
/// a change of the partition count), every bill is still the one worked out by hand.
#[tokio::test]
async fn billing_is_the_same_with_the_rows_spread_over_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path());
    for (partition, (from, to)) in [(0, 6), (6, 12), (12, 16)].into_iter().enumerate() {
        let partition = u16::try_from(partition).unwrap();
        lake.write(&sealed_in(partition, from, to), &Fence::open())
            .unwrap();
    }
    assert_eq!(lake.partitions().unwrap().len(), 3);
    billed_by_hand(dir.path(), &[Source::Events, Source::Rollups], "spread").await;
}

/// Files written before the lake had `decision_code` read it as null. Billing falls back to
/// the decision's name for their rows, so a lake of old and new files bills as worked out
/// by hand; compaction writes the codes into the files it merges.
#[tokio::test]
async fn files_from_before_decision_codes_bill_by_the_decision_names() {
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path());
    let without_codes = |sealed: SealedBatch| {
        let schema = sealed.batch.schema();
        let old: Vec<usize> = (0..schema.fields().len())
            .filter(|&i| schema.field(i).name() != schema::DECISION_CODE)
            .collect();
        SealedBatch {
            batch: sealed.batch.project(&old).unwrap(),
            ..sealed
        }
    };
    // Partition 0: two old files of 2026-11-02; partition 1: new files; partition 2: old.
    for sealed in [
        without_codes(sealed_in(0, 0, 1)),
        without_codes(sealed_in(0, 1, 2)),
        sealed_in(1, 2, 12),
        without_codes(sealed_in(2, 12, 16)),
    ] {
        lake.write(&sealed, &Fence::open()).unwrap();
    }
    // Per file of a partition: the nulls in its codes, `None` where it has no such column.
    let codes = |partition: u16| -> Vec<Option<usize>> {
        let files = lake.partition_files(partition).unwrap();
        files
            .iter()
            .map(|f| {
                let reader = ParquetRecordBatchReaderBuilder::try_new(lake.fetch(&f.key).unwrap())
                    .unwrap()
                    .build()
                    .unwrap();
                let batches: Vec<_> = reader.map(Result::unwrap).collect();
                batches[0].column_by_name(schema::DECISION_CODE).map(|_| {
                    batches
                        .iter()
                        .map(|b| b[schema::DECISION_CODE].null_count())
                        .sum()
                })
            })
            .collect()
    };
    assert_eq!(codes(0), [None, None]);
    assert!(codes(1).iter().all(|c| *c == Some(0)), "{:?}", codes(1));

    billed_by_hand(dir.path(), &[Source::Events], "old and new files").await;

    let december = SystemTime::UNIX_EPOCH + Duration::from_secs(20_789 * 86_400);
    let options = CompactOptions::default();
    let done = lake
        .compact(0, 2, &Fence::open(), &options, december)
        .unwrap();
    assert_eq!((done.merged, done.written), (2, 1), "{done:?}");
    assert_eq!(codes(0), [Some(0)], "the merged file has every row's code");
    billed_by_hand(dir.path(), &[Source::Events, Source::Rollups], "compacted").await;
}
