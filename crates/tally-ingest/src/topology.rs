//! Creates the JetStream streams and the per-partition consumers, idempotently.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::stream::{
    self, ConsumerErrorKind, DiscardPolicy, RetentionPolicy, StorageType, SubjectTransform,
};
use tally_core::partitions::{self, Partitions};
use tally_core::subject::{
    self, DEAD_LETTER_PREFIX, DEAD_LETTER_STREAM, EVENTS_STREAM, EVENTS_SUBJECT_PREFIX,
    NOTIFY_PREFIX, NOTIFY_STREAM,
};
use tokio_util::sync::CancellationToken;

use crate::{Error, IngestConfig, Result};

/// Makes sure the events stream (partitioned by customer), the dead-letter stream and the
/// notification stream exist, and answers the events stream's partitions.
///
/// `config.partitions` is the count of a stream made now; a stream that exists keeps its
/// own, which only [`grow`] changes.
pub async fn ensure_streams(js: &Context, config: &IngestConfig) -> Result<Partitions> {
    let (src, dest) = subject::partition_transform(&subject::partition_levels(config.partitions));
    let events = ensure_stream(
        js,
        stream::Config {
            name: EVENTS_STREAM.to_owned(),
            subjects: vec![format!("{EVENTS_SUBJECT_PREFIX}.*")],
            subject_transform: Some(SubjectTransform {
                source: src,
                destination: dest.clone(),
            }),
            duplicate_window: Duration::from_secs(config.duplicate_window_secs),
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            max_bytes: config.stream_max_bytes,
            discard: DiscardPolicy::New,
            num_replicas: config.replicas,
            ..Default::default()
        },
        "create events stream",
    )
    .await?;
    let partitions = partitions_of(&events.cached_info().config)?;
    if partitions.current() != config.partitions {
        tracing::info!(
            stream = EVENTS_STREAM,
            partitions = partitions.current(),
            configured = config.partitions,
            "the events stream keeps its partition count (ingest.partitions applies to a new \
             stream; `tally partitions grow` grows one)"
        );
    }
    for (name, prefix, what) in [
        (
            DEAD_LETTER_STREAM,
            DEAD_LETTER_PREFIX,
            "create dead-letter stream",
        ),
        (NOTIFY_STREAM, NOTIFY_PREFIX, "create notification stream"),
    ] {
        let config = stream::Config {
            name: name.to_owned(),
            subjects: vec![format!("{prefix}.>")],
            duplicate_window: OUTPUT_DUPLICATE_WINDOW
                .max(Duration::from_secs(config.duplicate_window_secs)),
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: config.replicas,
            ..Default::default()
        };
        ensure_stream(js, config, what).await?;
    }
    Ok(partitions)
}

/// How long the dead-letter and notification streams drop a repeated message id. A dead
/// letter (`dl-<seq>-<index>`) or a notice (its id derived from what it is about) is
/// published again only when its message is handled again: after a crash, a take-over or
/// a replay, while the message is not yet acknowledged. That can come minutes after the
/// first publication when NATS nodes and workers fail one after another, past the events
/// stream's two minutes: a day covers any outage Tally rides out while its backlog waits.
pub const OUTPUT_DUPLICATE_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// The partitions an events stream's configuration says: the history in its metadata,
/// on the levels of its subject transform.
pub fn partitions_of(config: &stream::Config) -> Result<Partitions> {
    let destination = config
        .subject_transform
        .as_ref()
        .map(|t| t.destination.as_str());
    let levels = destination
        .and_then(subject::transform_levels)
        .ok_or_else(|| {
            Error::Topology(format!(
                "stream {} partitions by {destination:?}, not by customer",
                config.name
            ))
        })?;
    let history = match config.metadata.get(partitions::METADATA_KEY) {
        Some(text) => Partitions::parse(text).map_err(|e| Error::Topology(e.to_string()))?,
        None => Partitions::fixed(levels[0]),
    };
    history.with_levels(levels).map_err(|e| {
        Error::Topology(format!(
            "stream {}: {e} (a stream grown by an older Tally: drain it, then delete it and \
             start again)",
            config.name
        ))
    })
}

/// Whether `parent` has handled every message it holds up to the growth that made its
/// children: none of its messages is left between its ack floor and the switch.
pub async fn passed(
    js: &Context,
    config: &IngestConfig,
    partitions: &Partitions,
    parent: partitions::Parent,
) -> Result<bool> {
    let until = parent.until;
    let floor = ack_floor(js, config, partitions, parent.partition).await?;
    if floor >= until {
        return Ok(true);
    }
    let filter = partitions
        .filter_at(parent.count, parent.partition)
        .ok_or_else(|| unknown(parent.partition, partitions))?;
    Ok(next_after(js, &filter, floor)
        .await?
        .is_none_or(|next| next > until))
}

