//! What an ingest worker hands to the lake, and what the lake answers.
//!
//! The worker seals an Arrow batch for one partition together with the stream sequences
//! it covers, sends it down a bounded channel, and acknowledges those messages to
//! JetStream only when the answer says the file holding them is durable.

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use tokio::sync::oneshot;

use crate::Fence;

/// Rows of one partition covering the stream sequences `first_seq..=last_seq`.
///
/// Every message in that range is accounted for: its events are rows here, or went to
/// the dead-letter stream, or were duplicates. `batch` may be empty when the range held
/// no valid event.
#[derive(Debug, Clone)]
pub struct SealedBatch {
    pub partition: u16,
    pub first_seq: u64,
    pub last_seq: u64,
    /// The last sequence of the partition's batch before this one with rows (or where the
    /// worker took the partition over): the lake commits this batch only once the
    /// partition's version in its log is that, so batches land in order and a worker that
    /// lost the partition cannot commit over its successor. `None`: after whatever the log
    /// holds (for tools and tests that write alone).
    pub after_seq: Option<u64>,
    pub batch: RecordBatch,
}

/// What the lake reports once a sealed batch is on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Durable {
    pub rows: usize,
    pub files: usize,
    pub bytes: u64,
}

/// A sealed batch and the channel its outcome is sent back on.
#[derive(Debug)]
pub struct FlushRequest {
    pub sealed: SealedBatch,
    /// The partition's write deadline: past it, the lake refuses the batch.
    pub fence: Arc<Fence>,
    pub done: oneshot::Sender<Result<Durable, String>>,
}
