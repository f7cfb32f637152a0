//! One partition's loop: pull, decode, dedup, dead-letter, accumulate, seal, ack after durable.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::Context;
use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::Acker;
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use tally_core::columnar::{ARROW_CONTENT_TYPE, CONTENT_TYPE_HEADER, Columnar};
use tally_core::metrics as names;
use tally_core::partitions::Partitions;
use tally_core::snapshot::Snapshot;
use tally_core::subject::{self, DEAD_LETTER_PREFIX, NOTIFY_PREFIX};
use tally_core::{
    Decision, DecodeLimits, Durable, Event, Fence, FlushRequest, Frame, Invalid, Reason,
    SealedBatch,
};
use tally_quota::{Engine, Notice, NoticeKind, Usage};
use tally_store::Lake;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::dedup::Dedup;
use crate::entitlements::Entitlements;
use crate::record::Waiters;
use crate::recovery::{self, Committed};
use crate::rows::Rows;
use crate::{Error, IngestConfig, Result, Stats, topology};

/// Dead-letter headers: why, where from, and which event of a batch.
pub const HDR_REASON: &str = "Tally-Reason";
pub const HDR_FIELD: &str = "Tally-Field";
pub const HDR_ERROR: &str = "Tally-Error";
pub const HDR_PARTITION: &str = "Tally-Partition";
pub const HDR_STREAM_SEQ: &str = "Tally-Stream-Seq";
pub const HDR_INDEX: &str = "Tally-Batch-Index";
pub const HDR_SUBJECT: &str = "Tally-Subject";

/// How long a durable batch's ack is retried before its partition starts over: longer
/// than JetStream takes to elect a consumer a new leader after its node is lost.
const ACK_PATIENCE: Duration = Duration::from_secs(30);
/// The longest wait between two attempts.
const ACK_RETRY_MAX: Duration = Duration::from_secs(1);

/// A sealed batch's messages, waiting for the lake's answer.
struct Pending {
    done: oneshot::Receiver<Result<Durable, String>>,
    /// `None`: nothing to acknowledge (a checkpoint after the last batch).
    last: Option<Acker>,
    last_seq: u64,
    /// The partition's state after `last_seq`, written once everything up to it is durable.
    checkpoint: Option<Snapshot>,
    /// When JetStream stored each message, in ms since the epoch, for the latency histogram.
    stored_ms: Vec<i64>,
    /// Notifications the batch's messages caused: stored before the ack.
    published: Vec<PublishAckFuture>,
}

/// The open batch of one partition.
struct Open {
    rows: Rows,
    first_seq: u64,
    last: Option<(Acker, u64)>,
    messages: usize,
    bytes: usize,
    opened: Option<Instant>,
    stored_ms: Vec<i64>,
    dead_letters: Vec<PublishAckFuture>,
    notices: Vec<PublishAckFuture>,
    /// The highest redelivered message skipped because the lake (or a batch on its way
    /// there) holds it: acknowledged after the batch, once everything below it is durable.
    /// Without this, a redelivery skipped after the last batch would never be
    /// acknowledged, and would come again after every `ack_wait`.
    skipped: Option<(Acker, u64)>,
}

impl Open {
    fn new() -> Self {
        Self {
            rows: Rows::default(),
            first_seq: 0,
            last: None,
            messages: 0,
            bytes: 0,
            opened: None,
            stored_ms: Vec::new(),
            dead_letters: Vec::new(),
            notices: Vec::new(),
            skipped: None,
        }
    }

    /// Notes a skipped redelivery; the open batch seals within `flush_age` even if it holds
    /// nothing else.
    fn skip(&mut self, acker: Acker, seq: u64) {
        if self.skipped.as_ref().is_none_or(|(_, s)| *s < seq) {
            self.skipped = Some((acker, seq));
        }
        if self.opened.is_none() {
            self.opened = Some(Instant::now());
        }
    }

    fn full(&self, c: &IngestConfig) -> bool {
        self.rows.len() >= c.flush_rows
            || self.messages >= c.flush_messages
            || self.bytes >= c.flush_bytes
    }
}

/// Runs one partition until cancelled (then drains) or until something fails: first takes
/// it over from the lake ([`recovery`](crate::recovery)), then pulls.
#[allow(clippy::too_many_arguments)]
pub async fn run_partition(
    js: Context,
    config: &IngestConfig,
    partitions: &Partitions,
    partition: u16,
    lake: Arc<Lake>,
    flush_tx: mpsc::Sender<FlushRequest>,
    stats: Arc<Stats>,
    entitlements: Option<Arc<Entitlements>>,
    fence: Arc<Fence>,
    cancel: CancellationToken,
) -> Result<()> {
    let (ack_tx, ack_rx) = mpsc::channel::<Pending>(config.flushes_in_flight);
    let acked = Arc::new(AtomicU64::new(0));
    let ack_failed = CancellationToken::new();
    let acks = tokio::spawn(ack_in_order(
        ack_rx,
        Duration::from_millis(config.fault_ack_delay_ms),
        Checkpoints::new(lake.clone(), fence.clone(), stats.clone()),
        stats.clone(),
        acked.clone(),
        ack_failed.clone(),
    ));
    let sink = Sink {
        flush_tx: &flush_tx,
        fence: &fence,
        ack_tx: &ack_tx,
        sealed: 0,
        acked: &acked,
        after_seq: 0,
    };
    let result = async {
        // A partition a growth made starts from its parent's state, once the parent has
        // handled what was stored before the growth (`None`: stopped while waiting).
        let Some(parent) =
            wait_for_parent(&js, config, partitions, partition, &lake, &cancel).await?
        else {
            return Ok(());
        };
        let inherit = parent.map(|parent| (parent, partitions.clone(), fence.clone()));
        let (recovered, dedup) = take_over(
            &js,
            partitions,
            partition,
            lake,
            entitlements.clone(),
            config,
            &stats,
            inherit,
        )
        .await?;
        let mut sink = sink;
        sink.after_seq = recovered.version;
        let mut part = Partition {
            number: partition,
            partitions,
            dedup,
            replayed_to: recovered.committed.last(),
            committed: recovered.committed,
            entitlements: entitlements.as_deref(),
            handled: 0,
            max_seq: recovered.checkpoint_seq,
            last_checkpoint: Instant::now(),
        };
        pull_loop(&js, config, &mut part, sink, &stats, &cancel, &ack_failed).await
    }
    .await;
    drop(ack_tx);
    let acked = acks
        .await
        .unwrap_or_else(|e| Err(Error::Store(format!("ack task panicked: {e}"))));
    // The ack task's error is the cause when it stopped the pull loop.
    acked.and(result)
}

