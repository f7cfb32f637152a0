//! `tally bench http`: the HTTP API under load from a second process.
//!
//! Starts the embedded nats-server, loads the demo catalogue and customers, and runs
//! `tally serve` (worker and API) as a child process; this process is the load generator,
//! a client on a runtime and thread of its own. Two modes:
//!
//! - `ingest`: `POST /api/v1/events` with `--batch` events per request (CloudEvents batch
//!   JSON, `--customers-per-request` customers in each), each timed from the request to
//!   its `202` (every event acknowledged by JetStream).
//! - `check`: `GET /api/v1/customers/{c}/entitlements/{f}`, each timed to its answer from
//!   the worker owning the customer.
//!
//! With `--rate`, each request is due at its own moment (`i / rate` after the start, an
//! open load, as in `tally bench check`) and goes out on the next of `--concurrency`
//! keep-alive connections, its latency counted from the moment it was due; without,
//! `--concurrency` connections send as fast as the server answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tally_node::pipeline::Service;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::BenchFormat;
use crate::workload::{self, PowerLaw, Spec};
use tally_node::config::Config;
use tally_node::pipeline::Nats;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpMode {
    Ingest,
    Check,
}

#[derive(Args)]
pub struct HttpBench {
    #[arg(long, value_enum, default_value_t = HttpMode::Ingest)]
    mode: HttpMode,
    /// Requests offered per second; without it, `--concurrency` senders send as fast as
    /// the server answers.
    #[arg(long)]
    rate: Option<u64>,
    /// Connections: with `--rate`, each sends the requests it is handed in turn (a
    /// request waiting for its connection counts that wait in its latency); without,
    /// each sends its next request as soon as the last is answered.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Events per ingest request.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Distinct customers in each ingest request (each customer's events travel to
    /// JetStream as one message).
    #[arg(long, default_value_t = 1)]
    customers_per_request: usize,
    #[arg(long, default_value_t = 1_000)]
    customers: u32,
    #[arg(long, value_enum, default_value_t = BenchFormat::Table)]
    format: BenchFormat,
    /// A CA certificate (PEM file) to trust, when the API serves HTTPS
    /// (`TALLY_API__TLS_CERT`, `TALLY_API__TLS_KEY`) with a certificate a private CA signed.
    #[arg(long, value_name = "PEM")]
    ca_cert: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct HttpReport {
    pub mode: HttpMode,
    pub offered_requests_per_sec: Option<u64>,
    /// Connections the load generator used.
    pub concurrency: usize,
    pub requests: u64,
    pub failures: u64,
    pub events: u64,
    pub seconds: f64,
    pub requests_per_sec: f64,
    pub events_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

pub async fn run(mut config: Config, args: HttpBench) -> anyhow::Result<std::process::ExitCode> {
    let temp = tempfile::Builder::new()
        .prefix("tally-bench-http-")
        .tempdir()?;
    if config.nats_url.is_none() {
        config.data_dir = temp.path().join("bench");
    }
    let mut spec = Spec::new(0, chrono::Utc::now().date_naive());
    spec.customers = args.customers;
    let nats = Nats::connect(&config, Service::Admin).await?;
    crate::demo::load_definitions(&nats, &spec, "tally-bench").await?;
    let keys = tally_api::ApiKeys::open(&nats.jetstream, nats.replicas).await?;
    let role = match args.mode {
        HttpMode::Ingest => tally_api::Role::Ingest,
        HttpMode::Check => tally_api::Role::Billing,
    };
    let key = keys
        .create(role, Vec::new(), "tally bench http".to_owned())
        .await?
        .token;

    let server_dir = temp.path().join("server");
    // The API binds a free port itself and names it on its first line of output: a port
    // picked here and handed over could be taken by another process meanwhile.
    let mut server = std::process::Command::new(std::env::current_exe()?)
        .arg("serve")
        .args(["--nats-url", &nats.url, "--data-dir"])
        .arg(&server_dir)
        .env("TALLY_API__LISTEN", "127.0.0.1:0")
        // One key carries the whole offered load, far over a key's default limits: the
        // bench measures the server with the limiter in the path, not the limits.
        .env("TALLY_API__KEY_REQUESTS_PER_SEC", "100000000")
        .env("TALLY_API__KEY_REQUESTS_BURST", "100000000")
        .env("TALLY_API__KEY_BYTES_PER_SEC", "1000000000000")
        .env("TALLY_API__KEY_BYTES_BURST", "1000000000000")
        .env("TALLY_LOG", "error")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting tally serve")?;
    let base = api_url(&mut server)?;
    let ca = args.ca_cert.map(tally_sdk::CaCertificate::File);
    let load = async {
        wait_ready(&base, ca.as_ref()).await?;
        let offer = Offer {
            base: base.clone(),
            ca,
            key,
            mode: args.mode,
            rate: args.rate,
            concurrency: args.concurrency.max(1),
            seconds: args.seconds.max(1),
            batch: args.batch.max(1),
            customers_per_request: args.customers_per_request.clamp(1, args.batch.max(1)),
            customers: args.customers.max(1),
        };
        tokio::task::spawn_blocking(move || offer.run()).await?
    };
    let outcome = load.await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let _ = tokio::task::spawn_blocking(move || server.wait()).await;
    let (latency, failures, seconds) = outcome?;

    let requests = latency.len();
    let events = match args.mode {
        HttpMode::Ingest => requests * args.batch as u64,
        HttpMode::Check => 0,
    };
    let report = HttpReport {
        mode: args.mode,
        offered_requests_per_sec: args.rate,
        concurrency: args.concurrency,
        requests,
        failures,
        events,
        seconds,
        requests_per_sec: requests as f64 / seconds,
        events_per_sec: events as f64 / seconds,
        p50_us: latency.value_at_quantile(0.5),
        p99_us: latency.value_at_quantile(0.99),
        p999_us: latency.value_at_quantile(0.999),
        max_us: latency.max(),
    };
    match args.format {
        BenchFormat::Json => println!("{}", serde_json::to_string(&report)?),
        BenchFormat::Table => println!(
            "http {:?}: {} requests ({} failed, {} events) in {:.2} s: {:.0} requests/s, {:.0} events/s; p50 {} µs, p99 {} µs, p999 {} µs, max {} µs",
            report.mode,
            report.requests,
            report.failures,
            report.events,
            report.seconds,
            report.requests_per_sec,
            report.events_per_sec,
            report.p50_us,
            report.p99_us,
            report.p999_us,
            report.max_us
        ),
    }
    Ok(if failures == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        eprintln!("error: {failures} requests failed");
        std::process::ExitCode::FAILURE
    })
}

/// Waits until the server is ready (NATS reachable, every partition owned).
/// The URL a starting `tally serve` names (`tally api on …`); its output is drained after.
fn api_url(server: &mut std::process::Child) -> anyhow::Result<String> {
    use std::io::BufRead;
    let stderr = server.stderr.take().context("tally serve's output")?;
    let mut lines = std::io::BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line?;
        if let Some(url) = line.strip_prefix("tally api on ") {
            let url = url.trim().to_owned();
            std::thread::spawn(move || lines.for_each(drop));
            return Ok(url);
        }
        seen.push(line);
    }
    anyhow::bail!(
        "tally serve exited before its API listened: {}",
        seen.join("\n")
    )
}

