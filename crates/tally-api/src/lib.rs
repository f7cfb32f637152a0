//! Tally's HTTP API: one axum server through which SDKs send events, CRMs provision
//! orders, apps check entitlements and fetch signed licenses, and billing jobs and product
//! managers read reports.
//!
//! Handlers translate HTTP to the shared mechanisms and back; they hold no business
//! logic. Events go to JetStream (`tally-ingest`'s subjects), checks to the worker owning
//! the customer (request-reply), definitions to the key-value buckets with their audit
//! trail, reports to `tally-reports`, which renders them as the CLI does.
//! Every route checks the caller's API key and role ([`keys`]); every error is one
//! problem-details shape ([`error`]). With a certificate configured the server speaks
//! HTTPS only ([`tls`]).

pub mod callout;
pub mod error;
pub mod keys;
pub mod licenses;
pub mod limits;
mod routes;
pub mod tls;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Context;
use serde::{Deserialize, Serialize};
use tally_core::event::DecodeLimits;
use tally_ingest::checks::LocalChecks;
use tally_ingest::definitions::Definitions;
use tokio_util::sync::CancellationToken;

pub use error::{ApiError, ApiResult, Problem};
pub use keys::{ApiKeys, KeyRecord, Role};
pub use licenses::LicenseKeys;
pub use limits::KeyLimits;
pub use routes::{AUTH_HEADER, router};

