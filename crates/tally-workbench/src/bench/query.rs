//! `tally bench query`: billing and adoption over a generated month in the lake.
//!
//! The month (the one before the current one, so it is closed) is generated straight into
//! a lake as the ingest workers would have written it: 16 partitions, each customer in the
//! partition NATS would give it, events in time order in messages of 100 events of one
//! customer, sealed in batches of 100,000 rows
//! (one file per batch and date, each with its hourly rollup), decisions and plans
//! recorded. Then every partition is compacted as a worker would once the month closed
//! (dates merged, the monthly rollups written). Then, each `--runs` times (the median is
//! reported):
//!
//! - **billing from the rollups**: `Lakehouse::billing` for the month, which reads the
//!   monthly rollups (and the hourly rollups of files they do not cover: none here);
//! - **billing from the raw events**: the same named query over every event
//!   (`Source::Events`), and, with `--duckdb PYTHON`, DuckDB over the same Parquet files
//!   with the same SQL (`benches/duckdb_billing.py`; `benches/query.sh` installs DuckDB
//!   from PyPI into the project's virtual environment: it is never a dependency of Tally);
//! - **adoption**: the four queries `tally adoption` runs for the month (feature use,
//!   first uses, use by region, distinct users per day, week and month).
//!
//! The two Tally billing answers and DuckDB's must agree on lines, events and quantity, or
//! the command fails. `--dir` keeps the lake and reuses it on the next run with the same
//! spec (generation and compaction take minutes at 100,000,000 events).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use arrow::array::{
    ArrayRef, Float64Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
    UInt8Builder, UInt16Array, UInt64Array,
};
use chrono::{Datelike, NaiveDate};
use clap::Args;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tally_core::schema::lake_schema;
use tally_core::subject::partition_of;
use tally_core::{Decision, Fence, SealedBatch};
use tally_query::analytics::DateRange;
use tally_query::{BillingTotals, Lakehouse, Period, Scope, Source};
use tally_store::{CompactOptions, Lake};

use super::BenchFormat;
use crate::workload::{MODELS, customer_id};

#[derive(Args)]
pub struct QueryBench {
    /// Events in the month.
    #[arg(long, default_value_t = 100_000_000)]
    events: u64,
    #[arg(long, default_value_t = 10_000)]
    customers: u32,
    /// Metered features (each customer uses most of them).
    #[arg(long, default_value_t = 50)]
    features: u32,
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

/// The adoption queries' times, in seconds.
#[derive(Debug, Serialize)]
pub struct AdoptionTimes {
    pub feature_use_s: f64,
    pub first_use_s: f64,
    pub region_use_s: f64,
    pub active_users_s: f64,
}

/// What a lake directory was generated with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Generated {
    /// The generator's and the lake layout's version: a lake of another is generated anew.
    pub version: u32,
    pub events: u64,
    pub customers: u32,
    pub features: u32,
    pub month: String,
    /// Prompts (`tally bench meters`): events of type `prompt` whose `data` has `tokens`,
    /// `model` and `user_id`, rather than usage with nothing in `data`.
    #[serde(default)]
    pub prompts: bool,
}

/// The lake a bench reads, and what making it took.
pub(crate) struct Prepared {
    pub lake_dir: PathBuf,
    pub reused: bool,
    pub generate_s: Option<f64>,
    pub compact_s: Option<f64>,
}

/// Generates `spec`'s month into `dir/lake` and compacts it as workers would once it
/// closed, with `meters` live throughout (their rollups written by every flush and
/// merge); or reuses the lake there when `dir/bench.json` says it holds the same spec.
pub(crate) async fn prepare(
    dir: &Path,
    spec: &Generated,
    month: Period,
    meters: &[tally_core::meter::Meter],
) -> anyhow::Result<Prepared> {
    let marker = dir.join("bench.json");
    let reused = std::fs::read(&marker)
        .ok()
        .and_then(|b| serde_json::from_slice::<Generated>(&b).ok())
        .is_some_and(|g| &g == spec);
    let lake_dir = dir.join("lake");
    let (mut generate_s, mut compact_s) = (None, None);
    if !reused {
        if lake_dir.exists() {
            std::fs::remove_dir_all(&lake_dir)
                .with_context(|| format!("clearing {}", lake_dir.display()))?;
        }
        let _ = std::fs::remove_file(&marker);
        let (lake, spec2) = (Lake::new(&lake_dir), spec.clone());
        lake.set_meters(meters);
        eprintln!(
            "generating {} events into {}",
            spec.events,
            lake_dir.display()
        );
        let t = Instant::now();
        let last_seqs =
            tokio::task::spawn_blocking(move || generate(&lake, &spec2, month)).await??;
        generate_s = Some(t.elapsed().as_secs_f64());
        eprintln!(
            "generated in {:.1} s; compacting",
            t.elapsed().as_secs_f64()
        );
        let lake = Lake::new(&lake_dir);
        lake.set_meters(meters);
        let t = Instant::now();
        tokio::task::spawn_blocking(move || compact(&lake, &last_seqs)).await??;
        compact_s = Some(t.elapsed().as_secs_f64());
        eprintln!("compacted in {:.1} s", t.elapsed().as_secs_f64());
        std::fs::write(&marker, serde_json::to_vec(spec)?)?;
    }
    Ok(Prepared {
        lake_dir,
        reused,
        generate_s,
        compact_s,
    })
}

