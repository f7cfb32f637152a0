//! `tally bench failover`: what losing a machine costs a cluster, at default settings.
//!
//! Three nats-server nodes (`NatsCluster`; every stream and bucket with three replicas),
//! the lake on the S3 server, two `tally worker` processes on data directories of their own
//! (as on two hosts; the lease at its default unless `--lease-ms`), and a publisher in this
//! process offering `--rate` events/s in slices of 10 ms, each sent again with the same
//! message ids until JetStream acknowledges it. After `--warmup` seconds:
//!
//! 1. **A worker dies**: one worker is killed with SIGKILL. The take-over time runs from
//!    the kill until every partition the dead worker held has acknowledged (to JetStream,
//!    so after the lake holds it) everything stored before the kill and something after:
//!    its consumer's ack floor is past the stream's last sequence at the kill, or it has
//!    nothing left to deliver.
//! 2. **A NATS node dies**: once that is done and `--settle` seconds have passed, a node
//!    that does not lead the events stream is killed with SIGKILL, and started again once
//!    ingest has caught up; after `--settle` seconds more, the node leading the events
//!    stream is, and started again 10 s later. For each, the publish pause is the longest
//!    time without a slice acknowledged, from a second before the kill until ingest caught
//!    up; the ingest pause is measured like the take-over, over every partition. A
//!    leader's loss waits for JetStream to elect another: nats-server's Raft waits 4 to
//!    9 s without a leader's heartbeat before it campaigns.
//!
//! Publishing then goes on to `--seconds`; when the stream is drained the lake must hold
//! every event once.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use serde::Serialize;
use tally_core::subject;
use tally_natsd::NatsCluster;
use tally_node::config::Config;
use tally_node::pipeline::{Nats, Service};
use tally_query::Lakehouse;

use super::BenchFormat;
use crate::chaos::{self, Run, Worker};
use crate::workload::{self, OutMessage, Spec};

#[derive(Args)]
pub struct FailoverBench {
    /// Events offered per second.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Seconds of publishing in all.
    #[arg(long, default_value_t = 90)]
    seconds: u64,
    /// Seconds before the worker is killed.
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    /// Seconds between the take-over and the NATS node's kill.
    #[arg(long, default_value_t = 5)]
    settle: u64,
    /// The workers' lease in milliseconds (unset: the default, 15,000).
    #[arg(long)]
    lease_ms: Option<u64>,
    /// Events per message.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Where the NATS nodes, the S3 objects and the workers' logs go, kept after the run
    /// (cleared first if an earlier run made it); unset: a temporary directory, removed.
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = BenchFormat::Table)]
    format: BenchFormat,
}

#[derive(Debug, Serialize)]
pub struct FailoverReport {
    pub rate: u64,
    pub lease_ms: u64,
    /// Partitions the killed worker held.
    pub partitions_taken_over: usize,
    /// From the worker's SIGKILL until every partition it held is acknowledged past it.
    pub takeover_ms: u64,
    /// A node that did not lead the events stream, killed: the longest time without a
    /// publish acknowledged around its loss, and from its SIGKILL until every partition
    /// is acknowledged past it.
    pub follower_loss_publish_pause_ms: u64,
    pub follower_loss_ingest_pause_ms: u64,
    /// The same for the node that led the events stream.
    pub leader_loss_publish_pause_ms: u64,
    pub leader_loss_ingest_pause_ms: u64,
    /// Slices sent again after an error.
    pub publish_retries: u64,
    pub events: u64,
    pub in_lake: u64,
    pub distinct_in_lake: u64,
    pub exact: bool,
}

/// How long a slice of publishing is.
const SLICE: Duration = Duration::from_millis(10);
/// The wait before a slice that failed is sent again: short, since pauses are measured.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

