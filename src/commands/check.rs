//! `tally check`: asks the worker that owns a customer whether it may use a feature now.

use anyhow::Context as _;
use clap::Args;
use tally_node::config::Config;
use tally_node::output::Format;
use tally_node::pipeline::Nats;
use tally_node::pipeline::Service;

#[derive(Debug, Args)]
pub struct CheckArgs {
    pub customer: String,
    pub feature: String,
    #[arg(long, default_value_t = 1.0)]
    pub quantity: f64,
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub region: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

pub async fn run(config: Config, cmd: CheckArgs) -> anyhow::Result<std::process::ExitCode> {
    use tally_ingest::checks::{CheckRequest, check};
    let nats = Nats::connect(&config, Service::Admin).await?;
    let request = CheckRequest {
        customer: cmd.customer,
        feature: cmd.feature,
        quantity: cmd.quantity,
        time: None,
        region: cmd.region,
        user: cmd.user,
    };
    let partitions = tally_ingest::topology::partitions(&nats.jetstream)
        .await
        .context("reading the events stream's partitions")?;
    let reply = check(
        &nats.client,
        partitions.current(),
        &request,
        std::time::Duration::from_secs(5),
    )
    .await
    .context("is a tally worker running against this NATS? (tally serve)")?;
    if cmd.format == Format::Table {
        let of = |v: Option<f64>| v.map_or("unlimited".to_owned(), |v| v.to_string());
        println!(
            "{} {}: {} ({}), usage {} of {}, {} remaining{}{}",
            reply.customer,
            reply.feature,
            reply.decision,
            if reply.has_access {
                "has access"
            } else {
                "no access"
            },
            reply.usage,
            of(reply.limit),
            of(reply.remaining),
            reply
                .resets_at
                .map_or(String::new(), |t| format!(", resets {}", t.to_rfc3339())),
            reply
                .value
                .as_ref()
                .map_or(String::new(), |v| format!(", value {v}")),
        );
    } else if cmd.format == Format::Csv {
        let text = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        println!("customer,feature,decision,has_access,usage,limit,remaining,resets_at,value");
        println!(
            "{},{},{},{},{},{},{},{},{}",
            reply.customer,
            reply.feature,
            reply.decision,
            reply.has_access,
            reply.usage,
            text(reply.limit),
            text(reply.remaining),
            reply.resets_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
            reply
                .value
                .as_ref()
                .map(|v| format!("\"{}\"", v.to_string().replace('"', "\"\"")))
                .unwrap_or_default(),
        );
    } else {
        println!("{}", serde_json::to_string(&reply)?);
    }
    Ok(std::process::ExitCode::SUCCESS)
}