/// A partition the stream's partitions do not have.
fn unknown(partition: u16, partitions: &Partitions) -> Error {
    Error::Topology(format!("no partition {partition} in {partitions}"))
}

/// Whether the partition's consumer has acknowledged every message of its subject stored
/// so far; `false` while the consumer does not exist. The stream's leader says which
/// message follows the ack floor: a consumer's own count of pending messages comes from
/// its leader's copy of the stream, which just after a NATS node's restart can be behind.
pub async fn caught_up(js: &Context, partition: u16) -> Result<bool> {
    let stream = js
        .get_stream_no_info(EVENTS_STREAM)
        .await
        .map_err(|e| Error::nats("read the events stream", e))?;
    let consumer: std::result::Result<PullConsumer, _> = stream
        .get_consumer(&subject::partition_consumer(partition))
        .await;
    let Ok(mut consumer) = consumer else {
        return Ok(false);
    };
    let info = consumer
        .info()
        .await
        .map_err(|e| Error::nats("read partition consumer", e))?;
    if info.num_ack_pending > 0 || info.num_pending > 0 {
        return Ok(false);
    }
    let filter = info.config.filter_subject.clone();
    Ok(next_after(js, &filter, floor_of(info)).await?.is_none())
}

/// The sequence of the first message under `filter` after `floor`, as the stream's leader
/// has it.
async fn next_after(js: &Context, filter: &str, floor: u64) -> Result<Option<u64>> {
    let stream = js
        .get_stream_no_info(EVENTS_STREAM)
        .await
        .map_err(|e| Error::nats("read the events stream", e))?;
    let next = stream
        .raw_message_builder()
        .sequence(floor + 1)
        .next_by_subject(filter.to_owned())
        .send()
        .await;
    match next {
        Ok(message) => Ok(Some(message.sequence)),
        Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(Error::nats("read a partition's next message", e)),
    }
}

/// The events stream's partitions now.
pub async fn partitions(js: &Context) -> Result<Partitions> {
    let mut stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|e| Error::nats("read the events stream", e))?;
    let info = stream
        .info()
        .await
        .map_err(|e| Error::nats("read the events stream", e))?;
    partitions_of(&info.config)
}

/// Grows the events stream to `count` partitions (a larger level of its subjects);
/// answers the history.
///
/// The stored subjects name every message's partition at every count the stream can
/// have, so a growth changes no subject: it picks the sequence from which on the new
/// count decides which partition holds a message. First a marker message
/// ([`subject::MARKER_HEADER`]) to every partition: a partition stops at its marker and
/// waits for the new history, since it cannot tell what the messages after it belong to.
/// The last marker's sequence is the switch: the history says it (`16@4711,64`) in one
/// update. Workers restart their partitions on the new count when they see it
/// (`supervise.rs`); each partition holds its messages up to the switch by the old count
/// and after it by the new; each new partition starts after the switch from its parent's
/// state, once the parent has handled every message up to the switch (`recovery.rs`).
/// Nothing is lost or counted twice: a message's partition follows from its subject and
/// sequence, which every replica stores alike. Run one growth at a time.
pub async fn grow(js: &Context, count: u16) -> Result<Partitions> {
    let topology = |e: partitions::BadPartitions| Error::Topology(e.to_string());
    let mut stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|e| Error::nats("read the events stream", e))?;
    let mut config = stream
        .info()
        .await
        .map_err(|e| Error::nats("read the events stream", e))?
        .config
        .clone();
    let now = partitions_of(&config)?;
    // Refused before anything is published.
    now.grow(count, now.last_switch()).map_err(topology)?;
    let mut until = 0;
    for marker in subject::marker_subjects(now.current()) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(subject::MARKER_HEADER, "partitions");
        let stored = js
            .publish_with_headers(marker, headers, bytes::Bytes::new())
            .await
            .map_err(|e| Error::nats("publish a partitions marker", e))?
            .await
            .map_err(|e| Error::nats("publish a partitions marker", e))?;
        until = until.max(stored.sequence);
    }
    let grown = now.grow(count, until).map_err(topology)?;
    config
        .metadata
        .insert(partitions::METADATA_KEY.to_owned(), grown.to_string());
    js.update_stream(config)
        .await
        .map_err(|e| Error::nats("write the events stream's partitions", e))?;
    tracing::info!(partitions = %grown, "the events stream grew");
    Ok(grown)
}

