//! The worker: takes partitions by lease ([`ownership`]), runs each one it holds, renews
//! its leases, and hands partitions over when workers come and go.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use async_nats::jetstream::Context;
use tally_core::metrics as names;
use tally_core::{Fence, FlushRequest};
use tally_store::Lake;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::entitlements::Entitlements;
use crate::ownership::{Assignment, Held, Leases};
use crate::{Error, IngestConfig, Result, Stats, checks, record, run_partition, topology};
use tally_core::partitions::Partitions;

/// What every partition of this worker shares.
#[derive(Clone)]
struct Shared {
    js: Context,
    config: IngestConfig,
    /// The events stream's partition counts (this generation's is `config.partitions`).
    partitions: Partitions,
    lake: Arc<Lake>,
    flush_tx: mpsc::Sender<FlushRequest>,
    stats: Arc<Stats>,
    entitlements: Option<Arc<Entitlements>>,
    /// Which partitions answer checks here, for callers in this process.
    local: Option<Arc<checks::LocalPartitions>>,
    /// The thread that answers checks over NATS.
    responder: Arc<checks::Responder>,
    /// The generation's stop (the worker's, or a new partition count); a fatal partition
    /// error fires it too.
    cancel: CancellationToken,
    errors: mpsc::Sender<Error>,
}

/// A partition this worker holds.
struct Unit {
    held: Held,
    fence: Arc<Fence>,
    /// Stops the partition gracefully: it seals, makes durable and acknowledges what it
    /// holds, and checkpoints.
    stop: CancellationToken,
    task: JoinHandle<()>,
    state: State,
    /// Fires once the partition's checks and record requests have been subscribed to (or
    /// the first attempt failed).
    answering: Option<oneshot::Receiver<()>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// Draining to hand the partition to another worker; the lease is still renewed.
    Releasing,
    /// The lease is gone: the fence is closed, the task is ending.
    Lost,
}

