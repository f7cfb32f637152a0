//! `tally ballista scheduler|executor`: a Ballista cluster over the lake, for queries run
//! with `--engine ballista://HOST:PORT` (or `query_engine` in the configuration). How the
//! pieces fit: `tally_query::distributed`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use tally_node::config::Config;
use tally_query::distributed::{self, Engine, ExecutorOptions, SchedulerOptions};

#[derive(Debug, Subcommand)]
pub enum BallistaCmd {
    /// Run a scheduler: it plans the queries clients send and hands their tasks to the
    /// executors.
    ///
    /// Example: tally ballista scheduler --listen 0.0.0.0:50050 --external-host ballista-scheduler
    Scheduler(SchedulerArgs),
    /// Run an executor: it registers with the scheduler, scans the lake and exchanges
    /// shuffle data with the other executors.
    ///
    /// Example: tally ballista executor --scheduler ballista-scheduler:50050 --listen 0.0.0.0:50051
    Executor(ExecutorArgs),
}

#[derive(Debug, Args)]
pub struct SchedulerArgs {
    /// Address to listen on. Ballista's gRPC has no authentication of its own: keep it on
    /// a private network.
    #[arg(long, default_value = "127.0.0.1:50050")]
    pub listen: SocketAddr,
    /// Host name the executors and clients reach this scheduler by (default: the
    /// listening address).
    #[arg(long)]
    pub external_host: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExecutorArgs {
    /// The scheduler, `HOST:PORT` or `ballista://HOST:PORT`.
    #[arg(long, default_value = "127.0.0.1:50050")]
    pub scheduler: String,
    /// Address for Arrow Flight: query results and shuffle data.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Port of the gRPC service the scheduler sends tasks to (on the listening address).
    #[arg(long, default_value_t = 50052)]
    pub grpc_port: u16,
    /// Host name the scheduler, the other executors and clients reach this executor by
    /// (default: the listening address).
    #[arg(long)]
    pub external_host: Option<String>,
    /// Directory of shuffle and spill files; default: `DATA_DIR/ballista/executor-PORT`.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Tasks run at once; 0: one per core.
    #[arg(long, default_value_t = 0)]
    pub concurrent_tasks: usize,
    /// Memory the executor's tasks may hold, in MiB; they spill to the work directory
    /// past it.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(64..=1 << 30))]
    pub memory_limit_mib: u64,
}

pub async fn run(config: &Config, cmd: BallistaCmd) -> anyhow::Result<ExitCode> {
    let lake = config.lake();
    match cmd {
        BallistaCmd::Scheduler(args) => {
            tracing::info!(listen = %args.listen, "Ballista scheduler starting");
            let options = SchedulerOptions {
                listen: args.listen,
                external_host: args.external_host,
            };
            distributed::run_scheduler(&lake, options)
                .await
                .context("running the Ballista scheduler")?;
        }
        BallistaCmd::Executor(args) => {
            let scheduler = scheduler_address(&args.scheduler)?;
            let work_dir = args.work_dir.unwrap_or_else(|| {
                config
                    .data_dir
                    .join("ballista")
                    .join(format!("executor-{}", args.listen.port()))
            });
            tracing::info!(listen = %args.listen, scheduler = %args.scheduler, "Ballista executor starting");
            let options = ExecutorOptions {
                scheduler,
                listen: args.listen,
                grpc_port: args.grpc_port,
                external_host: args.external_host,
                work_dir,
                concurrent_tasks: args.concurrent_tasks,
                memory_limit: args.memory_limit_mib << 20,
            };
            distributed::run_executor(&lake, options)
                .await
                .context("running the Ballista executor")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `HOST:PORT` or `ballista://HOST:PORT` as a host and a port.
fn scheduler_address(given: &str) -> anyhow::Result<(String, u16)> {
    let url = if given.contains("://") {
        given.to_owned()
    } else {
        format!("ballista://{given}")
    };
    match url.parse::<Engine>() {
        Ok(Engine::Ballista { host, port }) => Ok((host, port)),
        Ok(Engine::Local) => unreachable!("a URL is never `local`"),
        Err(e) => Err(anyhow::anyhow!("--scheduler: {e}")),
    }
}
