//! Tally's client for application code: record usage, ask whether a customer may use a
//! feature, and verify a signed license offline.
//!
//! A [`Client`] talks to Tally over NATS ([`Client::nats`]: events published to JetStream
//! on `tally.events.<customer-token>`, checks by request-reply on
//! `tally.check.<partition>.<customer-token>`, authenticated by an API key of the `sdk`
//! role, which NATS limits to the key's customers)
//! or over the HTTP API ([`Client::http`]: `POST /api/v1/events` and
//! `GET /api/v1/customers/{c}/entitlements/{f}`, over HTTPS too, trusting a private CA
//! given as [`Options::http_ca`]). Either way:
//!
//! - [`Client::record`] checks the event as the server would, gives it a UUID v7 id and
//!   puts it in a bounded buffer. A background task sends the buffer every
//!   [`Options::flush_interval`] or at [`Options::batch_size`] events, one message per
//!   customer over NATS (a single event's message id is its event id; several events' the
//!   hash of their ids) and one request per flush over HTTP. A failed send is retried with
//!   backoff with the same ids, so the server counts each event once however often it
//!   arrives. When the buffer is full `record` waits; [`Client::try_record`] does not.
//! - [`Client::flush`] returns once everything recorded before it is acknowledged, or
//!   says how many events were not; [`Client::shutdown`] flushes and stops.
//! - [`Client::check`] answers from a short local cache ([`Options::check_cache_ttl`]) or
//!   asks the worker that owns the customer.
//! - [`verify_license`] checks a license token against a [`KeySet`] with no network.
//!
//! ```no_run
//! use tally_sdk::{Client, NatsTarget, Options};
//!
//! # async fn run() -> Result<(), tally_sdk::Error> {
//! // `tally keys create --role sdk --customer cust-00001` prints the key and the URLs.
//! let key = std::env::var("TALLY_KEY").unwrap_or_default();
//! let target = NatsTarget::with_key("nats://127.0.0.1:4222", key);
//! let tally = Client::nats(target, Options::default()).await?;
//! tally.record("cust-00001", "api-calls", 3.0).await?;
//! let answer = tally.check("cust-00001", "api-calls").await?;
//! if !answer.has_access {
//!     println!("refused: {}", answer.decision);
//! }
//! tally.shutdown().await?; // sends what is still buffered
//! # Ok(())
//! # }
//! ```
//!
//! Dropping a client without [`Client::shutdown`] is a best-effort flush: the background
//! task sends what is buffered as long as the Tokio runtime keeps running, which it may
//! not (the end of `main`). Call `shutdown` for a sure flush.

#![warn(missing_docs)]

mod check;
mod error;
mod event;
mod flusher;
mod tls;
mod transport;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, oneshot};

pub use check::CheckAnswer;
pub use error::{Error, Failure, FailureHandler, FailureKind, Result};
pub use event::Event;
pub use tally_license::{KeySet, KeyStatus, License, PublishedKey, VerifyError, verify};
pub use tls::{CaCertificate, http_client};
pub use transport::{CHECK_PREFIX, batch_message_id};

use flusher::{Command, Counters, Flusher, Policy};
use transport::{Http, Nats, Transport};

/// How a [`Client`] buffers, sends, retries and caches.
#[derive(Debug, Clone)]
pub struct Options {
    /// The CloudEvents `source` of the events (default `tally-sdk`): the app's name.
    pub source: String,
    /// Events the buffer holds before `record` waits (default 10,000). One batch being
    /// sent is held besides.
    pub buffer_capacity: usize,
    /// Events that make the background task send at once (default 1,000).
    pub batch_size: usize,
    /// The longest an event waits in the buffer (default 1 s).
    pub flush_interval: Duration,
    /// How long one publish, acknowledgement, HTTP request or check may take (default 5 s).
    pub request_timeout: Duration,
    /// The first pause before a retry (default 100 ms); it doubles up to `retry_max`.
    pub retry_initial: Duration,
    /// The longest pause between retries (default 5 s).
    pub retry_max: Duration,
    /// How long a batch is retried before its events are given up and reported
    /// (default 5 min). While it is retried, the buffer fills and `record` waits.
    pub retry_timeout: Duration,
    /// How long a check's answer is reused for the same customer, feature and quantity
    /// (default 1 s; zero: no cache).
    pub check_cache_ttl: Duration,
    /// The partition count of the Tally deployment (`tally partitions show`; 16 by
    /// default): over NATS a check goes to the customer's partition. After the count
    /// grows, checks sent with the count before still work: the worker that gets one
    /// forwards it to the customer's partition now (a round trip more).
    pub partitions: u16,
    /// Called with the events of each batch that was refused or given up (besides an
    /// ERROR log, the [`Stats::failed`] counter and the next [`Client::flush`]'s error).
    /// It runs on the background task: keep it short, and never wait in it on anything
    /// the client itself is waiting for (a lock held across `flush`).
    pub on_failure: Option<FailureHandler>,
    /// A CA certificate that [`Client::http`] trusts beside the system's roots, for an API
    /// served over HTTPS with a certificate a private CA signed (default none).
    pub http_ca: Option<CaCertificate>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            source: "tally-sdk".into(),
            buffer_capacity: 10_000,
            batch_size: 1_000,
            flush_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            retry_timeout: Duration::from_secs(300),
            check_cache_ttl: Duration::from_secs(1),
            partitions: 16,
            on_failure: None,
            http_ca: None,
        }
    }
}

