//! Creates the JetStream streams and the per-partition consumers, idempotently.

use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::stream::{
    self, ConsumerErrorKind, DiscardPolicy, RetentionPolicy, StorageType, SubjectTransform,
};
use tally_core::subject::{
    self, DEAD_LETTER_PREFIX, DEAD_LETTER_STREAM, EVENTS_STREAM, EVENTS_SUBJECT_PREFIX,
    NOTIFY_PREFIX, NOTIFY_STREAM,
};

use crate::{Error, IngestConfig, Result};

/// Makes sure the events stream (partitioned by customer) and the dead-letter stream exist.
///
/// The partition count is fixed when the stream is created; a stream made with another
/// count is an error, not something to rewrite under running workers.
pub async fn ensure_streams(js: &Context, config: &IngestConfig) -> Result<()> {
    let (src, dest) = subject::partition_transform(config.partitions);
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
    let existing = events
        .cached_info()
        .config
        .subject_transform
        .as_ref()
        .map(|t| t.destination.clone());
    if existing.as_deref() != Some(dest.as_str()) {
        return Err(Error::Topology(format!(
            "stream {EVENTS_STREAM} exists with subject transform {existing:?}, not {dest:?}: \
             it was created with another partition count"
        )));
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
            duplicate_window: Duration::from_secs(config.duplicate_window_secs),
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: config.replicas,
            ..Default::default()
        };
        ensure_stream(js, config, what).await?;
    }
    Ok(())
}

/// Creates a stream, or opens it as it is and raises its replicas to `config`'s count (a
/// deployment grown from one server to a cluster replicates what it has). Its other
/// settings stay as they were made, and its replicas are never lowered: a command run
/// without the deployment's setting must not take copies away.
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
    if made.num_replicas < config.num_replicas {
        tracing::info!(stream = %made.name, from = made.num_replicas, to = config.num_replicas,
            "changing the stream's replicas");
        js.update_stream(stream::Config {
            num_replicas: config.num_replicas,
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
    partitions: &[u16],
) -> Result<()> {
    for &p in partitions {
        ensure_consumer(js, config, p).await?;
    }
    Ok(())
}

fn consumer_config(config: &IngestConfig, partition: u16, deliver: DeliverPolicy) -> pull::Config {
    let name = subject::partition_consumer(partition);
    pull::Config {
        durable_name: Some(name),
        filter_subject: subject::partition_filter(partition),
        ack_policy: AckPolicy::All,
        deliver_policy: deliver,
        ack_wait: Duration::from_secs(config.ack_wait_secs),
        max_ack_pending: config.max_ack_pending(),
        ..Default::default()
    }
}

/// The durable pull consumer of one partition.
pub async fn ensure_consumer(
    js: &Context,
    config: &IngestConfig,
    partition: u16,
) -> Result<PullConsumer> {
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
            .get_or_create_consumer(
                &subject::partition_consumer(partition),
                consumer_config(config, partition, DeliverPolicy::All),
            )
            .await;
        match created {
            Err(e) if e.kind() == ConsumerErrorKind::TimedOut && timeouts < 3 => timeouts += 1,
            created => return created.map_err(|e| Error::nats("create partition consumer", e)),
        }
    }
}

/// Re-creates a partition's consumer so that delivery restarts right after its ack floor.
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
    partition: u16,
) -> Result<(PullConsumer, u64)> {
    let (consumer, info) = consumer_info(js, config, partition).await?;
    if info.num_ack_pending == 0 && info.delivered.stream_sequence == info.ack_floor.stream_sequence
    {
        return Ok((consumer, info.delivered.consumer_sequence + 1));
    }
    let start = info.ack_floor.stream_sequence + 1;
    tracing::info!(
        partition,
        start,
        pending = info.num_ack_pending,
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
    let consumer: PullConsumer = stream
        .create_consumer(consumer_config(
            config,
            partition,
            DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
        ))
        .await
        .map_err(|e| Error::nats("re-create partition consumer", e))?;
    let next = consumer.cached_info().delivered.consumer_sequence + 1;
    Ok((consumer, next))
}

/// A partition's consumer (created if missing) and its state.
async fn consumer_info(
    js: &Context,
    config: &IngestConfig,
    partition: u16,
) -> Result<(PullConsumer, consumer::Info)> {
    let mut consumer = ensure_consumer(js, config, partition).await?;
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
pub async fn ack_floor(js: &Context, config: &IngestConfig, partition: u16) -> Result<u64> {
    let (_, info) = consumer_info(js, config, partition).await?;
    Ok(info.ack_floor.stream_sequence)
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
}

/// How often the server tells a waiting pull it is alive. Two missed, the pull is made
/// again: after a NATS node is lost, a partition pulls from its consumer's new leader
/// within about two of these.
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);

/// Starts pulling one partition's messages (prefetching, with heartbeats), from the
/// first message not yet acknowledged.
///
/// A pull asks for at most `fetch_messages` messages and the server's largest payload in
/// bytes (so that any message the stream holds fits one pull), and the next pull goes out
/// when half of it has arrived: a worker's connection has at most about one and a half
/// times that per partition on its way to it. Without the byte bound, a backlog of large
/// messages would be sent at once, faster than a busy worker reads, and the server would
/// cut the connection off as a slow consumer (`max_pending`, 64 MiB by default).
pub async fn messages(js: &Context, config: &IngestConfig, partition: u16) -> Result<Deliveries> {
    let (consumer, next) = rewind_to_ack_floor(js, config, partition).await?;
    let max_bytes = js.client().server_info().max_payload.max(1);
    let messages = consumer
        .stream()
        .max_messages_per_batch(config.fetch_messages)
        .max_bytes_per_batch(max_bytes)
        .heartbeat(PULL_HEARTBEAT)
        .messages()
        .await
        .map_err(|e| Error::nats("start consuming", e))?;
    Ok(Deliveries { messages, next })
}
