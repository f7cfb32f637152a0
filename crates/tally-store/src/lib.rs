//! Tally's lake: sealed Arrow batches become Parquet files committed to Delta Lake tables.
//!
//! Layout (hive style; the tables readable by any Delta engine):
//!
//! ```text
//! <root>/events/_delta_log/…, events/date=YYYY-MM-DD/p<partition>-<first>-<last>-<token>.parquet
//! <root>/rollups/_delta_log/…, rollups/date=YYYY-MM-DD/… (the same names)
//! ```
//!
//! `date` is the UTC date of the event time. One sealed batch becomes one file per date it
//! touches, and each events file has a [`rollup`](mod@rollup) of the same date and name.
//! [`Lake::write`] uploads them all, then commits the events files to the events table and
//! the rollups to the rollups table, each commit with the partition's transaction version
//! (see [`table`]): a reader sees a flush whole or not at all. The name and the file's
//! key-value metadata (`tally.partition`, `tally.first_seq`, `tally.last_seq`) record which
//! stream sequences it holds. [`Durable`] counts the events files only.
//!
//! Once a month is closed, compaction ([`compact`]) writes per partition its
//! [`monthly`] rollup and, just before it, its billing [`lines`].
//!
//! Beside the events, each partition's checkpoints ([`checkpoint`]); [`tail`] reads back
//! what a partition holds past one.
//!
//! [`Lake::write`] is blocking and runs off the async threads; [`run_writer`] is the thin
//! async shell that serves a worker's bounded channel of [`FlushRequest`]s.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{AsArray, BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::TimestampMicrosecondType;
use chrono::DateTime;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tally_core::metrics as names;
use tally_core::schema::{self, EVENTS_TABLE};
use tally_core::{Durable, Fence, FlushRequest, SealedBatch};

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

pub mod checkpoint;
pub mod compact;
pub mod lines;
pub mod meter_rollup;
pub mod migrate;
pub mod monthly;
pub mod rollup;
pub mod table;
pub mod tail;
pub mod users;

pub use compact::{CompactOptions, Compacted, parse_name, visible};
pub use lines::{BILLING_TABLE, lines_schema};
pub use meter_rollup::{
    LiveMeter, METER_MONTHLY_TABLE, METER_ROLLUPS_TABLE, meter_rollup_schema, meter_rollups,
};
pub use migrate::Migrated;
pub use monthly::{BadMonth, MONTHLY_TABLE, Month, MonthSources, PERIOD, monthly_schema};
pub use rollup::{ROLLUPS_TABLE, rollup, rollup_schema};
pub use table::{Expect, Location, S3Location, Storage, TableFile};
pub use tail::{PartitionFile, Tail};
pub use users::{ActiveUsers, Grain};

/// Metadata keys each Parquet file carries.
pub const META_PARTITION: &str = "tally.partition";
pub const META_FIRST_SEQ: &str = "tally.first_seq";
pub const META_LAST_SEQ: &str = "tally.last_seq";
/// How many files (one per event date) the sealed batch became: a recovering worker
/// treats a batch with fewer files as never written.
pub const META_FILES: &str = "tally.files";
/// On a compacted file: how many files it merged (see [`compact`]).
pub const META_COMPACTED: &str = "tally.compacted";

/// What a lake file's metadata says of it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FileMeta {
    pub partition: u16,
    pub first_seq: u64,
    pub last_seq: u64,
    pub files: usize,
    pub compacted: Option<usize>,
}

