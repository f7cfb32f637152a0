//! What `tally billing`, `tally overage` and `tally adoption` share: the lake and the
//! definitions they read, and `tally-reports`' renderer, which writes the same bytes as
//! the API's report routes.

use std::io::Write;

use clap::ValueEnum;
use tally_node::config::Config;
use tally_query::{Lakehouse, LakehouseOptions};
use tally_reports::{Definitions, Report};

/// How `tally billing`, `tally overage` and `tally adoption` print their reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// Aligned tables for people.
    Table,
    /// JSON: one document.
    Json,
    /// CSV with a header row.
    Csv,
    /// An Arrow IPC stream of one table (for pyarrow, polars, DuckDB).
    Arrow,
}

impl From<ReportFormat> for tally_reports::Format {
    fn from(f: ReportFormat) -> Self {
        match f {
            ReportFormat::Table => Self::Table,
            ReportFormat::Json => Self::Json,
            ReportFormat::Csv => Self::Csv,
            ReportFormat::Arrow => Self::Arrow,
        }
    }
}

pub(crate) async fn open(config: &Config) -> anyhow::Result<(Lakehouse, Definitions)> {
    let options = LakehouseOptions {
        engine: config.query_engine.clone(),
        ..LakehouseOptions::default()
    };
    let lake = Lakehouse::open_with(&config.lake(), options).await?;
    Ok((lake, tally_node::definitions(config).await?))
}

pub(crate) fn print(report: &impl Report, format: ReportFormat) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    tally_reports::render(report, format.into(), &mut out)?;
    out.flush()?;
    Ok(())
}