pub async fn run(mut config: Config, args: FailoverBench) -> anyhow::Result<FailoverReport> {
    let temp = tempfile::Builder::new()
        .prefix("tally-bench-failover-")
        .tempdir()?;
    let dir = match &args.dir {
        Some(dir) => {
            crate::demo::prepare(dir, "bench-failover")?;
            dir.clone()
        }
        None => temp.path().to_owned(),
    };
    let nats_dir = dir.join("nats");
    let binary = config.nats_server.clone();
    let cluster = tokio::task::spawn_blocking(move || NatsCluster::start(&nats_dir, 3, binary))
        .await?
        .context("starting the NATS cluster")?;
    let url = cluster.url();
    let credentials = cluster.credentials().dir().to_owned();
    let cluster = Arc::new(Mutex::new(cluster));
    config.nats_url = Some(url.clone());
    config.nats_credentials = Some(credentials.clone());
    config.ingest.replicas = 3;
    config.data_dir = dir.join("bench");
    let s3_dir = dir.join("s3");
    let (_s3, location) = tokio::task::spawn_blocking(move || crate::start_s3(&s3_dir)).await??;
    config.lake_s3 = Some(location);
    let lease_ms = args.lease_ms.unwrap_or(config.ingest.lease_ms);
    config.ingest.lease_ms = lease_ms;

    let nats = Nats::connect(&config, Service::Admin).await?;
    let mut spec = Spec::new(args.rate * args.seconds, chrono::Utc::now().date_naive());
    spec.span = workload::Span::Day;
    spec.batch = args.batch;
    crate::demo::entitle_unlimited(&nats, spec.customers, "tally-bench").await?;
    tally_ingest::topology::ensure_streams(&nats.jetstream, &config.ingest).await?;
    let (messages, totals) = workload::generate(&spec);

    let mut env = chaos::lake_env(&config);
    env.push((
        "TALLY_NATS_CREDENTIALS".to_owned(),
        credentials.display().to_string(),
    ));
    env.push(("TALLY_INGEST__REPLICAS".to_owned(), "3".to_owned()));
    env.push(("TALLY_INGEST__LEASE_MS".to_owned(), lease_ms.to_string()));
    let exe = std::env::current_exe().context("locating the tally binary")?;
    let worker = |n: u32| {
        Worker::start(
            &exe,
            &url,
            Run::Worker(dir.join(format!("worker-{n}"))),
            &dir,
            &env,
            n,
        )
    };
    let mut workers = vec![worker(0)?, worker(1)?];
    let partitions = config.ingest.partitions;
    // Both workers hold their share before the clock starts.
    let held = |pid: u32| chaos::held_by(&nats, partitions, pid);
    let deadline = Instant::now() + Duration::from_secs(120);
    while held(workers[0].child.id()).await.is_empty()
        || held(workers[1].child.id()).await.is_empty()
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the workers did not share the partitions within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let acked: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let publisher = tokio::spawn(publish(
        nats.jetstream.clone(),
        messages,
        args.rate,
        acked.clone(),
    ));

    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let victim = held(workers[0].child.id()).await;
    let killed_at_seq = last_sequence(&nats).await?;
    let killed = Instant::now();
    workers[0].kill()?;
    caught_up(&nats, &victim, killed_at_seq).await?;
    let takeover = killed.elapsed();
    tracing::info!(ms = takeover.as_millis(), "taken over");

    let all: Vec<u16> = (0..partitions).collect();
    let lose = |node: usize, back_after: Option<Duration>| {
        lose_node(&nats, &cluster, node, back_after, &all, &acked)
    };
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let leader = node_of(&stream_leader(&nats).await?)?;
    let follower = (leader + 1) % 3;
    let (follower_publish, follower_ingest) = lose(follower, None).await?;
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let leader = node_of(&stream_leader(&nats).await?)?;
    let (leader_publish, leader_ingest) = lose(leader, Some(Duration::from_secs(10))).await?;
    let retries = publisher.await??;

    chaos::drained(&nats, partitions, &mut workers[1..]).await?;
    for worker in workers.drain(..).skip(1) {
        worker.stop()?;
    }
    let lake = Lakehouse::open(&config.lake()).await?;
    let (in_lake, distinct) = chaos::count(&lake).await?;
    let report = FailoverReport {
        rate: args.rate,
        lease_ms,
        partitions_taken_over: victim.len(),
        takeover_ms: millis(takeover),
        follower_loss_publish_pause_ms: millis(follower_publish),
        follower_loss_ingest_pause_ms: millis(follower_ingest),
        leader_loss_publish_pause_ms: millis(leader_publish),
        leader_loss_ingest_pause_ms: millis(leader_ingest),
        publish_retries: retries,
        events: totals.events_valid,
        in_lake,
        distinct_in_lake: distinct,
        exact: in_lake == totals.events_valid && distinct == in_lake,
    };
    match args.format {
        BenchFormat::Json => println!("{}", serde_json::to_string(&report)?),
        BenchFormat::Table => {
            println!(
                "worker killed: {} partitions taken over in {} ms (lease {} ms)",
                report.partitions_taken_over, report.takeover_ms, report.lease_ms
            );
            println!(
                "a NATS node not leading the stream killed: publishing paused {} ms, ingest caught up in {} ms",
                report.follower_loss_publish_pause_ms, report.follower_loss_ingest_pause_ms
            );
            println!(
                "the stream's leading NATS node killed: publishing paused {} ms, ingest caught up in {} ms",
                report.leader_loss_publish_pause_ms, report.leader_loss_ingest_pause_ms
            );
            println!(
                "{} events, {} in the lake ({} distinct): {}",
                report.events,
                report.in_lake,
                report.distinct_in_lake,
                if report.exact { "exact" } else { "NOT EXACT" }
            );
        }
    }
    if !report.exact {
        bail!("the lake does not hold every event once");
    }
    drop(nats);
    drop(cluster);
    Ok(report)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Kills node `node` (SIGKILL) and waits until every one of `partitions` is acknowledged
/// past the stream's last sequence at the kill; starts the node again `back_after` the
/// kill (in the background, awaited before returning), or once ingest caught up. Returns
/// the longest time without a slice acknowledged from a second before the kill until
/// then, and the time until ingest caught up.
async fn lose_node(
    nats: &Nats,
    cluster: &Arc<Mutex<NatsCluster>>,
    node: usize,
    back_after: Option<Duration>,
    partitions: &[u16],
    acked: &Mutex<Vec<Instant>>,
) -> anyhow::Result<(Duration, Duration)> {
    let poisoned = || anyhow::anyhow!("poisoned");
    let seq = last_sequence(nats).await?;
    let killed = Instant::now();
    cluster.lock().map_err(|_| poisoned())?.stop_node(node);
    let restart = |cluster: Arc<Mutex<NatsCluster>>, wait: Duration| {
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            std::thread::sleep(wait);
            let mut cluster = cluster.lock().map_err(|_| poisoned())?;
            cluster.restart_node(node)?;
            Ok(())
        })
    };
    let back = back_after.map(|after| restart(cluster.clone(), after));
    caught_up(nats, partitions, seq).await?;
    let ingest = killed.elapsed();
    let until = Instant::now();
    match back {
        Some(back) => back.await??,
        None => restart(cluster.clone(), Duration::ZERO).await??,
    }
    let acked = acked.lock().map_err(|_| poisoned())?;
    let from = killed - Duration::from_secs(1);
    let publish = acked
        .windows(2)
        .filter(|w| w[1] >= from && w[0] <= until)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    tracing::info!(
        node,
        ingest_ms = ingest.as_millis(),
        publish_ms = publish.as_millis(),
        "NATS node lost"
    );
    Ok((publish, ingest))
}