/// The API server's settings (`[api]` in the configuration file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address the server listens on.
    pub listen: String,
    /// The server's TLS certificate chain, a PEM file (its own certificate first). With
    /// `tls_key`, the API serves HTTPS only; with neither, plain HTTP.
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert`, a PEM file (PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<PathBuf>,
    /// Largest request body accepted, in bytes (an events batch included).
    pub max_body_bytes: usize,
    /// How long a check waits for the worker owning the customer, in milliseconds.
    pub check_timeout_ms: u64,
    /// How long an events request waits for JetStream to acknowledge every event.
    pub publish_timeout_ms: u64,
    /// Lifetime of an issued license token, in seconds, unless the request asks for less.
    pub license_ttl_secs: u64,
    /// How long a retired signing key stays published (its tokens verifiable), in
    /// seconds: at least the longest license lifetime.
    pub license_key_grace_secs: u64,
    /// How long an `Idempotency-Key` is remembered, in seconds.
    pub idempotency_secs: u64,
    /// How long a NATS connection made with an API key lasts before the server asks Tally
    /// about the key again, in seconds (1-60): the most a revoked key keeps NATS.
    pub nats_session_secs: u64,
    /// Requests per second each API key may make, and how many at once ([`limits`]).
    pub key_requests_per_sec: u32,
    pub key_requests_burst: u32,
    /// Request-body bytes per second each API key may send, and how many at once: at
    /// least `max_body_bytes`.
    pub key_bytes_per_sec: u64,
    pub key_bytes_burst: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".to_owned(),
            tls_cert: None,
            tls_key: None,
            max_body_bytes: 4 * 1024 * 1024,
            check_timeout_ms: 2_000,
            publish_timeout_ms: 10_000,
            license_ttl_secs: 30 * 24 * 3600,
            license_key_grace_secs: 31 * 24 * 3600,
            idempotency_secs: 24 * 3600,
            nats_session_secs: 50,
            key_requests_per_sec: 1_000,
            key_requests_burst: 2_000,
            // The default largest body (4 MiB) 8 times a second, 16 at once.
            key_bytes_per_sec: 32 * 1024 * 1024,
            key_bytes_burst: 64 * 1024 * 1024,
        }
    }
}

impl ApiConfig {
    /// Every problem with these settings, each naming its key.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(format!(
                "api.listen: {:?} is not an address such as 127.0.0.1:8080",
                self.listen
            ));
        }
        if let Err(e) = self.tls() {
            problems.push(e.to_string());
        }
        if self.max_body_bytes < 1024 {
            problems.push("api.max_body_bytes must be at least 1024".to_owned());
        }
        if self.check_timeout_ms == 0 || self.publish_timeout_ms == 0 {
            problems
                .push("api.check_timeout_ms and api.publish_timeout_ms must be above 0".to_owned());
        }
        if !(1..=60).contains(&self.nats_session_secs) {
            problems.push(format!(
                "api.nats_session_secs must be 1-60 (a revoked key loses NATS within it), not {}",
                self.nats_session_secs
            ));
        }
        if self.idempotency_secs == 0 {
            problems.push("api.idempotency_secs must be above 0".to_owned());
        }
        if self.key_requests_per_sec == 0 || self.key_requests_burst == 0 {
            problems.push(
                "api.key_requests_per_sec and api.key_requests_burst must be above 0".to_owned(),
            );
        }
        if self.key_bytes_per_sec == 0 {
            problems.push("api.key_bytes_per_sec must be above 0".to_owned());
        }
        if self.key_bytes_burst < self.max_body_bytes as u64 {
            problems.push(
                "api.key_bytes_burst must be at least api.max_body_bytes, or a body the server accepts could never pass"
                    .to_owned(),
            );
        }
        if self.license_ttl_secs == 0 {
            problems.push("api.license_ttl_secs must be above 0".to_owned());
        }
        if self.license_key_grace_secs < self.license_ttl_secs {
            problems.push(
                "api.license_key_grace_secs must be at least api.license_ttl_secs, or tokens would outlive their key"
                    .to_owned(),
            );
        }
        problems
    }

    /// The TLS configuration made from `tls_cert` and `tls_key` (the files are read
    /// now), or `None` for plain HTTP.
    pub fn tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>, tls::TlsError> {
        match (&self.tls_cert, &self.tls_key) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => tls::server_config(cert, key).map(Some),
            _ => Err(tls::TlsError::Incomplete),
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub js: Context,
    pub client: async_nats::Client,
    /// The events stream's partition count (a customer's checks go to its partition),
    /// followed while the API runs: [`AppState::partitions`].
    partitions: Arc<std::sync::atomic::AtomicU16>,
    /// The same limits the workers decode with: what the API accepts, they accept.
    pub limits: DecodeLimits,
    pub config: ApiConfig,
    pub keys: ApiKeys,
    /// Each key's requests and body bytes per second.
    pub key_limits: KeyLimits,
    pub definitions: Definitions,
    pub licenses: LicenseKeys,
    /// `Idempotency-Key`s and their responses.
    pub idempotency: async_nats::jetstream::kv::Store,
    /// Customers' requests for access to a feature or for an upgrade.
    pub access_requests: async_nats::jetstream::kv::Store,
    pub reports: tally_reports::LakeReports,
    /// The worker running in this process (`tally serve`): checks of the customers whose
    /// partitions it owns are answered without a round trip through NATS.
    pub local_checks: Option<LocalChecks>,
    /// Renders the process's metrics for `GET /metrics` (the binary owns the recorder);
    /// unset, the route answers 404.
    pub metrics: std::sync::OnceLock<RenderMetrics>,
}

/// Renders the metrics in the Prometheus text format.
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

impl std::ops::Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("partitions", &self.partitions())
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// Opens the buckets the API uses (creating them when missing, with `replicas` copies
    /// each) and starts following the API keys until `cancel`.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        js: Context,
        partitions: u16,
        replicas: usize,
        limits: DecodeLimits,
        config: ApiConfig,
        reports: tally_reports::LakeReports,
        local_checks: Option<LocalChecks>,
        cancel: CancellationToken,
    ) -> Result<AppState, OpenError> {
        let keys = ApiKeys::open(&js, replicas).await?;
        let definitions = Definitions::open(&js, replicas).await?;
        let grace = Duration::from_secs(config.license_key_grace_secs);
        let licenses = LicenseKeys::open(&js, grace, replicas).await?;
        let idempotency = Duration::from_secs(config.idempotency_secs);
        let idempotency = routes::idempotency::open(&js, idempotency, replicas).await?;
        let access_requests = routes::access::open(&js, replicas).await?;
        let partitions = Arc::new(std::sync::atomic::AtomicU16::new(partitions));
        tokio::spawn(follow_partitions(
            js.clone(),
            partitions.clone(),
            cancel.clone(),
        ));
        tokio::spawn(keys.clone().follow(cancel));
        Ok(AppState(Arc::new(Inner {
            client: js.client(),
            js,
            partitions,
            limits,
            key_limits: KeyLimits::new(&config),
            config,
            keys,
            definitions,
            licenses,
            idempotency,
            access_requests,
            reports,
            local_checks,
            metrics: std::sync::OnceLock::new(),
        })))
    }

    /// The events stream's partition count now.
    pub fn partitions(&self) -> u16 {
        self.partitions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Serves `render`'s output on `GET /metrics`; only the first call counts.
    pub fn serve_metrics(&self, render: RenderMetrics) -> &Self {
        let _ = self.metrics.set(render);
        self
    }
}

/// How often the API reads the events stream's partition count.
const PARTITIONS_POLL: Duration = Duration::from_secs(5);

/// Keeps `partitions` at the events stream's count (`tally partitions grow` raises it)
/// until `cancel`. Until it is seen, a check sent on the count before is forwarded by the
/// worker that gets it.
async fn follow_partitions(
    js: Context,
    partitions: Arc<std::sync::atomic::AtomicU16>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(PARTITIONS_POLL) => {}
        }
        match tally_ingest::topology::partitions(&js).await {
            Ok(now) => partitions.store(now.current(), std::sync::atomic::Ordering::Relaxed),
            Err(e) => tracing::debug!(error = %e, "cannot read the events stream's partitions"),
        }
    }
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("api keys: {0}")]
    Keys(#[from] keys::KeyError),
    #[error("definitions: {0}")]
    Definitions(#[from] tally_ingest::Error),
    #[error("license keys: {0}")]
    Licenses(#[from] licenses::LicenseKeyError),
    #[error("idempotency bucket: {0}")]
    Idempotency(String),
    #[error("access requests bucket: {0}")]
    AccessRequests(String),
}

/// Serves the API on `listener` until `shutdown`; requests in flight finish first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (app, _) = router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// [`serve`] over TLS (HTTPS only): each connection is served once its handshake
/// succeeded ([`tls::TlsListener`]).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (app, _) = router(state);
    axum::serve(tls::TlsListener::new(listener, tls)?, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_limits_are_checked_against_the_body_limit() {
        assert_eq!(ApiConfig::default().problems(), Vec::<String>::new());
        let config = ApiConfig {
            key_requests_per_sec: 0,
            key_bytes_per_sec: 0,
            key_bytes_burst: 4096,
            max_body_bytes: 8192,
            ..ApiConfig::default()
        };
        let problems = config.problems().join("\n");
        for key in [
            "api.key_requests_per_sec",
            "api.key_bytes_per_sec",
            "api.key_bytes_burst must be at least api.max_body_bytes",
        ] {
            assert!(problems.contains(key), "{key}: {problems}");
        }
    }
}
