//! `tally bench lake`: the commit rate the lake's Delta log sustains with every partition
//! flushing at once, and each flush's latency (upload, then a commit to the events table
//! and one to the rollups table), on local disk or on the S3-compatible test server.
//!
//! The rows are the workload generator's events, decoded and put in lake rows as a worker
//! would, `--rows` per flush. One thread per partition writes flush after flush, each
//! following the one before (`after_seq`), for `--seconds`; every 100th commit of a table
//! writes a checkpoint in the background, as in ingest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tally_core::{Decision, DecodeLimits, Fence, Frame, SealedBatch};
use tally_ingest::rows::Rows;
use tally_store::{Lake, Location};

use super::BenchFormat;
use crate::workload::{self, Spec};

#[derive(Args)]
pub struct LakeBench {
    /// Partitions flushing at once, a thread each.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    partitions: u16,
    /// Rows per flush.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..))]
    rows: u32,
    /// How long every partition flushes.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// On the S3-compatible test server (s3s-fs, started for the run) rather than local disk.
    #[arg(long)]
    s3: bool,
    #[arg(long, value_enum, default_value_t = BenchFormat::Table)]
    format: BenchFormat,
}

#[derive(Debug, Serialize)]
pub struct LakeReport {
    pub storage: &'static str,
    pub partitions: u16,
    pub rows_per_flush: u32,
    pub seconds: f64,
    pub flushes: u64,
    /// Flushes per second; each is one commit to each of the two tables.
    pub flushes_per_second: f64,
    pub rows_per_second: f64,
    pub flush_p50_ms: f64,
    pub flush_p99_ms: f64,
    pub flush_max_ms: f64,
}

pub fn run(args: LakeBench) -> anyhow::Result<std::process::ExitCode> {
    let dir = tempfile::Builder::new()
        .prefix("tally-bench-lake-")
        .tempdir()?;
    let (_server, location) = if args.s3 {
        let (server, s3) = crate::start_s3(&dir.path().join("s3"))?;
        (Some(server), Location::S3(s3))
    } else {
        (None, Location::Local(dir.path().join("lake")))
    };
    let lake = Lake::open(&location)?;
    let rows = Arc::new(rows_of(args.rows)?);

    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let threads: Vec<_> = (0..args.partitions)
        .map(|partition| {
            let (lake, rows) = (lake.clone(), Arc::clone(&rows));
            std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                let mut latencies = Vec::new();
                let fence = Fence::open();
                let n = rows.num_rows() as u64;
                let mut last = 0;
                while Instant::now() < deadline {
                    let sealed = SealedBatch {
                        partition,
                        first_seq: last + 1,
                        last_seq: last + n,
                        after_seq: Some(last),
                        batch: (*rows).clone(),
                    };
                    let t = Instant::now();
                    lake.write(&sealed, &fence)?;
                    latencies.push(t.elapsed());
                    last += n;
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in threads {
        latencies.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("a flushing thread panicked"))??,
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort();
    let at = |q: f64| {
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1e3
    };
    let flushes = latencies.len() as u64;
    let report = LakeReport {
        storage: if args.s3 { "s3s-fs" } else { "local disk" },
        partitions: args.partitions,
        rows_per_flush: args.rows,
        seconds,
        flushes,
        flushes_per_second: flushes as f64 / seconds,
        rows_per_second: (flushes * u64::from(args.rows)) as f64 / seconds,
        flush_p50_ms: at(0.5),
        flush_p99_ms: at(0.99),
        flush_max_ms: at(1.0),
    };
    match args.format {
        BenchFormat::Json => println!("{}", serde_json::to_string(&report)?),
        BenchFormat::Table => println!(
            "{} partitions on {}, {} rows a flush: {} flushes in {:.1} s, {:.0} flushes/s \
             (a commit to each table), {:.0} rows/s; flush p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            report.partitions,
            report.storage,
            report.rows_per_flush,
            report.flushes,
            report.seconds,
            report.flushes_per_second,
            report.rows_per_second,
            report.flush_p50_ms,
            report.flush_p99_ms,
            report.flush_max_ms
        ),
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// `n` lake rows of the workload generator's valid events, all accepted.
fn rows_of(n: u32) -> anyhow::Result<arrow::array::RecordBatch> {
    // Today's events, as a worker flushes them: a flush is mostly of one date.
    let spec = Spec::new(u64::from(n) * 2, chrono::Utc::now().date_naive());
    let (messages, _) = workload::generate(&spec);
    let limits = DecodeLimits::default();
    let mut rows = Rows::default();
    let now = chrono::Utc::now().timestamp_micros();
    'messages: for (seq, m) in (1..).zip(&messages) {
        let frame = Frame::decode(&m.payload, &limits)
            .map_err(|e| anyhow::anyhow!("a generated message: {e:?}"))?;
        for event in frame.events.into_iter().flatten() {
            if rows.len() == n as usize {
                break 'messages;
            }
            rows.push(&event, Decision::Accepted, Some("pro"), now, seq, 0);
        }
    }
    Ok(rows.finish())
}
