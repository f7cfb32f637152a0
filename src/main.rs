//! `tally`: usage metering, entitlement enforcement and billing analytics.

use std::io::IsTerminal as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{ArgAction, Args, Parser, Subcommand};
use tally::config::{Config, parse_partitions};
use tally::definitions::Kind;
use tally::demo::{self, DemoArgs};
use tally::output::Format;
use tally::pipeline::{self, Nats};
use tally::workload::Spec;
use tally_query::Period;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "tally", version, about, long_about = None)]
struct Cli {
    /// Configuration file (TOML). `TALLY_*` environment variables override it.
    #[arg(long, global = true, env = "TALLY_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory: the lake, and the embedded nats-server's store.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// NATS server URL; unset starts a local nats-server.
    #[arg(long, global = true)]
    nats_url: Option<String>,
    /// Log what Tally does (`-v`), or in detail (`-vv`). `serve`, `worker` and `api` log
    /// it anyway, the other commands only warnings; a `log` setting (`TALLY_LOG`) wins.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole pipeline on a generated month of usage and print its bill.
    ///
    /// The demo always starts its own nats-server and lake under the data directory
    /// (default data/demo), which it clears on the next run; it does not use --nats-url.
    ///
    /// Example: tally demo --events 200000 --format json
    Demo(DemoCmd),
    /// Print every customer's invoice for a month: usage rated by the plan that decided
    /// it, plan and add-on fees, the minimum. Reads the plans and customers from NATS (the
    /// embedded server of the data directory when no URL is set) and the usage from the
    /// lake.
    ///
    /// Example: tally billing --period 2026-11 --format csv
    Billing(tally::reports::BillingArgs),
    /// Run one read-only SQL query over the lake (tables `events`, `rollups`, `decisions`) and
    /// the definitions (`plans`, `prices`, `customers`, `customer_addons`).
    ///
    /// Only queries run: DDL, DML, COPY, SET, several statements and table functions that
    /// read files are refused. The query is bounded by --memory-limit-mib and
    /// --timeout-secs; json, csv and arrow stream the result as it comes.
    ///
    /// Example: tally sql "SELECT customer, SUM(quantity) AS quantity FROM events WHERE date >= '2026-11-01' GROUP BY customer ORDER BY quantity DESC LIMIT 10" --format csv
    Sql(tally::sql::SqlArgs),
    /// The upgrade candidates of a month: customers past a feature's allowance (how far,
    /// what it adds to the bill), and customers refused by hard limits (per day) with the
    /// plan that would have covered them. Plans and customers come from NATS, usage from
    /// the lake.
    ///
    /// Example: tally overage --period 2026-11 --format json
    Overage(tally::reports::OverageArgs),
    /// Adoption per feature over a range of days: active and activated customers, events,
    /// quantity, first uses, free-tier customers who never used an advanced feature, use by
    /// region, distinct users per day, week and month.
    ///
    /// Example: tally adoption --from 2026-11-01 --to 2026-11-30 --feature exports
    Adoption(tally::reports::AdoptionArgs),
    /// Merge the lake's small Parquet files into large ones (the workers also do it every
    /// ingest.compact_every_secs). Only what checkpoints have settled is merged; no query
    /// sees a row twice or misses one meanwhile, and the replaced files are removed once
    /// older than --retain-secs.
    ///
    /// Example: tally compact --data-dir data --format json
    Compact(tally::compact::CompactArgs),
    /// Run Tally (the ingest worker over every partition, and the HTTP API) until
    /// interrupted.
    ///
    /// Example: tally serve --nats-url nats://127.0.0.1:4222
    Serve,
    /// Run an ingest worker until interrupted: a fair share of the partitions among the
    /// live workers, or exactly those of `--partitions`.
    ///
    /// Example: tally worker --partitions 0-7
    Worker(WorkerCmd),
    /// Plans, add-ons and SKU mappings: apply a catalogue file, or list them.
    ///
    /// Example: tally plans apply examples/catalog.toml
    #[command(subcommand)]
    Plans(tally::definitions::DefinitionsCmd),
    /// Customers' entitlements: apply a customers file, or list them.
    ///
    /// Example: tally customers apply examples/customers.toml
    #[command(subcommand)]
    Customers(tally::definitions::DefinitionsCmd),
    /// Ask the worker that owns a customer whether it may use a feature now.
    ///
    /// Example: tally check cust-00001 api-calls --quantity 100 --nats-url nats://127.0.0.1:4222
    Check(CheckCmd),
    /// Run the HTTP API alone (no ingest worker), until Ctrl-C or SIGTERM.
    ///
    /// Example: TALLY_NATS_URL=nats://10.0.0.5:4222 tally api
    Api,
    /// Manage the API keys: create (the secret is shown once), list, revoke.
    ///
    /// Example: tally keys create --role billing --name "invoicing job"
    #[command(subcommand)]
    Keys(tally::api::KeysCmd),
    /// License tokens: verify one offline against a published key set (no NATS, no network).
    ///
    /// Example: tally license verify "$(cat license.token)" --key license-keys.json --format json
    #[command(subcommand)]
    License(tally::license::LicenseCmd),
    /// Run the fault suite: publish a workload while the worker is killed, nats-server
    /// restarts and the lake refuses writes; then check the lake against the generator.
    ///
    /// It starts its own nats-server and worker under the data directory, which it
    /// clears on the next run. Exits non-zero unless every figure is exact.
    ///
    /// Example: tally chaos --events 100000 --kills 5 --nats-restarts 2 --data-dir /tmp/chaos --format json
    Chaos(tally::chaos::ChaosArgs),
    /// Measure the pipeline: ingest, the quota engine, checks, recovery, queries, HTTP.
    ///
    /// Example: tally bench ingest --events 3000000 --batch 100 --format json
    #[command(subcommand)]
    Bench(tally::bench::BenchCmd),
}

