//! `tally chaos`: the fault suite as a command.
//!
//! Starts a nats-server of its own under the data directory and a worker (`tally serve`)
//! as a child process, publishes a generated workload (batched and single messages, some
//! event ids repeated, some events malformed), and meanwhile:
//!
//! - kills the worker with SIGKILL `--kills` times and starts a new one at once (it takes
//!   the partitions over once the dead one's leases expire);
//! - kills and restarts nats-server `--nats-restarts` times (the publisher retries what
//!   was not acknowledged with the same message ids, as an SDK does);
//! - `--pauses` times, starts a second worker and pauses the first (SIGSTOP) for three
//!   leases, so that the second takes its partitions over, then resumes it: the flushes it
//!   had under way when it stopped are refused by the lake's log (its lease is gone, or its
//!   successor committed past them), and the two share the partitions from then on;
//! - makes the lake's events directory unwritable for `--unwritable-secs` once.
//!
//! With `--s3` the lake is in a bucket of an S3-compatible server (`s3s-fs`, started here
//! on a loopback port) instead of under the data directory, and the server is stopped for
//! `--unwritable-secs` and started again instead (same port, same objects).
//!
//! With `--cluster`, as a deployment past one machine runs: three nats-server nodes in a
//! cluster (streams and buckets with three replicas), three workers (`tally worker`), each
//! on a data directory of its own and given every node's URL, and the lake on the S3
//! server. Each of `--nats-restarts` kills one node with SIGKILL and starts it again
//! [`NODE_DOWN`] later, one node at a time (never the majority), while publishing goes on
//! through the others.
//!
//! Publishing is paced (`--rate`) and cut into slices; the faults fall between slices, at
//! moments drawn from `--seed`, while the worker is busy with what was published before. When everything is acknowledged
//! and drained, the worker is stopped and the lake is checked against the generator: each
//! valid event exactly once, every malformed one a dead letter, every repeated id dropped,
//! and the billing lines (every customer is on an unlimited plan, so every valid event
//! bills) equal to the generator's per customer × feature. The figures are printed as a
//! table, or as one JSON object on the last line.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally_node::pipeline::Service;

use anyhow::{Context as _, bail};
use clap::Args;
use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::Int64Type;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tally_core::subject;
use tally_natsd::{NatsCluster, NatsServer, ServerOptions};
use tally_query::{Lakehouse, Period, Scope};

use crate::workload::{self, OutMessage, Spec};
use tally_node::config::Config;
use tally_node::output::Format;
use tally_node::pipeline::Nats;

/// Publishing is cut into this many slices; faults fall between them.
const SLICES: usize = 100;
/// The worker's lease: a killed worker's partitions are free again this soon.
const LEASE_MS: u64 = 1500;
/// The wait before a slice that failed is sent again.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// How long a killed NATS node of a `--cluster` run stays down.
const NODE_DOWN: Duration = Duration::from_secs(3);
/// NATS nodes and workers of a `--cluster` run.
const CLUSTER: usize = 3;

