//! Creates the JetStream streams and the per-partition consumers, idempotently.

use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::stream::{
    self, DiscardPolicy, RetentionPolicy, StorageType, SubjectTransform,
};
use tally_core::subject::{
    self, DEAD_LETTER_PREFIX, DEAD_LETTER_STREAM, EVENTS_STREAM, EVENTS_SUBJECT_PREFIX,
};

use crate::{Error, IngestConfig, Result};

/// Makes sure the events stream (partitioned by customer) and the dead-letter stream exist.
///
/// The partition count is fixed when the stream is created; a stream made with another
/// count is an error, not something to rewrite under running workers.
pub async fn ensure_streams(js: &Context, config: &IngestConfig) -> Result<()> {
    let (src, dest) = subject::partition_transform(config.partitions);
    let events = js
        .get_or_create_stream(stream::Config {
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
            ..Default::default()
        })
        .await
        .map_err(|e| Error::nats("create events stream", e))?;
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
    js.get_or_create_stream(stream::Config {
        name: DEAD_LETTER_STREAM.to_owned(),
        subjects: vec![format!("{DEAD_LETTER_PREFIX}.>")],
        duplicate_window: Duration::from_secs(config.duplicate_window_secs),
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| Error::nats("create dead-letter stream", e))?;
    Ok(())
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
    let name = subject::partition_consumer(partition);
    stream
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: subject::partition_filter(partition),
                ack_policy: AckPolicy::All,
                deliver_policy: DeliverPolicy::All,
                ack_wait: Duration::from_secs(config.ack_wait_secs),
                max_ack_pending: config.max_ack_pending(),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| Error::nats("create partition consumer", e))
}

/// Starts pulling one partition's messages (prefetching, with heartbeats).
pub async fn messages(js: &Context, config: &IngestConfig, partition: u16) -> Result<pull::Stream> {
    ensure_consumer(js, config, partition)
        .await?
        .stream()
        .max_messages_per_batch(config.fetch_messages)
        .heartbeat(Duration::from_secs(5))
        .messages()
        .await
        .map_err(|e| Error::nats("start consuming", e))
}