/// Where sealed batches go, and how many of them were acknowledged.
struct Sink<'a> {
    flush_tx: &'a mpsc::Sender<FlushRequest>,
    /// The partition's write deadline, sent with every batch.
    fence: &'a Arc<Fence>,
    ack_tx: &'a mpsc::Sender<Pending>,
    sealed: u64,
    acked: &'a AtomicU64,
    /// The last sequence of the partition the lake holds or was last handed with rows:
    /// the next sealed batch follows it.
    after_seq: u64,
}

impl Sink<'_> {
    async fn pending(&mut self, pending: Pending) -> Result<()> {
        self.ack_tx
            .send(pending)
            .await
            .map_err(|_| Error::Store("the ack task stopped".to_owned()))?;
        self.sealed += 1;
        Ok(())
    }

    /// Queues an ack, or a checkpoint, that waits for nothing but the batches before it.
    async fn nothing_to_write(
        &mut self,
        last: Option<Acker>,
        last_seq: u64,
        checkpoint: Option<Snapshot>,
    ) -> Result<()> {
        let (done_tx, done) = oneshot::channel();
        let _ = done_tx.send(Ok(Durable::default()));
        self.pending(Pending {
            done,
            last,
            last_seq,
            checkpoint,
            stored_ms: Vec::new(),
            published: Vec::new(),
        })
        .await
    }

    /// Waits until every sealed batch is acknowledged (or the ack task has stopped).
    async fn settle(&self) {
        while self.acked.load(Relaxed) < self.sealed && !self.ack_tx.is_closed() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A partition's state in the pull loop.
struct Partition<'e> {
    number: u16,
    /// The partition counts of this generation.
    partitions: &'e Partitions,
    dedup: Dedup,
    /// What the lake already holds: skipped when delivered again.
    committed: Committed,
    /// The last sequence of the lake's rows replayed at take-over. Until delivery passes
    /// it, no checkpoint is taken: the engine holds rows past sequences not yet handled
    /// (a batch lost in a crash while a later one landed), which no `last_seq` can say.
    replayed_to: u64,
    entitlements: Option<&'e Entitlements>,
    /// Messages handled since the last checkpoint.
    handled: u64,
    /// The highest sequence handled or skipped. It starts at the checkpoint's, not at the
    /// end of the lake's tail: a sealed batch that was lost in a crash while a later one
    /// landed leaves a gap that must still be handled.
    max_seq: u64,
    last_checkpoint: Instant,
}

impl Partition<'_> {
    /// Whether the message stored at `seq` under `subject` is this partition's: always on
    /// a stream that never grew (its consumer's filter says so); after a growth, by the
    /// count in force at `seq` (a partition past a growth still reads its children's
    /// messages until its consumer moves to the narrower filter).
    fn owns(&self, subject: &str, seq: u64) -> bool {
        self.partitions.last_switch() == 0
            || self.partitions.owner(subject, seq) == Some(self.number)
    }

    /// The partition's counters and seen ids as they stand, which is after `max_seq`.
    fn checkpoint(&mut self) -> Snapshot {
        self.handled = 0;
        self.last_checkpoint = Instant::now();
        Snapshot {
            partition: self.number,
            last_seq: self.max_seq,
            accounts: self
                .entitlements
                .and_then(|e| e.engine(self.number))
                .map(|e| e.snapshot())
                .unwrap_or_default(),
            seen: self.dedup.export(),
        }
    }

    /// A checkpoint when one is due: something was handled since the last, and it is
    /// `interval` old or a definition changed (so that replaying the rows stored after a
    /// checkpoint always uses the definitions they were decided with).
    fn checkpoint_if(&mut self, interval: Duration, definitions_changed: bool) -> Option<Snapshot> {
        let due = definitions_changed || self.last_checkpoint.elapsed() >= interval;
        (self.handled > 0 && due && self.max_seq >= self.replayed_to).then(|| self.checkpoint())
    }
}

/// How often a new partition looks whether its parent is done with the messages from
/// before the growth.
const PARENT_POLL: Duration = Duration::from_millis(250);