#[derive(Args, Debug, Clone)]
pub struct ChaosArgs {
    /// Events to generate (about 1 % more are published: repeated ids).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Times the worker is killed (SIGKILL) and started again while events flow.
    #[arg(long, default_value_t = 10)]
    pub kills: u32,
    /// Times nats-server (with `--cluster`, one node at a time) is killed and started
    /// again while events flow.
    #[arg(long, default_value_t = 2)]
    pub nats_restarts: u32,
    /// Times a worker is paused (SIGSTOP) past its leases while another takes its
    /// partitions over, then resumed.
    #[arg(long, default_value_t = 1)]
    pub pauses: u32,
    /// For how long, once, the lake refuses writes (0: never); with `--s3`, how long the
    /// S3 server is stopped.
    #[arg(long, default_value_t = 3)]
    pub unwritable_secs: u64,
    /// The lake in a bucket of an S3-compatible server (s3s-fs, started here; see
    /// `scripts/install-s3.sh`) instead of the data directory.
    #[arg(long)]
    pub s3: bool,
    /// Three NATS nodes in a cluster (three replicas), three workers on data directories
    /// of their own, the lake on the S3 server (implies `--s3`).
    #[arg(long)]
    pub cluster: bool,
    /// Grows the partition count to this (a multiple of `ingest.partitions`) halfway
    /// through publishing, while the faults go on (`tally partitions grow`).
    #[arg(long)]
    pub grow_to: Option<u16>,
    /// Events published per second at most, so that the faults are spread over the run.
    #[arg(long, default_value_t = 50_000)]
    pub rate: u64,
    /// Customers of the workload.
    #[arg(long, default_value_t = 1_000)]
    pub customers: u32,
    /// Seeds the workload and the moments of the faults.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// What happened, and whether the lake is exact.
#[derive(Debug, Serialize)]
pub struct ChaosReport {
    /// Events in every message published (first attempts; repeated ids and malformed
    /// events included).
    pub sent: u64,
    /// Events in messages JetStream acknowledged (each message counted once, however many
    /// attempts it took).
    pub acked: u64,
    /// Distinct valid events generated.
    pub events_valid: u64,
    pub in_lake: u64,
    pub distinct_in_lake: u64,
    /// Acknowledged events that are neither in the lake nor dead letters: the repeated ids
    /// the worker dropped. The generator published `duplicates_published`.
    pub duplicates_dropped: u64,
    pub duplicates_published: u64,
    pub dead_letters: u64,
    pub events_invalid: u64,
    /// Workers killed with SIGKILL (each replaced at once).
    pub worker_kills: u32,
    /// nats-servers killed with SIGKILL and started again: the only one, or one node of
    /// the cluster at a time.
    pub nats_node_kills: u32,
    /// NATS nodes: 1, or 3 with `--cluster`.
    pub nats_nodes: usize,
    /// The fewest copies NATS keeps of any of Tally's streams and buckets, as it reports.
    pub replicas: usize,
    /// Workers running side by side (each on a data directory of its own with
    /// `--cluster`).
    pub workers: usize,
    /// The events stream's partition counts at the end, each with the last sequence
    /// stored under it (`16@5123,64` after `--grow-to 64`).
    pub partitions: String,
    pub pauses: u32,
    /// Flushes the lake refused because their worker had lost the partition (a paused
    /// worker's, after it resumed), as the workers' logs tell.
    pub stale_flushes_refused: u64,
    pub unwritable_secs: u64,
    /// Where the lake was: `local` or `s3`.
    pub lake: &'static str,
    /// Times the S3 server was stopped and started again (with `--s3`).
    pub s3_restarts: u32,
    /// Slices of publishing that had to be sent again after an error.
    pub publish_retries: u64,
    /// The last worker's peak resident memory (`VmHWM`), in MiB, where `/proc` tells.
    pub worker_peak_rss_mib: Option<u64>,
    pub seconds: f64,
    /// The billing lines equal the generator's per customer × feature, and the lake holds
    /// every valid event exactly once.
    pub billing_matches: bool,
    /// Every figure above agrees with the generator.
    pub exact: bool,
}

/// A fault, at the start of a slice of publishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillWorker,
    RestartNats,
    PauseWorker,
    Unwritable,
    Grow(u16),
}

