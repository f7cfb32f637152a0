//! `tally demo`: the workbench's demo on this configuration, with its exit code.

use std::process::ExitCode;

use clap::Args;
use tally_query::Period;
use tally_workbench::demo::{self, DemoArgs};
use tally_workbench::workload::Spec;

use tally_node::config::Config;
use tally_node::output::Format;

#[derive(Debug, Args)]
pub struct DemoCmd {
    /// Events to generate.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Customers (a few large ones and a long tail).
    #[arg(long, default_value_t = 1_000)]
    pub customers: u32,
    /// Metered features (at most 24).
    #[arg(long, default_value_t = 20)]
    pub features: u32,
    /// Regions (at most 6).
    #[arg(long, default_value_t = 3)]
    pub regions: u32,
    /// Month the events fall in (YYYY-MM); default: the current month, up to now.
    #[arg(long)]
    pub month: Option<String>,
    /// Events per NATS message (1: one event per message).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Share of malformed events (they go to the dead-letter stream).
    #[arg(long, default_value_t = 0.001)]
    pub invalid_rate: f64,
    /// Share of events published a second time with the same id.
    #[arg(long, default_value_t = 0.001)]
    pub duplicate_rate: f64,
    /// Billing lines to show.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

impl DemoCmd {
    /// The demo keeps its data apart (`data/demo`) unless a directory was chosen.
    fn data_dir_is_default(&self, config: &Config) -> bool {
        config.data_dir == Config::default().data_dir
    }
}

/// Runs the demo; exit code 2 when the lake does not equal the replay.
pub async fn run(mut config: Config, cmd: DemoCmd) -> anyhow::Result<ExitCode> {
    let month = match &cmd.month {
        Some(m) => m.parse::<Period>()?.first_day(),
        None => demo::this_month(),
    };
    let mut spec = Spec::new(cmd.events, month);
    spec.customers = cmd.customers;
    spec.features = cmd.features;
    spec.regions = cmd.regions;
    spec.batch = cmd.batch;
    spec.invalid_rate = cmd.invalid_rate;
    spec.duplicate_rate = cmd.duplicate_rate;
    if cmd.data_dir_is_default(&config) {
        config.data_dir = config.data_dir.join("demo");
    }
    let quiet = cmd.format != Format::Table;
    let report = demo::run(
        config,
        DemoArgs {
            spec,
            top: cmd.top,
            quiet,
        },
    )
    .await?;
    if quiet {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(if report.matches {
        ExitCode::SUCCESS
    } else {
        eprintln!("error: the billed totals do not equal the generated totals");
        ExitCode::from(2)
    })
}