impl Options {
    /// Sets the failure handler.
    pub fn on_failure(mut self, f: impl Fn(&Failure) + Send + Sync + 'static) -> Self {
        self.on_failure = Some(FailureHandler::new(f));
        self
    }

    fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        if self.source.is_empty() {
            problems.push("source is empty");
        }
        if self.buffer_capacity == 0 {
            problems.push("buffer_capacity is 0");
        }
        if self.batch_size == 0 {
            problems.push("batch_size is 0");
        }
        if self.flush_interval.is_zero() {
            problems.push("flush_interval is 0");
        }
        if self.request_timeout.is_zero() {
            problems.push("request_timeout is 0");
        }
        if self.partitions == 0 {
            problems.push("partitions is 0");
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Options(problems.join("; ")))
        }
    }
}

/// Where [`Client::nats`] connects: servers and an API key, or a connection the app
/// already has.
#[derive(Clone)]
pub enum NatsTarget {
    /// Servers and the API key the connection authenticates with.
    Key {
        /// `nats://host:port`, or `tls://host:port` for TLS (comma-separated for several
        /// servers).
        url: String,
        /// A Tally API key (`tally_<id>_<secret>`) of the `sdk` role (or `ingest` to send
        /// events only).
        api_key: String,
        /// A CA certificate (PEM file) to trust for the servers' TLS certificates, beside
        /// the system's roots.
        ca: Option<std::path::PathBuf>,
    },
    /// An existing connection, made with [`connect_options`] (its inbox prefix is the
    /// one the key may read).
    Client(async_nats::Client),
}

impl NatsTarget {
    /// Servers at `url`, authenticated with `api_key`.
    pub fn with_key(url: impl Into<String>, api_key: impl Into<String>) -> Self {
        Self::Key {
            url: url.into(),
            api_key: api_key.into(),
            ca: None,
        }
    }

    /// Trusts the CA certificate in this PEM file for the servers' TLS certificates.
    pub fn trusting(self, ca: impl Into<std::path::PathBuf>) -> Self {
        match self {
            Self::Key { url, api_key, .. } => Self::Key {
                url,
                api_key,
                ca: Some(ca.into()),
            },
            client => client,
        }
    }
}

impl std::fmt::Debug for NatsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Never the key's secret.
            Self::Key { url, ca, .. } => f
                .debug_struct("Key")
                .field("url", url)
                .field("ca", ca)
                .finish_non_exhaustive(),
            Self::Client(_) => f.write_str("Client"),
        }
    }
}

/// How to connect to Tally's NATS with an API key: the key as the connection's token (the
/// server asks Tally, which answers with the key's permissions) and the inbox prefix the
/// key may subscribe to, `_INBOX.<key id>`.
pub fn connect_options(api_key: &str) -> Result<async_nats::ConnectOptions> {
    let id = api_key
        .strip_prefix("tally_")
        .and_then(|rest| rest.split_once('_'))
        .map(|(id, _)| id)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| {
            Error::Options("the API key is not of the form tally_<id>_<secret>".to_owned())
        })?;
    tls::install_provider();
    Ok(async_nats::ConnectOptions::with_token(api_key.to_owned())
        .custom_inbox_prefix(tally_core::access::inbox_prefix(id))
        .name("tally-sdk"))
}