pub async fn run(mut config: Config, args: ChaosArgs) -> anyhow::Result<ChaosReport> {
    let started = Instant::now();
    let dir = config.data_dir.clone();
    // New, empty, or made by an earlier `tally chaos` (cleared).
    crate::demo::prepare(&dir, "chaos")?;
    let nats_dir = dir.join("nats");
    let binary = config.nats_server.clone();
    let server = if args.cluster {
        let cluster =
            tokio::task::spawn_blocking(move || NatsCluster::start(&nats_dir, CLUSTER, binary))
                .await?
                .context("starting the NATS cluster")?;
        config.ingest.replicas = CLUSTER;
        Server::Cluster(Arc::new(Mutex::new(cluster)))
    } else {
        let mut options = ServerOptions::new(nats_dir);
        options.binary = binary;
        let server = tokio::task::spawn_blocking(move || NatsServer::start(options))
            .await?
            .context("starting nats-server")?;
        Server::One(Arc::new(Mutex::new(server)))
    };
    // A restart keeps the servers' ports: every worker is given these URLs.
    let nats_url = server.url();
    config.nats_url = Some(nats_url.clone());
    config.nats_credentials = Some(server.credentials());
    let s3 = if args.s3 || args.cluster {
        let s3_dir = dir.join("s3");
        let (s3, location) =
            tokio::task::spawn_blocking(move || crate::start_s3(&s3_dir)).await??;
        config.lake_s3 = Some(location);
        Some(Arc::new(Mutex::new(s3)))
    } else {
        None
    };
    let mut worker_env = lake_env(&config);
    worker_env.push((
        "TALLY_NATS_CREDENTIALS".to_owned(),
        server.credentials().display().to_string(),
    ));
    worker_env.push((
        "TALLY_INGEST__REPLICAS".to_owned(),
        config.ingest.replicas.to_string(),
    ));
    worker_env.push(("TALLY_INGEST__LEASE_MS".to_owned(), LEASE_MS.to_string()));
    let nats = Nats::connect(&config, Service::Admin).await?;
    crate::demo::entitle_unlimited(&nats, args.customers, "tally-chaos").await?;
    tally_ingest::topology::ensure_streams(&nats.jetstream, &config.ingest).await?;

    let month = crate::demo::this_month();
    let mut spec = Spec::new(args.events, month);
    spec.customers = args.customers;
    spec.batch = 50;
    spec.single_rate = 0.2;
    spec.duplicate_rate = 0.01;
    spec.invalid_rate = 0.001;
    spec.seed = args.seed;
    let (messages, totals) = workload::generate(&spec);
    let faults = schedule(&args);

    let exe = std::env::current_exe().context("locating the tally binary")?;
    let mut started_workers = 0;
    let mut start_worker = || {
        started_workers += 1;
        let n = started_workers - 1;
        let run = if args.cluster {
            // As on a host of its own: a data directory no other worker shares.
            Run::Worker(dir.join(format!("worker-{n}")))
        } else {
            Run::Serve(dir.clone())
        };
        Worker::start(&exe, &nats_url, run, &dir, &worker_env, n)
    };
    // The oldest first: a kill or a pause strikes the worker that has run the longest.
    let side_by_side = if args.cluster { CLUSTER } else { 1 };
    let mut workers = (0..side_by_side)
        .map(|_| start_worker())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let lake_events = config.lake_dir().join(tally_core::schema::EVENTS_TABLE);
    let mut report = ChaosReport {
        sent: 0,
        acked: 0,
        events_valid: totals.events_valid,
        in_lake: 0,
        distinct_in_lake: 0,
        duplicates_dropped: 0,
        duplicates_published: totals.duplicates_published,
        dead_letters: 0,
        events_invalid: totals.events_invalid,
        worker_kills: 0,
        nats_node_kills: 0,
        nats_nodes: if args.cluster { CLUSTER } else { 1 },
        replicas: 0,
        workers: side_by_side,
        partitions: String::new(),
        pauses: 0,
        stale_flushes_refused: 0,
        unwritable_secs: args.unwritable_secs,
        lake: if s3.is_some() { "s3" } else { "local" },
        s3_restarts: 0,
        publish_retries: 0,
        worker_peak_rss_mib: None,
        seconds: 0.0,
        billing_matches: false,
        exact: false,
    };
    let mut restore: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
    // The cluster node down now, and the task that starts it again.
    let mut node_back: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
    // Each paused worker's pid and the task that resumes it.
    let mut resumes: Vec<(u32, tokio::task::JoinHandle<anyhow::Result<()>>)> = Vec::new();
    let per_slice = messages.len().div_ceil(SLICES).max(1);
    let publishing = Instant::now();
    for (i, slice) in messages.chunks(per_slice).enumerate() {
        let due = Duration::from_secs_f64(report.sent as f64 / args.rate.max(1) as f64);
        tokio::time::sleep_until((publishing + due).into()).await;
        for fault in faults.iter().filter(|(at, _)| *at == i).map(|(_, f)| *f) {
            match fault {
                Fault::KillWorker => {
                    // The oldest worker that is not paused (a kill would end its pause).
                    let paused =
                        |pid: u32| resumes.iter().any(|(p, r)| *p == pid && !r.is_finished());
                    let victim = workers
                        .iter()
                        .position(|w| !paused(w.child.id()))
                        .unwrap_or(0);
                    let mut dead = workers.remove(victim);
                    dead.kill()?;
                    report.worker_kills += 1;
                    workers.push(start_worker()?);
                    tracing::warn!(
                        kills = report.worker_kills,
                        "worker killed and started again"
                    );
                }
                Fault::PauseWorker => {
                    let pid = workers[0].child.id();
                    // Paused while it holds partitions, so that another takes them over.
                    holds_a_lease(&nats, partitions_now(&nats).await?.current(), pid).await?;
                    workers.push(start_worker()?);
                    resumes.push((pid, pause(pid, 3 * LEASE_MS)));
                    report.pauses += 1;
                    tracing::warn!(pauses = report.pauses, pid, "worker paused past its leases");
                }
                Fault::RestartNats => {
                    // One node down at a time: the one before is back first.
                    if let Some(back) = node_back.take() {
                        back.await??;
                    }
                    let node = report.nats_node_kills as usize;
                    report.nats_node_kills += 1;
                    match &server {
                        Server::One(one) => {
                            let one = one.clone();
                            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                                Ok(locked(&one)?.restart()?)
                            })
                            .await?
                            .context("restarting nats-server")?;
                            tracing::warn!(kills = report.nats_node_kills, "nats-server restarted");
                        }
                        Server::Cluster(cluster) => {
                            node_back = Some(kill_node(cluster.clone(), node % CLUSTER));
                            tracing::warn!(
                                kills = report.nats_node_kills,
                                node = node % CLUSTER,
                                "NATS node killed"
                            );
                        }
                    }
                }
                Fault::Grow(count) => {
                    grow(&nats, count).await?;
                    tracing::warn!(partitions = count, "the partition count grew");
                }
                Fault::Unwritable => {
                    restore = Some(match &s3 {
                        Some(s3) => stop_s3(s3.clone(), args.unwritable_secs),
                        None => make_unwritable(&lake_events, args.unwritable_secs)?,
                    });
                    report.s3_restarts += u32::from(s3.is_some());
                    tracing::warn!(secs = args.unwritable_secs, "the lake refuses writes");
                }
            }
        }
        report.sent += slice.iter().map(|m| u64::from(m.events)).sum::<u64>();
        report.publish_retries += publish(&nats.jetstream, slice, RETRY_PAUSE).await?;
        report.acked += slice.iter().map(|m| u64::from(m.events)).sum::<u64>();
    }
    if let Some(restore) = restore {
        restore.await??;
    }
    if let Some(back) = node_back {
        back.await??;
    }
    for (_, resume) in resumes {
        resume.await??;
    }
    let partitions = partitions_now(&nats).await?;
    report.partitions = partitions.to_string();
    drained(&nats, partitions.current(), &mut workers).await?;
    report.worker_peak_rss_mib = workers
        .iter()
        .filter_map(Worker::peak_rss_kib)
        .max()
        .map(|k| k / 1024);
    for worker in workers {
        worker.stop()?;
    }
    report.stale_flushes_refused = stale_flushes_refused(&dir, started_workers);

    let lake = Lakehouse::open(&config.lake()).await?;
    let (rows, distinct) = count(&lake).await?;
    report.in_lake = rows;
    report.distinct_in_lake = distinct;
    report.dead_letters = nats
        .jetstream
        .get_stream(subject::DEAD_LETTER_STREAM)
        .await?
        .info()
        .await?
        .state
        .messages;
    report.replicas = fewest_replicas(&nats).await?;
    report.duplicates_dropped = report
        .acked
        .saturating_sub(report.in_lake + report.dead_letters);
    let billing = lake.billing(&Scope::Month(Period::of(month)), None).await?;
    report.billing_matches = rows == distinct
        && rows == totals.events_valid
        && crate::demo::lines_of(&billing) == totals.by_line;
    report.exact = report.billing_matches
        && report.acked == report.sent
        && report.dead_letters == totals.events_invalid
        && report.duplicates_dropped == totals.duplicates_published;
    report.seconds = started.elapsed().as_secs_f64();
    drop(nats);
    drop(server);
    Ok(report)
}

