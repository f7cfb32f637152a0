//! `tally`: usage metering, entitlement enforcement and billing analytics.

use std::io::IsTerminal as _;
use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand};
use tally::commands::serve;
use tally::config::{Config, parse_partitions};
use tally::definitions::Kind;

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
    /// Where SQL and the reports run: `local`, or `ballista://HOST:PORT` (a scheduler of
    /// `tally ballista`). Overrides the `query_engine` setting.
    #[arg(long, global = true)]
    engine: Option<tally_query::Engine>,
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
    Demo(tally::commands::demo::DemoCmd),
    /// Print every customer's invoice for a month: usage rated by the plan that decided
    /// it, plan and add-on fees, the minimum. Reads the plans and customers from NATS (the
    /// embedded server of the data directory when no URL is set) and the usage from the
    /// lake.
    ///
    /// Example: tally billing --period 2026-11 --format csv
    Billing(tally::commands::billing::BillingArgs),
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
    Overage(tally::commands::overage::OverageArgs),
    /// Adoption per feature over a range of days: active and activated customers, events,
    /// quantity, first uses, free-tier customers who never used an advanced feature, use by
    /// region, distinct users per day, week and month.
    ///
    /// Example: tally adoption --from 2026-11-01 --to 2026-11-30 --feature exports
    Adoption(tally::commands::adoption::AdoptionArgs),
    /// Merge the lake's small Parquet files into large ones (the workers also do it every
    /// ingest.compact_every_secs). Only what checkpoints have settled is merged; no query
    /// sees a row twice or misses one meanwhile, and the replaced files are removed once
    /// older than --retain-secs.
    ///
    /// Example: tally compact --data-dir data --format json
    Compact(tally::compact::CompactArgs),
    /// Work on the lake itself: `tally lake migrate` turns a lake of the directory layout
    /// into Delta tables.
    ///
    /// Example: tally lake migrate --data-dir data
    #[command(subcommand)]
    Lake(tally::commands::lake::LakeCmd),
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
    /// Meters (OpenMeter's definitions, applied with `tally plans apply` under
    /// `[[meters]]` or through the API): list them, or query a meter's usage over the lake.
    ///
    /// Example: tally meters query tokens --window DAY --time-zone Europe/Berlin --group-by subject
    #[command(subcommand)]
    Meters(tally::commands::meters::MetersCmd),
    /// Customers' entitlements: apply a customers file, or list them.
    ///
    /// Example: tally customers apply examples/customers.toml
    #[command(subcommand)]
    Customers(tally::definitions::DefinitionsCmd),
    /// Ask the worker that owns a customer whether it may use a feature now.
    ///
    /// Example: tally check cust-00001 api-calls --quantity 100 --nats-url nats://127.0.0.1:4222
    Check(tally::commands::check::CheckArgs),
    /// Run the HTTP API alone (no ingest worker), until Ctrl-C or SIGTERM.
    ///
    /// Example: TALLY_NATS_URL=nats://10.0.0.5:4222 tally api
    Api,
    /// Manage the API keys: create (the secret is shown once), list, revoke.
    ///
    /// Example: tally keys create --role billing --name "invoicing job"
    #[command(subcommand)]
    Keys(tally::commands::keys::KeysCmd),
    /// NATS credentials for a deployment: `tally nats init --dir DIR` makes them and the
    /// nats-server configuration that enforces them.
    ///
    /// Example: tally nats init --dir /etc/tally/nats
    #[command(subcommand)]
    Nats(tally::commands::nats::NatsCmd),
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
    /// The events stream's partitions: show the count, or grow it (16 → 64) while Tally
    /// runs.
    ///
    /// Example: tally partitions grow --to 64
    #[command(subcommand)]
    Partitions(tally::commands::partitions::PartitionsCmd),
    /// A Ballista cluster over the lake for distributed queries: `scheduler`, and
    /// `executor` (two or more). Queries run on it with --engine ballista://HOST:PORT.
    ///
    /// Example: tally ballista scheduler --listen 127.0.0.1:50050
    #[command(subcommand)]
    Ballista(tally::commands::ballista::BallistaCmd),
    /// Measure the pipeline: ingest, the quota engine, checks, recovery, queries, HTTP.
    ///
    /// Example: tally bench ingest --events 3000000 --batch 100 --format json
    #[command(subcommand)]
    Bench(tally::bench::BenchCmd),
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
    if let Some(engine) = cli.engine {
        config.query_engine = engine;
    }
    match cli.command {
        Command::Demo(cmd) => tally::commands::demo::run(config, cmd).await,
        Command::Billing(args) => {
            tally::commands::billing::run(&config, args).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Sql(args) => tally::sql::run(&config, args).await,
        Command::Overage(args) => {
            tally::commands::overage::run(&config, args).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Adoption(args) => {
            tally::commands::adoption::run(&config, args).await?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Compact(args) => tally::compact::run(&config, args).await,
        Command::Serve => serve::run(config, None, true).await,
        Command::Worker(cmd) => {
            let partitions = cmd
                .partitions
                .map(|spec| parse_partitions(&spec, config.ingest.partitions))
                .transpose()?;
            serve::run(config, partitions, false).await
        }
        Command::Plans(cmd) => tally::definitions::run(config, Kind::Catalog, cmd).await,
        Command::Customers(cmd) => tally::definitions::run(config, Kind::Customers, cmd).await,
        Command::Check(cmd) => tally::commands::check::run(config, cmd).await,
        Command::Api => serve::api(config).await,
        Command::Keys(cmd) => tally::commands::keys::run(&config, cmd).await,
        Command::Lake(cmd) => tally::commands::lake::run(&config, cmd).await,
        Command::License(cmd) => tally::license::run(cmd),
        Command::Nats(cmd) => tally::commands::nats::run(&config, cmd),
        Command::Bench(cmd) => tally::bench::run(config, cmd).await,
        Command::Chaos(args) => tally::commands::chaos::run(config, args).await,
        Command::Ballista(cmd) => tally::commands::ballista::run(&config, cmd).await,
        Command::Partitions(cmd) => tally::commands::partitions::run(&config, cmd).await,
        Command::Meters(cmd) => tally::commands::meters::run(&config, cmd).await,
    }
}

/// The log filter: the configured `log` when set; else what Tally does (INFO) for the
/// long-running commands, whose operators read it, and for any command run with `-v`;
/// only warnings for the commands a person runs to get an answer; detail with `-vv`.
fn log_filter(config: &Config, command: &Command, verbose: u8) -> String {
    if let Some(log) = &config.log {
        return log.clone();
    }
    let long_running = matches!(
        command,
        Command::Serve | Command::Worker(_) | Command::Api | Command::Ballista(_)
    );
    match (verbose, long_running) {
        (0, false) => "warn",
        (0 | 1, _) => "warn,tally=info",
        _ => "warn,tally=debug",
    }
    .to_owned()
}
