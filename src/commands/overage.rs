//! `tally overage`: the month's upgrade candidates.

use clap::Args;
use tally_node::config::Config;
use tally_query::Period;

use super::reports::{ReportFormat, open, print};

#[derive(Debug, Args)]
pub struct OverageArgs {
    /// The month, YYYY-MM.
    #[arg(long)]
    pub period: Period,
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

/// Prints the report.
pub async fn run(config: &Config, args: OverageArgs) -> anyhow::Result<()> {
    let (lake, defs) = open(config).await?;
    print(
        &tally_reports::overage(&lake, &defs, args.period).await?,
        args.format,
    )
}