const PARTITIONS: u16 = 16;
const BATCH_ROWS: u64 = 100_000;
/// Events per message (one customer's).
const MESSAGE_EVENTS: usize = 100;

#[derive(Debug, Serialize)]
pub struct QueryReport {
    pub events: u64,
    pub customers: u32,
    pub features: u32,
    pub month: String,
    /// Whether the lake was generated by this run (false: reused from `--dir`).
    pub generated: bool,
    pub generate_s: Option<f64>,
    pub compact_s: Option<f64>,
    pub lake_bytes: u64,
    pub events_files: u64,
    /// Rows of the month's monthly rollups.
    pub monthly_rows: u64,
    /// Rows of their billing lines: what billing of the month reads and merges.
    pub lines_rows: u64,
    pub billing_lines: u64,
    pub billing_rollup_s: f64,
    pub billing_raw_s: f64,
    /// DuckDB's fastest way to the same answer (the fastest median of `duckdb_forms_s`).
    pub duckdb_raw_s: Option<f64>,
    /// DuckDB's median for each way of writing the query (`benches/duckdb_billing.py`).
    pub duckdb_forms_s: Option<BTreeMap<String, f64>>,
    /// The four adoption queries, each the median of its runs, summed.
    pub adoption_s: f64,
    pub adoption: AdoptionTimes,
    /// Billing from the monthly rollups at 1,000,000,000 events: the measured time scaled
    /// by the billing lines there would be then, at most one per customer × feature (one
    /// plan each; the lines do not grow with the events once every customer uses every
    /// feature).
    pub billing_rollup_projected_1b_s: f64,
    pub runs: usize,
}

