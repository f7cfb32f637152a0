//! `tally sql`: one read-only SQL query over the lake, printed as a table or streamed as
//! JSON, CSV or Arrow IPC. What is refused and the limits: `tally_query::sql`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use arrow::record_batch::RecordBatch;
use clap::{Args, ValueEnum};
use futures::StreamExt;
use tally_query::output::{OutputFormat, write_stream};
use tally_query::sql::{self, SqlError};
use tally_query::{Lakehouse, LakehouseOptions};

use tally_node::config::Config;
use tally_node::output::{Format, write_batches};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SqlFormat {
    /// An aligned table for people (the whole result is gathered first).
    Table,
    /// One JSON array of row objects, streamed; nulls written as null.
    Json,
    /// CSV with a header row, streamed.
    Csv,
    /// An Arrow IPC stream, streamed (for pyarrow, polars, DuckDB).
    Arrow,
}

#[derive(Debug, Args)]
pub struct SqlArgs {
    /// One query (SELECT or WITH … SELECT) over the lake's tables `events` and `rollups`,
    /// `decisions`, and the definitions' `plans`, `prices`, `customers` and
    /// `customer_addons` (read from NATS when the query names one).
    pub query: String,
    #[arg(long, value_enum, default_value_t = SqlFormat::Table)]
    pub format: SqlFormat,
    /// Memory the query may hold, in MiB; sorts and grouped aggregations spill to disk
    /// past it, other operators fail the query.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub memory_limit_mib: u64,
    /// Wall-clock limit of the query (planning and the whole result), in seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_secs: u64,
    /// Directory for spill files; default: the system's temporary directory.
    #[arg(long)]
    pub spill_dir: Option<PathBuf>,
}

/// Runs the query against `config`'s lake and writes its result to stdout.
pub async fn run(config: &Config, args: SqlArgs) -> anyhow::Result<ExitCode> {
    let options = LakehouseOptions {
        memory_limit: usize::try_from(args.memory_limit_mib << 20)?,
        spill_dir: args.spill_dir,
        time_limit: Duration::from_secs(args.timeout_secs),
        engine: config.query_engine.clone(),
        ..LakehouseOptions::default()
    };
    let lake = Lakehouse::open_with(&config.lake(), options).await?;
    with_definitions(config, &lake, &args.query).await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = match args.format {
        SqlFormat::Table => match collect(&lake, &args.query).await {
            Ok(batches) => {
                write_batches(&mut out, &batches, Format::Table)?;
                Ok(())
            }
            Err(e) => Err(e),
        },
        SqlFormat::Json => stream(&lake, &args.query, OutputFormat::Json, &mut out).await,
        SqlFormat::Csv => stream(&lake, &args.query, OutputFormat::Csv, &mut out).await,
        SqlFormat::Arrow => stream(&lake, &args.query, OutputFormat::Arrow, &mut out).await,
    };
    match result {
        Ok(()) => {
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ SqlError::TimeLimit { .. }) => {
            // The query's task is aborted, but a worker thread in the middle of a long
            // operator step finishes that step first, and the runtime's shutdown would
            // wait for it: exit now.
            let _ = out.flush();
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        Err(e) => {
            let _ = out.flush();
            Err(e.into())
        }
    }
}

/// Registers the definitions' tables in `lake` if `query` names one of them: they are
/// read from NATS, which a query over the lake alone does not need.
async fn with_definitions(config: &Config, lake: &Lakehouse, query: &str) -> anyhow::Result<()> {
    if tally_reports::needs_definitions(lake, query) {
        tally_node::definitions(config)
            .await
            .context("reading the definitions the query's tables hold")?
            .register(lake)?;
    }
    Ok(())
}

/// The whole result, for the table format.
async fn collect(lake: &Lakehouse, query: &str) -> Result<Vec<RecordBatch>, SqlError> {
    let mut stream = sql::run(lake, query).await?;
    let mut batches = Vec::new();
    while let Some(batch) = stream.next().await {
        batches.push(batch?);
    }
    Ok(batches)
}

/// The result written as it arrives.
async fn stream(
    lake: &Lakehouse,
    query: &str,
    format: OutputFormat,
    out: &mut impl Write,
) -> Result<(), SqlError> {
    write_stream(sql::run(lake, query).await?, format, out).await?;
    Ok(())
}
