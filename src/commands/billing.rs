//! `tally billing`: every customer's invoice for a month.

use clap::Args;
use tally_node::config::Config;
use tally_query::Period;
use tally_reports::InvoiceRequest;

use super::reports::{ReportFormat, open, print};

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

/// Prints the report.
pub async fn run(config: &Config, args: BillingArgs) -> anyhow::Result<()> {
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
