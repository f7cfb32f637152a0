//! Tally's ingest: JetStream pull workers that decode, decide and hand batches to the lake.
//!
//! One task per owned partition pulls from that partition's durable consumer, decodes each
//! message ([`tally_core::Frame`]), drops repeated event ids ([`dedup`]), sends invalid
//! events to the dead-letter stream, and appends the rest as Arrow rows. A batch is sealed
//! on rows, messages, bytes or age and sent down a bounded channel to the lake; the
//! messages it covers are acknowledged (ack-all, confirmed by the server) only after the
//! lake answers that the file holding them is durable. The lake is `tally-store`'s: a
//! [`Pipeline`] runs the worker with its lake writer, and take-over reads the lake's
//! checkpoint and the rows stored after it to resume each partition where the last durable
//! file ended.

pub mod checks;
pub mod dedup;
pub mod definitions;
mod endpoint;
pub mod entitlements;
pub mod ownership;
mod pipeline;
pub mod record;
mod recovery;
pub mod rows;
mod supervise;
pub mod topology;
mod worker;

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tally_core::{Decision, DecodeLimits};

pub use endpoint::NatsEndpoint;
pub use pipeline::{LakeWriter, Pipeline};
pub use supervise::run_worker;
pub use tally_natsd::Service;
pub use worker::run_partition;

/// Ingest settings. Defaults suit a laptop and the two-core reference machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Partitions of the events stream; fixed when the stream is created.
    pub partitions: u16,
    /// Copies NATS keeps of each of Tally's streams and buckets: 1 on a single server, 3
    /// on a cluster of three or more nodes (any one node can then be lost). An existing
    /// stream or bucket with fewer is raised to this count when a process opens it, and
    /// never lowered (a command run without the setting takes no copies away).
    pub replicas: usize,
    /// JetStream's publish dedup window, in seconds.
    pub duplicate_window_secs: u64,
    /// Largest events stream, in bytes (-1: unlimited). Publishers are refused beyond it.
    pub stream_max_bytes: i64,
    /// Seal a batch at this many rows...
    pub flush_rows: usize,
    /// ...or this many messages...
    pub flush_messages: usize,
    /// ...or this many payload bytes...
    pub flush_bytes: usize,
    /// ...or when its first message is this old.
    pub flush_age_ms: u64,
    /// Sealed batches per partition waiting to become durable.
    pub flushes_in_flight: usize,
    /// Messages per pull request.
    pub fetch_messages: usize,
    /// How long JetStream waits for an ack before redelivering, in seconds.
    pub ack_wait_secs: u64,
    /// Distinct event ids remembered per partition (per generation, see [`dedup`]).
    pub dedup_capacity: usize,
    /// Checkpoint each partition's counters at least this often while it handles messages
    /// (and after every definition change), in seconds: a worker that takes the partition
    /// over replays the lake's rows stored since.
    pub checkpoint_secs: u64,
    /// Decide every event against the entitlements in the key-value buckets. Off, every
    /// valid event is `accepted` (to measure what enforcement costs).
    pub enforce: bool,
    /// Meter the events of customers with no definition: decided `metered` (read by
    /// meters, counted by no limit) rather than `unknown_customer`, so that a team can
    /// start with metering alone and define plans later.
    pub meter_unknown_customers: bool,
    pub limits: DecodeLimits,
    /// Fault injection for tests: hold each ack this long after its batch is durable, so
    /// that a test can kill a worker between the two. Leave it at 0.
    pub fault_ack_delay_ms: u64,
    /// Fault injection for tests: wait this long before applying each change read from the
    /// definitions buckets, so that a test can show a change still applies to the first
    /// event stored after its write. Not read from configuration files.
    #[serde(skip)]
    pub definitions_apply_delay_ms: u64,
    /// A partition's lease lasts this long after its last renewal (renewed every second,
    /// or every third of it if shorter), in milliseconds: a worker that dies has its
    /// partitions taken over within about this time and a second (see [`ownership`]). Long
    /// enough that renewals delayed by a saturated nats-server, or by JetStream electing
    /// the leases bucket a leader after a NATS node is lost, do not cost a worker its
    /// partitions.
    pub lease_ms: u64,
    /// Compact each owned partition's settled files this often, in seconds (0: never; see
    /// `tally_store::compact`): closed dates merged whole, open ones once small files pile
    /// up. `tally compact` does the same on demand.
    pub compact_every_secs: u64,
    /// Rows a compacted file holds at most.
    pub compact_target_rows: u64,
    /// Notices and dead letters a worker has published and not yet seen acknowledged by
    /// JetStream, at most. Each partition holds its share (half for each kind) until its
    /// batch is acknowledged and awaits them sooner once it holds more, so that a burst of
    /// notices never waits on a publish slot that only its own batch would free.
    pub publishes_in_flight: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            partitions: 16,
            replicas: 1,
            duplicate_window_secs: 120,
            stream_max_bytes: -1,
            flush_rows: 100_000,
            flush_messages: 20_000,
            flush_bytes: 32 * 1024 * 1024,
            flush_age_ms: 500,
            flushes_in_flight: 2,
            fetch_messages: 1_000,
            ack_wait_secs: 60,
            dedup_capacity: 500_000,
            checkpoint_secs: 10,
            enforce: true,
            meter_unknown_customers: false,
            limits: DecodeLimits::default(),
            fault_ack_delay_ms: 0,
            definitions_apply_delay_ms: 0,
            lease_ms: 15_000,
            compact_every_secs: 300,
            compact_target_rows: 1_000_000,
            publishes_in_flight: 4_096,
        }
    }
}

