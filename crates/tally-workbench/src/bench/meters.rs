//! `tally bench meters`: a meter query by customer × day over a generated month of
//! prompts, from the meter rollups, from the raw events, and (with `--duckdb`) DuckDB over
//! the same files with the same JSON extraction.
//!
//! The month (the one before the current one) is generated as `tally bench query`
//! generates it (16 partitions, messages of 100 events of one customer, batches of
//! 100,000 rows), but every event is a `prompt` whose `data` holds `tokens`, `model` and
//! `user_id`, and five meters are live while it is written: each flush writes their
//! rollups, as a worker's does, and the compaction that follows writes the merged files'.
//! Then, each `--runs` times (the median is reported), the `tokens` meter (`SUM` of
//! `$.tokens`) is queried by customer and UTC day over the month:
//!
//! - **from the rollups**: `Lakehouse::meter_query`, which reads the meter's rollups;
//! - **from the raw events**: `tally_query::meters::meter_query`, the same query reading
//!   `$.tokens` out of every event's `data`;
//! - **DuckDB** (`benches/duckdb_meters.py`): the same over the events' Parquet files,
//!   with `json_extract_string` and a cast.
//!
//! The three answers must agree on rows and total, or the command fails.

use std::path::{Path, PathBuf};

use chrono::{Datelike, NaiveDate, TimeZone, Utc};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tally_core::meter::{Meter, WindowSize};
use tally_query::meters::{MeterQuery, MeterRow};
use tally_query::{Lakehouse, Period};

use super::BenchFormat;
use super::query::{Generated, Prepared, disk, duckdb_script, prepare, timed};

#[derive(Args)]
pub struct MetersBench {
    /// Events in the month.
    #[arg(long, default_value_t = 100_000_000)]
    events: u64,
    #[arg(long, default_value_t = 10_000)]
    customers: u32,
    /// Timed runs of each query; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Keep the generated lake here, and reuse it when it holds the same spec.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// A Python with the duckdb module: also time DuckDB over the same files.
    #[arg(long)]
    duckdb: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = BenchFormat::Table)]
    format: BenchFormat,
}

#[derive(Debug, Serialize)]
pub struct MetersReport {
    pub events: u64,
    pub customers: u32,
    pub month: String,
    pub generated: bool,
    pub generate_s: Option<f64>,
    pub compact_s: Option<f64>,
    pub lake_bytes: u64,
    pub events_files: u64,
    pub meter_rollup_bytes: u64,
    pub meter_rollup_files: u64,
    /// The closed months' files (a row per customer × UTC day × group), all meters'.
    pub meter_monthly_bytes: u64,
    pub meter_monthly_files: u64,
    /// Rows of the answer: customers × days with prompts.
    pub rows: usize,
    pub rollups_s: f64,
    pub raw_s: f64,
    pub duckdb_s: Option<f64>,
    pub runs: usize,
}

/// Five meters of the events of `event_type` whose `data` has `tokens`, `model` and a
/// user at `user`, grouped by model.
pub fn prompt_meters(event_type: &str, user: &str) -> Vec<Meter> {
    [
        ("tokens", "SUM", Some("$.tokens")),
        ("prompts", "COUNT", None),
        ("users", "UNIQUE_COUNT", Some(user)),
        ("tokens_max", "MAX", Some("$.tokens")),
        ("tokens_latest", "LATEST", Some("$.tokens")),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (slug, aggregation, value))| {
        let mut m = json!({
            "slug": slug, "id": tally_core::meter::ulid_text(i as u128 + 1),
            "eventType": event_type, "aggregation": aggregation,
            "groupBy": {"model": "$.model"},
        });
        if let Some(v) = value {
            m["valueProperty"] = json!(v);
        }
        serde_json::from_value(m).expect("a valid meter")
    })
    .collect()
}