/// The NATS of a run: one server, or the nodes of a cluster.
enum Server {
    One(Arc<Mutex<NatsServer>>),
    Cluster(Arc<Mutex<NatsCluster>>),
}

impl Server {
    /// Every node's client URL, comma-separated.
    fn url(&self) -> String {
        match self {
            Server::One(one) => locked(one).map(|s| s.url()),
            Server::Cluster(cluster) => locked(cluster).map(|c| c.url()),
        }
        .unwrap_or_default()
    }

    /// The credentials directory the servers enforce.
    fn credentials(&self) -> PathBuf {
        match self {
            Server::One(one) => locked(one).map(|s| s.credentials().dir().to_owned()),
            Server::Cluster(cluster) => locked(cluster).map(|c| c.credentials().dir().to_owned()),
        }
        .unwrap_or_default()
    }
}

fn locked<T>(shared: &Mutex<T>) -> anyhow::Result<std::sync::MutexGuard<'_, T>> {
    shared
        .lock()
        .map_err(|_| anyhow::anyhow!("a server's lock is poisoned"))
}

/// Kills node `i` of the cluster now (SIGKILL) and starts it again [`NODE_DOWN`] later.
fn kill_node(
    cluster: Arc<Mutex<NatsCluster>>,
    i: usize,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::task::spawn_blocking(move || {
        let mut cluster = locked(&cluster)?;
        cluster.stop_node(i);
        std::thread::sleep(NODE_DOWN);
        cluster
            .restart_node(i)
            .with_context(|| format!("starting NATS node {} again", i + 1))?;
        tracing::warn!(node = i, "NATS node is back");
        Ok(())
    })
}