pub async fn run(args: QueryBench) -> anyhow::Result<std::process::ExitCode> {
    let temp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("tally-bench-query-")
                .tempdir()?;
            temp.path().to_owned()
        }
    };
    let today = chrono::Utc::now().date_naive();
    let this_month = NaiveDate::from_ymd_opt(today.year(), today.month(), 1).unwrap_or(today);
    let month = Period::of(this_month - chrono::Days::new(1));
    let spec = Generated {
        version: 7,
        events: args.events,
        customers: args.customers,
        features: args.features,
        month: month.to_string(),
        prompts: false,
    };
    let Prepared {
        lake_dir,
        reused: reuse,
        generate_s,
        compact_s,
    } = prepare(&dir, &spec, month, &[]).await?;
    let house = Lakehouse::open(&tally_store::Location::Local(lake_dir.clone())).await?;
    let scope = Scope::Month(month);
    let (billing_rollup_s, from_rollups) = timed(args.runs, || async {
        house.billing_from(Source::Rollups, &scope, None).await
    })
    .await?;
    let (billing_raw_s, from_events) = timed(args.runs, || async {
        house.billing_from(Source::Events, &scope, None).await
    })
    .await?;
    let (rollups, raw) = (
        BillingTotals::of(&from_rollups),
        BillingTotals::of(&from_events),
    );
    anyhow::ensure!(
        rollups == raw,
        "billing from the rollups ({rollups:?}) differs from billing from the events ({raw:?})"
    );
    let range = DateRange::new(
        month.first_day(),
        month.next().first_day() - chrono::Days::new(1),
    )
    .context("the month's days")?;
    let (feature_use_s, _) =
        timed(args.runs, || async { house.feature_use(range, None).await }).await?;
    let (first_use_s, _) = timed(args.runs, || async {
        house.first_uses(range.end(), None).await
    })
    .await?;
    let (region_use_s, _) =
        timed(args.runs, || async { house.region_use(range, None).await }).await?;
    let (active_users_s, _) = timed(args.runs, || async {
        house.active_users(range, None).await
    })
    .await?;
    let adoption = AdoptionTimes {
        feature_use_s,
        first_use_s,
        region_use_s,
        active_users_s,
    };
    let adoption_s = feature_use_s + first_use_s + region_use_s + active_users_s;
    let (duckdb_raw_s, duckdb_forms_s) = match &args.duckdb {
        Some(python) => {
            let duck = duckdb(python, &lake_dir, month, args.runs, &raw)?;
            (Some(duck.seconds), Some(duck.forms))
        }
        None => (None, None),
    };

    let lake = Lake::new(&lake_dir);
    let monthly = lake.month_sources(month)?;
    let monthly_rows = footer_rows(&lake, &monthly.monthly)?;
    let lines = monthly
        .lines
        .as_deref()
        .context("the month is compacted whole, yet its monthly files have no billing lines")?;
    let lines_rows = footer_rows(&lake, lines)?;
    let (lake_bytes, events_files) = disk(&lake_dir.join(tally_core::schema::EVENTS_TABLE))?;
    // Billing merges the monthly files' billing lines, and its time follows their number.
    // At 1,000,000,000 events they are at most every customer × feature, one plan each.
    let lines_1b = u64::from(args.customers) * u64::from(args.features);
    let report = QueryReport {
        events: args.events,
        customers: args.customers,
        features: args.features,
        month: month.to_string(),
        generated: !reuse,
        generate_s,
        compact_s,
        lake_bytes,
        events_files,
        monthly_rows,
        billing_lines: raw.lines,
        billing_rollup_s,
        billing_raw_s,
        duckdb_raw_s,
        duckdb_forms_s,
        adoption_s,
        adoption,
        lines_rows,
        billing_rollup_projected_1b_s: billing_rollup_s * lines_1b.max(lines_rows) as f64
            / lines_rows.max(1) as f64,
        runs: args.runs,
    };
    match args.format {
        BenchFormat::Table => {
            println!(
                "{} events, {} customers × {} features, month {} ({} files, {:.1} GiB){}",
                report.events,
                report.customers,
                report.features,
                report.month,
                report.events_files,
                report.lake_bytes as f64 / (1u64 << 30) as f64,
                if reuse { ", reused" } else { "" }
            );
            if let (Some(g), Some(c)) = (generate_s, compact_s) {
                println!("generated in {g:.1} s, compacted in {c:.1} s");
            }
            println!(
                "billing ({} lines), median of {}:",
                report.billing_lines, report.runs
            );
            println!(
                "  from the monthly rollups ({} rows, {} billing lines)  {:.3} s (projected at 1e9 events: {:.3} s)",
                report.monthly_rows,
                report.lines_rows,
                report.billing_rollup_s,
                report.billing_rollup_projected_1b_s
            );
            println!(
                "  from the raw events                 {:.3} s",
                report.billing_raw_s
            );
            if let Some(d) = report.duckdb_raw_s {
                println!("  DuckDB from the raw events          {d:.3} s (its fastest form)");
            }
            for (form, s) in report.duckdb_forms_s.iter().flatten() {
                println!("    DuckDB, {form:<29} {s:.3} s");
            }
            let a = &report.adoption;
            println!(
                "adoption {:.3} s: feature use {:.3}, first uses {:.3}, regions {:.3}, \
                 distinct users {:.3}",
                report.adoption_s, a.feature_use_s, a.first_use_s, a.region_use_s, a.active_users_s
            );
        }
        BenchFormat::Json => {}
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(std::process::ExitCode::SUCCESS)
}

/// Runs `query` `runs` times; the median time in seconds and the last answer.
pub(crate) async fn timed<T, E, F, Fut>(runs: usize, mut query: F) -> anyhow::Result<(f64, T)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        last = Some(query().await?);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let answer = last.context("at least one run")?;
    Ok((times[times.len() / 2], answer))
}

const DECISIONS: [(Decision, f64); 6] = [
    (Decision::Accepted, 0.90),
    (Decision::Overage, 0.95),
    (Decision::LimitReached, 0.98),
    (Decision::NotEntitled, 0.99),
    (Decision::SeatLimit, 0.995),
    (Decision::Late, 1.0),
];
const PLANS: [&str; 3] = ["free", "pro", "enterprise"];
const REGIONS: [&str; 3] = ["eu-west-1", "us-east-1", "ap-south-1"];

