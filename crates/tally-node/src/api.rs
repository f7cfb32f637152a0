//! The HTTP API as the binary runs it (`tally api`, and inside `tally serve`), and
//! `tally keys`, which manages the API keys.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;

use std::time::Duration;

use tally_api::callout::Callout;
use tally_api::{ApiKeys, AppState, Role};
use tally_ingest::Service;
use tally_ingest::checks::LocalChecks;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::pipeline::Nats;

/// A running API server.
pub struct Api {
    /// Where it listens (the configured address, with the port chosen when it was 0).
    pub addr: SocketAddr,
    /// Whether it serves HTTPS (`api.tls_cert` and `api.tls_key`).
    pub tls: bool,
    /// The admin key made at the first start, and the file it was written to.
    pub bootstrap: Option<(String, PathBuf)>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Api {
    /// Opens the API's buckets, makes the first admin key when there is no key at all,
    /// binds `api.listen` and serves until `cancel`, over HTTPS when a certificate is
    /// configured. `local_checks`: the worker running in this process, if any.
    pub async fn start(
        config: &Config,
        nats: &Nats,
        local_checks: Option<LocalChecks>,
        cancel: CancellationToken,
    ) -> anyhow::Result<Api> {
        // The API's own connection, with the API's permissions.
        let client = nats
            .endpoint
            .connect(Service::Api, "tally-api")
            .await
            .context("connecting the API to NATS")?;
        let jetstream = async_nats::jetstream::new(client.clone());
        // Events are accepted before any worker has run: the streams must exist. Checks go
        // to the partitions the stream has (after a growth, a worker forwards a check sent
        // on the count before to the partition now).
        let partitions = tally_ingest::topology::ensure_streams(&jetstream, &config.ingest)
            .await
            .context("creating the events streams")?;
        let reports =
            tally_reports::LakeReports::new(config.lake()).with_engine(config.query_engine.clone());
        let state = AppState::open(
            jetstream,
            partitions.current(),
            config.ingest.replicas,
            config.ingest.limits,
            config.api.clone(),
            reports,
            local_checks,
            cancel.clone(),
        )
        .await
        .context("opening the API's buckets")?;
        if let Some(render) = crate::metrics::render(nats.client.clone()) {
            state.serve_metrics(render);
        }
        let bootstrap = bootstrap_admin_key(config, &state.keys).await?;
        // NATS clients with an API key are authorized here.
        let issuer = tally_natsd::Credentials::open(&nats.endpoint.credentials)
            .callout_key()
            .context("reading the auth callout's key")?;
        let callout = Callout::new(
            state.keys.clone(),
            issuer,
            Duration::from_secs(config.api.nats_session_secs),
        );
        callout
            .serve(client.clone(), cancel.clone())
            .await
            .map_err(|e| tally_ingest::Error::Nats {
                what: "subscribing to the auth callout",
                source: e,
            })?;
        let tls = config
            .api
            .tls()
            .context("loading the API's TLS certificate")?;
        let listener = tokio::net::TcpListener::bind(&config.api.listen)
            .await
            .with_context(|| format!("listening on {} (api.listen)", config.api.listen))?;
        let addr = listener.local_addr()?;
        let serves_tls = tls.is_some();
        tracing::info!(%addr, tls = serves_tls, "api listening");
        let task = match tls {
            Some(tls) => tokio::spawn(tally_api::serve_tls(listener, tls, state, cancel)),
            None => tokio::spawn(tally_api::serve(listener, state, cancel)),
        };
        Ok(Api {
            addr,
            tls: serves_tls,
            bootstrap,
            task,
        })
    }

    /// The API's base URL: `https://` or `http://` and [`Api::addr`].
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Waits for the server to finish (after its cancel token fired).
    pub async fn stopped(self) -> anyhow::Result<()> {
        self.task
            .await
            .context("api server panicked")?
            .context("api server failed")
    }
}

/// With no API key at all (a fresh installation), makes an admin key and writes it to
/// `<data_dir>/api-admin.key`, readable by its owner only.
async fn bootstrap_admin_key(
    config: &Config,
    keys: &ApiKeys,
) -> anyhow::Result<Option<(String, PathBuf)>> {
    if !keys.list().await?.is_empty() {
        return Ok(None);
    }
    let created = keys
        .create(
            Role::Admin,
            Vec::new(),
            "made at the first start".to_owned(),
        )
        .await?;
    let path = config.data_dir.join("api-admin.key");
    std::fs::create_dir_all(&config.data_dir)?;
    write_private(&path, &format!("{}\n", created.token))
        .with_context(|| format!("writing the first admin key to {}", path.display()))?;
    tracing::warn!(path = %path.display(), id = %created.record.id, "no API key existed: made an admin key");
    Ok(Some((created.token, path)))
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}