/// Creates a stream, or opens it as it is and raises its replicas and duplicate window to
/// `config`'s (a deployment grown from one server to a cluster replicates what it has; a
/// stream made by an older Tally gets the window this one relies on). Its other settings
/// stay as they were made, and neither is ever lowered: a command run without the
/// deployment's setting must not take copies away.
pub async fn ensure_stream(
    js: &Context,
    config: stream::Config,
    what: &'static str,
) -> Result<stream::Stream> {
    let mut stream = js
        .get_or_create_stream(config.clone())
        .await
        .map_err(|e| Error::nats(what, e))?;
    let made = stream.cached_info().config.clone();
    if made.num_replicas < config.num_replicas || made.duplicate_window < config.duplicate_window {
        tracing::info!(stream = %made.name, replicas = config.num_replicas.max(made.num_replicas),
            duplicate_window_secs = config.duplicate_window.max(made.duplicate_window).as_secs(),
            "raising the stream's replicas or duplicate window");
        js.update_stream(stream::Config {
            num_replicas: config.num_replicas.max(made.num_replicas),
            duplicate_window: config.duplicate_window.max(made.duplicate_window),
            ..made
        })
        .await
        .map_err(|e| Error::nats(what, e))?;
        stream = js
            .get_stream(&config.name)
            .await
            .map_err(|e| Error::nats(what, e))?;
    }
    Ok(stream)
}

/// Creates a key-value bucket or updates it to `config`, keeping any higher replica count
/// it has (as [`ensure_stream`] does).
pub async fn ensure_bucket(
    js: &Context,
    mut config: async_nats::jetstream::kv::Config,
) -> Result<async_nats::jetstream::kv::Store, async_nats::jetstream::context::CreateKeyValueError> {
    if let Ok(mut stream) = js.get_stream(format!("KV_{}", config.bucket)).await
        && let Ok(info) = stream.info().await
    {
        config.num_replicas = config.num_replicas.max(info.config.num_replicas);
    }
    js.create_or_update_key_value(config).await
}

/// Creates the durable consumers of these partitions, so that the topology is complete
/// before anyone publishes or waits on it.
pub async fn ensure_consumers(
    js: &Context,
    config: &IngestConfig,
    partitions: &Partitions,
    list: &[u16],
) -> Result<()> {
    for &p in list {
        ensure_consumer(js, config, partitions, p).await?;
    }
    Ok(())
}

/// A partition's consumer that delivers from stream sequence `from` on: every message the
/// partition holds from there ([`Partitions::filter`]).
fn consumer_config(
    config: &IngestConfig,
    partitions: &Partitions,
    partition: u16,
    from: u64,
) -> Result<pull::Config> {
    let name = subject::partition_consumer(partition);
    let filter_subject = partitions
        .filter(partition, from)
        .ok_or_else(|| unknown(partition, partitions))?;
    let deliver = match from {
        0 | 1 => DeliverPolicy::All,
        start_sequence => DeliverPolicy::ByStartSequence { start_sequence },
    };
    Ok(pull::Config {
        durable_name: Some(name),
        filter_subject,
        ack_policy: AckPolicy::All,
        deliver_policy: deliver,
        ack_wait: Duration::from_secs(config.ack_wait_secs),
        max_ack_pending: config.max_ack_pending(),
        ..Default::default()
    })
}

/// The durable pull consumer of one partition, made to start at the first message the
/// partition can hold if it does not exist.
pub async fn ensure_consumer(
    js: &Context,
    config: &IngestConfig,
    partitions: &Partitions,
    partition: u16,
) -> Result<PullConsumer> {
    let start = partitions
        .start(partition)
        .ok_or_else(|| unknown(partition, partitions))?;
    let wanted = consumer_config(config, partitions, partition, start)?;
    let stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|e| Error::nats("open events stream", e))?;
    // A JetStream API request is answered within its timeout (5 s) unless the server is
    // overloaded (many streams being written at once); this one is idempotent, so a
    // timed-out request is made again before the start fails.
    let mut timeouts = 0;
    loop {
        let created = stream
            .get_or_create_consumer(&subject::partition_consumer(partition), wanted.clone())
            .await;
        match created {
            Err(e) if e.kind() == ConsumerErrorKind::TimedOut && timeouts < 3 => timeouts += 1,
            created => return created.map_err(|e| Error::nats("create partition consumer", e)),
        }
    }
}