impl IngestConfig {
    /// Unacknowledged messages a consumer may hold: every batch in flight plus the open one,
    /// with room for a prefetch. With ack-all, a lower limit would stall the consumer.
    pub fn max_ack_pending(&self) -> i64 {
        let per_batch = self.flush_messages.min(self.flush_rows);
        i64::try_from((self.flushes_in_flight + 1) * per_batch + 2 * self.fetch_messages)
            .unwrap_or(i64::MAX)
    }

    /// Every problem with these settings, for the operator to read at start.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.partitions == 0 {
            p.push("ingest.partitions must be at least 1".to_owned());
        }
        if self.flush_rows == 0 || self.flush_messages == 0 || self.flush_bytes == 0 {
            p.push("ingest.flush_rows, flush_messages and flush_bytes must be positive".to_owned());
        }
        if self.flushes_in_flight == 0 {
            p.push("ingest.flushes_in_flight must be at least 1".to_owned());
        }
        if self.compact_target_rows < 2 {
            p.push("ingest.compact_target_rows must be at least 2".to_owned());
        }
        if self.fetch_messages == 0 {
            p.push("ingest.fetch_messages must be at least 1".to_owned());
        }
        if !(1..=5).contains(&self.replicas) {
            p.push(format!(
                "ingest.replicas must be 1 to 5 (NATS keeps at most 5 copies), not {}",
                self.replicas
            ));
        }
        p
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// NATS refused or failed an operation; retrying later may help.
    #[error("nats: {what}: {source}")]
    Nats {
        what: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// This process's NATS credentials are missing or unreadable.
    #[error("NATS credentials: {0}")]
    Credentials(String),
    /// The streams exist with a shape this configuration cannot use.
    #[error("jetstream topology: {0}")]
    Topology(String),
    /// The lake could not make a batch durable; its messages stay unacknowledged.
    #[error("lake: {0}")]
    Store(String),
    /// A stored definition (plan, customer, …) could not be read or written.
    #[error("definition: {0}")]
    Definition(String),
    /// A check or record request was refused; `field` names the request's flawed field.
    #[error("refused: {message}")]
    Refused {
        message: String,
        field: Option<String>,
    },
    /// No worker answered a check or record request in time (none owns the partition,
    /// or NATS is unavailable).
    #[error("{0}")]
    Unanswered(String),
    /// A reply that could not be read.
    #[error("check: {0}")]
    Check(String),
    /// The worker or the lake writer stopped unexpectedly.
    #[error("{0}")]
    Stopped(String),
}

impl Error {
    pub(crate) fn nats(
        what: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Nats {
            what,
            source: source.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Counters a worker keeps while it runs; read by the demo, the load generator and metrics.
#[derive(Debug)]
pub struct Stats {
    pub messages: AtomicU64,
    pub events_valid: AtomicU64,
    pub duplicates: AtomicU64,
    pub dead_letters: AtomicU64,
    pub redeliveries_skipped: AtomicU64,
    /// Times a partition found deliveries lost on the way to it and started again at its
    /// ack floor ([`topology::Deliveries`]).
    pub delivery_gaps: AtomicU64,
    /// Lake rows replayed when taking partitions over.
    pub replayed: AtomicU64,
    /// Partitions taken over from the lake (at start, after a failure, from another worker).
    pub takeovers: AtomicU64,
    /// Customer × feature counters restored from checkpoints when taking partitions over.
    pub counters_restored: AtomicU64,
    pub checkpoints: AtomicU64,
    /// Partitions taken over again after a failure.
    pub partition_restarts: AtomicU64,
    /// Partitions whose lease this worker holds and runs.
    pub partitions_owned: AtomicU64,
    /// Leases lost while running (another worker may have taken the partition).
    pub leases_lost: AtomicU64,
    /// Valid, first-seen events by decision, in the order of [`Decision::ALL`].
    pub decided: [AtomicU64; Decision::ALL.len()],
    pub notices: AtomicU64,
    /// Rows in files the lake reported durable and whose messages were acknowledged.
    pub rows_durable: AtomicU64,
    pub files_written: AtomicU64,
    pub batches_acked: AtomicU64,
    /// Milliseconds from JetStream storing a message to its ack after the durable write.
    pub stored_to_durable_ms: Mutex<Histogram<u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            messages: AtomicU64::new(0),
            events_valid: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            redeliveries_skipped: AtomicU64::new(0),
            delivery_gaps: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            takeovers: AtomicU64::new(0),
            counters_restored: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            partition_restarts: AtomicU64::new(0),
            partitions_owned: AtomicU64::new(0),
            leases_lost: AtomicU64::new(0),
            decided: Default::default(),
            notices: AtomicU64::new(0),
            rows_durable: AtomicU64::new(0),
            files_written: AtomicU64::new(0),
            batches_acked: AtomicU64::new(0),
            stored_to_durable_ms: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid histogram bounds"),
            ),
        }
    }
}

impl Stats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