const MICROS_PER_DAY: i64 = 86_400_000_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("lake I/O at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("parquet encoding: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("batch has no {0} column of the lake schema")]
    Schema(&'static str),
    #[error("lake file has no {0} column, which the lake schema requires")]
    MissingColumn(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The partition's lease may have passed to another worker: nothing was made visible.
    #[error("partition {0} is no longer owned by this worker; nothing written")]
    Fenced(u16),
    #[error("lake storage: {0}")]
    Storage(String),
    #[error("lake table: {0}")]
    Table(String),
    /// A commit's precondition failed: the partition's version in the log is not the one
    /// the commit follows.
    #[error(
        "table {table}: partition {partition} is at sequence {found} in the log, not {expected}; \
         another worker committed it"
    )]
    Unexpected {
        table: &'static str,
        partition: u16,
        expected: u64,
        found: u64,
    },
    #[error("table {table}: a concurrent commit conflicts: {reason}")]
    Conflict { table: &'static str, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// The lake: its tables (events, hourly rollups, monthly rollups, billing lines) and the
/// partitions' checkpoints, on local disk or object storage.
#[derive(Debug, Clone)]
pub struct Lake {
    /// The lake's directory, for a lake on local disk.
    dir: Option<PathBuf>,
    storage: Storage,
    tables: Arc<Tables>,
    props: WriterProperties,
    /// For the monthly rollups: row groups small enough that a query of some decisions
    /// skips the others' by their statistics (the rows are sorted by decision).
    monthly_props: WriterProperties,
    /// For the meter rollups: LZ4, whose codec costs nothing to set up. A zstd codec makes
    /// a compression and a decompression context per column, and a flush writes fifteen
    /// columns per live meter: with five meters, setting them up cost more than rolling
    /// the meters up.
    meter_props: WriterProperties,
    /// The meters whose rollups each flush and compaction write ([`Lake::set_meters`]).
    meters: Arc<std::sync::RwLock<Arc<[LiveMeter]>>>,
}

/// The lake's Delta tables.
#[derive(Debug)]
pub(crate) struct Tables {
    pub events: table::Table,
    pub rollups: table::Table,
    pub monthly: table::Table,
    pub billing: table::Table,
    pub meter_rollups: table::Table,
    pub meter_monthly: table::Table,
}

/// Rows per row group of a monthly rollup file.
const MONTHLY_ROW_GROUP_ROWS: usize = 16_384;

impl Lake {
    /// The lake in the local directory `root` (created on first write).
    ///
    /// # Panics
    /// If `root` is relative and the current directory cannot be read.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Self::open(&Location::Local(root)).expect("the lake's directory has an absolute path")
    }

    /// The lake at `location`.
    pub fn open(location: &Location) -> Result<Self> {
        let storage = Storage::open(location)?;
        let dir = match location {
            Location::Local(dir) => Some(std::path::absolute(dir).map_err(io_err(dir))?),
            Location::S3(_) => None,
        };
        let tables = Tables {
            events: table::Table::new(
                &storage,
                EVENTS_TABLE,
                schema::lake_schema(),
                schema::DATE,
                deltalake::kernel::DataType::DATE,
            )?,
            rollups: table::Table::new(
                &storage,
                ROLLUPS_TABLE,
                rollup_schema(),
                schema::DATE,
                deltalake::kernel::DataType::DATE,
            )?,
            monthly: table::Table::new(
                &storage,
                MONTHLY_TABLE,
                monthly_schema(),
                PERIOD,
                deltalake::kernel::DataType::STRING,
            )?,
            billing: table::Table::new(
                &storage,
                BILLING_TABLE,
                lines_schema(),
                PERIOD,
                deltalake::kernel::DataType::STRING,
            )?,
            meter_rollups: table::Table::new(
                &storage,
                METER_ROLLUPS_TABLE,
                meter_rollup_schema(),
                schema::DATE,
                deltalake::kernel::DataType::DATE,
            )?,
            meter_monthly: table::Table::new(
                &storage,
                METER_MONTHLY_TABLE,
                meter_rollup_schema(),
                PERIOD,
                deltalake::kernel::DataType::STRING,
            )?,
        };
        // Event ids are unique: a dictionary for them is pure cost, and so are statistics
        // on ids and free-form data that no query prunes on.
        let unique = |name: &str| parquet::schema::types::ColumnPath::from(name);
        let props = || {
            WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).unwrap_or_default()))
                .set_column_dictionary_enabled(unique(schema::EVENT_ID), false)
                .set_column_statistics_enabled(
                    unique(schema::EVENT_ID),
                    parquet::file::properties::EnabledStatistics::None,
                )
                .set_column_dictionary_enabled(unique(schema::DATA), false)
                .set_column_statistics_enabled(
                    unique(schema::DATA),
                    parquet::file::properties::EnabledStatistics::None,
                )
        };
        Ok(Self {
            dir,
            storage,
            tables: Arc::new(tables),
            props: props().build(),
            monthly_props: props()
                .set_max_row_group_row_count(Some(MONTHLY_ROW_GROUP_ROWS))
                .build(),
            meter_props: props().set_compression(Compression::LZ4_RAW).build(),
            meters: Arc::new(std::sync::RwLock::new(Arc::from([]))),
        })
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The lake's directory, for a lake on local disk.
    pub fn local_dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Writes a sealed batch durably: its rows as one events file per event date, each
    /// with its rollup, committed to the events table and then to the rollups table, each
    /// in one commit that carries the partition's transaction version and lands only after
    /// the partition's previous batch (`sealed.after_seq`), while `fence` holds.
    pub fn write(&self, sealed: &SealedBatch, fence: &Fence) -> Result<Durable> {
        let mut durable = Durable::default();
        if sealed.batch.num_rows() == 0 {
            return Ok(durable);
        }
        let days = split_by_day(&sealed.batch)?;
        let meta = FileMeta {
            partition: sealed.partition,
            first_seq: sealed.first_seq,
            last_seq: sealed.last_seq,
            files: days.len(),
            compacted: None,
        };
        // A name of its own for each attempt: a file that a failed attempt, or a worker
        // that lost the partition, left uncommitted is never overwritten or reused.
        let token = file_token();
        let meters = self.live_meters();
        let (mut events, mut rollups, mut metered) = (Vec::new(), Vec::new(), Vec::new());
        for (day, rows) in days {
            let date = date_of_day(day);
            let path = format!(
                "{}={date}/{}",
                schema::DATE,
                file_name(sealed.partition, sealed.first_seq, sealed.last_seq, &token)
            );
            let summary = rollup(&rows)?;
            metered.extend(self.meter_uploads(&meters, &path, &date, &meta, &rows)?);
            let bytes = encode(&self.props, &meta, &rows)?;
            durable.rows += rows.num_rows();
            durable.files += 1;
            durable.bytes += bytes.len() as u64;
            events.push(Upload {
                path: path.clone(),
                value: date.clone(),
                stats: stats(&rows),
                bytes,
            });
            rollups.push(Upload {
                path,
                value: date,
                stats: stats(&summary),
                bytes: encode(&self.props, &meta, &summary)?,
            });
        }
        table::block_on(async {
            let tables = &self.tables;
            futures::future::try_join3(
                self.upload(&tables.events, &events),
                self.upload(&tables.rollups, &rollups),
                self.upload(&tables.meter_rollups, &metered),
            )
            .await?;
            commit_flush(&tables.events, &events, sealed, fence).await?;
            commit_flush(&tables.rollups, &rollups, sealed, fence).await?;
            let now = std::time::SystemTime::now();
            self.commit_meter_rollups(&metered, &[], now, sealed.partition, fence)
                .await
        })?;
        Ok(durable)
    }

    /// Sets the meters whose rollups every later flush and compaction write: the live
    /// ones of `meters` (see [`meter_rollup`](mod@meter_rollup)).
    pub fn set_meters<'m>(&self, meters: impl IntoIterator<Item = &'m tally_core::meter::Meter>) {
        let live: Arc<[LiveMeter]> = meters.into_iter().filter_map(LiveMeter::new).collect();
        *self
            .meters
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = live;
    }

    /// The meters whose rollups are written now.
    pub fn live_meters(&self) -> Arc<[LiveMeter]> {
        self.meters
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The rollup of each of `meters` of the events file `path` (dated `date`) holding
    /// `rows`, ready to upload.
    pub(crate) fn meter_uploads(
        &self,
        meters: &[LiveMeter],
        path: &str,
        date: &str,
        meta: &FileMeta,
        rows: &RecordBatch,
    ) -> Result<Vec<Upload>> {
        if meters.is_empty() {
            return Ok(Vec::new());
        }
        meters
            .iter()
            .zip(meter_rollups(rows, meters)?)
            .map(|(meter, summary)| {
                Ok(Upload {
                    path: meter_rollup::rollup_path(path, meter.key()),
                    value: date.to_owned(),
                    stats: stats(&summary),
                    bytes: encode(&self.meter_props, meta, &summary)?,
                })
            })
            .collect()
    }

    /// Adds `files` to the meter rollups table in one commit, removing `replaced` (dated
    /// `now`), while `fence` holds for `partition`. A meter rollup answers for its events file alone, so
    /// it needs no place in the partition's order.
    pub(crate) async fn commit_meter_rollups(
        &self,
        files: &[Upload],
        replaced: &[TableFile],
        now: std::time::SystemTime,
        partition: u16,
        fence: &Fence,
    ) -> Result<()> {
        if files.is_empty() && replaced.is_empty() {
            return Ok(());
        }
        let table = &self.tables.meter_rollups;
        let mut actions: Vec<_> = replaced.iter().map(|f| table.remove(f, now)).collect();
        actions.extend(files.iter().map(|f| f.add(table)));
        let operation = if replaced.is_empty() {
            table::append()
        } else {
            table::optimize()
        };
        table
            .commit(actions, &[], &[], Some((fence, partition)), operation)
            .await?;
        Ok(())
    }

    /// Puts each of `files` into `table`'s directory (not yet part of the table).
    async fn upload(&self, table: &table::Table, files: &[Upload]) -> Result<()> {
        futures::future::try_join_all(files.iter().map(|f| async move {
            let key = format!("{}/{}", table.name, f.path);
            self.storage.create(&key, f.bytes.clone()).await
        }))
        .await?;
        Ok(())
    }
}