async fn wait_ready(base: &str, ca: Option<&tally_sdk::CaCertificate>) -> anyhow::Result<()> {
    let http = tally_sdk::http_client(ca)?.build()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "tally serve did not become ready at {base}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The load generator: what to send, and how fast.
struct Offer {
    base: String,
    ca: Option<tally_sdk::CaCertificate>,
    key: String,
    mode: HttpMode,
    rate: Option<u64>,
    concurrency: usize,
    seconds: u64,
    batch: usize,
    customers_per_request: usize,
    customers: u32,
}

/// Makes the requests: random customers by the demo's power law, random features.
struct Requests {
    rng: SmallRng,
    weights: PowerLaw,
    features: &'static [&'static str],
    sequence: u64,
}

impl Requests {
    fn new(customers: u32, seed: u64) -> Self {
        Self {
            rng: SmallRng::seed_from_u64(seed),
            weights: PowerLaw::new(customers as usize, 0.9),
            features: workload::features(20),
            sequence: 0,
        }
    }

    fn customer(&mut self) -> String {
        workload::customer_id(self.weights.pick(&mut self.rng) as u32)
    }

    fn feature(&mut self) -> &'static str {
        self.features[self.rng.random_range(0..self.features.len())]
    }

    /// A batch of `batch` events over `customers` customers.
    fn events(&mut self, batch: usize, customers: usize, seed: u64) -> Vec<u8> {
        let who: Vec<String> = (0..customers).map(|_| self.customer()).collect();
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut body = Vec::with_capacity(batch * 220);
        body.push(b'[');
        for i in 0..batch {
            if i > 0 {
                body.push(b',');
            }
            self.sequence += 1;
            let feature = self.feature();
            body.extend_from_slice(
                format!(
                    r#"{{"specversion":"1.0","id":"{seed:x}-{:x}","source":"bench","type":"usage","subject":"{}","time":"{time}","data":{{"feature":"{feature}","quantity":1}}}}"#,
                    self.sequence,
                    who[i % customers],
                )
                .as_bytes(),
            );
        }
        body.push(b']');
        body
    }

    fn request(
        &mut self,
        offer: &Offer,
        http: &reqwest::Client,
        seed: u64,
    ) -> reqwest::RequestBuilder {
        match offer.mode {
            HttpMode::Ingest => http
                .post(format!("{}/api/v1/events", offer.base))
                .bearer_auth(&offer.key)
                .header("content-type", "application/cloudevents-batch+json")
                .body(self.events(offer.batch, offer.customers_per_request, seed)),
            HttpMode::Check => {
                let (customer, feature) = (self.customer(), self.feature());
                http.get(format!(
                    "{}/api/v1/customers/{customer}/entitlements/{feature}",
                    offer.base
                ))
                .bearer_auth(&offer.key)
            }
        }
    }
}