/// Runs the partitions this worker can hold until `cancel` fires or one of them fails.
///
/// On cancel, each partition seals its open batch, waits for it to become durable and
/// acknowledges it; then the leases are released. A failing partition is taken over again
/// from the lake while its lease holds; one failing while stopping (or with streams of the
/// wrong shape) stops the rest. `ready` fires once the entitlements are loaded, the
/// first round of leases is taken and those partitions answer checks and record requests.
/// `leases_js` should be a connection of its own: on the worker's, renewals would queue
/// behind its pulls, acks and publishes under load. Checks are answered on `responder`.
///
/// The partition count is the events stream's. When it grows (`tally partitions grow`),
/// the worker stops its partitions as at a clean stop and starts again on the new count:
/// a generation each.
#[allow(clippy::too_many_arguments)]
pub async fn run_worker(
    js: Context,
    leases_js: Context,
    responder: checks::Responder,
    config: IngestConfig,
    assignment: Assignment,
    lake: Arc<Lake>,
    flush_tx: mpsc::Sender<FlushRequest>,
    stats: Arc<Stats>,
    cancel: CancellationToken,
    ready: oneshot::Sender<Option<checks::LocalChecks>>,
) -> Result<()> {
    // A context of the worker's own, so that its publishes have their own slots (see
    // `IngestConfig::publishes_in_flight`), apart from any publisher sharing the client.
    let js = async_nats::jetstream::context::ContextBuilder::new()
        .max_ack_inflight(config.publishes_in_flight.max(1))
        .build(js.client());
    let responder = Arc::new(responder);
    let mut ready = Some(ready);
    let mut local: Option<checks::LocalChecks> = None;
    let mut pause = Duration::from_millis(250);
    loop {
        let generation = async {
            let partitions = topology::ensure_streams(&js, &config).await?;
            let generation = Generation {
                js: js.clone(),
                leases_js: leases_js.clone(),
                responder: responder.clone(),
                config: IngestConfig {
                    partitions: partitions.current(),
                    ..config.clone()
                },
                partitions,
                assignment: assignment.clone(),
                lake: lake.clone(),
                flush_tx: flush_tx.clone(),
                stats: stats.clone(),
            };
            run_generation(generation, &cancel, &mut ready, &mut local).await
        };
        match generation.await {
            Ok(true) => pause = Duration::from_millis(250),
            Ok(false) => return Ok(()),
            // A later generation starting while a NATS node is down: its streams, buckets
            // or leases did not answer (the first one's caller retries it).
            Err(e @ Error::Nats { .. }) if ready.is_none() && !cancel.is_cancelled() => {
                tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64,
                    "cannot start the partitions on the new count yet");
                tokio::select! {
                    () = cancel.cancelled() => return Ok(()),
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// What one generation of a worker runs with: the partition count it started on.
struct Generation {
    js: Context,
    leases_js: Context,
    responder: Arc<checks::Responder>,
    /// `partitions` is the stream's count for this generation.
    config: IngestConfig,
    partitions: Partitions,
    assignment: Assignment,
    lake: Arc<Lake>,
    flush_tx: mpsc::Sender<FlushRequest>,
    stats: Arc<Stats>,
}

/// How often a worker reads the events stream's partition count.
const PARTITIONS_POLL: Duration = Duration::from_secs(2);

/// Runs one generation until `worker` is cancelled (answering `false`) or until the
/// partition count changes (`true`: start the next one).
async fn run_generation(
    g: Generation,
    worker: &CancellationToken,
    ready: &mut Option<oneshot::Sender<Option<checks::LocalChecks>>>,
    local_checks: &mut Option<checks::LocalChecks>,
) -> Result<bool> {
    let Generation {
        js,
        leases_js,
        responder,
        config,
        partitions,
        assignment,
        lake,
        flush_tx,
        stats,
    } = g;
    // This generation's stop: the worker's, or a new partition count.
    let stopping = worker.child_token();
    let candidates = assignment.candidates(config.partitions);
    let entitlements = if config.enforce {
        Some(
            Entitlements::start(
                &js,
                &candidates,
                partitions.clone(),
                config.replicas,
                Duration::from_millis(config.definitions_apply_delay_ms),
                Some(Lake::clone(&lake)),
                stopping.clone(),
            )
            .await?,
        )
    } else {
        None
    };
    let leases = Leases::open(
        &leases_js,
        Duration::from_millis(config.lease_ms.max(300)),
        config.replicas,
    )
    .await?;
    tracing::info!(worker = %leases.id, lease_ms = config.lease_ms, partitions = %partitions,
        ?assignment, "worker started");
    let (errors, mut failed) = mpsc::channel::<Error>(candidates.len().max(1));
    let local = entitlements
        .as_ref()
        .map(|e| checks::LocalPartitions::new(e.clone(), config.partitions));
    if let Some(local) = &local {
        match local_checks {
            Some(checks) => checks.replace(local.clone()),
            None => *local_checks = Some(checks::LocalChecks::new(local.clone())),
        }
    }
    let ctx = Shared {
        js,
        config,
        partitions,
        lake,
        flush_tx,
        stats,
        entitlements,
        local,
        responder,
        cancel: stopping.clone(),
        errors,
    };
    let cancel = &stopping;
    let mut grown = false;
    let mut polled_at = std::time::Instant::now();
    // Workers start their search at different partitions, so that two starting together
    // do not race for the same ones.
    let offset = (xxhash_rust::xxh3::xxh3_64(leases.id.as_bytes()) as usize)
        .checked_rem(candidates.len())
        .unwrap_or(0);
    let order: Vec<u16> = candidates
        .iter()
        .cycle()
        .skip(offset)
        .take(candidates.len())
        .copied()
        .collect();
    // Every round (a third of the lease at most, a second by default) renews the leases,
    // announces this worker and looks for free partitions. A NATS node lost can leave the
    // leases bucket without a leader for up to 9 s: renewing often keeps the last renewal
    // recent, so the fences (closing a lease less a quarter after it) outlast the election,
    // and a dead worker's leases and announcement expire about a lease after its death.
    let scan = (leases.lease / 3).min(SCAN);
    let mut units: BTreeMap<u16, Unit> = BTreeMap::new();
    // Consumer lag is sampled off this loop (which renews the leases), every few seconds.
    let mut sampled_at: Option<std::time::Instant> = None;
    let mut sampled: BTreeMap<u16, bool> = BTreeMap::new();
    while !cancel.is_cancelled() {
        renew(&leases, &mut units, &ctx.stats).await;
        reap(&leases, &mut units).await;
        // Bounded, so that a listing waiting for NATS to elect a leader never holds up the
        // next round's renewals.
        match tokio::time::timeout(scan.max(ROUND_WAIT), leases.heartbeat()).await {
            Ok(Ok(workers)) => {
                rebalance(&leases, &ctx, &assignment, &order, workers, &mut units).await;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot reach the leases; retrying"),
            Err(_) => tracing::warn!("the leases did not answer in time; retrying"),
        }
        let owned = units.values().filter(|u| u.state == State::Running).count();
        ctx.stats.partitions_owned.store(owned as u64, Relaxed);
        metrics::gauge!(names::PARTITIONS_OWNED).set(owned as f64);
        if sampled_at.is_none_or(|at| at.elapsed() >= PENDING_SAMPLE) {
            sampled_at = Some(std::time::Instant::now());
            for owned in sampled.values_mut() {
                *owned = false;
            }
            for (p, unit) in &units {
                if unit.state == State::Running {
                    sampled.insert(*p, true);
                }
            }
            tokio::spawn(sample_pending(ctx.js.clone(), sampled.clone()));
        }
        if let Some(r) = ready.take() {
            for unit in units.values_mut() {
                if let Some(answering) = unit.answering.take() {
                    let _ = answering.await;
                }
            }
            let _ = r.send(local_checks.clone());
        }
        if polled_at.elapsed() >= PARTITIONS_POLL {
            polled_at = std::time::Instant::now();
            if let Ok(Ok(now)) =
                tokio::time::timeout(ROUND_WAIT, topology::partitions(&ctx.js)).await
                && now.current() != ctx.config.partitions
            {
                tracing::info!(
                    from = ctx.config.partitions,
                    to = now.current(),
                    "the events stream's partition count changed; starting the partitions again on it"
                );
                grown = true;
                cancel.cancel();
                break;
            }
        }
        tokio::select! {
            () = cancel.cancelled() => {}
            () = tokio::time::sleep(scan) => {}
        }
    }
    // Every partition drains (their stop tokens are children of `cancel`); the leases are
    // renewed meanwhile, then released.
    while units.values().any(|u| !u.task.is_finished()) {
        renew(&leases, &mut units, &ctx.stats).await;
        tokio::time::sleep(scan.min(Duration::from_millis(100))).await;
    }
    for (p, unit) in std::mem::take(&mut units) {
        if unit.state != State::Lost
            && let Err(e) = leases.release(p, unit.held).await
        {
            tracing::warn!(partition = p, error = %e, "cannot release a lease; it expires by itself");
        }
    }
    leases.leave().await;
    ctx.stats.partitions_owned.store(0, Relaxed);
    metrics::gauge!(names::PARTITIONS_OWNED).set(0.0);
    for p in sampled.keys() {
        metrics::gauge!(names::CONSUMER_PENDING, "partition" => p.to_string()).set(0.0);
    }
    drop(ctx);
    match failed.recv().await {
        Some(e) => Err(e),
        None => Ok(grown && !worker.is_cancelled()),
    }
}

/// How often a worker renews its leases, announces itself and looks for free partitions,
/// at most.
const SCAN: Duration = Duration::from_secs(1);
/// How long a round waits for one answer from the leases buckets (a renewal, the
/// announcement and listing) before it goes on without it.
const ROUND_WAIT: Duration = Duration::from_secs(2);

/// How often the lag of the partitions owned is sampled.
const PENDING_SAMPLE: Duration = Duration::from_secs(5);

/// Sets the lag gauge of each partition: sampled where `owned`, 0 where this worker no
/// longer owns it (its new owner reports it), so that a sum over workers counts it once.
async fn sample_pending(js: Context, partitions: BTreeMap<u16, bool>) {
    for (p, owned) in partitions {
        let gauge = metrics::gauge!(names::CONSUMER_PENDING, "partition" => p.to_string());
        if !owned {
            gauge.set(0.0);
            continue;
        }
        match tokio::time::timeout(Duration::from_secs(2), topology::pending(&js, p)).await {
            Ok(Ok(Some(n))) => gauge.set(n as f64),
            Ok(Ok(None)) => gauge.set(0.0),
            Ok(Err(e)) => {
                tracing::debug!(partition = p, error = %e, "cannot sample the consumer lag")
            }
            Err(_) => tracing::debug!(partition = p, "sampling the consumer lag timed out"),
        }
    }
}

/// Renews every lease still held; a partition whose lease is gone, or whose fence closed
/// before a renewal got through, is lost at once. A renewal unanswered within
/// [`ROUND_WAIT`] is tried again next round (if it landed meanwhile, that renewal finds
/// the lease still this worker's).
async fn renew(leases: &Leases, units: &mut BTreeMap<u16, Unit>, stats: &Stats) {
    let renewals = units
        .iter_mut()
        .filter(|(_, u)| u.state != State::Lost)
        .map(|(&p, u)| async move {
            let mut held = u.held;
            let outcome = tokio::time::timeout(ROUND_WAIT, leases.renew(p, &mut held))
                .await
                .unwrap_or_else(|_| Err(Error::nats("renew a partition lease", "timed out")));
            (p, held, outcome)
        });
    let outcomes = futures::future::join_all(renewals).await;
    for (p, held, outcome) in outcomes {
        let Some(unit) = units.get_mut(&p) else {
            continue;
        };
        match outcome {
            Ok(true) => {
                unit.held = held;
                unit.fence.extend(leases.deadline(held.sent));
            }
            Ok(false) => lose(p, unit, stats, "the lease is another worker's"),
            Err(e) if !unit.fence.holds() => lose(p, unit, stats, &e.to_string()),
            Err(e) => tracing::warn!(partition = p, error = %e, "cannot renew a lease; retrying"),
        }
    }
}

fn lose(partition: u16, unit: &mut Unit, stats: &Stats, why: &str) {
    unit.fence.revoke();
    unit.stop.cancel();
    unit.state = State::Lost;
    stats.leases_lost.fetch_add(1, Relaxed);
    tracing::error!(
        partition,
        why,
        "partition lease lost; the partition stops without writing"
    );
}

/// Forgets partitions whose task has ended, releasing the leases of those handed over.
async fn reap(leases: &Leases, units: &mut BTreeMap<u16, Unit>) {
    let ended: Vec<u16> = units
        .iter()
        .filter(|(_, u)| u.task.is_finished())
        .map(|(&p, _)| p)
        .collect();
    for p in ended {
        let Some(unit) = units.remove(&p) else {
            continue;
        };
        if unit.state == State::Releasing {
            match leases.release(p, unit.held).await {
                Ok(()) => tracing::info!(partition = p, "partition handed over"),
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "cannot release a lease; it expires by itself")
                }
            }
        }
    }
}

/// Lets partitions beyond this worker's share go, and takes free ones up to it.
async fn rebalance(
    leases: &Leases,
    ctx: &Shared,
    assignment: &Assignment,
    order: &[u16],
    workers: usize,
    units: &mut BTreeMap<u16, Unit>,
) {
    let share = assignment.share(ctx.config.partitions, workers);
    let running: Vec<u16> = units
        .iter()
        .filter(|(_, u)| u.state == State::Running)
        .map(|(&p, _)| p)
        .collect();
    for p in running
        .iter()
        .rev()
        .take(running.len().saturating_sub(share))
    {
        if let Some(unit) = units.get_mut(p) {
            tracing::info!(partition = p, share, workers, "handing a partition over");
            unit.state = State::Releasing;
            unit.stop.cancel();
        }
    }
    let mut wanted = share.saturating_sub(running.len());
    for &p in order {
        if wanted == 0 || ctx.cancel.is_cancelled() {
            break;
        }
        if units.contains_key(&p) {
            continue;
        }
        match leases.acquire(p).await {
            Ok(Some(held)) => {
                let fence = Arc::new(Fence::until(leases.deadline(held.sent)));
                let stop = ctx.cancel.child_token();
                let (answering_tx, answering) = oneshot::channel();
                let task = tokio::spawn(own(
                    ctx.clone(),
                    p,
                    fence.clone(),
                    stop.clone(),
                    answering_tx,
                ));
                tracing::info!(partition = p, "partition lease taken");
                units.insert(
                    p,
                    Unit {
                        held,
                        fence,
                        stop,
                        task,
                        state: State::Running,
                        answering: Some(answering),
                    },
                );
                wanted -= 1;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "cannot take a lease; retrying");
                break;
            }
        }
    }
}

/// Runs one held partition (its checks, record requests and compaction rounds too) until
/// `stop`, taking it over again from the lake after a failure while the fence holds.
/// Returns once its last compaction round has ended.
async fn own(
    ctx: Shared,
    partition: u16,
    fence: Arc<Fence>,
    stop: CancellationToken,
    answering_tx: oneshot::Sender<()>,
) {
    let compaction = (ctx.config.compact_every_secs > 0).then(|| {
        let stop = stop.child_token();
        let task = tokio::spawn(compact_while_held(
            ctx.lake.clone(),
            ctx.config.clone(),
            partition,
            fence.clone(),
            stop.clone(),
        ));
        (stop, tokio_util::task::AbortOnDropHandle::new(task))
    });
    run_held(&ctx, partition, &fence, &stop, answering_tx).await;
    // A round under way holds the lake's compaction lock on a blocking thread, which an
    // abort would not stop: it ends while the lease is still held, and so before the
    // worker's shutdown returns.
    if let Some((stop, task)) = compaction {
        stop.cancel();
        let _ = task.await;
    }
}

/// The body of [`own`]: the partition's consumer and its answers, restarted after a
/// failure while the fence holds, until `stop`.
async fn run_held(
    ctx: &Shared,
    partition: u16,
    fence: &Arc<Fence>,
    stop: &CancellationToken,
    answering_tx: oneshot::Sender<()>,
) {
    let mut pause = Duration::from_millis(100);
    let mut answering = None;
    let mut answering_tx = Some(answering_tx);
    // Callers in this process are answered here while the partition's requests are.
    let _local = ctx
        .local
        .as_ref()
        .map(|local| LocalGuard { local, partition });
    loop {
        let run = async {
            if answering.is_none() {
                let subscribed = answer(ctx, partition, stop).await;
                if subscribed.is_ok()
                    && let Some(local) = &ctx.local
                {
                    local.set_answering(partition, true);
                }
                if let Some(tx) = answering_tx.take() {
                    let _ = tx.send(());
                }
                answering = Some(subscribed?);
            }
            run_partition(
                ctx.js.clone(),
                &ctx.config,
                &ctx.partitions,
                partition,
                ctx.lake.clone(),
                ctx.flush_tx.clone(),
                ctx.stats.clone(),
                ctx.entitlements.clone(),
                fence.clone(),
                stop.clone(),
            )
            .await
        };
        let e = match run.await {
            Ok(()) => return,
            Err(e) => e,
        };
        if !fence.holds() {
            tracing::warn!(partition, error = %e, "partition stopped after its lease ended");
            return;
        }
        if ctx.cancel.is_cancelled() && matches!(e, Error::Nats { .. }) {
            // Stopping while NATS is away or slow (just restarted, overloaded): what the
            // partition has not acknowledged is delivered again at the next start, and
            // the lake's log drops what it already holds. Nothing is lost.
            tracing::warn!(partition, error = %e, "partition stopped without reaching NATS");
            return;
        }
        if ctx.cancel.is_cancelled() || matches!(e, Error::Topology(_)) {
            tracing::error!(partition, error = %e, "partition worker failed");
            ctx.cancel.cancel();
            let _ = ctx.errors.send(e).await;
            return;
        }
        if stop.is_cancelled() {
            tracing::warn!(partition, error = %e, "partition failed while handing over");
            return;
        }
        ctx.stats.partition_restarts.fetch_add(1, Relaxed);
        tracing::warn!(partition, error = %e, retry_in_ms = pause.as_millis() as u64,
            "partition worker failed; taking the partition over again from the lake");
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// Compacts a held partition's settled files every `compact_every_secs` (the partitions
/// of a worker spread over the interval) while its lease holds; the compacted files become
/// visible only while the fence holds. A round finding the lake's compaction lock taken
/// (`tally compact`, another worker's round) is skipped.
async fn compact_while_held(
    lake: Arc<Lake>,
    config: IngestConfig,
    partition: u16,
    fence: Arc<Fence>,
    stop: CancellationToken,
) {
    let every = Duration::from_secs(config.compact_every_secs);
    let spread = u32::from(config.partitions.max(1));
    let mut wait = every / spread * (u32::from(partition) % spread + 1);
    let options = tally_store::CompactOptions {
        target_rows: config.compact_target_rows,
        ..tally_store::CompactOptions::default()
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = every;
        if !fence.holds() {
            return;
        }
        let (lake, fence, options) = (lake.clone(), fence.clone(), options.clone());
        let round = tokio::task::spawn_blocking(move || {
            let Some(_lock) = lake.lock_compaction()? else {
                return Ok(None);
            };
            let Some(settled) = lake.settled_seq(partition)? else {
                return Ok(None);
            };
            let now = std::time::SystemTime::now();
            let mut done = lake.compact(partition, settled, &fence, &options, now)?;
            // The owner of partition 0 also removes the files no snapshot needs any more.
            if partition == 0 {
                done.removed += lake.vacuum(options.retain, now)?;
            }
            Ok::<_, tally_store::Error>(Some(done))
        })
        .await;
        match round {
            Ok(Ok(Some(done))) if done.written > 0 || done.removed > 0 => {
                tracing::info!(
                    partition,
                    merged = done.merged,
                    written = done.written,
                    rows = done.rows,
                    removed = done.removed,
                    "compacted"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(partition, error = %e, "compaction failed; the lake is unchanged by it")
            }
            Err(e) => tracing::warn!(partition, error = %e, "compaction panicked"),
        }
    }
}

/// Stops answering a partition's checks in-process when its task ends.
struct LocalGuard<'a> {
    local: &'a checks::LocalPartitions,
    partition: u16,
}

impl Drop for LocalGuard<'_> {
    fn drop(&mut self) {
        self.local.set_answering(self.partition, false);
    }
}

/// Answers checks and record requests for a held partition until `stop`.
async fn answer(
    ctx: &Shared,
    partition: u16,
    stop: &CancellationToken,
) -> Result<Option<[tokio::task::JoinSet<()>; 2]>> {
    let Some(e) = &ctx.entitlements else {
        return Ok(None);
    };
    let checks = checks::serve(
        &ctx.responder,
        e.clone(),
        vec![partition],
        &ctx.partitions,
        stop.clone(),
    )
    .await?;
    let records = record::serve(
        ctx.js.clone(),
        e.clone(),
        vec![partition],
        &ctx.partitions,
        ctx.config.limits,
        stop.clone(),
    )
    .await?;
    Ok(Some([checks, records]))
}