/// Re-creates a partition's consumer so that delivery restarts right after its ack floor,
/// on the filter of what the partition holds from there (narrower once it is past a
/// growth).
///
/// Why: with ack-all, acknowledging a message acknowledges every pending message below
/// it. Messages delivered to an earlier subscription (a crashed process, or a pull stream
/// that ended) but never processed stay pending until `ack_wait` runs out, while new
/// messages are delivered at once; acking one of those would acknowledge, and so lose,
/// the stranded ones. Restarting at the ack floor delivers everything not yet
/// acknowledged again, in order, with no gap.
///
/// Returns the consumer and the consumer sequence its next delivery will carry.
async fn rewind_to_ack_floor(
    js: &Context,
    config: &IngestConfig,
    partitions: &Partitions,
    partition: u16,
) -> Result<(PullConsumer, u64, Option<u64>)> {
    let (consumer, info) = consumer_info(js, config, partitions, partition).await?;
    let start = floor_of(&info) + 1;
    let wanted = consumer_config(config, partitions, partition, start)?;
    // Every delivery acknowledged, on the right filter: nothing is stranded.
    if info.num_ack_pending == 0
        && info.delivered.consumer_sequence == info.ack_floor.consumer_sequence
        && info.config.filter_subject == wanted.filter_subject
    {
        let serves_until = partitions.filter_until(partition, start);
        return Ok((consumer, info.delivered.consumer_sequence + 1, serves_until));
    }
    tracing::info!(
        partition,
        start,
        pending = info.num_ack_pending,
        filter = %wanted.filter_subject,
        "rewinding the partition consumer to its ack floor"
    );
    let stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|e| Error::nats("open events stream", e))?;
    let name = subject::partition_consumer(partition);
    stream
        .delete_consumer(&name)
        .await
        .map_err(|e| Error::nats("delete partition consumer", e))?;
    let serves_until = partitions.filter_until(partition, start);
    let consumer: PullConsumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..wanted
        })
        .await
        .map_err(|e| Error::nats("re-create partition consumer", e))?;
    let next = consumer.cached_info().delivered.consumer_sequence + 1;
    Ok((consumer, next, serves_until))
}

/// A partition's consumer (created if missing) and its state.
async fn consumer_info(
    js: &Context,
    config: &IngestConfig,
    partitions: &Partitions,
    partition: u16,
) -> Result<(PullConsumer, consumer::Info)> {
    let mut consumer = ensure_consumer(js, config, partitions, partition).await?;
    let info = consumer
        .info()
        .await
        .map_err(|e| Error::nats("read partition consumer", e))?
        .clone();
    Ok((consumer, info))
}

/// Messages of the partition's consumer not yet acknowledged or not yet delivered (its
/// lag), without creating the consumer: `None` when it does not exist.
pub async fn pending(js: &Context, partition: u16) -> Result<Option<u64>> {
    let stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|e| Error::nats("read events stream", e))?;
    let Ok(mut consumer) = stream
        .get_consumer::<pull::Config>(&subject::partition_consumer(partition))
        .await
    else {
        return Ok(None);
    };
    let info = consumer
        .info()
        .await
        .map_err(|e| Error::nats("read partition consumer", e))?;
    Ok(Some(info.num_pending + info.num_ack_pending as u64))
}

/// The partition's ack floor: every message up to it is acknowledged.
pub async fn ack_floor(
    js: &Context,
    config: &IngestConfig,
    partitions: &Partitions,
    partition: u16,
) -> Result<u64> {
    let (_, info) = consumer_info(js, config, partitions, partition).await?;
    Ok(floor_of(&info))
}

/// A consumer's ack floor as a stream sequence. A consumer made to start at a sequence
/// ([`rewind_to_ack_floor`]) reports 0 until it acknowledges a message, though everything
/// before its start is acknowledged.
fn floor_of(info: &consumer::Info) -> u64 {
    let start = match info.config.deliver_policy {
        DeliverPolicy::ByStartSequence { start_sequence } => start_sequence.saturating_sub(1),
        _ => 0,
    };
    info.ack_floor.stream_sequence.max(start)
}