/// For a partition a growth made that has no checkpoint of its own: waits until its
/// parent has handled every message stored before the growth, and answers the parent
/// (`Some(Some(parent))`). `Some(None)`: nothing to inherit. `None`: `cancel` fired first.
async fn wait_for_parent(
    js: &Context,
    config: &IngestConfig,
    partitions: &Partitions,
    partition: u16,
    lake: &Arc<Lake>,
    cancel: &CancellationToken,
) -> Result<Option<Option<u16>>> {
    let Some(parent) = partitions.parent(partition) else {
        return Ok(Some(None));
    };
    if has_checkpoint(lake, partition).await? {
        return Ok(Some(None));
    }
    let mut told = false;
    loop {
        if topology::passed(js, config, partitions, parent).await?
            && parent_settled(partitions, parent.partition, lake).await?
        {
            return Ok(Some(Some(parent.partition)));
        }
        if !told {
            told = true;
            tracing::info!(
                partition,
                parent = parent.partition,
                until = parent.until,
                "waiting for the parent partition to handle what was stored before the growth"
            );
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(None),
            () = tokio::time::sleep(PARENT_POLL) => {}
        }
    }
}

/// Whether a parent's state is all in the lake: always for a partition of the first
/// count; for one a growth made, once it has a checkpoint of its own (written when it
/// inherited from its own parent).
async fn parent_settled(partitions: &Partitions, parent: u16, lake: &Arc<Lake>) -> Result<bool> {
    if partitions.parent(parent).is_none() {
        return Ok(true);
    }
    has_checkpoint(lake, parent).await
}

/// Whether the lake holds a checkpoint of `partition`.
async fn has_checkpoint(lake: &Arc<Lake>, partition: u16) -> Result<bool> {
    let lake = lake.clone();
    Ok(
        tokio::task::spawn_blocking(move || lake.latest_checkpoint(partition))
            .await
            .map_err(|e| Error::Store(format!("reading a checkpoint panicked: {e}")))?
            .map_err(|e| Error::Store(e.to_string()))?
            .is_some(),
    )
}

/// Rebuilds the partition's counters and seen ids from the lake (first from its parent's,
/// when `inherit` names one); publishes again the notices of replayed rows that no ack
/// covered.
#[allow(clippy::too_many_arguments)]
async fn take_over(
    js: &Context,
    partitions: &Partitions,
    partition: u16,
    lake: Arc<Lake>,
    entitlements: Option<Arc<Entitlements>>,
    config: &IngestConfig,
    stats: &Stats,
    inherit: Option<(u16, Partitions, Arc<Fence>)>,
) -> Result<(recovery::Recovered, Dedup)> {
    // Messages above the ack floor may not have had their notices stored.
    let ack_floor = topology::ack_floor(js, config, partitions, partition).await?;
    let started = Instant::now();
    let capacity = config.dedup_capacity;
    let (recovered, dedup) = tokio::task::spawn_blocking(move || {
        let mut dedup = Dedup::new(capacity);
        let inherit = inherit
            .as_ref()
            .map(|(parent, partitions, fence)| recovery::Inherit {
                parent: *parent,
                partitions,
                fence,
            });
        recovery::recover(
            &lake,
            partition,
            ack_floor,
            &mut dedup,
            entitlements.as_deref(),
            inherit,
        )
        .map(|r| (r, dedup))
    })
    .await
    .map_err(|e| Error::Store(format!("recovery panicked: {e}")))??;
    // Within the partition's share of the context's publishes in flight: every partition
    // may be taken over at once, each with hundreds of notices, and a publish waits for a
    // slot that only an awaited ack gives back.
    let share = held_publishes(config);
    let mut held = Vec::new();
    for notice in &recovered.notices {
        hold(&mut held, share, "notification ack", notify(js, notice)).await?;
    }
    await_acks(&mut held, "notification ack").await?;
    stats.replayed.fetch_add(recovered.replayed, Relaxed);
    stats
        .counters_restored
        .fetch_add(recovered.counters, Relaxed);
    stats.takeovers.fetch_add(1, Relaxed);
    metrics::counter!(names::TAKEOVERS).increment(1);
    tracing::info!(
        partition,
        checkpoint = recovered.checkpoint_seq,
        counters = recovered.counters,
        replayed = recovered.replayed,
        notices_again = recovered.notices.len(),
        ms = started.elapsed().as_millis() as u64,
        "partition taken over"
    );
    Ok((recovered, dedup))
}

/// Resolves when the partition's definitions change; never without entitlements.
async fn definitions_changed(changes: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    if let Some(rx) = changes
        && rx.changed().await.is_ok()
    {
        return;
    }
    *changes = None;
    std::future::pending().await
}