/// Splits a batch into one batch per UTC day of `event_time`, in day order.
fn split_by_day(batch: &RecordBatch) -> Result<Vec<(i64, RecordBatch)>> {
    let times = batch
        .column_by_name(schema::EVENT_TIME)
        .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
        .ok_or(Error::Schema(schema::EVENT_TIME))?;
    let days: Vec<i64> = times
        .values()
        .iter()
        .map(|t| t.div_euclid(MICROS_PER_DAY))
        .collect();
    let (Some(&lo), Some(&hi)) = (days.iter().min(), days.iter().max()) else {
        return Ok(Vec::new());
    };
    if lo == hi {
        return Ok(vec![(lo, batch.clone())]);
    }
    let mut distinct = days.clone();
    distinct.sort_unstable();
    distinct.dedup();
    distinct
        .into_iter()
        .map(|day| {
            let mask: BooleanArray = days.iter().map(|d| Some(*d == day)).collect();
            Ok((day, filter_record_batch(batch, &mask)?))
        })
        .collect()
}

/// A file written to a table's directory, to be committed.
pub(crate) struct Upload {
    /// Relative to the table's root.
    pub path: String,
    /// Its partition value.
    pub value: String,
    pub stats: Option<String>,
    pub bytes: bytes::Bytes,
}