/// A partition's pull stream, and the consumer sequence of the delivery it expects next.
///
/// JetStream numbers every delivery of a consumer, redeliveries included, one after the
/// other. A delivery that arrives with a later number than expected means the ones between
/// were lost on the way (the connection dropped, or the server cut it off as a slow
/// consumer): with ack-all, acknowledging anything after them would acknowledge them too,
/// unread. The partition starts again at the ack floor instead ([`messages`]).
pub struct Deliveries {
    pub messages: pull::Stream,
    pub next: u64,
    /// The last sequence the consumer's filter serves: past it, the partition's messages
    /// are under a narrower one ([`Partitions::filter_until`]).
    pub serves_until: Option<u64>,
    /// The last stream sequence delivered on this stream and handled (0: none yet).
    pub handled_to: u64,
}

/// How often the server tells a waiting pull it is alive. Two missed, the partition pulls
/// again once its consumer answers ([`pull_again`]): after a NATS node is lost, within
/// about a quarter of this of the consumer's new leader being elected.
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);

/// How long [`pull_again`] asks for a silent consumer.
const SILENT_CONSUMER: Duration = Duration::from_secs(30);

/// Starts pulling one partition's messages (prefetching, with heartbeats), from the
/// first message not yet acknowledged.
///
/// A pull asks for at most `fetch_messages` messages and the server's largest payload in
/// bytes (so that any message the stream holds fits one pull), and the next pull goes out
/// when half of it has arrived: a worker's connection has at most about one and a half
/// times that per partition on its way to it. Without the byte bound, a backlog of large
/// messages would be sent at once, faster than a busy worker reads, and the server would
/// cut the connection off as a slow consumer (`max_pending`, 64 MiB by default).
pub async fn messages(
    js: &Context,
    config: &IngestConfig,
    partitions: &Partitions,
    partition: u16,
) -> Result<Deliveries> {
    let (consumer, next, serves_until) =
        rewind_to_ack_floor(js, config, partitions, partition).await?;
    Ok(Deliveries {
        messages: pull(js, config, &consumer).await?,
        next,
        serves_until,
        handled_to: 0,
    })
}

/// A pull stream on `consumer`, as [`messages`] describes.
async fn pull(
    js: &Context,
    config: &IngestConfig,
    consumer: &PullConsumer,
) -> Result<pull::Stream> {
    let max_bytes = js.client().server_info().max_payload.max(1);
    consumer
        .stream()
        .max_messages_per_batch(config.fetch_messages)
        .max_bytes_per_batch(max_bytes)
        .heartbeat(PULL_HEARTBEAT)
        .messages()
        .await
        .map_err(|e| Error::nats("start consuming", e))
}

/// A new pull stream on the partition's consumer once the consumer answers again; `None`
/// if cancelled first. For a pull stream whose heartbeats stopped: its request went with
/// the consumer's leader (a NATS node lost; JetStream elects another in 4 to 9 s), and
/// the stream itself would ask again only once that request expired (30 s). Delivery goes
/// on where it was: a delivery lost on the way shows as a gap in the consumer's sequence
/// ([`Deliveries`]). A consumer silent for [`SILENT_CONSUMER`] is an error: the partition
/// is then taken over again, its consumer re-created if it is gone.
pub async fn pull_again(
    js: &Context,
    config: &IngestConfig,
    partition: u16,
    cancel: &CancellationToken,
) -> Result<Option<pull::Stream>> {
    let name = subject::partition_consumer(partition);
    let answered = ask_through_election("read partition consumer", SILENT_CONSUMER, || async {
        js.get_consumer_from_stream::<pull::Config, _, _>(&name, EVENTS_STREAM)
            .await
            .map_err(|e| Error::nats("read partition consumer", e))
    });
    let consumer = tokio::select! {
        () = cancel.cancelled() => return Ok(None),
        consumer = answered => consumer?,
    };
    pull(js, config, &consumer).await.map(Some)
}

/// How long one request of [`ask_through_election`] may take.
const ASK_ONCE: Duration = Duration::from_secs(1);

/// `ask`, a request to a stream or consumer JetStream may be electing a leader for (4 to
/// 9 s after a NATS node's loss; until then it goes unanswered), made again until it
/// answers: each given [`ASK_ONCE`], a quarter of that between them, for `within` at most,
/// then its last error (`what` names a request that timed out).
pub(crate) async fn ask_through_election<T, F, Fut>(
    what: &'static str,
    within: Duration,
    mut ask: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let failed = match tokio::time::timeout(ASK_ONCE, ask()).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(e)) => e,
            Err(elapsed) => Error::nats(what, elapsed),
        };
        if tokio::time::Instant::now() + ASK_ONCE / 4 >= deadline {
            return Err(failed);
        }
        tokio::time::sleep(ASK_ONCE / 4).await;
    }
}