async fn pull_loop(
    js: &Context,
    config: &IngestConfig,
    part: &mut Partition<'_>,
    mut sink: Sink<'_>,
    stats: &Stats,
    cancel: &CancellationToken,
    ack_failed: &CancellationToken,
) -> Result<()> {
    let partition = part.number;
    let partitions = part.partitions;
    let mut deliveries = topology::messages(js, config, partitions, partition).await?;
    let mut open = Open::new();
    let mut changes = part.entitlements.and_then(|e| e.changes(partition));
    let interval = Duration::from_secs(config.checkpoint_secs);
    let flush_age = Duration::from_millis(config.flush_age_ms);
    // The open batch is sealed when its first message is `flush_age` old, to the tick. One
    // timer, re-armed once per batch rather than once per message.
    let timer = tokio::time::sleep(flush_age);
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    // At a marker of a growth this generation does not know, the partition stops pulling
    // until the worker starts again on the new count: what follows the marker may be
    // another partition's.
    let mut parked = false;
    loop {
        // Past a growth, a narrower filter delivers only the partition's own messages:
        // once a message at or after the switch was delivered and handled, the ack floor
        // reaches the switch when it is acknowledged, and the consumer starts again there.
        if deliveries
            .serves_until
            .is_some_and(|until| deliveries.handled_to >= until)
        {
            deliveries = restart(
                js,
                config,
                partitions,
                partition,
                &mut open,
                &mut sink,
                Duration::ZERO,
            )
            .await?;
        }
        if armed != open.opened {
            armed = open.opened;
            if let Some(t) = armed {
                timer
                    .as_mut()
                    .reset(tokio::time::Instant::from_std(t + flush_age));
            }
        }
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            () = ack_failed.cancelled() => {
                return Err(Error::Store("the partition's acks stopped".to_owned()));
            }
            () = definitions_changed(&mut changes) => {
                let checkpoint = part.checkpoint_if(interval, true);
                seal(&mut open, partition, &mut sink, checkpoint).await?;
            }
            () = &mut timer, if armed.is_some() => {
                let checkpoint = part.checkpoint_if(interval, false);
                seal(&mut open, partition, &mut sink, checkpoint).await?;
            }
            next = deliveries.messages.next(), if !parked => match next {
                Some(Ok(msg)) => {
                    let info = msg.info().map_err(|e| Error::nats("read message info", e))?;
                    let (seq, stored_us) = (info.stream_sequence, info.published.timestamp_micros());
                    let delivery = info.consumer_sequence;
                    let stored_ms = stored_us.div_euclid(1000);
                    if delivery != deliveries.next {
                        stats.delivery_gaps.fetch_add(1, Relaxed);
                        metrics::counter!(names::DELIVERY_GAPS).increment(1);
                        tracing::warn!(partition, expected = deliveries.next, delivery, seq,
                            "deliveries lost on the way; starting again at the ack floor");
                        deliveries = restart(js, config, partitions, partition, &mut open, &mut sink, Duration::ZERO).await?;
                        continue;
                    }
                    deliveries.next += 1;
                    let marker = msg.headers.as_ref().is_some_and(|h| h.get(subject::MARKER_HEADER).is_some());
                    // A marker (`topology::grow`) of a growth this generation does not know:
                    // everything before it is made durable, and it stays unacknowledged, so
                    // that a restart on the old count stops here again.
                    if marker && seq > partitions.last_switch() {
                        tracing::info!(partition, seq,
                            "the partition count is growing: waiting for the new count");
                        let checkpoint = part.checkpoint_if(interval, true);
                        seal(&mut open, partition, &mut sink, checkpoint).await?;
                        parked = true;
                        continue;
                    }
                    deliveries.handled_to = seq;
                    // Handled by this process, or already in the lake.
                    if seq <= part.max_seq || part.committed.holds(seq) {
                        part.max_seq = part.max_seq.max(seq);
                        stats.redeliveries_skipped.fetch_add(1, Relaxed);
                        open.skip(msg.split().1, seq);
                        continue;
                    }
                    part.max_seq = seq;
                    // A known growth's marker, or another partition's message since a growth
                    // (the consumer still on a wider filter): acknowledged with the
                    // neighbours.
                    if marker || !part.owns(msg.subject.as_str(), seq) {
                        open.skip(msg.split().1, seq);
                        continue;
                    }
                    let (message, acker) = msg.split();
                    if let Some(e) = part.entitlements {
                        // Changes acknowledged before this message was stored apply to it.
                        e.sync_for(stored_us).await?;
                    }
                    let at = At { partition, seq };
                    handle(js, config, at, &message, &mut open, &mut part.dedup, stats, part.entitlements).await?;
                    part.handled += 1;
                    if open.last.is_none() {
                        open.first_seq = seq;
                        open.opened = Some(Instant::now());
                    }
                    open.last = Some((acker, seq));
                    open.messages += 1;
                    open.bytes += message.payload.len();
                    open.stored_ms.push(stored_ms);
                    if open.full(config) {
                        let checkpoint = part.checkpoint_if(interval, false);
                        seal(&mut open, partition, &mut sink, checkpoint).await?;
                    }
                }
                // Two heartbeats missed: the pull went unanswered (see `pull_again`).
                Some(Err(e)) if e.kind() == MessagesErrorKind::MissingHeartbeat => {
                    tracing::warn!(partition, error = %e, "the consumer went silent; pulling again once it answers");
                    match topology::pull_again(js, config, partition, cancel).await? {
                        Some(messages) => deliveries.messages = messages,
                        None => break,
                    }
                }
                // The pull stream recovers from the others itself; a terminal one ends it.
                Some(Err(e)) => tracing::warn!(partition, error = %e, "pull stream error"),
                None => {
                    tracing::warn!(partition, "pull stream ended; resubscribing at the ack floor");
                    let pause = Duration::from_millis(250);
                    deliveries = restart(js, config, partitions, partition, &mut open, &mut sink, pause).await?;
                }
            }
        }
    }
    // A clean stop leaves a checkpoint of everything, so the next start replays nothing.
    let checkpoint = part.checkpoint_if(Duration::ZERO, true);
    seal(&mut open, partition, &mut sink, checkpoint).await
}

/// Seals what the partition holds, waits until it is acknowledged, and pulls again from
/// the ack floor after `pause`: acks go through the consumer that delivered the messages,
/// which starting again may re-create.
async fn restart(
    js: &Context,
    config: &IngestConfig,
    partitions: &Partitions,
    partition: u16,
    open: &mut Open,
    sink: &mut Sink<'_>,
    pause: Duration,
) -> Result<topology::Deliveries> {
    seal(open, partition, sink, None).await?;
    sink.settle().await;
    tokio::time::sleep(pause).await;
    topology::messages(js, config, partitions, partition).await
}

