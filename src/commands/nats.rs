//! `tally nats init`: the credentials of a deployment's NATS, and the server configuration
//! that enforces them.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use tally_natsd::{Credentials, Service, auth};
use tally_node::config::Config;

/// NATS credentials for a deployment.
#[derive(Debug, Subcommand)]
pub enum NatsCmd {
    /// Make the credentials (one nkey per Tally service and the auth callout's key) in a
    /// directory (0700, files 0600), keeping any already there, and write `auth.conf`, the
    /// `authorization` block for nats-server to `include`: Tally's services by their
    /// public keys with least-privilege permissions, every other client sent to Tally's
    /// auth callout (API keys).
    ///
    /// Give each process only its own file: a worker `worker.nk`, the API `api.nk` and
    /// `callout.nk`, the operator's commands `admin.nk`. For a cluster, `--route` writes
    /// `cluster.conf`, the routes each node's `cluster` block includes, authenticated with
    /// `route.secret`.
    ///
    /// Example: tally nats init --dir /etc/tally/nats --route nats-1:6222 --route nats-2:6222 --route nats-3:6222
    Init(InitArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Where to write them (default: the configured nats_credentials, or
    /// <data_dir>/nats/credentials).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also make a private CA (`ca.pem`, what clients trust) and a certificate for these
    /// hosts (`server.pem`, `server-key.pem`), for TLS between hosts when the deployment
    /// has no CA of its own. Repeat for several names or addresses.
    #[arg(long = "tls-host")]
    pub tls_hosts: Vec<String>,
    /// The route address (`host:port`) of each node of a NATS cluster, for `cluster.conf`:
    /// the routes a node's `cluster` block includes, authenticated with `route.secret`.
    /// Repeat for every node.
    #[arg(long = "route")]
    pub routes: Vec<String>,
}

pub fn run(config: &Config, cmd: NatsCmd) -> anyhow::Result<std::process::ExitCode> {
    match cmd {
        NatsCmd::Init(args) => {
            let dir = args.dir.unwrap_or_else(|| config.nats_credentials_dir());
            let credentials = Credentials::ensure(&dir)
                .with_context(|| format!("making NATS credentials in {}", dir.display()))?;
            let conf = credentials.write_server_config()?;
            if !args.tls_hosts.is_empty() {
                let made = tally_natsd::tls::make(&dir, &args.tls_hosts)?;
                eprintln!(
                    "TLS: {} and {} for {}; clients trust {}",
                    made.cert.display(),
                    made.key.display(),
                    args.tls_hosts.join(", "),
                    made.ca.display()
                );
            }
            if !args.routes.is_empty() {
                let cluster = credentials.write_cluster_config(&args.routes)?;
                eprintln!(
                    "cluster: include {} in each node's cluster block",
                    cluster.display()
                );
            }
            println!("{}", conf.display());
            eprintln!(
                "credentials in {}: {} and {} (the auth callout's key); include {} in nats-server's configuration",
                dir.display(),
                Service::ALL
                    .iter()
                    .map(|s| auth::file_name(*s))
                    .collect::<Vec<_>>()
                    .join(", "),
                auth::CALLOUT_FILE,
                conf.display(),
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