/// The index of node `n1` … in the cluster.
fn node_of(name: &str) -> anyhow::Result<usize> {
    name.strip_prefix('n')
        .and_then(|n| n.parse::<usize>().ok())
        .and_then(|n| n.checked_sub(1))
        .with_context(|| format!("{name:?} is not a node of this cluster"))
}

/// Publishes at `rate` in slices of [`SLICE`], each until acknowledged; records when each
/// slice was; returns the slices sent again.
async fn publish(
    js: async_nats::jetstream::Context,
    messages: Vec<OutMessage>,
    rate: u64,
    acked: Arc<Mutex<Vec<Instant>>>,
) -> anyhow::Result<u64> {
    let per_slice = (rate as f64 * SLICE.as_secs_f64()).max(1.0) as u64;
    let start = tokio::time::Instant::now();
    let (mut sent, mut retries, mut from) = (0u64, 0u64, 0usize);
    while from < messages.len() {
        let mut to = from;
        let mut events = 0u64;
        while to < messages.len() && events < per_slice {
            events += u64::from(messages[to].events);
            to += 1;
        }
        retries += chaos::publish(&js, &messages[from..to], RETRY_PAUSE).await?;
        acked
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .push(Instant::now());
        sent += events;
        from = to;
        tokio::time::sleep_until(start + Duration::from_secs_f64(sent as f64 / rate as f64)).await;
    }
    Ok(retries)
}

/// The events stream's last sequence, asked until a node answers.
async fn last_sequence(nats: &Nats) -> anyhow::Result<u64> {
    let mut stream = nats.jetstream.get_stream(subject::EVENTS_STREAM).await?;
    Ok(stream.info().await?.state.last_sequence)
}

/// The node leading the events stream (`n1` …).
async fn stream_leader(nats: &Nats) -> anyhow::Result<String> {
    let mut stream = nats.jetstream.get_stream(subject::EVENTS_STREAM).await?;
    let info = stream.info().await?;
    info.cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .context("the events stream has no leader")
}

/// Waits until each of `partitions` has acknowledged every message stored up to `seq`
/// and one after it (its ack floor is past `seq`), or has nothing left to deliver. NATS
/// requests that fail while a node is down are asked again, each given `ASK` at most:
/// a request to a consumer without a leader would otherwise wait out the client's
/// timeout (5 s), and the pause measured would be that timeout's.
async fn caught_up(nats: &Nats, partitions: &[u16], seq: u64) -> anyhow::Result<()> {
    const ASK: Duration = Duration::from_millis(250);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut waiting: Vec<u16> = partitions.to_vec();
    while !waiting.is_empty() {
        if Instant::now() > deadline {
            bail!("partitions {waiting:?} did not catch up within 300 s");
        }
        let mut still = Vec::new();
        for &p in &waiting {
            let name = subject::partition_consumer(p);
            let info = nats
                .jetstream
                .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                    &name,
                    subject::EVENTS_STREAM,
                );
            let done = match tokio::time::timeout(ASK, info).await {
                Ok(Ok(c)) => {
                    let i = c.cached_info();
                    i.ack_floor.stream_sequence > seq
                        || (i.num_pending == 0 && i.num_ack_pending == 0)
                }
                _ => false,
            };
            if !done {
                still.push(p);
            }
        }
        waiting = still;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