/// Decodes one message (CloudEvents JSON, or Arrow IPC when its `Content-Type` says so)
/// into rows and dead letters.
#[allow(clippy::too_many_arguments)]
async fn handle(
    js: &Context,
    config: &IngestConfig,
    at: At,
    message: &async_nats::Message,
    open: &mut Open,
    dedup: &mut Dedup,
    stats: &Stats,
    entitlements: Option<&Entitlements>,
) -> Result<()> {
    let At { partition, seq } = at;
    stats.messages.fetch_add(1, Relaxed);
    metrics::counter!(names::MESSAGES).increment(1);
    let payload = &message.payload;
    let limits = &config.limits;
    let mut notices = Vec::new();
    let refused = {
        // Held only while this message's events are decided, never across an await.
        let mut engine = entitlements.and_then(|e| e.engine(partition));
        let mut accept = Accept {
            token: subject::parse_partitioned(message.subject.as_str()).map(|s| s.token),
            limits,
            ingest_micros: chrono::Utc::now().timestamp_micros(),
            seq,
            partition,
            valid: 0,
            duplicates: 0,
            decided: [0; Decision::ALL.len()],
            engine: engine.as_deref_mut(),
            meter_unknown: config.meter_unknown_customers,
            notices: &mut notices,
            waiters: entitlements.map(|e| &e.waiters),
        };
        let refused = decode_and_accept(payload, message, limits, &mut accept, open, dedup);
        // Shared counters are touched once per message, not once per event.
        stats.events_valid.fetch_add(accept.valid, Relaxed);
        stats.duplicates.fetch_add(accept.duplicates, Relaxed);
        for ((total, n), decision) in stats.decided.iter().zip(accept.decided).zip(Decision::ALL) {
            if n > 0 {
                total.fetch_add(n, Relaxed);
                metrics::counter!(names::EVENTS, "decision" => decision.as_str()).increment(n);
            }
        }
        if accept.duplicates > 0 {
            metrics::counter!(names::DUPLICATES).increment(accept.duplicates);
        }
        refused
    };
    let share = held_publishes(config);
    for (index, original, invalid) in refused {
        let dl = dead_letter(js, partition, seq, index, message, original, &invalid);
        hold(&mut open.dead_letters, share, "dead letter ack", dl).await?;
        stats.dead_letters.fetch_add(1, Relaxed);
        metrics::counter!(names::DEAD_LETTERS, "reason" => invalid.reason.as_str()).increment(1);
    }
    for notice in &notices {
        hold(
            &mut open.notices,
            share,
            "notification ack",
            notify(js, notice),
        )
        .await?;
        stats.notices.fetch_add(1, Relaxed);
        metrics::counter!(names::NOTIFICATIONS, "kind" => notice.kind.as_str()).increment(1);
    }
    Ok(())
}

/// How many notices, and as many dead letters, a partition holds unacknowledged between
/// messages (0: each is awaited as soon as it is published).
///
/// A publish takes a slot of the worker's context (`publishes_in_flight` of them) that
/// only awaiting its ack gives back. Held until the batch is sealed, a burst of notices
/// could take every slot and then wait for one that only the seal would free. A partition
/// awaits what it holds before it would hold more than this share, and the shares of all
/// partitions add up to no more than the slots, so a publish always finds one.
fn held_publishes(config: &IngestConfig) -> usize {
    config.publishes_in_flight / (2 * usize::from(config.partitions.max(1)))
}

/// Runs `publish` and holds its ack in `held`, awaiting the acks held so far first when
/// `held` is at its `share` ([`held_publishes`]), and at once when the share is 0.
async fn hold(
    held: &mut Vec<PublishAckFuture>,
    share: usize,
    what: &'static str,
    publish: impl Future<Output = Result<PublishAckFuture>>,
) -> Result<()> {
    if held.len() >= share.max(1) {
        await_acks(held, what).await?;
    }
    held.push(publish.await?);
    if held.len() > share {
        await_acks(held, what).await?;
    }
    Ok(())
}

/// Awaits the acks of publishes held so far.
async fn await_acks(held: &mut Vec<PublishAckFuture>, what: &'static str) -> Result<()> {
    for published in held.drain(..) {
        published.await.map_err(|e| Error::nats(what, e))?;
    }
    Ok(())
}

/// Where a message was stored.
#[derive(Clone, Copy)]
struct At {
    partition: u16,
    seq: u64,
}

/// An event refused whole: its index in a batch, its original bytes, its flaw.
type Refused = (Option<usize>, Bytes, Invalid);

/// Decodes one message and passes each event through `accept`; returns those refused.
fn decode_and_accept(
    payload: &Bytes,
    message: &async_nats::Message,
    limits: &DecodeLimits,
    accept: &mut Accept<'_, '_>,
    open: &mut Open,
    dedup: &mut Dedup,
) -> Vec<Refused> {
    let is_arrow = header(message, CONTENT_TYPE_HEADER) == Some(ARROW_CONTENT_TYPE);
    let mut refused: Vec<Refused> = Vec::new();
    if is_arrow {
        match Columnar::decode(payload, limits) {
            Err(invalid) => refused.push((None, payload.clone(), invalid)),
            Ok(columnar) => {
                for (i, outcome) in columnar.events(limits).enumerate() {
                    if let Some(invalid) = accept.event(outcome, open, dedup) {
                        refused.push((Some(i), Bytes::from(columnar.row_json(i)), invalid));
                    }
                }
            }
        }
    } else {
        match Frame::decode(payload, limits) {
            Err(invalid) => refused.push((None, payload.clone(), invalid)),
            Ok(frame) => {
                let is_batch = frame.is_batch;
                let mut raw: Option<Vec<&[u8]>> = None;
                for (i, outcome) in frame.events.into_iter().enumerate() {
                    if let Some(invalid) = accept.event(outcome, open, dedup) {
                        let original = if is_batch {
                            let raw = raw.get_or_insert_with(|| Frame::raw_events(payload));
                            raw.get(i)
                                .map_or_else(|| payload.clone(), |r| payload.slice_ref(r))
                        } else {
                            payload.clone()
                        };
                        refused.push((is_batch.then_some(i), original, invalid));
                    }
                }
            }
        }
    }
    refused
}