impl From<async_nats::Client> for NatsTarget {
    fn from(client: async_nats::Client) -> Self {
        Self::Client(client)
    }
}

/// What a client has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Events accepted into the buffer.
    pub recorded: u64,
    /// Events acknowledged by JetStream or the API.
    pub sent: u64,
    /// Events refused or given up (each reported to the failure handler).
    pub failed: u64,
    /// Sends attempted again after a failure.
    pub retries: u64,
}

/// Tally for application code; see the [crate] documentation.
///
/// Methods take `&self`: share one client (in an `Arc`) across the app. It needs a Tokio
/// runtime, on which it runs its background task.
#[derive(Debug)]
pub struct Client {
    tx: mpsc::Sender<Command>,
    transport: Arc<Transport>,
    counters: Arc<Counters>,
    cache: check::Cache,
    options: Options,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Nats(_) => f.write_str("Transport::Nats"),
            Transport::Http(h) => write!(f, "Transport::Http({})", h.base),
        }
    }
}

impl Client {
    /// A client that publishes to JetStream and checks by request-reply.
    pub async fn nats(target: impl Into<NatsTarget>, options: Options) -> Result<Client> {
        options.validate()?;
        let client = match target.into() {
            NatsTarget::Client(client) => client,
            NatsTarget::Key { url, api_key, ca } => {
                let mut connect = connect_options(&api_key)?;
                if let Some(ca) = ca {
                    connect = connect.require_tls(true).add_root_certificates(ca);
                }
                let urls = tally_core::subject::server_urls(&url);
                connect.connect(urls).await.map_err(|e| {
                    Error::Unavailable(format!("cannot connect to NATS at {url}: {e}"))
                })?
            }
        };
        let mut js = async_nats::jetstream::new(client.clone());
        js.set_timeout(options.request_timeout);
        let transport = Transport::Nats(Nats {
            client,
            js,
            partitions: options.partitions,
        });
        Ok(Self::start(transport, options))
    }

    /// A client of the HTTP API at `base_url` (`http://127.0.0.1:8080`, or `https://…`
    /// trusting the system's roots and [`Options::http_ca`]), with an API key of the
    /// `ingest` role to record and a reader's (`provisioning`, `billing`, `portal`) to
    /// check.
    pub async fn http(base_url: &str, api_key: &str, options: Options) -> Result<Client> {
        options.validate()?;
        let base = reqwest::Url::parse(base_url)
            .map_err(|e| Error::Options(format!("base URL {base_url:?}: {e}")))?;
        transport::endpoint(&base, &[])?;
        let client = http_client(options.http_ca.as_ref())?
            .build()
            .map_err(|e| Error::Options(format!("HTTP client: {e}")))?;
        let transport = Transport::Http(Http {
            client,
            base,
            key: api_key.to_owned(),
        });
        Ok(Self::start(transport, options))
    }

    fn start(transport: Transport, options: Options) -> Client {
        let (tx, rx) = mpsc::channel(options.buffer_capacity);
        let transport = Arc::new(transport);
        let counters = Arc::new(Counters::default());
        let policy = Policy {
            batch_size: options.batch_size,
            flush_interval: options.flush_interval,
            request_timeout: options.request_timeout,
            retry_initial: options.retry_initial,
            retry_max: options.retry_max,
            retry_timeout: options.retry_timeout,
            on_failure: options.on_failure.clone(),
        };
        tokio::spawn(Flusher::new(rx, transport.clone(), policy, counters.clone()).run());
        Client {
            tx,
            transport,
            counters,
            cache: check::Cache::new(options.check_cache_ttl),
            options,
        }
    }

    /// Records `quantity` of `feature` used by `customer` now, and returns the event id.
    /// Waits while the buffer is full.
    pub async fn record(&self, customer: &str, feature: &str, quantity: f64) -> Result<String> {
        self.record_event(Event::new(customer, feature, quantity))
            .await
    }

