//! `tally adoption`: how the features are taken up over a range of days.

use clap::Args;
use std::collections::BTreeSet;

use anyhow::Context as _;
use chrono::NaiveDate;
use tally_node::config::Config;
use tally_query::analytics::DateRange;
use tally_reports::{AdoptionRequest, FREE_PLAN};

use super::reports::{ReportFormat, open, print};

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

/// Prints the report.
pub async fn run(config: &Config, args: AdoptionArgs) -> anyhow::Result<()> {
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