/// A header's first value. A message has a header or two: a scan beats building a
/// `HeaderName` and hashing it, which `HeaderMap::get` does for every call.
fn header<'m>(message: &'m async_nats::Message, name: &str) -> Option<&'m str> {
    let (_, values) = message
        .headers
        .as_ref()?
        .iter()
        .find(|(k, _)| AsRef::<str>::as_ref(k).eq_ignore_ascii_case(name))?;
    values.first().map(|v| v.as_str())
}

/// What every event of one message shares on its way into the open batch.
struct Accept<'m, 'e> {
    /// The customer token of the message's subject.
    token: Option<&'m str>,
    limits: &'m DecodeLimits,
    ingest_micros: i64,
    seq: u64,
    partition: u16,
    valid: u64,
    duplicates: u64,
    decided: [u64; Decision::ALL.len()],
    /// `None`: enforcement is off and every valid event is accepted.
    engine: Option<&'e mut Engine>,
    /// An unknown customer's events are `metered` rather than `unknown_customer`.
    meter_unknown: bool,
    notices: &'e mut Vec<Notice>,
    /// Record requests waiting for a decision.
    waiters: Option<&'e Waiters>,
}

impl Accept<'_, '_> {
    /// Checks the customer, drops a repeated id, decides and appends; returns the flaw of
    /// an event that must be dead-lettered.
    fn event(
        &mut self,
        outcome: Result<Event<'_>, Invalid>,
        open: &mut Open,
        dedup: &mut Dedup,
    ) -> Option<Invalid> {
        let event = match outcome {
            Ok(event) => event,
            Err(invalid) => return Some(invalid),
        };
        if let Some(t) = self.token
            && !subject::token_matches(t, &event.subject)
        {
            return Some(Invalid {
                reason: Reason::SubjectMismatch,
                field: Some("subject".into()),
                message: format!(
                    "`subject` {:?} is not the customer this message was published for (token {t:?})",
                    event.subject
                ),
            });
        }
        if let Err(invalid) = self.limits.check_time(event.time, self.ingest_micros) {
            return Some(invalid);
        }
        let time = event
            .time
            .map_or(self.ingest_micros, |t| t.timestamp_micros());
        // Features bound to meters of the event's type read it before it is taken: a value
        // one of them cannot read refuses the event (a corrected resend is then new).
        let bound = self
            .engine
            .as_deref()
            .and_then(|e| e.bindings(&event.event_type));
        let readings = match bound
            .as_deref()
            .map(|b| tally_quota::readings(b, &event, time))
        {
            Some(Err(invalid)) => return Some(invalid),
            Some(Ok(readings)) => readings,
            None => Vec::new(),
        };
        if dedup.first_time(&event.id) {
            let decision = match self.engine.as_deref_mut() {
                Some(engine) => {
                    let usage = Usage {
                        customer: &event.subject,
                        feature: &event.feature,
                        quantity: event.quantity,
                        time,
                        region: event.region.as_deref(),
                        user: event.user.as_deref(),
                    };
                    let (decision, plan) = if readings.is_empty() {
                        engine.decide_under_plan(&usage, self.notices)
                    } else {
                        engine.decide_readings(&usage, &readings, self.notices)
                    };
                    let decision = match decision {
                        Decision::UnknownCustomer if self.meter_unknown => Decision::Metered,
                        d => d,
                    };
                    open.rows.push(
                        &event,
                        decision,
                        plan,
                        self.ingest_micros,
                        self.seq,
                        self.partition,
                    );
                    decision
                }
                None => {
                    open.rows.push(
                        &event,
                        Decision::Accepted,
                        None,
                        self.ingest_micros,
                        self.seq,
                        self.partition,
                    );
                    Decision::Accepted
                }
            };
            self.decided[decision as usize] += 1;
            self.valid += 1;
            if let Some(w) = self.waiters {
                w.decided(&event.id, Some(decision));
            }
        } else {
            self.duplicates += 1;
            if let Some(w) = self.waiters {
                w.decided(&event.id, None);
            }
        }
        None
    }
}

/// Publishes a dead letter: the original bytes as the body, the reason in headers. Its
/// message id makes a re-publish after a redelivery a no-op.
async fn dead_letter(
    js: &Context,
    partition: u16,
    seq: u64,
    index: Option<usize>,
    message: &async_nats::Message,
    original: Bytes,
    invalid: &Invalid,
) -> Result<PublishAckFuture> {
    let mut headers = HeaderMap::new();
    headers.insert(HDR_REASON, invalid.reason.as_str());
    if let Some(field) = invalid.field.as_deref() {
        headers.insert(HDR_FIELD, field);
    }
    headers.insert(
        HDR_ERROR,
        invalid.message.replace(['\r', '\n'], " ").as_str(),
    );
    headers.insert(HDR_PARTITION, partition.to_string().as_str());
    headers.insert(HDR_STREAM_SEQ, seq.to_string().as_str());
    headers.insert(HDR_SUBJECT, message.subject.as_str());
    if let Some(i) = index {
        headers.insert(HDR_INDEX, i.to_string().as_str());
    }
    let id = format!("dl-{seq}-{}", index.map_or(-1, |i| i as i64));
    headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
    js.publish_with_headers(
        format!("{DEAD_LETTER_PREFIX}.{}", invalid.reason),
        headers,
        original,
    )
    .await
    .map_err(|e| Error::nats("publish dead letter", e))
}