/// The slices before which each fault strikes, drawn from the seed, none in the first
/// or last tenth (so the worker is busy when they strike).
fn schedule(args: &ChaosArgs) -> Vec<(usize, Fault)> {
    let mut rng = SmallRng::seed_from_u64(args.seed ^ 0xC4A0_5EED);
    let kinds = std::iter::repeat_n(Fault::KillWorker, args.kills as usize)
        .chain(std::iter::repeat_n(
            Fault::RestartNats,
            args.nats_restarts as usize,
        ))
        .chain(std::iter::repeat_n(
            Fault::PauseWorker,
            args.pauses as usize,
        ))
        .chain((args.unwritable_secs > 0).then_some(Fault::Unwritable));
    let mut faults: Vec<(usize, Fault)> = kinds
        .map(|f| (rng.random_range(SLICES / 10..SLICES * 9 / 10), f))
        .chain(args.grow_to.map(|count| (SLICES / 2, Fault::Grow(count))))
        .collect();
    faults.sort_unstable();
    faults
}

/// The events stream's partitions now, asked again while a NATS node is down.
async fn partitions_now(nats: &Nats) -> anyhow::Result<tally_core::partitions::Partitions> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match tally_ingest::topology::partitions(&nats.jetstream).await {
            Ok(partitions) => return Ok(partitions),
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "cannot read the partitions yet; retrying");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(e) => return Err(e).context("reading the events stream's partitions"),
        }
    }
}

/// Grows the partition count to `count`, trying again while a NATS node is down (a
/// growth stopped half-way, its markers published but the count not written, is made
/// again by the next attempt).
async fn grow(nats: &Nats, count: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match tally_ingest::topology::grow(&nats.jetstream, count).await {
            Ok(_) => return Ok(()),
            // An attempt whose answer was lost may have finished it.
            Err(e) => match tally_ingest::topology::partitions(&nats.jetstream).await {
                Ok(now) if now.current() == count => return Ok(()),
                _ if Instant::now() < deadline => {
                    tracing::warn!(error = %e, "cannot grow the partitions yet; retrying");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                _ => return Err(e).context("growing the partition count"),
            },
        }
    }
}

/// Publishes a slice until JetStream acknowledged all of it; returns the retries. A retry
/// sends the same message ids, so what was stored before the failure is dropped by
/// JetStream's duplicate window.
/// `pause` is the wait between attempts.
pub(crate) async fn publish(
    js: &async_nats::jetstream::Context,
    slice: &[OutMessage],
    pause: Duration,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut retries = 0;
    loop {
        match workload::publish(js, slice, workload::MAX_ACKS_IN_FLIGHT, |_| {}).await {
            Ok(_) => return Ok(retries),
            Err(e) if Instant::now() < deadline => {
                retries += 1;
                tracing::info!(error = %e, "publishing failed; sending the slice again");
                tokio::time::sleep(pause).await;
            }
            Err(e) => return Err(e.context("publishing never succeeded within 120 s")),
        }
    }
}

