//! The end-to-end harness: a real nats-server on a free port with its own temporary
//! directory (stopped and removed on drop), and Tally's pipeline wired as the binary
//! wires it.

#![allow(dead_code)]

pub mod tls;

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use tally_node::pipeline::Service;

use arrow::array::AsArray;
use arrow::datatypes::Float64Type;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::process::Command;
use std::time::Duration;

use indicatif::ProgressBar;
use tally::config::Config;
use tally::demo::wait_drained;
use tally::pipeline::{Nats, Pipeline};
use tally_natsd::NatsServer;

pub struct Harness {
    /// Set by a test that provokes permissions violations on purpose.
    pub expect_violations: bool,
    pub server: NatsServer,
    pub dir: tempfile::TempDir,
    pub config: Config,
    pub nats: Nats,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(false).await
    }

    /// [`start`](Self::start) with a nats-server that serves TLS only, its CA trusted by
    /// Tally's connections.
    pub async fn start_tls() -> Harness {
        Self::start_with(true).await
    }

    async fn start_with(tls: bool) -> Harness {
        // `TEST_LOG=info` (any tracing filter) shows what the pipeline logs (not `TALLY_…`:
        // the binary reads those as configuration).
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let start = if tls {
            NatsServer::start_temp_tls
        } else {
            NatsServer::start_temp
        };
        let server = tokio::task::spawn_blocking(start)
            .await
            .unwrap()
            .expect("nats-server must be installed: run scripts/install-nats.sh");
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            nats_url: Some(server.url()),
            nats_credentials: Some(server.credentials().dir().to_owned()),
            nats_ca: server.ca(),
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        let nats = Nats::connect(&config, Service::Admin).await.unwrap();
        Harness {
            expect_violations: false,
            server,
            dir,
            config,
            nats,
        }
    }

    /// Puts customers `cust-00000` … of the workload generator on a plan with every
    /// feature metered and unlimited, so that every valid event is `accepted`: for tests of
    /// delivery, where the decisions are not the subject.
    pub async fn entitle_everyone(&self, customers: u32) {
        tally::demo::entitle_unlimited(&self.nats, customers, "test")
            .await
            .unwrap();
    }

    /// Applies a catalogue and customers written in TOML (checked first) to the buckets.
    pub async fn define(
        &self,
        catalog: &str,
        customers: &str,
    ) -> tally_ingest::definitions::Definitions {
        use tally_core::entitlement::{Catalog, Customers};
        let defs = tally_ingest::definitions::Definitions::open(&self.nats.jetstream, 1)
            .await
            .unwrap();
        let catalog: Catalog = toml::from_str(catalog).unwrap();
        assert!(catalog.problems().is_empty(), "{:?}", catalog.problems());
        defs.apply_catalog(&catalog, "test").await.unwrap();
        let customers: Customers = toml::from_str(customers).unwrap();
        defs.apply_customers(&customers, "test").await.unwrap();
        defs
    }

    /// Publishes `n` events of `quantity` each of one customer's feature, dated `time`
    /// (and by `user`, if given), as one batch message; ids are unique per customer,
    /// feature and time.
    pub async fn send(
        &self,
        customer: &str,
        feature: &str,
        n: usize,
        quantity: u32,
        time: &str,
        user: Option<&str>,
    ) {
        let user = user.map_or(String::new(), |u| format!(r#","user":"{u}""#));
        let events: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"specversion":"1.0","id":"{customer}-{feature}-{time}-{i}","source":"test","type":"usage","subject":"{customer}","time":"{time}","data":{{"feature":"{feature}","quantity":{quantity}{user}}}}}"#
                )
            })
            .collect();
        self.nats
            .jetstream
            .publish(
                tally_core::subject::events_subject(customer),
                format!("[{}]", events.join(",")).into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// `tally <args>` against the harness's server and data directory, which must
    /// succeed: what it prints.
    pub fn cli(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .args(["--nats-url", &self.server.url(), "--data-dir"])
            .arg(self.dir.path())
            .env("TALLY_NATS_CREDENTIALS", self.server.credentials().dir())
            .env("TALLY_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tally {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    pub fn lake_events(&self) -> PathBuf {
        self.config.lake_dir().join("events")
    }

    /// Waits (with a deadline, never a fixed sleep) until every partition's consumer has
    /// nothing pending or unacknowledged and `rows` rows are durable.
    pub async fn drain(&self, pipeline: &Pipeline, rows: u64) {
        drain_partitions(self, pipeline, self.config.ingest.partitions, rows).await;
    }

    /// Every dead letter: (reason, field, batch index, body).
    pub async fn dead_letters(&self) -> Vec<DeadLetter> {
        let mut stream = self
            .nats
            .jetstream
            .get_stream(tally_core::subject::DEAD_LETTER_STREAM)
            .await
            .unwrap();
        let info = stream.info().await.unwrap().clone();
        let mut out = Vec::new();
        for seq in info.state.first_sequence..=info.state.last_sequence {
            if info.state.messages == 0 {
                break;
            }
            let msg = stream.get_raw_message(seq).await.unwrap();
            let h = |name: &str| msg.headers.get(name).map(|v| v.as_str().to_owned());
            out.push(DeadLetter {
                reason: h("Tally-Reason").unwrap_or_default(),
                field: h("Tally-Field"),
                index: h("Tally-Batch-Index").map(|i| i.parse().unwrap()),
                error: h("Tally-Error").unwrap_or_default(),
                body: msg.payload.to_vec(),
            });
        }
        out
    }
}

/// `n` loopback ports free right now, for processes a test starts on ports of its own
/// ([`tally_natsd::free_ports`]).
pub fn free_ports(n: usize) -> Vec<u16> {
    tally_natsd::free_ports(n).unwrap()
}

/// [`Harness::drain`] over `partitions` partitions (the stream's count, after a growth).
pub async fn drain_partitions(h: &Harness, pipeline: &Pipeline, partitions: u16, rows: u64) {
    wait_drained(
        &h.nats,
        &tally_store::Lake::new(h.config.lake_dir()),
        partitions,
        &pipeline.stats,
        rows,
        &ProgressBar::hidden(),
        pipeline,
        Duration::from_secs(300),
    )
    .await
    .unwrap();
}

#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub reason: String,
    pub field: Option<String>,
    pub index: Option<usize>,
    pub error: String,
    pub body: Vec<u8>,
}