/// Publishes a notification to `tally.notify.<kind>.<customer-token>`. Its message id
/// names the customer, feature, kind and period, so a redelivered message that crosses
/// the same threshold again sends nothing new.
async fn notify(js: &Context, notice: &Notice) -> Result<PublishAckFuture> {
    let time = |us: i64| chrono::DateTime::from_timestamp_micros(us).map(|t| t.to_rfc3339());
    let (threshold, grant) = match &notice.kind {
        NoticeKind::Threshold(t) => (Some(*t), None),
        NoticeKind::GrantExhausted(g) => (None, Some(g.as_str())),
        NoticeKind::LimitReached => (None, None),
    };
    let body = serde_json::json!({
        "kind": notice.kind.as_str(),
        "customer": notice.customer,
        "feature": notice.feature,
        "plan": notice.plan,
        "usage": notice.usage,
        "limit": notice.limit,
        "percent": notice.percent,
        "threshold": threshold,
        "grant": grant,
        "period_start": time(notice.period_start),
        "period_end": time(notice.period_end),
        "next_plan": notice.next_plan,
    });
    let identity = format!(
        "{}\u{0}{}\u{0}{}\u{0}{:?}\u{0}{:?}\u{0}{}",
        notice.customer,
        notice.feature,
        notice.kind.as_str(),
        threshold,
        grant,
        notice.period_start
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!(
            "notice-{:032x}",
            xxhash_rust::xxh3::xxh3_128(identity.as_bytes())
        )
        .as_str(),
    );
    let subject = format!(
        "{NOTIFY_PREFIX}.{}.{}",
        notice.kind.as_str(),
        subject::customer_token(&notice.customer)
    );
    js.publish_with_headers(subject, headers, body.to_string().into())
        .await
        .map_err(|e| Error::nats("publish notification", e))
}

/// Seals the open batch, if it holds any message, and queues it for the lake, with the
/// checkpoint to write once it is durable; then the ack of a skipped redelivery past it.
async fn seal(
    open: &mut Open,
    partition: u16,
    sink: &mut Sink<'_>,
    checkpoint: Option<Snapshot>,
) -> Result<()> {
    let skipped = open.skipped.take();
    let opened = open.opened.take();
    let sealed_to = match open.last.take() {
        Some((last, last_seq)) => {
            let open_ms = opened.map_or(0, |t| t.elapsed().as_millis() as u64);
            seal_rows(open, partition, sink, checkpoint, last, last_seq, open_ms).await?;
            Some(last_seq)
        }
        // Nothing to write: the checkpoint waits only for the batches before it.
        None => {
            if let Some(checkpoint) = checkpoint {
                let last_seq = checkpoint.last_seq;
                sink.nothing_to_write(None, last_seq, Some(checkpoint))
                    .await?;
            }
            None
        }
    };
    if let Some((acker, seq)) = skipped
        && sealed_to.is_none_or(|to| seq > to)
    {
        sink.nothing_to_write(Some(acker), seq, None).await?;
    }
    Ok(())
}

/// Hands the open batch's rows to the lake and its ack to the ack task.
async fn seal_rows(
    open: &mut Open,
    partition: u16,
    sink: &mut Sink<'_>,
    checkpoint: Option<Snapshot>,
    last: Acker,
    last_seq: u64,
    open_ms: u64,
) -> Result<()> {
    // A dead letter is stored before the batch holding its neighbours is handed to the
    // lake: once the lake holds a batch, its messages are never handled again.
    for dead_letter in open.dead_letters.drain(..) {
        dead_letter
            .await
            .map_err(|e| Error::nats("dead letter ack", e))?;
    }
    let sealed = SealedBatch {
        partition,
        first_seq: open.first_seq,
        last_seq,
        after_seq: Some(sink.after_seq),
        batch: open.rows.finish(),
    };
    if sealed.batch.num_rows() > 0 {
        sink.after_seq = last_seq;
    }
    // How long the batch's first message had been stored, and the batch open, when sealed.
    let stored_ms = open.stored_ms.first().map_or(0, |&stored| {
        chrono::Utc::now().timestamp_millis().saturating_sub(stored)
    });
    tracing::debug!(
        partition,
        first_seq = sealed.first_seq,
        last_seq,
        rows = sealed.batch.num_rows(),
        messages = open.messages,
        stored_ms,
        open_ms,
        "batch sealed"
    );
    let (done_tx, done) = oneshot::channel();
    sink.flush_tx
        .send(FlushRequest {
            sealed,
            fence: sink.fence.clone(),
            done: done_tx,
        })
        .await
        .map_err(|_| Error::Store("the lake writer stopped".to_owned()))?;
    sink.pending(Pending {
        done,
        last: Some(last),
        last_seq,
        checkpoint,
        stored_ms: std::mem::take(&mut open.stored_ms),
        published: std::mem::take(&mut open.notices),
    })
    .await?;
    open.messages = 0;
    open.bytes = 0;
    Ok(())
}

