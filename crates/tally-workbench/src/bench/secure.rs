//! `--secure`: the benchmarks as a deployment across hosts runs them. nats-server serves
//! TLS only (a CA and certificate made for the run), the API answers the auth callout, and
//! the load comes through a connection authenticated with an `sdk` API key, as an
//! application's would, its every publish checked against the key's permissions.
//! `--authenticated`: the same without TLS. Without either, the load comes from the
//! operator's service credential over loopback.

use std::time::Duration;

use anyhow::Context as _;
use tally_api::{ApiKeys, Role};
use tally_natsd::{NatsServer, ServerOptions, Tls};
use tally_node::api::Api;
use tally_node::config::Config;
use tally_node::pipeline::{Nats, Service};
use tokio_util::sync::CancellationToken;

/// A TLS nats-server of the run's own and the API answering its callout.
pub struct Secure {
    /// Kept running for the run.
    _server: NatsServer,
    api: Option<Api>,
    stop: CancellationToken,
    /// The `sdk` key the load is sent with.
    pub key: String,
    /// The CA the load's connection trusts, with TLS.
    pub ca: Option<std::path::PathBuf>,
}

impl Secure {
    /// Starts the server under `dir` (serving TLS only, with `tls`) and points `config`
    /// at it.
    pub async fn start(
        config: &mut Config,
        dir: &std::path::Path,
        tls: bool,
    ) -> anyhow::Result<Secure> {
        let mut options = ServerOptions::new(dir.join("nats"));
        options.binary = config.nats_server.clone();
        let mut ca = None;
        if tls {
            let made = tally_natsd::tls::make(&dir.join("tls"), &["127.0.0.1".to_owned()])?;
            options.tls = Some(Tls {
                cert: made.cert,
                key: made.key,
            });
            ca = Some(made.ca);
        }
        let server = tokio::task::spawn_blocking(move || NatsServer::start(options))
            .await?
            .context("starting nats-server with TLS")?;
        config.nats_url = Some(server.url());
        config.nats_credentials = Some(server.credentials().dir().to_owned());
        config.nats_ca = ca.clone();
        config.api.listen = "127.0.0.1:0".to_owned();
        config.api.nats_session_secs = 60;
        Ok(Secure {
            _server: server,
            api: None,
            stop: CancellationToken::new(),
            key: String::new(),
            ca,
        })
    }

    /// Starts the API (the callout) and makes the load's key.
    pub async fn serve(&mut self, config: &Config, nats: &Nats) -> anyhow::Result<()> {
        self.api = Some(Api::start(config, nats, None, self.stop.clone()).await?);
        let keys = ApiKeys::open(&nats.jetstream, nats.replicas).await?;
        self.key = keys
            .create(Role::Sdk, Vec::new(), "tally bench".to_owned())
            .await?
            .token;
        Ok(())
    }

    /// How the load connects: with the key (over TLS, when the server serves it).
    pub fn connect_options(&self) -> anyhow::Result<async_nats::ConnectOptions> {
        let mut options =
            tally_sdk::connect_options(&self.key)?.connection_timeout(Duration::from_secs(5));
        if let Some(ca) = &self.ca {
            options = options.require_tls(true).add_root_certificates(ca.clone());
        }
        Ok(options)
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        if let Some(api) = self.api {
            api.stopped().await?;
        }
        Ok(())
    }
}

/// How the load connects without `--secure`: as the operator, on loopback.
pub fn operator_options(config: &Config) -> anyhow::Result<async_nats::ConnectOptions> {
    let seed =
        tally_natsd::Credentials::open(config.nats_credentials_dir()).seed(Service::Admin)?;
    Ok(async_nats::ConnectOptions::with_nkey(seed))
}