/// The rows of the visible lake files. Polled while workers run: a file listed and then
/// removed before it is read (a taken-over partition's incomplete batch, a compaction's
/// input) counts nothing, and the next poll sees the lake as it then is.
pub fn lake_rows(h: &Harness) -> u64 {
    parquet_files(&h.lake_events())
        .into_iter()
        .filter_map(|p| File::open(p).ok())
        .map(|file| {
            use parquet::file::reader::FileReader;
            let r = parquet::file::reader::SerializedFileReader::new(file).unwrap();
            r.metadata().file_metadata().num_rows() as u64
        })
        .sum()
}

/// A `tally serve` process, killed if a failing test leaves it running.
/// A running `tally serve` or `tally worker`, and where its HTTP API listens (`serve`).
pub struct Serve(pub std::process::Child, pub Option<String>);

impl Harness {
    /// The permissions violations nats-server logged: a Tally service that needed more than
    /// its grant (or a test that tried what it may not).
    pub fn permission_violations(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.server.data_dir().join("nats-server.log"))
            .unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("Violation"))
            .map(str::to_owned)
            .collect()
    }
}

/// Every test holds Tally's services to their least-privilege grants: nothing the pipeline,
/// the API or the CLI did may have been refused by nats-server.
impl Drop for Harness {
    fn drop(&mut self) {
        if self.expect_violations {
            return;
        }
        let violations = self.permission_violations();
        if std::thread::panicking() {
            // Often the reason: say it beside the failure.
            for v in &violations {
                eprintln!("nats-server refused a Tally service: {v}");
            }
            return;
        }
        assert!(
            violations.is_empty(),
            "nats-server refused a Tally service:\n{}",
            violations.join("\n")
        );
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `tally serve` and returns once it says it is running.
pub fn serve(h: &Harness, flush_age_ms: &str) -> Serve {
    serve_with(h, &[("TALLY_INGEST__FLUSH_AGE_MS", flush_age_ms)])
}

/// Starts `tally serve` with these environment variables set.
pub fn serve_with(h: &Harness, env: &[(&str, &str)]) -> Serve {
    run_tally(h, &["serve"], env)
}

/// Starts `tally <args>` (`serve` or `worker …`) against the harness's NATS and data
/// directory, and returns once it says it is running.
pub fn run_tally(h: &Harness, args: &[&str], env: &[(&str, &str)]) -> Serve {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .args(["--nats-url", &h.server.url(), "--data-dir"])
        .arg(h.dir.path())
        .env("TALLY_NATS_CREDENTIALS", h.server.credentials().dir())
        .envs(env.iter().copied())
        .env("TALLY_INGEST__ACK_WAIT_SECS", "2")
        // A killed worker's partitions are free again within two seconds.
        .env("TALLY_INGEST__LEASE_MS", "1500")
        .env("TALLY_LOG", "info")
        // `tally serve` runs the API too: on a free port, so tests side by side do not collide.
        .env("TALLY_API__LISTEN", "127.0.0.1:0")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut api = None;
    let running = lines.by_ref().any(|line| {
        let line = line.unwrap_or_default();
        eprintln!("{line}");
        if let Some(url) = line.strip_prefix("tally api on ") {
            api = Some(url.trim().to_owned());
        }
        line.contains("tally is running")
    });
    assert!(running, "tally serve exited before it was running");
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(|l| eprintln!("{}", l.unwrap_or_default())));
    Serve(child, api)
}

/// Per partition consumer: (messages not yet delivered, delivered but unacknowledged).
pub async fn consumer_backlog(h: &Harness) -> (u64, u64) {
    let stream = h.nats.jetstream.get_stream("TALLY_EVENTS").await.unwrap();
    let (mut pending, mut unacked) = (0, 0);
    for p in 0..h.config.ingest.partitions {
        // A worker re-creating its consumer makes it briefly absent: not settled yet.
        let consumer: Result<async_nats::jetstream::consumer::PullConsumer, _> = stream
            .get_consumer(&tally_core::subject::partition_consumer(p))
            .await;
        match consumer {
            Ok(mut c) => match c.info().await {
                Ok(info) => {
                    pending += info.num_pending;
                    unacked += info.num_ack_pending as u64;
                }
                Err(_) => pending += 1,
            },
            Err(_) => pending += 1,
        }
    }
    (pending, unacked)
}

pub fn terminate(mut serve: Serve) {
    let pid = serve.0.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());
    let status = serve.0.wait().unwrap();
    assert!(status.success(), "tally serve exited with {status}");
}