impl Upload {
    pub(crate) fn add(&self, table: &table::Table) -> deltalake::kernel::Action {
        table.add(
            self.path.clone(),
            &self.value,
            self.bytes.len() as u64,
            self.stats.clone(),
        )
    }
}

/// How long a flush waits for the partition's previous batch to be committed before it
/// gives up (the partition is then taken over from the log).
const PREDECESSOR_WAIT: Duration = Duration::from_secs(10);

/// Commits a flush's `files` to `table`: after the partition's previous batch, with the
/// batch's last sequence as the partition's transaction version.
async fn commit_flush(
    table: &table::Table,
    files: &[Upload],
    sealed: &SealedBatch,
    fence: &Fence,
) -> Result<()> {
    let partition = sealed.partition;
    let after_seq = match sealed.after_seq {
        Some(seq) => seq,
        None => table.version_of(partition).await?,
    };
    let expect = [Expect {
        partition,
        after_seq,
    }];
    let waiting = std::time::Instant::now();
    loop {
        let adds = files.iter().map(|f| f.add(table)).collect();
        match table
            .commit(
                adds,
                &[(partition, sealed.last_seq)],
                &expect,
                Some((fence, partition)),
                table::append(),
            )
            .await
        {
            Ok(_) => return Ok(()),
            // An earlier attempt of this flush committed it (its answer was lost).
            Err(Error::Unexpected { found, .. }) if found == sealed.last_seq => return Ok(()),
            // The partition's previous batch is still on its way.
            Err(Error::Unexpected { found, .. })
                if found < after_seq && waiting.elapsed() < PREDECESSOR_WAIT =>
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Encodes `rows` as a Parquet file with the lake's `tally.*` metadata.
pub(crate) fn encode(
    props: &WriterProperties,
    meta: &FileMeta,
    rows: &RecordBatch,
) -> Result<bytes::Bytes> {
    let mut writer = ArrowWriter::try_new(Vec::new(), rows.schema(), Some(props.clone()))?;
    writer.write(rows)?;
    for (key, value) in [
        (META_PARTITION, meta.partition.to_string()),
        (META_FIRST_SEQ, meta.first_seq.to_string()),
        (META_LAST_SEQ, meta.last_seq.to_string()),
        (META_FILES, meta.files.to_string()),
    ] {
        writer.append_key_value_metadata(KeyValue::new(key.to_owned(), value));
    }
    if let Some(inputs) = meta.compacted {
        writer.append_key_value_metadata(KeyValue::new(
            META_COMPACTED.to_owned(),
            inputs.to_string(),
        ));
    }
    Ok(writer.into_inner()?.into())
}

/// A lake file's name: `p<partition>-<first_seq>-<last_seq>-<token>.parquet`.
pub(crate) fn file_name(partition: u16, first_seq: u64, last_seq: u64, token: &str) -> String {
    format!("p{partition:03}-{first_seq:012}-{last_seq:012}-{token}.parquet")
}

/// Eight hex digits that make a written file's name its own.
pub(crate) fn file_token() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..8].to_owned()
}

/// `YYYY-MM-DD` of a day since the epoch.
pub(crate) fn date_of_day(day: i64) -> String {
    DateTime::from_timestamp(day * 86_400, 0)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| "invalid".to_owned())
}

