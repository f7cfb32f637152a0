//! `tally billing`, `tally overage` and `tally adoption`: the reports of `tally-reports`
//! over the configured lake and the definitions in NATS, written by its renderer (the
//! same bytes `GET /api/v1/billing` and the others answer).

use std::collections::BTreeSet;
use std::io::Write;

use anyhow::Context as _;
use chrono::NaiveDate;
use clap::{Args, ValueEnum};
use tally_ingest::definitions::Definitions as Buckets;
use tally_query::analytics::DateRange;
use tally_query::{Lakehouse, Period};
use tally_reports::{AdoptionRequest, Definitions, FREE_PLAN, InvoiceRequest, Report};

use crate::config::Config;
use crate::pipeline::Nats;

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

#[derive(Debug, Args)]
pub struct BillingArgs {
    /// The month to bill, YYYY-MM.
    #[arg(long)]
    pub period: Period,
    /// Only this customer.
    #[arg(long)]
    pub customer: Option<String>,
    /// Bill each customer's own billing month that starts in the period, on its anchor
    /// day, instead of the calendar month.
    #[arg(long)]
    pub anniversary: bool,
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

#[derive(Debug, Args)]
pub struct OverageArgs {
    /// The month, YYYY-MM.
    #[arg(long)]
    pub period: Period,
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

#[derive(Debug, Args)]
pub struct AdoptionArgs {
    /// First day of the range, YYYY-MM-DD (UTC).
    #[arg(long)]
    pub from: NaiveDate,
    /// Last day of the range, YYYY-MM-DD (UTC), included.
    #[arg(long)]
    pub to: NaiveDate,
    /// Only this feature.
    #[arg(long)]
    pub feature: Option<String>,
    /// A plan whose customers are the free tier (repeat for several).
    #[arg(long = "free-plan", default_values_t = [FREE_PLAN.to_owned()])]
    pub free_plans: Vec<String>,
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

/// The definitions as they are now, from NATS (the embedded server of the data directory
/// when no URL is set).
pub async fn definitions(config: &Config) -> anyhow::Result<Definitions> {
    let nats = Nats::connect(config).await?;
    let buckets = Buckets::open(&nats.jetstream).await?;
    Definitions::load(&buckets)
        .await
        .context("reading the plans and customers")
}

/// `tally billing`.
pub async fn billing(config: &Config, args: BillingArgs) -> anyhow::Result<()> {
    let request = InvoiceRequest {
        period: args.period,
        customer: args.customer,
        anniversary: args.anniversary,
    };
    let (lake, defs) = open(config).await?;
    print(
        &tally_reports::invoices(&lake, &defs, &request).await?,
        args.format,
    )
}

/// `tally overage`.
pub async fn overage(config: &Config, args: OverageArgs) -> anyhow::Result<()> {
    let (lake, defs) = open(config).await?;
    print(
        &tally_reports::overage(&lake, &defs, args.period).await?,
        args.format,
    )
}

/// `tally adoption`.
pub async fn adoption(config: &Config, args: AdoptionArgs) -> anyhow::Result<()> {
    let range = DateRange::new(args.from, args.to)
        .with_context(|| format!("--to {} is before --from {}", args.to, args.from))?;
    let request = AdoptionRequest {
        range,
        feature: args.feature,
        free_plans: args.free_plans.into_iter().collect::<BTreeSet<_>>(),
    };
    let (lake, defs) = open(config).await?;
    print(
        &tally_reports::adoption(&lake, &defs, &request).await?,
        args.format,
    )
}

async fn open(config: &Config) -> anyhow::Result<(Lakehouse, Definitions)> {
    let lake = Lakehouse::open(&config.lake_dir()).await?;
    Ok((lake, definitions(config).await?))
}

fn print(report: &impl Report, format: ReportFormat) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    tally_reports::render(report, format.into(), &mut out)?;
    out.flush()?;
    Ok(())
}