/// Writes the month into the lake, partitions spread over the cores; returns each
/// partition's last sequence.
fn generate(lake: &Lake, spec: &Generated, month: Period) -> anyhow::Result<Vec<u64>> {
    let customers: Vec<(String, u16)> = (0..spec.customers)
        .map(|i| {
            let id = customer_id(i);
            let p = partition_of(&id, PARTITIONS);
            (id, p)
        })
        .collect();
    let features: Vec<String> = (0..spec.features)
        .map(|f| format!("feature-{f:02}"))
        .collect();
    let start = month.first_day().and_hms_opt(0, 0, 0).unwrap_or_default();
    let start = start.and_utc().timestamp_micros();
    let end = month
        .next()
        .first_day()
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc()
        .timestamp_micros();
    let next = AtomicU16::new(0);
    let last_seqs: Vec<AtomicU64> = (0..PARTITIONS).map(|_| AtomicU64::new(0)).collect();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for _ in 0..threads {
            handles.push(s.spawn(|| -> anyhow::Result<()> {
                loop {
                    let p = next.fetch_add(1, Ordering::Relaxed);
                    if p >= PARTITIONS {
                        return Ok(());
                    }
                    let mine: Vec<(u32, &str)> = customers
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| c.1 == p)
                        .map(|(i, c)| (i as u32, c.0.as_str()))
                        .collect();
                    let n = spec.events * mine.len() as u64 / u64::from(spec.customers).max(1);
                    let last = partition(lake, p, &mine, &features, n, (start, end), spec.prompts)?;
                    last_seqs[usize::from(p)].store(last, Ordering::Relaxed);
                }
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a generator thread panicked"))??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(last_seqs
        .iter()
        .map(|s| s.load(Ordering::Relaxed))
        .collect())
}

/// One partition's `n` events, in time order over `[start, end)`, sealed and written in
/// batches as a worker would; returns the last sequence. `prompts`: of type `prompt`,
/// with `tokens`, `model` and `user_id` in `data`.
fn partition(
    lake: &Lake,
    p: u16,
    customers: &[(u32, &str)],
    features: &[String],
    n: u64,
    (start, end): (i64, i64),
    prompts: bool,
) -> anyhow::Result<u64> {
    let mut rng = SmallRng::seed_from_u64(u64::from(p) + 1);
    let step = (end - start) as f64 / n.max(1) as f64;
    let mut seq = 0u64;
    let mut id = String::new();
    while seq < n {
        let rows = BATCH_ROWS.min(n - seq) as usize;
        let first_seq = seq + 1;
        let mut event_id = StringBuilder::with_capacity(rows, rows * 16);
        let mut customer = StringBuilder::with_capacity(rows, rows * 10);
        let mut feature = StringBuilder::with_capacity(rows, rows * 10);
        let mut quantity = Float64Builder::with_capacity(rows);
        let mut time = TimestampMicrosecondBuilder::with_capacity(rows);
        let mut region = StringBuilder::with_capacity(rows, rows * 10);
        let mut user = StringBuilder::with_capacity(rows, rows * 4);
        let mut decision = StringBuilder::with_capacity(rows, rows * 9);
        let mut decision_code = UInt8Builder::with_capacity(rows);
        let mut ingest = TimestampMicrosecondBuilder::with_capacity(rows);
        let mut plan = StringBuilder::with_capacity(rows, rows * 4);
        let mut data = StringBuilder::with_capacity(rows, if prompts { rows * 48 } else { 0 });
        let mut c = &customers[0];
        for row in 0..rows {
            seq += 1;
            // A message carries one customer's events, as SDKs batch them. Skewed: a few
            // customers and features carry most of the usage.
            if row % MESSAGE_EVENTS == 0 {
                c = &customers[(rng.random::<f64>().powi(2) * customers.len() as f64) as usize];
            }
            let f = (rng.random::<f64>().powi(2) * features.len() as f64) as usize;
            let t = start + (seq as f64 * step) as i64;
            id.clear();
            use std::fmt::Write as _;
            let _ = write!(id, "{p:03}-{seq:012}");
            event_id.append_value(&id);
            customer.append_value(c.1);
            feature.append_value(&features[f]);
            quantity.append_value(if rng.random::<f64>() < 0.9 {
                1.0
            } else {
                f64::from(rng.random_range(2u32..=10))
            });
            time.append_value(t);
            region.append_value(REGIONS[c.0 as usize % REGIONS.len()]);
            id.clear();
            let _ = write!(id, "u{}", rng.random_range(0..20));
            user.append_value(&id);
            if prompts {
                let tokens: u32 = rng.random_range(1..=2000);
                let model = MODELS[rng.random_range(0..MODELS.len())];
                let who = rng.random_range(0..50);
                data.append_value(format!(
                    r#"{{"tokens":{tokens},"model":"{model}","user_id":"u{who}"}}"#
                ));
            } else {
                data.append_null();
            }
            let roll = rng.random::<f64>();
            let d = DECISIONS
                .iter()
                .find(|d| roll < d.1)
                .map_or(Decision::Accepted, |d| d.0);
            decision.append_value(d.as_str());
            decision_code.append_value(d.code());
            ingest.append_value(t + 1_000_000);
            plan.append_value(
                PLANS[match c.0 % 10 {
                    0 => 2,
                    1..=3 => 1,
                    _ => 0,
                }],
            );
        }
        let strings = |v: &str| -> ArrayRef {
            let mut b = StringBuilder::with_capacity(rows, rows * v.len());
            for _ in 0..rows {
                b.append_value(v);
            }
            Arc::new(b.finish())
        };
        let batch = RecordBatch::try_new(
            lake_schema(),
            vec![
                Arc::new(event_id.finish()),
                Arc::new(customer.finish()),
                Arc::new(feature.finish()),
                Arc::new(quantity.finish()),
                Arc::new(time.finish().with_timezone("UTC")),
                Arc::new(region.finish()),
                Arc::new(user.finish()),
                strings("bench"),
                strings(if prompts { "prompt" } else { "usage" }),
                Arc::new(data.finish()),
                Arc::new(decision.finish()),
                Arc::new(ingest.finish().with_timezone("UTC")),
                Arc::new(UInt64Array::from_iter_values(first_seq..=seq)),
                Arc::new(UInt16Array::from(vec![p; rows])),
                Arc::new(plan.finish()),
                Arc::new(decision_code.finish()),
            ],
        )?;
        lake.write(
            &SealedBatch {
                partition: p,
                first_seq,
                last_seq: seq,
                after_seq: None,
                batch,
            },
            &Fence::open(),
        )?;
    }
    Ok(seq)
}

/// Compacts every partition up to its last sequence (nothing else writes this lake), the
/// month closed: dates merged, monthly rollups written, the merged files deleted (so that
/// DuckDB, globbing the directories, reads what the tables hold).
fn compact(lake: &Lake, last_seqs: &[u64]) -> anyhow::Result<()> {
    let options = CompactOptions {
        closed_after: Duration::ZERO,
        retain: Duration::ZERO,
        ..CompactOptions::default()
    };
    let next = AtomicU16::new(0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let p = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&last) = last_seqs.get(usize::from(p)) else {
                            return Ok(());
                        };
                        lake.compact(p, last, &Fence::open(), &options, SystemTime::now())?;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a compaction thread panicked"))??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    lake.vacuum(options.retain, SystemTime::now())?;
    Ok(())
}

/// What `benches/duckdb_billing.py` answers.
#[derive(Deserialize)]
struct Duck {
    /// The fastest of the forms' medians.
    seconds: f64,
    forms: BTreeMap<String, f64>,
    lines: u64,
    events: u64,
    quantity: f64,
}

/// DuckDB's times for the raw billing query over the month's events files, written in
/// each of the script's forms (median of `runs` each), after checking its answer against
/// Tally's.
fn duckdb(
    python: &Path,
    lake: &Path,
    month: Period,
    runs: usize,
    tally: &BillingTotals,
) -> anyhow::Result<Duck> {
    let duck: Duck = duckdb_script(python, "duckdb_billing.py", lake, month, runs)?;
    anyhow::ensure!(
        (duck.lines, duck.events, duck.quantity) == (tally.lines, tally.events, tally.quantity),
        "DuckDB's billing ({} lines, {} events, {} quantity) differs from Tally's ({tally:?})",
        duck.lines,
        duck.events,
        duck.quantity
    );
    Ok(duck)
}

/// Runs `benches/<script>` with `python` over the lake's month, `runs` times each query,
/// and reads the JSON object it prints.
pub(crate) fn duckdb_script<T: serde::de::DeserializeOwned>(
    python: &Path,
    script: &str,
    lake: &Path,
    month: Period,
    runs: usize,
) -> anyhow::Result<T> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../benches")
        .join(script);
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(lake)
        .arg(month.to_string())
        .arg(runs.to_string())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "DuckDB's run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("DuckDB's answer")
}

fn footer_rows(lake: &Lake, keys: &[String]) -> anyhow::Result<u64> {
    let mut rows = 0;
    for key in keys {
        rows += lake.footer_rows(key)?;
    }
    Ok(rows)
}

/// Bytes and Parquet files under a directory.
pub(crate) fn disk(dir: &Path) -> anyhow::Result<(u64, u64)> {
    let (mut bytes, mut files) = (0, 0);
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            let (b, f) = disk(&path)?;
            bytes += b;
            files += f;
        } else if path.extension().is_some_and(|x| x == "parquet") {
            bytes += std::fs::metadata(&path)?.len();
            files += 1;
        }
    }
    Ok((bytes, files))
}