#[derive(Args)]
struct DemoCmd {
    /// Events to generate.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Customers (a few large ones and a long tail).
    #[arg(long, default_value_t = 1_000)]
    customers: u32,
    /// Metered features (at most 24).
    #[arg(long, default_value_t = 20)]
    features: u32,
    /// Regions (at most 6).
    #[arg(long, default_value_t = 3)]
    regions: u32,
    /// Month the events fall in (YYYY-MM); default: the current month, up to now.
    #[arg(long)]
    month: Option<String>,
    /// Events per NATS message (1: one event per message).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Share of malformed events (they go to the dead-letter stream).
    #[arg(long, default_value_t = 0.001)]
    invalid_rate: f64,
    /// Share of events published a second time with the same id.
    #[arg(long, default_value_t = 0.001)]
    duplicate_rate: f64,
    /// Billing lines to show.
    #[arg(long, default_value_t = 10)]
    top: usize,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(Args)]
struct CheckCmd {
    customer: String,
    feature: String,
    #[arg(long, default_value_t = 1.0)]
    quantity: f64,
    #[arg(long)]
    user: Option<String>,
    #[arg(long)]
    region: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(Args)]
struct WorkerCmd {
    /// Partitions this worker owns, e.g. `0-7` or `0-3,8` (waiting for any that another
    /// worker holds). Without it, the worker takes a fair share and hands partitions over
    /// as workers come and go.
    #[arg(long)]
    partitions: Option<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        // The reader went away (`tally … | head`): nothing more to say.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let mut config = Config::load(cli.config.as_deref())?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(log_filter(
            &config,
            &cli.command,
            cli.verbose,
        )))
        // Colours for a person at a terminal, not for a log file or a pipe.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    if let Some(dir) = cli.data_dir {
        config.data_dir = dir;
    }
    if cli.nats_url.is_some() {
        config.nats_url = cli.nats_url;
    }
    match cli.command {
        Command::Demo(cmd) => {
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
                std::process::ExitCode::SUCCESS
            } else {
                eprintln!("error: the billed totals do not equal the generated totals");
                std::process::ExitCode::from(2)
            })
        }
        Command::Billing(args) => {
            tally::reports::billing(&config, args).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Sql(args) => tally::sql::run(&config, args).await,
        Command::Overage(args) => {
            tally::reports::overage(&config, args).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Adoption(args) => {
            tally::reports::adoption(&config, args).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Compact(args) => tally::compact::run(&config, args).await,
        Command::Serve => serve(config, None, true).await,
        Command::Worker(cmd) => {
            let partitions = cmd
                .partitions
                .map(|spec| parse_partitions(&spec, config.ingest.partitions))
                .transpose()?;
            serve(config, partitions, false).await
        }
        Command::Plans(cmd) => tally::definitions::run(config, Kind::Catalog, cmd).await,
        Command::Customers(cmd) => tally::definitions::run(config, Kind::Customers, cmd).await,
        Command::Check(cmd) => check(config, cmd).await,
        Command::Api => serve_api(config).await,
        Command::Keys(cmd) => tally::api::run_keys(&config, cmd).await,
        Command::License(cmd) => tally::license::run(cmd),
        Command::Bench(cmd) => tally::bench::run(config, cmd).await,
        Command::Chaos(args) => {
            if config.data_dir == Config::default().data_dir {
                config.data_dir = config.data_dir.join("chaos");
            }
            let format = args.format;
            let report = tally::chaos::run(config, args).await?;
            match format {
                Format::Table => tally::chaos::print_table(&report),
                _ => println!("{}", serde_json::to_string(&report)?),
            }
            Ok(if report.exact {
                std::process::ExitCode::SUCCESS
            } else {
                eprintln!("error: the lake does not match what was published; see the figures");
                std::process::ExitCode::from(2)
            })
        }
    }
}

/// The log filter: the configured `log` when set; else what Tally does (INFO) for the
/// long-running commands, whose operators read it, and for any command run with `-v`;
/// only warnings for the commands a person runs to get an answer; detail with `-vv`.
fn log_filter(config: &Config, command: &Command, verbose: u8) -> String {
    if let Some(log) = &config.log {
        return log.clone();
    }
    let long_running = matches!(command, Command::Serve | Command::Worker(_) | Command::Api);
    match (verbose, long_running) {
        (0, false) => "warn",
        (0 | 1, _) => "warn,tally=info",
        _ => "warn,tally=debug",
    }
    .to_owned()
}

impl DemoCmd {
    /// The demo keeps its data apart (`data/demo`) unless a directory was chosen.
    fn data_dir_is_default(&self, config: &Config) -> bool {
        config.data_dir == Config::default().data_dir
    }
}

async fn check(config: Config, cmd: CheckCmd) -> anyhow::Result<std::process::ExitCode> {
    use tally_ingest::checks::{CheckRequest, check};
    let nats = Nats::connect(&config).await?;
    let request = CheckRequest {
        customer: cmd.customer,
        feature: cmd.feature,
        quantity: cmd.quantity,
        time: None,
        region: cmd.region,
        user: cmd.user,
    };
    let reply = check(
        &nats.client,
        config.ingest.partitions,
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

/// Whether an error is NATS failing an operation (retrying later may help), not a
/// configuration or topology one.
fn nats_unavailable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<tally_ingest::Error>(),
            Some(tally_ingest::Error::Nats { .. })
        )
    })
}