/// Delta statistics of a file's rows: the row count and the range of its times and
/// sequences, which engines use to skip files.
pub(crate) fn stats(rows: &RecordBatch) -> Option<String> {
    use arrow::compute::{max, min};
    use arrow::datatypes::UInt64Type;
    let mut lo = serde_json::Map::new();
    let mut hi = serde_json::Map::new();
    let micros = |us: i64| {
        DateTime::from_timestamp_micros(us).map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
    };
    for name in [schema::EVENT_TIME, rollup::FIRST_TIME] {
        if let Some(times) = rows
            .column_by_name(name)
            .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
            && let (Some(a), Some(b)) = (min(times).and_then(micros), max(times).and_then(micros))
        {
            lo.insert(name.to_owned(), a.into());
            hi.insert(name.to_owned(), b.into());
        }
    }
    if let Some(seqs) = rows
        .column_by_name(schema::STREAM_SEQ)
        .and_then(|c| c.as_primitive_opt::<UInt64Type>())
        && let (Some(a), Some(b)) = (min(seqs), max(seqs))
    {
        lo.insert(schema::STREAM_SEQ.to_owned(), a.into());
        hi.insert(schema::STREAM_SEQ.to_owned(), b.into());
    }
    // Every column's null count: a reader learns from the log alone which columns a file
    // has (a file from before a column was added has none for it).
    let nulls: serde_json::Map<String, serde_json::Value> = rows
        .schema()
        .fields()
        .iter()
        .zip(rows.columns())
        .map(|(f, c)| (f.name().clone(), c.null_count().into()))
        .collect();
    let stats = serde_json::json!({
        "numRecords": rows.num_rows(),
        "minValues": lo,
        "maxValues": hi,
        "nullCount": nulls,
    });
    Some(stats.to_string())
}

/// What the lake writer has been through, for the operator.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Failed attempts to write a batch (each is retried).
    pub write_failures: AtomicU64,
    /// Whether the last attempt failed.
    pub failing: AtomicBool,
}