pub async fn run(args: MetersBench) -> anyhow::Result<std::process::ExitCode> {
    let temp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("tally-bench-meters-")
                .tempdir()?;
            temp.path().to_owned()
        }
    };
    let today = Utc::now().date_naive();
    let this_month = NaiveDate::from_ymd_opt(today.year(), today.month(), 1).unwrap_or(today);
    let month = Period::of(this_month - chrono::Days::new(1));
    // Version 2: the closed month's meter days (a lake of version 1 lacks them).
    let spec = Generated {
        version: 2,
        events: args.events,
        customers: args.customers,
        features: 1,
        month: month.to_string(),
        prompts: true,
    };
    let meters = prompt_meters("prompt", "$.user_id");
    let Prepared {
        lake_dir,
        reused,
        generate_s,
        compact_s,
    } = prepare(&dir, &spec, month, &meters).await?;

    let house = Lakehouse::open(&tally_store::Location::Local(lake_dir.clone())).await?;
    let midnight =
        |d: NaiveDate| Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default());
    let query = MeterQuery {
        from: Some(midnight(month.first_day())),
        to: Some(midnight(month.next().first_day())),
        window: Some(WindowSize::Day),
        group_by: vec!["subject".to_owned()],
        ..MeterQuery::default()
    };
    let tokens = &meters[0];
    let (rollups_s, from_rollups) = timed(args.runs, || async {
        house.meter_query(tokens, &query).await
    })
    .await?;
    let (raw_s, from_events) = timed(args.runs, || async {
        tally_query::meters::meter_query(house.context(), tokens, &query).await
    })
    .await?;
    let (a, b) = (Totals::of(&from_rollups), Totals::of(&from_events));
    anyhow::ensure!(
        a == b,
        "the meter from its rollups ({a:?}) differs from the meter from the events ({b:?})"
    );
    let duckdb_s = match &args.duckdb {
        Some(python) => Some(duckdb(python, &lake_dir, month, args.runs, &b)?),
        None => None,
    };
    let (lake_bytes, events_files) = disk(&lake_dir.join(tally_core::schema::EVENTS_TABLE))?;
    let (meter_rollup_bytes, meter_rollup_files) =
        disk(&lake_dir.join(tally_store::METER_ROLLUPS_TABLE))?;
    let monthly = lake_dir.join(tally_store::METER_MONTHLY_TABLE);
    let (meter_monthly_bytes, meter_monthly_files) = if monthly.exists() {
        disk(&monthly)?
    } else {
        (0, 0)
    };
    let report = MetersReport {
        events: args.events,
        customers: args.customers,
        month: month.to_string(),
        generated: !reused,
        generate_s,
        compact_s,
        lake_bytes,
        events_files,
        meter_rollup_bytes,
        meter_rollup_files,
        meter_monthly_bytes,
        meter_monthly_files,
        rows: from_rollups.len(),
        rollups_s,
        raw_s,
        duckdb_s,
        runs: args.runs,
    };
    if args.format == BenchFormat::Table {
        println!(
            "{} prompts, {} customers, month {} ({} events files, {:.1} GiB; meter rollups {} files, {:.1} MiB; closed months {} files, {:.1} MiB){}",
            report.events,
            report.customers,
            report.month,
            report.events_files,
            report.lake_bytes as f64 / (1u64 << 30) as f64,
            report.meter_rollup_files,
            report.meter_rollup_bytes as f64 / (1u64 << 20) as f64,
            report.meter_monthly_files,
            report.meter_monthly_bytes as f64 / (1u64 << 20) as f64,
            if reused { ", reused" } else { "" }
        );
        if let (Some(g), Some(c)) = (generate_s, compact_s) {
            println!("generated in {g:.1} s, compacted in {c:.1} s");
        }
        println!(
            "SUM of $.tokens by customer × day ({} rows), median of {}:",
            report.rows, report.runs
        );
        println!("  from the meter rollups   {:.3} s", report.rollups_s);
        println!("  from the raw events      {:.3} s", report.raw_s);
        if let Some(d) = report.duckdb_s {
            println!("  DuckDB, raw events       {d:.3} s");
        }
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(std::process::ExitCode::SUCCESS)
}

/// What two answers must share: their rows and their values' total.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
struct Totals {
    rows: usize,
    total: f64,
}

impl Totals {
    fn of(rows: &[MeterRow]) -> Totals {
        Totals {
            rows: rows.len(),
            total: rows.iter().map(|r| r.value).sum(),
        }
    }
}

/// DuckDB's median over the month's events files (after checking its answer).
fn duckdb(
    python: &Path,
    lake: &Path,
    month: Period,
    runs: usize,
    tally: &Totals,
) -> anyhow::Result<f64> {
    #[derive(Deserialize)]
    struct Duck {
        seconds: f64,
        rows: usize,
        total: f64,
    }
    let duck: Duck = duckdb_script(python, "duckdb_meters.py", lake, month, runs)?;
    anyhow::ensure!(
        duck.rows == tally.rows && (duck.total - tally.total).abs() <= 1e-6 * tally.total.abs(),
        "DuckDB's answer ({} rows, total {}) differs from Tally's ({tally:?})",
        duck.rows,
        duck.total
    );
    Ok(duck.seconds)
}