/// Runs the worker (and the API, `with_api`) until Ctrl-C or SIGTERM, then drains in
/// order: the worker first, the API last, so requests can be answered while it drains.
async fn serve(
    config: Config,
    partitions: Option<Vec<u16>>,
    with_api: bool,
) -> anyhow::Result<std::process::ExitCode> {
    // Handlers first: a SIGTERM during start-up must drain, not kill.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let nats = Nats::connect(&config).await?;
    // NATS may be restarting while this starts: transient errors are retried for a while.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut pause = std::time::Duration::from_millis(250);
    let pipeline = loop {
        match pipeline::start(&config, &nats, partitions.clone()).await {
            Ok(p) => break p,
            Err(e) if nats_unavailable(&e) && std::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "cannot start yet");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    };
    let stop_api = CancellationToken::new();
    let api = if with_api {
        let api = tally::api::Api::start(
            &config,
            &nats,
            pipeline.local_checks.clone(),
            stop_api.clone(),
        )
        .await?;
        announce(&api);
        Some(api)
    } else {
        None
    };
    tracing::info!(lake = %config.lake_dir().display(), "tally is running; Ctrl-C stops it");
    let cancel = pipeline.cancel_token();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; draining"),
        _ = term.recv() => tracing::info!("terminated; draining"),
        () = cancel.cancelled() => tracing::error!("a component failed; stopping"),
    }
    pipeline.shutdown().await?;
    stop_api.cancel();
    if let Some(api) = api {
        api.stopped().await?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Runs the API alone until Ctrl-C or SIGTERM.
async fn serve_api(config: Config) -> anyhow::Result<std::process::ExitCode> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let nats = Nats::connect(&config).await?;
    let stop = CancellationToken::new();
    let api = tally::api::Api::start(&config, &nats, None, stop.clone()).await?;
    announce(&api);
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
        _ = term.recv() => tracing::info!("terminated; stopping"),
    }
    stop.cancel();
    api.stopped().await?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Tells the operator where the API is, and where the first admin key went.
fn announce(api: &tally::api::Api) {
    eprintln!("tally api on http://{}", api.addr);
    if let Some((_, path)) = &api.bootstrap {
        eprintln!(
            "no API key existed: an admin key was made and written to {} (tally keys create makes others)",
            path.display()
        );
    }
}