/// The first pause after a failed write, and the longest.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Serves flush requests until the channel closes, encoding up to `concurrency` files at
/// once on blocking threads. Each request's outcome goes back on its own channel.
///
/// A write that fails (a full disk, a lake made read-only) is retried with backoff until
/// it succeeds: its batch stays unacknowledged meanwhile, the worker stops pulling once
/// its batches in flight are all waiting, and JetStream holds the backlog. Once `stop`
/// is cancelled a failing write is tried once more and then reported failed.
pub async fn run_writer(
    lake: Arc<Lake>,
    mut rx: mpsc::Receiver<FlushRequest>,
    concurrency: usize,
    stats: Arc<WriterStats>,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(FlushRequest {
        sealed,
        fence,
        done,
    }) = rx.recv().await
    {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (lake, stats, stop) = (lake.clone(), stats.clone(), stop.clone());
        tasks.spawn_blocking(move || {
            let outcome = write_until_done(&lake, &sealed, &fence, &stats, &stop);
            drop(permit);
            // The worker may have gone away; its messages stay unacknowledged then.
            let _ = done.send(outcome);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

fn write_until_done(
    lake: &Lake,
    sealed: &SealedBatch,
    fence: &Fence,
    stats: &WriterStats,
    stop: &CancellationToken,
) -> std::result::Result<Durable, String> {
    let mut pause = RETRY_FIRST;
    let mut attempts = 0u32;
    let _span = tracing::debug_span!(
        "flush",
        partition = sealed.partition,
        first_seq = sealed.first_seq,
        last_seq = sealed.last_seq,
        rows = sealed.batch.num_rows(),
    )
    .entered();
    loop {
        let started = std::time::Instant::now();
        match lake.write(sealed, fence) {
            Ok(durable) => {
                let took = started.elapsed();
                metrics::histogram!(names::FLUSH_SECONDS).record(took.as_secs_f64());
                if durable.files > 0 {
                    let per_file = metrics::histogram!(names::FLUSH_ROWS);
                    let rows = durable.rows as f64 / durable.files as f64;
                    for _ in 0..durable.files {
                        per_file.record(rows);
                    }
                }
                tracing::debug!(
                    files = durable.files,
                    bytes = durable.bytes,
                    ms = took.as_millis() as u64,
                    "batch durable in the lake"
                );
                if attempts > 0 {
                    stats.failing.store(false, Ordering::Relaxed);
                    tracing::warn!(
                        partition = sealed.partition,
                        attempts,
                        "the lake is writable again"
                    );
                }
                return Ok(durable);
            }
            // Another worker may own the partition now, or committed past this batch:
            // retrying cannot help; the partition is taken over from the log.
            Err(e @ (Error::Fenced(_) | Error::Unexpected { .. })) => return Err(e.to_string()),
            Err(e) => {
                attempts += 1;
                stats.write_failures.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(names::LAKE_WRITE_FAILURES).increment(1);
                stats.failing.store(true, Ordering::Relaxed);
                if attempts == 1 || attempts.is_power_of_two() {
                    tracing::error!(partition = sealed.partition, first_seq = sealed.first_seq,
                        last_seq = sealed.last_seq, attempts, error = %e,
                        "lake write failed; retrying, nothing is acknowledged meanwhile");
                }
                if stop.is_cancelled() {
                    return Err(e.to_string());
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(RETRY_MAX);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use arrow::array::{
        Array, Float64Array, StringArray, TimestampMicrosecondArray, UInt8Array, UInt16Array,
        UInt64Array,
    };
    use std::fs::{self, File};
    use std::sync::Arc as StdArc;
    use tally_core::Decision;

    /// Rows of customer `acme` at these times, with stream sequences 1, 2, ….
    pub(crate) fn batch(times: &[i64]) -> RecordBatch {
        let n = times.len();
        let s = |v: &str| StdArc::new(StringArray::from(vec![v; n])) as StdArc<dyn Array>;
        let ts = |v: Vec<i64>| {
            StdArc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
                as StdArc<dyn Array>
        };
        RecordBatch::try_new(
            schema::lake_schema(),
            vec![
                StdArc::new(StringArray::from(
                    (0..n).map(|i| format!("e{i}")).collect::<Vec<_>>(),
                )),
                s("acme"),
                s("calls"),
                StdArc::new(Float64Array::from(vec![1.0; n])),
                ts(times.to_vec()),
                StdArc::new(StringArray::from(vec![None::<&str>; n])),
                StdArc::new(StringArray::from(vec![None::<&str>; n])),
                s("src"),
                s("type"),
                StdArc::new(StringArray::from(vec![None::<&str>; n])),
                s("accepted"),
                ts(vec![0; n]),
                StdArc::new(UInt64Array::from((1..=n as u64).collect::<Vec<_>>())),
                StdArc::new(UInt16Array::from(vec![3; n])),
                s("pro"),
                StdArc::new(UInt8Array::from(vec![Decision::Accepted.code(); n])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn one_file_per_day_named_by_sequences() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let day = MICROS_PER_DAY;
        // 2026-11-01 is day 20758 since the epoch.
        let d0 = 20_758 * day;
        let sealed = SealedBatch {
            partition: 3,
            first_seq: 10,
            last_seq: 12,
            after_seq: None,
            batch: batch(&[d0 + 5, d0 + day + 1, d0 + 7]),
        };
        let durable = lake.write(&sealed, &Fence::open()).unwrap();
        assert_eq!(
            durable,
            Durable {
                rows: 3,
                files: 2,
                bytes: durable.bytes
            }
        );
        let files = lake.partition_files(3).unwrap();
        let names: Vec<(&str, u64, u64)> = files
            .iter()
            .map(|f| (f.file.value.as_str(), f.first_seq, f.last_seq))
            .collect();
        assert_eq!(names, [("2026-11-01", 10, 12), ("2026-11-02", 10, 12)]);
        let (a, b) = (
            &dir.path().join(&files[0].key),
            &dir.path().join(&files[1].key),
        );
        assert!(a.starts_with(dir.path().join("events/date=2026-11-01")));
        assert!(b.starts_with(dir.path().join("events/date=2026-11-02")));
        assert!(a.exists() && b.exists());
        let reader =
            parquet::file::reader::SerializedFileReader::new(File::open(a).unwrap()).unwrap();
        use parquet::file::reader::FileReader;
        let meta = reader.metadata().file_metadata();
        assert_eq!(meta.num_rows(), 2);
        let kv: Vec<_> = meta
            .key_value_metadata()
            .unwrap()
            .iter()
            .filter(|k| k.key.starts_with("tally."))
            .map(|k| (k.key.clone(), k.value.clone().unwrap()))
            .collect();
        assert!(kv.contains(&(META_FIRST_SEQ.into(), "10".into())));
        assert!(kv.contains(&(META_LAST_SEQ.into(), "12".into())));
        assert!(kv.contains(&(META_PARTITION.into(), "3".into())));
        // No temporary file is left behind.
        let leftovers: Vec<_> = fs::read_dir(a.parent().unwrap())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".tmp")
            })
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn an_empty_batch_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let sealed = SealedBatch {
            partition: 0,
            first_seq: 1,
            last_seq: 1,
            after_seq: None,
            batch: RecordBatch::new_empty(schema::lake_schema()),
        };
        assert_eq!(
            lake.write(&sealed, &Fence::open()).unwrap(),
            Durable::default()
        );
        assert!(!dir.path().join(EVENTS_TABLE).exists());
        assert!(!dir.path().join(ROLLUPS_TABLE).exists());
    }

    #[test]
    fn an_unwritable_lake_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("events");
        fs::write(&blocker, b"a file where a directory should be").unwrap();
        let lake = Lake::new(dir.path());
        let sealed = SealedBatch {
            partition: 0,
            first_seq: 1,
            last_seq: 1,
            after_seq: None,
            batch: batch(&[0]),
        };
        assert!(matches!(
            lake.write(&sealed, &Fence::open()),
            Err(Error::Storage(_) | Error::Table(_))
        ));
    }

    #[test]
    fn a_closed_fence_makes_nothing_visible() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let sealed = SealedBatch {
            partition: 4,
            first_seq: 1,
            last_seq: 2,
            after_seq: None,
            batch: batch(&[0, 1]),
        };
        let fence = Fence::open();
        fence.revoke();
        assert!(matches!(lake.write(&sealed, &fence), Err(Error::Fenced(4))));
        assert!(lake.partition_files(4).unwrap().is_empty());
        assert_eq!(lake.version_of(4).unwrap(), 0);
        // What it uploaded goes once older than the retention.
        let retain = Duration::from_secs(60);
        let later = std::time::SystemTime::now() + retain * 2;
        assert_eq!(lake.vacuum(retain, later).unwrap(), 2);
        let left: Vec<_> = walk(dir.path())
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// A Parquet file's rows and its `tally.*` metadata.
    fn read_file(path: &Path) -> (RecordBatch, Vec<(String, String)>) {
        let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            File::open(path).unwrap(),
        )
        .unwrap();
        let mut kv: Vec<_> = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .unwrap()
            .iter()
            .filter(|k| k.key.starts_with("tally."))
            .map(|k| (k.key.clone(), k.value.clone().unwrap()))
            .collect();
        kv.sort();
        let schema = builder.schema().clone();
        let batches: Vec<_> = builder.build().unwrap().map(|b| b.unwrap()).collect();
        (
            arrow::compute::concat_batches(&schema, &batches).unwrap(),
            kv,
        )
    }

    #[test]
    fn each_events_file_has_a_rollup_of_the_same_name() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let d0 = 20_758 * MICROS_PER_DAY;
        let hour = 3_600_000_000;
        let sealed = SealedBatch {
            partition: 3,
            first_seq: 10,
            last_seq: 14,
            after_seq: None,
            batch: batch(&[d0 + 5, d0 + MICROS_PER_DAY + 1, d0 + 7, d0 + hour, d0 + 8]),
        };
        let durable = lake.write(&sealed, &Fence::open()).unwrap();
        // The rollups are not counted: the lake holds five rows in two files.
        assert_eq!((durable.rows, durable.files), (5, 2));
        let events = lake.partition_files(3).unwrap();
        let rollups = lake.partition_rollup_files(3).unwrap();
        let relative = |files: &[PartitionFile]| -> Vec<PathBuf> {
            files.iter().map(|f| PathBuf::from(&f.file.path)).collect()
        };
        let names = relative(&rollups);
        assert_eq!(names, relative(&events));
        let dates: Vec<_> = names
            .iter()
            .map(|n| n.parent().unwrap().to_owned())
            .collect();
        assert_eq!(
            dates,
            [
                PathBuf::from("date=2026-11-01"),
                PathBuf::from("date=2026-11-02")
            ]
        );
        // Each rollup sums its own day's rows and carries its events file's metadata.
        let mut per_hour: Vec<u64> = Vec::new();
        for (e, r) in events.iter().zip(&rollups) {
            let (rows, events_kv) = read_file(&dir.path().join(&e.key));
            let (summary, rollup_kv) = read_file(&dir.path().join(&r.key));
            assert_eq!(summary.schema().fields(), rollup_schema().fields());
            assert_eq!(rollup_kv, events_kv);
            assert!(rollup_kv.contains(&(META_FILES.into(), "2".into())));
            assert_eq!(summary.columns(), rollup(&rows).unwrap().columns());
            let counts = summary.column_by_name(rollup::EVENTS).unwrap();
            per_hour.extend(
                counts
                    .as_primitive::<arrow::datatypes::UInt64Type>()
                    .values(),
            );
        }
        // 2026-11-01 00:00 (three rows), 01:00 (one); 2026-11-02 00:00 (one).
        assert_eq!(per_hour, [3, 1, 1]);
    }

    #[test]
    fn no_events_file_is_visible_before_its_rollup() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(ROLLUPS_TABLE), b"not a directory").unwrap();
        let lake = Lake::new(dir.path());
        let sealed = SealedBatch {
            partition: 1,
            first_seq: 1,
            last_seq: 1,
            after_seq: None,
            batch: batch(&[0]),
        };
        assert!(matches!(
            lake.write(&sealed, &Fence::open()),
            Err(Error::Storage(_) | Error::Table(_))
        ));
        assert!(lake.partition_files(1).unwrap().is_empty());
    }

    #[test]
    fn a_closed_fence_writes_no_rollup() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let sealed = SealedBatch {
            partition: 4,
            first_seq: 1,
            last_seq: 2,
            after_seq: None,
            batch: batch(&[0, MICROS_PER_DAY]),
        };
        let fence = Fence::open();
        fence.revoke();
        assert!(matches!(lake.write(&sealed, &fence), Err(Error::Fenced(4))));
        assert!(lake.partition_rollup_files(4).unwrap().is_empty());
        assert!(lake.partition_files(4).unwrap().is_empty());
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
        files
    }
}