    /// Records an event (with a user, region, time, id or further data), and returns its
    /// id. Refuses an event the server would refuse ([`Error::InvalidEvent`]); waits while
    /// the buffer is full.
    pub async fn record_event(&self, event: Event) -> Result<String> {
        let stamped = event::stamp(event, &self.options.source, Utc::now())?;
        let id = stamped.id.clone();
        self.tx
            .send(Command::Record(stamped))
            .await
            .map_err(|_| Error::Closed)?;
        self.counters.recorded.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    /// [`Client::record`], but [`Error::BufferFull`] rather than waiting.
    pub fn try_record(&self, customer: &str, feature: &str, quantity: f64) -> Result<String> {
        self.try_record_event(Event::new(customer, feature, quantity))
    }

    /// [`Client::record_event`], but [`Error::BufferFull`] rather than waiting.
    pub fn try_record_event(&self, event: Event) -> Result<String> {
        let stamped = event::stamp(event, &self.options.source, Utc::now())?;
        let id = stamped.id.clone();
        self.tx
            .try_send(Command::Record(stamped))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Error::BufferFull {
                    capacity: self.options.buffer_capacity,
                },
                mpsc::error::TrySendError::Closed(_) => Error::Closed,
            })?;
        self.counters.recorded.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    /// Sends everything recorded before this call and waits for it to be acknowledged.
    /// [`Error::Undelivered`] if events recorded through this client were refused or given
    /// up since the previous `flush` (they went to the failure handler).
    pub async fn flush(&self) -> Result<()> {
        let (done, answer) = oneshot::channel();
        self.tx
            .send(Command::Flush(done))
            .await
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Flushes and stops the background task; the client records nothing more.
    pub async fn shutdown(&self) -> Result<()> {
        let (done, answer) = oneshot::channel();
        self.tx
            .send(Command::Shutdown(done))
            .await
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// May `customer` use `feature` (one unit) now?
    pub async fn check(&self, customer: &str, feature: &str) -> Result<CheckAnswer> {
        self.check_quantity(customer, feature, 1.0).await
    }

    /// May `customer` use `quantity` of `feature` now? An answer for the same three is
    /// reused for [`Options::check_cache_ttl`].
    pub async fn check_quantity(
        &self,
        customer: &str,
        feature: &str,
        quantity: f64,
    ) -> Result<CheckAnswer> {
        if !quantity.is_finite() || quantity < 0.0 {
            return Err(Error::Check {
                message: format!("quantity must be a finite number ≥ 0, not {quantity}"),
                field: Some("quantity".into()),
            });
        }
        if let Some(answer) = self.cache.get(customer, feature, quantity) {
            return Ok(answer);
        }
        let timeout = self.options.request_timeout;
        let answer = match &*self.transport {
            Transport::Nats(nats) => nats.check(customer, feature, quantity, timeout).await,
            Transport::Http(http) => http.check(customer, feature, quantity, timeout).await,
        }?;
        self.cache.put(customer, feature, quantity, &answer);
        Ok(answer)
    }

    /// What this client has done so far.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            recorded: c.recorded.load(Ordering::Relaxed),
            sent: c.sent.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
        }
    }
}

/// Verifies a license token against a key set, now, with no network (see [`verify`] for
/// an injected clock).
pub fn verify_license(token: &str, keys: &KeySet) -> Result<License, VerifyError> {
    verify(token, keys, Utc::now())
}

/// Fetches the published license keys once from `GET /api/v1/license-keys` (no API key
/// needed); keep them, or ship a copy with the app, and verify offline.
pub async fn fetch_license_keys(base_url: &str) -> Result<KeySet> {
    fetch_license_keys_trusting(base_url, None).await
}

/// [`fetch_license_keys`] from an API served over HTTPS with a certificate `ca` signed.
pub async fn fetch_license_keys_trusting(
    base_url: &str,
    ca: Option<&CaCertificate>,
) -> Result<KeySet> {
    let base = reqwest::Url::parse(base_url)
        .map_err(|e| Error::Options(format!("base URL {base_url:?}: {e}")))?;
    let url = transport::endpoint(&base, &["api", "v1", "license-keys"])?;
    let http = http_client(ca)?
        .build()
        .map_err(|e| Error::Options(format!("HTTP client: {e}")))?;
    let response = http
        .get(url)
        .send()
        .await
        .map_err(|e| Error::Unavailable(format!("license keys: {}", error::with_causes(&e))))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| Error::Unavailable(format!("license keys: {}", error::with_causes(&e))))?;
    if !status.is_success() {
        return Err(Error::Refused {
            status: status.as_u16(),
            message: text,
        });
    }
    KeySet::parse(&text).map_err(|e| Error::Protocol(e.to_string()))
}