/// Acknowledges sealed batches in the order they were sealed, each only once the lake
/// says it is durable. With ack-all, acking out of order would acknowledge an earlier
/// batch that is not yet on disk.
async fn ack_in_order(
    mut rx: mpsc::Receiver<Pending>,
    ack_delay: Duration,
    checkpoints: Checkpoints,
    stats: Arc<Stats>,
    acked: Arc<AtomicU64>,
    failed: CancellationToken,
) -> Result<()> {
    let mut acks = Acks {
        latency: Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid bounds"),
        checkpoints,
        ack_delay,
        stats,
    };
    let mut outcome = Ok(());
    while let Some(p) = rx.recv().await {
        if outcome.is_err() {
            // Acknowledge nothing more, but let every batch handed to the lake land before
            // the partition is taken over again from what the lake holds.
            let _ = p.done.await;
        } else if let Err(e) = acks.one(p).await {
            failed.cancel();
            outcome = Err(e);
        }
        acked.fetch_add(1, Relaxed);
    }
    acks.checkpoints.finish().await;
    outcome
}

/// What the ack task keeps between batches.
struct Acks {
    latency: Histogram<u64>,
    checkpoints: Checkpoints,
    ack_delay: Duration,
    stats: Arc<Stats>,
}

impl Acks {
    async fn one(&mut self, p: Pending) -> Result<()> {
        // A notification must be stored before the ack that covers its message: a crash in
        // between redelivers the message, which sends it again (its message id makes that
        // a no-op). Waiting here keeps the pull loop going.
        for published in p.published {
            published
                .await
                .map_err(|e| Error::nats("notification ack", e))?;
        }
        let durable = p
            .done
            .await
            .map_err(|_| Error::Store("the lake writer dropped a batch".to_owned()))?
            .map_err(Error::Store)?;
        // Everything up to the checkpoint is durable now.
        if let Some(checkpoint) = p.checkpoint {
            self.checkpoints.write(checkpoint);
        }
        let Some(last) = p.last else {
            return Ok(());
        };
        if !self.ack_delay.is_zero() {
            tokio::time::sleep(self.ack_delay).await;
        }
        // A consumer whose NATS node was lost answers no ack until JetStream has elected
        // it another leader (nats-server waits 4 to 9 s before it campaigns): the batch is
        // durable, so the ack waits for that rather than the partition starting over.
        let acking = Instant::now();
        let mut attempt = 0;
        while let Err(e) = last.double_ack().await {
            attempt += 1;
            if acking.elapsed() >= ACK_PATIENCE {
                return Err(Error::nats("acknowledge batch", e));
            }
            tracing::warn!(last_seq = p.last_seq, error = %e, "ack failed; retrying");
            tokio::time::sleep(Duration::from_millis(100 * attempt).min(ACK_RETRY_MAX)).await;
        }
        let now = chrono::Utc::now().timestamp_millis();
        let to_durable = metrics::histogram!(names::STORED_TO_DURABLE_SECONDS);
        for stored in &p.stored_ms {
            let ms = u64::try_from((now - stored).max(1)).unwrap_or(1);
            self.latency.saturating_record(ms);
            to_durable.record(ms as f64 / 1000.0);
        }
        let stats = &self.stats;
        stats.rows_durable.fetch_add(durable.rows as u64, Relaxed);
        stats.files_written.fetch_add(durable.files as u64, Relaxed);
        stats.batches_acked.fetch_add(1, Relaxed);
        metrics::counter!(names::ROWS_DURABLE).increment(durable.rows as u64);
        metrics::counter!(names::BATCHES_ACKED).increment(1);
        tracing::debug!(
            last_seq = p.last_seq,
            rows = durable.rows,
            files = durable.files,
            messages = p.stored_ms.len(),
            "batch durable and acknowledged"
        );
        if let Ok(mut h) = stats.stored_to_durable_ms.lock() {
            let _ = h.add(&self.latency);
        }
        self.latency.reset();
        Ok(())
    }
}

/// Writes checkpoints off the ack path, one at a time per partition; while one is being
/// written, only the newest one waiting is kept (it holds everything the others did).
struct Checkpoints {
    lake: Arc<Lake>,
    fence: Arc<Fence>,
    stats: Arc<Stats>,
    writing: Option<tokio::task::JoinHandle<()>>,
    waiting: Option<Snapshot>,
}

impl Checkpoints {
    fn new(lake: Arc<Lake>, fence: Arc<Fence>, stats: Arc<Stats>) -> Self {
        Self {
            lake,
            fence,
            stats,
            writing: None,
            waiting: None,
        }
    }

    fn write(&mut self, checkpoint: Snapshot) {
        self.waiting = Some(checkpoint);
        if self.writing.as_ref().is_none_or(|w| w.is_finished()) {
            self.start();
        }
    }

    fn start(&mut self) {
        let Some(checkpoint) = self.waiting.take() else {
            return;
        };
        let (lake, fence, stats) = (self.lake.clone(), self.fence.clone(), self.stats.clone());
        self.writing = Some(tokio::task::spawn_blocking(move || {
            match lake.write_checkpoint(&checkpoint, &fence) {
                Ok(_) => {
                    stats.checkpoints.fetch_add(1, Relaxed);
                }
                // The rows are in the lake: a later checkpoint, or a longer replay, covers it.
                Err(e) => tracing::error!(partition = checkpoint.partition,
                    last_seq = checkpoint.last_seq, error = %e, "cannot write a checkpoint"),
            }
        }));
    }

    /// Waits for the checkpoint being written and writes the one waiting.
    async fn finish(mut self) {
        if let Some(w) = self.writing.take() {
            let _ = w.await;
        }
        self.start();
        if let Some(w) = self.writing.take() {
            let _ = w.await;
        }
    }
}