impl Offer {
    /// Sends the load and returns the latencies, the failures and the seconds it took.
    fn run(self) -> anyhow::Result<(Histogram<u64>, u64, f64)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let http = tally_sdk::http_client(self.ca.as_ref())?
            .pool_max_idle_per_host(1024)
            .build()?;
        let seed = rand::random::<u64>();
        let failures = Arc::new(AtomicU64::new(0));
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let handle = runtime.handle().clone();
        let collector = std::thread::spawn(move || {
            runtime.block_on(async move {
                let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
                while let Some(us) = done_rx.recv().await {
                    latency.saturating_record(us);
                }
                anyhow::Ok(latency)
            })
        });
        // A check of a customer the catalogue does not define is answered too (404, as
        // `unknown_customer` is over NATS): the demo's customers include such.
        let answered: fn(reqwest::StatusCode) -> bool = match self.mode {
            HttpMode::Ingest => |s| s.is_success(),
            HttpMode::Check => |s| s.is_success() || s == reqwest::StatusCode::NOT_FOUND,
        };
        let send = {
            let (done_tx, failures) = (done_tx.clone(), failures.clone());
            // `due`: when the request was meant to leave; its latency counts from then, so
            // time spent waiting for a free connection is counted too.
            move |request: reqwest::RequestBuilder, due: Instant| {
                let (done, failures) = (done_tx.clone(), failures.clone());
                async move {
                    let sent = due;
                    match request.send().await {
                        Ok(r) if answered(r.status()) => {
                            let _ = r.bytes().await;
                            let _ = done.send(sent.elapsed().as_micros() as u64);
                        }
                        Ok(r) => {
                            if failures.fetch_add(1, Ordering::Relaxed) == 0 {
                                let status = r.status();
                                let body = r.text().await.unwrap_or_default();
                                eprintln!("first failure: {status} {body}");
                            }
                        }
                        Err(e) => {
                            if failures.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("first failure: {e}");
                            }
                        }
                    }
                }
            }
        };
        let start = Instant::now();
        let end = start + Duration::from_secs(self.seconds);
        match self.rate {
            Some(rate) => {
                // `concurrency` connections, each sending its requests in turn, as a
                // client's connection pool does (wrk2's model): opening a connection per
                // request in flight would measure TCP handshakes and the accept queue.
                let lanes: Vec<_> = (0..self.concurrency)
                    .map(|_| {
                        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(
                            reqwest::RequestBuilder,
                            Instant,
                        )>();
                        let send = send.clone();
                        handle.spawn(async move {
                            while let Some((request, due)) = rx.recv().await {
                                send(request, due).await;
                            }
                        });
                        tx
                    })
                    .collect();
                let mut requests = Requests::new(self.customers, seed);
                let total = rate * self.seconds;
                for i in 0..total {
                    let due = start + Duration::from_secs_f64(i as f64 / rate.max(1) as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let lane = &lanes[i as usize % lanes.len()];
                    let _ = lane.send((requests.request(&self, &http, seed), due));
                }
            }
            None => {
                let senders: Vec<_> = (0..self.concurrency)
                    .map(|s| {
                        let mut requests = Requests::new(self.customers, seed ^ (s as u64 + 1));
                        let sender_seed = seed ^ ((s as u64 + 1) << 32);
                        let (http, send) = (http.clone(), send.clone());
                        let offer = self.clone_settings();
                        handle.spawn(async move {
                            while Instant::now() < end {
                                let request = requests.request(&offer, &http, sender_seed);
                                send(request, Instant::now()).await;
                            }
                        })
                    })
                    .collect();
                handle.block_on(async {
                    for s in senders {
                        let _ = s.await;
                    }
                });
            }
        }
        drop(send);
        drop(done_tx);
        let latency = collector
            .join()
            .map_err(|_| anyhow::anyhow!("the load generator's runtime panicked"))??;
        Ok((
            latency,
            failures.load(Ordering::Relaxed),
            start.elapsed().as_secs_f64(),
        ))
    }

    fn clone_settings(&self) -> Offer {
        Offer {
            base: self.base.clone(),
            ca: self.ca.clone(),
            key: self.key.clone(),
            mode: self.mode,
            rate: self.rate,
            concurrency: self.concurrency,
            seconds: self.seconds,
            batch: self.batch,
            customers_per_request: self.customers_per_request,
            customers: self.customers,
        }
    }
}