/// Waits until every partition's consumer has nothing pending and nothing unacknowledged
/// (acks come only after the lake holds a batch). A worker that exits meanwhile fails the
/// run, with the end of its log.
pub(crate) async fn drained(
    nats: &Nats,
    partitions: u16,
    workers: &mut [Worker],
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        for worker in workers.iter_mut() {
            if let Some(status) = worker.child.try_wait()? {
                bail!(
                    "a worker exited with {status}; the end of {}:\n{}",
                    worker.log.display(),
                    worker.log_tail()
                );
            }
        }
        let mut idle = true;
        for p in 0..partitions {
            match tally_ingest::topology::caught_up(&nats.jetstream, p).await {
                Ok(true) => continue,
                Ok(false) => tracing::debug!(partition = p, "not drained yet"),
                Err(e) => tracing::debug!(partition = p, error = %e, "not drained yet"),
            }
            idle = false;
            break;
        }
        if idle {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the worker did not drain the stream within 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The fewest replicas of any stream (buckets are streams too).
async fn fewest_replicas(nats: &Nats) -> anyhow::Result<usize> {
    use futures::TryStreamExt as _;
    let streams: Vec<_> = nats.jetstream.streams().try_collect().await?;
    streams
        .iter()
        .map(|s| s.config.num_replicas)
        .min()
        .context("no streams")
}

/// Rows and distinct event ids in the lake.
pub(crate) async fn count(lake: &Lakehouse) -> anyhow::Result<(u64, u64)> {
    let batches = lake
        .context()
        .sql("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM events")
        .await?
        .collect()
        .await?;
    let b = batches.first().context("no count")?;
    let get = |i: usize| b.column(i).as_primitive::<Int64Type>().value(0);
    let (n, d) = (get(0), get(1));
    debug_assert!(!b.column(0).is_null(0));
    Ok((u64::try_from(n)?, u64::try_from(d)?))
}

/// Puts a file where the events directory was; the directory comes back after `secs`.
fn make_unwritable(
    events: &Path,
    secs: u64,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    std::fs::create_dir_all(events)?;
    let away = events.with_extension("away");
    std::fs::rename(events, &away)?;
    std::fs::write(events, b"the lake refuses writes (tally chaos)")?;
    let events = events.to_owned();
    Ok(tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        std::fs::remove_file(&events)?;
        std::fs::rename(&away, &events)?;
        tracing::warn!("the lake is writable again");
        Ok(())
    }))
}

/// Waits (up to 30 s) until the worker with process id `pid` holds a partition's lease.
async fn holds_a_lease(nats: &Nats, partitions: u16, pid: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if !held_by(nats, partitions, pid).await.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the worker {pid} took no partition within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The partitions whose lease the worker with process id `pid` holds (none while the
/// leases bucket cannot be read, or before any worker made it).
pub(crate) async fn held_by(nats: &Nats, partitions: u16, pid: u32) -> Vec<u16> {
    use tally_ingest::ownership::{LEASES_BUCKET, lease_key, worker_pid};
    let mut held = Vec::new();
    let Ok(kv) = nats.jetstream.get_key_value(LEASES_BUCKET).await else {
        return held;
    };
    for p in 0..partitions {
        if let Ok(Some(owner)) = kv.get(lease_key(p)).await
            && worker_pid(&String::from_utf8_lossy(&owner)) == Some(pid)
        {
            held.push(p);
        }
    }
    held
}

/// Pauses the process `pid` (SIGSTOP) now and resumes it (SIGCONT) after `ms`.
fn pause(pid: u32, ms: u64) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let signal = move |name: &str| -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()?;
        anyhow::ensure!(
            status.success(),
            "cannot send SIG{name} to the worker {pid}"
        );
        Ok(())
    };
    let stopped = signal("STOP");
    tokio::spawn(async move {
        stopped?;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        signal("CONT")?;
        tracing::warn!(pid, "worker resumed");
        Ok(())
    })
}

/// Flushes the lake refused to workers that had lost their partition, counted in the logs
/// of the `workers` started (the worker's error says which).
fn stale_flushes_refused(dir: &Path, workers: u32) -> u64 {
    (0..workers)
        .map(|n| std::fs::read_to_string(dir.join(format!("worker-{n}.log"))).unwrap_or_default())
        .map(|log| {
            log.lines()
                .filter(|l| {
                    l.contains("is no longer owned by this worker")
                        || l.contains("another worker committed it")
                })
                .count() as u64
        })
        .sum()
}

/// Stops the S3 server now and starts it again (same port, same objects) after `secs`.
fn stop_s3(
    s3: Arc<Mutex<tally_s3d::S3Server>>,
    secs: u64,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::task::spawn_blocking(move || {
        let mut server = locked(&s3)?;
        server.stop();
        std::thread::sleep(Duration::from_secs(secs));
        server.restart().context("starting the S3 server again")?;
        tracing::warn!("the S3 server is back");
        Ok(())
    })
}

