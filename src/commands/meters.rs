//! `tally meters`: the meters defined (OpenMeter's definitions; written with `tally plans
//! apply` under `[[meters]]`, or the API), and a meter's usage over the lake, in the
//! shape OpenMeter's meter query answers.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand, ValueEnum};
use tally_core::access::Service;
use tally_core::meter::{Tz, WindowSize};
use tally_ingest::definitions::Definitions;
use tally_node::config::Config;
use tally_node::pipeline::Nats;
use tally_query::Lakehouse;
use tally_query::meters::MeterQuery;
use tally_reports::meters::{MeterQueryResult, named_group_by};

#[derive(Debug, Subcommand)]
pub enum MetersCmd {
    /// The meters defined, by slug.
    ///
    /// Example: tally meters list --format json
    List(ListArgs),
    /// A meter's usage: by window, customer and group-by, as OpenMeter's meter query
    /// answers it.
    ///
    /// Example: tally meters query tokens --window DAY --time-zone Europe/Berlin --group-by subject --group-by model
    Query(QueryArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MeterFormat {
    Table,
    /// OpenMeter's `MeterQueryResult` (for `list`: its `Meter` objects).
    Json,
    Csv,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// List deleted meters too.
    #[arg(long)]
    pub deleted: bool,
    #[arg(long, value_enum, default_value_t = MeterFormat::Table)]
    pub format: MeterFormat,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The meter's slug or id.
    pub meter: String,
    /// Events at or after (RFC 3339).
    #[arg(long)]
    pub from: Option<DateTime<Utc>>,
    /// Events before (RFC 3339).
    #[arg(long)]
    pub to: Option<DateTime<Utc>>,
    /// MINUTE, HOUR, DAY or MONTH; none: one window per group.
    #[arg(long, value_parser = parse_window)]
    pub window: Option<WindowSize>,
    /// The IANA time zone windows follow.
    #[arg(long, default_value = "UTC", value_parser = parse_zone)]
    pub time_zone: Tz,
    /// Only this customer (repeat for more).
    #[arg(long)]
    pub customer: Vec<String>,
    /// `subject`, `customer_id` or one of the meter's group-bys (repeat for more).
    #[arg(long)]
    pub group_by: Vec<String>,
    /// `NAME=VALUE`: only events whose group-by NAME is VALUE (repeat for more).
    #[arg(long)]
    pub filter: Vec<String>,
    #[arg(long, value_enum, default_value_t = MeterFormat::Table)]
    pub format: MeterFormat,
}

fn parse_window(text: &str) -> Result<WindowSize, String> {
    WindowSize::parse(text).ok_or_else(|| format!("MINUTE, HOUR, DAY or MONTH, not {text:?}"))
}

fn parse_zone(text: &str) -> Result<Tz, String> {
    text.parse()
        .map_err(|_| format!("an IANA time zone (Europe/Berlin), not {text:?}"))
}

pub async fn run(config: &Config, cmd: MetersCmd) -> anyhow::Result<ExitCode> {
    let nats = Nats::connect(config, Service::Admin).await?;
    let definitions = Definitions::open(&nats.jetstream, nats.replicas).await?;
    let out = &mut std::io::stdout().lock();
    match cmd {
        MetersCmd::List(args) => {
            let meters: Vec<_> = definitions
                .load_catalog()
                .await?
                .meters
                .into_iter()
                .filter(|m| args.deleted || !m.is_deleted())
                .collect();
            match args.format {
                MeterFormat::Json => writeln!(out, "{}", serde_json::to_string(&meters)?)?,
                MeterFormat::Table | MeterFormat::Csv => {
                    writeln!(
                        out,
                        "{:<24} {:<14} {:<24} {:<20} group by",
                        "meter", "aggregation", "value", "event type"
                    )?;
                    for m in &meters {
                        writeln!(
                            out,
                            "{:<24} {:<14} {:<24} {:<20} {}{}",
                            m.slug,
                            m.aggregation.as_str(),
                            m.value_property.as_deref().unwrap_or("-"),
                            m.event_type,
                            m.group_by.keys().cloned().collect::<Vec<_>>().join(", "),
                            if m.is_deleted() { " (deleted)" } else { "" }
                        )?;
                    }
                }
            }
        }
        MetersCmd::Query(args) => {
            let Some(meter) = definitions.live_meter(&args.meter).await? else {
                bail!("no meter {:?} (tally meters list)", args.meter);
            };
            let mut filters = std::collections::BTreeMap::<String, Vec<String>>::new();
            for f in &args.filter {
                let (name, value) = f
                    .split_once('=')
                    .with_context(|| format!("--filter is NAME=VALUE, not {f:?}"))?;
                filters
                    .entry(name.to_owned())
                    .or_default()
                    .push(value.to_owned());
            }
            let query = MeterQuery {
                from: args.from,
                to: args.to,
                window: args.window,
                time_zone: args.time_zone,
                customers: args.customer,
                group_by: args.group_by,
                filter_group_by: filters,
            };
            query.check(&meter)?;
            let lake = Lakehouse::open(&config.lake()).await?;
            let rows = lake.meter_query(&meter, &query).await?;
            let result = MeterQueryResult::new(&query, rows);
            let names = named_group_by(&query);
            match args.format {
                MeterFormat::Json => writeln!(out, "{}", result.to_json())?,
                MeterFormat::Csv => write!(out, "{}", result.to_csv(&names))?,
                MeterFormat::Table => {
                    write!(
                        out,
                        "{:<26} {:<26} {:<16}",
                        "window start", "window end", "customer"
                    )?;
                    for n in &names {
                        write!(out, " {n:<16}")?;
                    }
                    writeln!(out, " {:>16}", meter.aggregation.as_str())?;
                    for row in &result.data {
                        let customer = row.subject.as_deref().or(row.customer_id.as_deref());
                        write!(
                            out,
                            "{:<26} {:<26} {:<16}",
                            row.window_start,
                            row.window_end,
                            customer.unwrap_or("*")
                        )?;
                        for n in &names {
                            let v = row.group_by.get(n).cloned().flatten();
                            write!(out, " {:<16}", v.as_deref().unwrap_or("-"))?;
                        }
                        writeln!(out, " {:>16}", row.value)?;
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