/// `Some` once every partition consumer exists.
pub async fn consumer_backlog_ready(h: &Harness) -> Option<()> {
    let stream = h.nats.jetstream.get_stream("TALLY_EVENTS").await.ok()?;
    for p in 0..h.config.ingest.partitions {
        stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
                &tally_core::subject::partition_consumer(p),
            )
            .await
            .ok()?;
    }
    Some(())
}

/// The lake's rows, read with the plain Parquet reader: (distinct ids, rows, quantity).
pub fn read_lake(h: &Harness) -> (HashSet<String>, u64, f64) {
    let mut ids = HashSet::new();
    let (mut rows, mut quantity) = (0u64, 0.0);
    for path in parquet_files(&h.lake_events()) {
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            rows += batch.num_rows() as u64;
            ids.extend(
                batch
                    .column(0)
                    .as_string::<i32>()
                    .iter()
                    .map(|s| s.unwrap().to_owned()),
            );
            quantity += batch
                .column_by_name("quantity")
                .unwrap()
                .as_primitive::<Float64Type>()
                .values()
                .iter()
                .sum::<f64>();
        }
    }
    (ids, rows, quantity)
}

/// Waits, with a deadline, until `ready` holds.
pub async fn until<F: Future<Output = bool>>(what: &str, mut ready: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ready().await {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every Parquet file under a directory, recursively, that is part of the lake: a file
/// superseded by a compacted one (still on disk for a while) is left out, as every reader
/// of the lake leaves it out (`tally_store::visible`).
pub fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    // A table of the lake: the files of its newest snapshot.
    if let (Some(root), Some(table)) = (dir.parent(), dir.file_name().and_then(|n| n.to_str()))
        && dir.join("_delta_log").is_dir()
    {
        let mut files = tally_store::Lake::new(root).table_paths(table).unwrap();
        files.sort();
        return files;
    }
    let mut out = Vec::new();
    collect_parquet(dir, &mut out);
    out
}

fn collect_parquet(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries {
        let path = e.unwrap().path();
        if path.is_dir() {
            collect_parquet(&path, out);
        } else if path.extension().is_some_and(|x| x == "parquet") {
            out.push(path);
        }
    }
    out.sort();
}

/// An HTTP client for the API (plain HTTP, or HTTPS trusting the system's roots); every
/// client is built this way: `reqwest` links no TLS crypto provider of its own.
pub fn http() -> reqwest::Client {
    tally_sdk::http_client(None).unwrap().build().unwrap()
}

/// The HTTP API of a harness, on a free loopback port, with the admin key it made at
/// its first start.
pub struct TestApi {
    pub base: String,
    pub admin: String,
    pub http: reqwest::Client,
    pub stop: tokio_util::sync::CancellationToken,
    pub api: tally::api::Api,
}

impl TestApi {
    /// A request to `path` (from `/api/v1/…`) with `key`, if any, as the bearer token.
    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    /// Makes a key of `role`, limited to `customers`, and returns its token.
    pub async fn key(&self, h: &Harness, role: tally_api::Role, customers: &[&str]) -> String {
        let keys = tally_api::ApiKeys::open(&h.nats.jetstream, 1)
            .await
            .unwrap();
        keys.create(
            role,
            customers.iter().map(|c| (*c).to_owned()).collect(),
            String::new(),
        )
        .await
        .unwrap()
        .token
    }
}

impl Harness {
    /// Starts the API against this harness's NATS and lake.
    pub async fn api(&self) -> TestApi {
        self.api_with(None).await
    }

    /// Starts the API, answering checks in-process from `local` (a worker's) first.
    pub async fn api_with(&self, local: Option<tally_ingest::checks::LocalChecks>) -> TestApi {
        self.start_api(self.config.clone(), local, http()).await
    }

    /// Starts the API serving HTTPS with `certs`' server certificate; its client trusts
    /// their CA.
    pub async fn api_tls(&self, certs: &tls::TestCerts) -> TestApi {
        let mut config = self.config.clone();
        config.api.tls_cert = Some(certs.cert.clone());
        config.api.tls_key = Some(certs.key.clone());
        let ca = tally_sdk::CaCertificate::file(&certs.ca);
        let http = tally_sdk::http_client(Some(&ca)).unwrap().build().unwrap();
        self.start_api(config, None, http).await
    }

    async fn start_api(
        &self,
        mut config: Config,
        local: Option<tally_ingest::checks::LocalChecks>,
        http: reqwest::Client,
    ) -> TestApi {
        config.api.listen = "127.0.0.1:0".to_owned();
        let stop = tokio_util::sync::CancellationToken::new();
        let api = tally::api::Api::start(&config, &self.nats, local, stop.clone())
            .await
            .unwrap();
        let admin = match &api.bootstrap {
            Some((token, _)) => token.clone(),
            None => {
                let keys = tally_api::ApiKeys::open(&self.nats.jetstream, 1)
                    .await
                    .unwrap();
                keys.create(tally_api::Role::Admin, Vec::new(), String::new())
                    .await
                    .unwrap()
                    .token
            }
        };
        TestApi {
            base: api.url(),
            admin,
            http,
            stop,
            api,
        }
    }
}