/// The environment that points a worker at `config`'s lake (its bucket, for a lake on S3).
pub(crate) fn lake_env(config: &Config) -> Vec<(String, String)> {
    let Some(s3) = &config.lake_s3 else {
        return Vec::new();
    };
    let var = |k: &str, v: &str| (format!("TALLY_LAKE_S3__{k}"), v.to_owned());
    let mut env = vec![
        var("BUCKET", &s3.bucket),
        var("PREFIX", &s3.prefix),
        var("REGION", &s3.region),
        var("ACCESS_KEY_ID", &s3.access_key_id),
        var("SECRET_ACCESS_KEY", &s3.secret_access_key),
    ];
    if let Some(endpoint) = &s3.endpoint {
        env.push(var("ENDPOINT", endpoint));
    }
    env
}

/// What a worker process runs, on which data directory.
pub(crate) enum Run {
    /// `tally serve`: the worker and the API, on the run's data directory.
    Serve(PathBuf),
    /// `tally worker`, on a data directory of its own.
    Worker(PathBuf),
}

/// A worker child process, its log `worker-<n>.log` in the run's directory.
pub(crate) struct Worker {
    pub(crate) child: Child,
    log: PathBuf,
}

impl Worker {
    pub(crate) fn start(
        exe: &Path,
        url: &str,
        run: Run,
        logs: &Path,
        env: &[(String, String)],
        n: u32,
    ) -> anyhow::Result<Worker> {
        let log = logs.join(format!("worker-{n}.log"));
        let (command, dir) = match run {
            Run::Serve(dir) => ("serve", dir),
            Run::Worker(dir) => ("worker", dir),
        };
        std::fs::create_dir_all(&dir)?;
        let child = Command::new(exe)
            .args([command, "--nats-url", url, "--data-dir"])
            .arg(dir)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("TALLY_LOG", "warn,tally_ingest=info")
            // Workers overlap while one takes over from another, and other programs may
            // hold the default port: each worker's API on a free port.
            .env("TALLY_API__LISTEN", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .context("starting the worker")?;
        Ok(Worker { child, log })
    }

    /// The last lines of the worker's log, for an error that names it.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `VmHWM` of the running worker, in KiB.
    fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    }

    pub(crate) fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM: the worker drains and releases its leases.
    pub(crate) fn stop(mut self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("cannot signal the worker");
        }
        let exit = self.child.wait()?;
        if !exit.success() {
            bail!(
                "the worker exited with {exit} on SIGTERM; the end of {}:\n{}",
                self.log.display(),
                self.log_tail()
            );
        }
        Ok(())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The report as a table.
pub fn print_table(r: &ChaosReport) {
    let rows = [
        ("events sent", r.sent.to_string()),
        ("acknowledged by JetStream", r.acked.to_string()),
        ("valid events generated", r.events_valid.to_string()),
        ("rows in the lake", r.in_lake.to_string()),
        (
            "distinct event ids in the lake",
            r.distinct_in_lake.to_string(),
        ),
        (
            "repeated ids dropped (published)",
            format!("{} ({})", r.duplicates_dropped, r.duplicates_published),
        ),
        (
            "dead letters (malformed generated)",
            format!("{} ({})", r.dead_letters, r.events_invalid),
        ),
        ("lake", r.lake.to_owned()),
        ("NATS nodes", r.nats_nodes.to_string()),
        ("replicas of each stream and bucket", r.replicas.to_string()),
        ("workers side by side", r.workers.to_string()),
        (
            "partitions (counts, last sequence of each)",
            r.partitions.clone(),
        ),
        ("worker kills survived", r.worker_kills.to_string()),
        ("NATS node kills survived", r.nats_node_kills.to_string()),
        ("worker pauses past the lease", r.pauses.to_string()),
        (
            "stale flushes refused by the log",
            r.stale_flushes_refused.to_string(),
        ),
        (
            "seconds the lake refused writes",
            r.unwritable_secs.to_string(),
        ),
        ("S3 server restarts survived", r.s3_restarts.to_string()),
        ("publish slices sent again", r.publish_retries.to_string()),
        (
            "last worker's peak memory (MiB)",
            r.worker_peak_rss_mib
                .map_or_else(|| "unknown".to_owned(), |m| m.to_string()),
        ),
        (
            "billing matches the generator",
            r.billing_matches.to_string(),
        ),
        ("every figure exact", r.exact.to_string()),
        ("seconds", format!("{:.1}", r.seconds)),
    ];
    for (name, value) in rows {
        println!("{name:<36} {value}");
    }
}
