//! Compaction: a partition's small files of one date merged into large ones, with no
//! query ever seeing a row twice or missing one.
//!
//! **Which files are part of the lake**: those of the tables' snapshots. A compacted file
//! takes the whole sequence range of the files it merged (`p<partition>-<first>-<last>`).
//! Monthly rollups are files beside the tables, where a file whose range lies inside
//! another's of the same partition and directory is *superseded* ([`visible`]).
//!
//! **Making it visible.** A merge is one commit of the events table that removes its inputs
//! and adds the merged file, then the same for their rollups: a reader sees the inputs or
//! the merged file, never both and never neither. [`Lake::vacuum`] deletes the inputs once
//! removed longer than [`CompactOptions::retain`] ago, so a query planned from an older
//! snapshot still finds them; a removal is dated by the clock compaction is given.
//!
//! **What may be merged.** Only sequences at or below the partition's *settled* sequence
//! ([`Lake::settled_seq`]: its newest checkpoint's). Every sealed batch up to a checkpoint
//! is durable, and a take-over skips every message at or below the checkpoint it restores,
//! so nothing is ever written again at or below that sequence: a compaction never races
//! ingest, and every batch it merges is complete. (A take-over that falls back to an older
//! checkpoint reads the compacted files past it like any other, see [`Lake::tail`].) A
//! compaction's commit removes its inputs and lands only while they are all still in the
//! table, so of two compactions that merge overlapping sets one is refused; on local disk
//! one compaction runs at a time per lake ([`Lake::lock_compaction`]), so none is wasted.
//!
//! **When.** A date closed for [`CompactOptions::closed_after`] is merged whole, into files
//! of at most [`CompactOptions::target_rows`] rows. On a date still open, only runs of at
//! least [`CompactOptions::open_min_files`] small files are merged, so a busy day's files do
//! not pile up and a large file is not rewritten again and again while its date is open.
//! A compacted file's rows are its inputs' rows grouped by customer, each customer's in
//! stream order, and its rollup is computed from them as a sealed batch's is.

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arrow::array::AsArray;
use arrow::array::{ArrayRef, RecordBatch, new_null_array};
use arrow::compute::concat_batches;
use chrono::NaiveDate;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tally_core::Fence;
use tally_core::schema::{self, lake_schema};

use crate::table::{TableFile, block_on, optimize};
use crate::{
    Error, FileMeta, Lake, PartitionFile, ROLLUPS_TABLE, Result, Upload, encode, file_name,
    file_token, io_err, rollup, stats,
};

/// A lake file's partition and sequence range, from its name
/// (`p<partition>-<first_seq>-<last_seq>.parquet`).
pub fn parse_name(name: &str) -> Option<(u16, u64, u64)> {
    let rest = name.strip_prefix('p')?.strip_suffix(".parquet")?;
    // `p<partition>-<first>-<last>`, and since the tables, `-<token>`.
    let mut parts = rest.splitn(4, '-');
    let partition = parts.next()?.parse().ok()?;
    let first = parts.next()?.parse().ok()?;
    let last = parts.next()?.parse().ok()?;
    Some((partition, first, last))
}

/// Which of a table's files are part of the lake, given each as its directory (any key
/// naming it) and its partition and sequence range: a file whose range lies inside another
/// file's range of the same partition and directory is superseded by it.
pub fn visible<K: Ord>(files: &[(K, u16, u64, u64)]) -> Vec<bool> {
    let mut order: Vec<usize> = (0..files.len()).collect();
    // By directory and partition, then first sequence up and last sequence down: a file is
    // inside another exactly when an earlier file of its group reaches as far as it does.
    order.sort_by(|&a, &b| {
        let (x, y) = (&files[a], &files[b]);
        (&x.0, x.1, x.2).cmp(&(&y.0, y.1, y.2)).then(y.3.cmp(&x.3))
    });
    let mut shown = vec![true; files.len()];
    let mut reach: Option<(usize, u64)> = None;
    for i in order {
        let (_, _, _, last) = files[i];
        match reach {
            Some((group, max)) if files[group].0 == files[i].0 && files[group].1 == files[i].1 => {
                if last <= max {
                    shown[i] = false;
                } else {
                    reach = Some((group, last));
                }
            }
            _ => reach = Some((i, last)),
        }
    }
    shown
}

/// What a compaction run may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactOptions {
    /// Rows a compacted file holds at most. Default: 1,000,000.
    pub target_rows: u64,
    /// How long after its end a date counts as closed and is merged whole. Default: 1 h.
    pub closed_after: Duration,
    /// On a date still open, the fewest small files (under an eighth of `target_rows`)
    /// merged at once. Default: 16.
    pub open_min_files: usize,
    /// How long the files a compacted file supersedes stay on disk after it appeared, for
    /// queries listed before it. Default: 15 min.
    pub retain: Duration,
}

impl Default for CompactOptions {
    fn default() -> Self {
        Self {
            target_rows: 1_000_000,
            closed_after: Duration::from_secs(3600),
            open_min_files: 16,
            retain: Duration::from_secs(15 * 60),
        }
    }
}

/// What a compaction run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Events files merged.
    pub merged: usize,
    /// Compacted files written.
    pub written: usize,
    /// Rows in the compacted files.
    pub rows: u64,
    /// Monthly rollups written (see [`monthly`](mod@crate::monthly)).
    pub monthly: usize,
    /// Rollups replaced by a reconciliation.
    pub removed: usize,
    /// Meter rollups written for files that lacked them.
    pub meter_rollups: usize,
}

impl std::ops::AddAssign for Compacted {
    fn add_assign(&mut self, o: Compacted) {
        self.merged += o.merged;
        self.written += o.written;
        self.rows += o.rows;
        self.monthly += o.monthly;
        self.removed += o.removed;
        self.meter_rollups += o.meter_rollups;
    }
}

/// The lake's compaction lock, held while it lives.
#[derive(Debug)]
pub struct CompactionLock {
    _file: Option<File>,
}

/// An events file the run may merge.
struct Candidate {
    file: PartitionFile,
    rows: u64,
}

impl Lake {
    /// Takes the lake's compaction lock (a lock file in the lake's directory, released
    /// when the returned guard drops or the process ends), or `None` while another holds
    /// it. A lake on object storage has no lock: its commits refuse the loser of a race.
    pub fn lock_compaction(&self) -> Result<Option<CompactionLock>> {
        let Some(dir) = self.local_dir() else {
            return Ok(Some(CompactionLock { _file: None }));
        };
        let path = dir.join(".compact.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(CompactionLock { _file: Some(file) })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
        }
    }

    /// The highest sequence of a partition at and below which nothing is written any more:
    /// that of its newest checkpoint file (written only once every batch up to it was
    /// durable, so its name says so even if its content were unreadable). `None` without
    /// checkpoints.
    pub fn settled_seq(&self, partition: u16) -> Result<Option<u64>> {
        let keys = block_on(self.checkpoint_keys(partition))?;
        Ok(keys
            .iter()
            .filter_map(|k| k.rsplit('/').next()?.strip_suffix(".ckpt")?.parse().ok())
            .max())
    }

    /// The partitions the events table has files of.
    pub fn partitions(&self) -> Result<BTreeSet<u16>> {
        Ok(block_on(self.tables.events.files())?
            .iter()
            .filter_map(|f| parse_name(f.path.rsplit('/').next()?))
            .map(|(p, _, _)| p)
            .collect())
    }

    /// Compacts a partition's files with sequences up to `up_to_seq` (see the module's
    /// rules), then removes what earlier runs superseded more than `retain` ago and the
    /// rollups an interrupted run left without their events file. Hold the compaction lock
    /// and pass a settled sequence: a file written meanwhile below it would be lost to the
    /// merge.
    pub fn compact(
        &self,
        partition: u16,
        up_to_seq: u64,
        fence: &Fence,
        options: &CompactOptions,
        now: SystemTime,
    ) -> Result<Compacted> {
        let mut done = Compacted::default();
        let files = self.partition_files(partition)?;
        let mut by_date: std::collections::BTreeMap<String, Vec<Candidate>> =
            std::collections::BTreeMap::new();
        for file in files {
            if file.last_seq > up_to_seq {
                continue;
            }
            let rows = self.file_rows(&file)?;
            by_date
                .entry(file.file.value.clone())
                .or_default()
                .push(Candidate { file, rows });
        }
        for (date, candidates) in by_date {
            let closed = date_end(&date).is_some_and(|end| {
                now.duration_since(end)
                    .is_ok_and(|d| d >= options.closed_after)
            });
            for run in runs(candidates, closed, options) {
                done += self.merge(partition, &date, &run, fence, now)?;
            }
        }
        done.removed += self.reconcile_rollups(partition, up_to_seq, fence, now)?;
        done.meter_rollups += self.backfill_meter_rollups(partition, up_to_seq, fence, now)?;
        done.monthly +=
            self.compact_months(partition, up_to_seq, fence, options.closed_after, now)?;
        Ok(done)
    }

    /// Merges one run of a date's files into one file: the merged events file replaces
    /// the run's in one commit of the events table, then its rollup replaces theirs in one
    /// commit of the rollups table. A reader sees the run's files or the merged one, never
    /// both and never neither; the replaced files stay until [`Lake::vacuum`] removes them.
    fn merge(
        &self,
        partition: u16,
        date: &str,
        run: &[Candidate],
        fence: &Fence,
        now: SystemTime,
    ) -> Result<Compacted> {
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            return Ok(Compacted::default());
        };
        let mut batches = Vec::new();
        for c in run {
            batches.extend(read_rows(self.fetch(&c.file.key)?)?);
        }
        let rows = by_customer(&concat_batches(&lake_schema(), &batches)?)?;
        let summary = rollup(&rows)?;
        let meta = FileMeta {
            partition,
            first_seq: first.file.first_seq,
            last_seq: last.file.last_seq,
            files: 1,
            compacted: Some(run.len()),
        };
        let path = format!(
            "{}={date}/{}",
            schema::DATE,
            file_name(partition, meta.first_seq, meta.last_seq, &file_token())
        );
        let metered = self.meter_uploads(&self.live_meters(), &path, date, &meta, &rows)?;
        let events = Upload {
            path: path.clone(),
            value: date.to_owned(),
            stats: stats(&rows),
            bytes: encode(&self.props, &meta, &rows)?,
        };
        let rollups = Upload {
            path,
            value: date.to_owned(),
            stats: stats(&summary),
            bytes: encode(&self.props, &meta, &summary)?,
        };
        let inputs: Vec<&PartitionFile> = run.iter().map(|c| &c.file).collect();
        let (events_table, rollups_table) = (&self.tables.events, &self.tables.rollups);
        let replaced_rollups: Vec<TableFile> = self
            .partition_rollup_files(partition)?
            .into_iter()
            .filter(|r| inputs.iter().any(|i| i.file.path == r.file.path))
            .map(|r| r.file)
            .collect();
        let replaced_meters = self.meter_rollups_of(partition, &inputs)?;
        block_on(async {
            for (table, upload) in [(events_table, &events), (rollups_table, &rollups)]
                .into_iter()
                .chain(metered.iter().map(|m| (&self.tables.meter_rollups, m)))
            {
                let key = format!("{}/{}", table.name, upload.path);
                self.storage.create(&key, upload.bytes.clone()).await?;
            }
            let mut actions: Vec<_> = inputs
                .iter()
                .map(|f| events_table.remove(&f.file, now))
                .collect();
            actions.push(events.add(events_table));
            events_table
                .commit(actions, &[], &[], Some((fence, partition)), optimize())
                .await?;
            let mut actions: Vec<_> = replaced_rollups
                .iter()
                .map(|f| rollups_table.remove(f, now))
                .collect();
            actions.push(rollups.add(rollups_table));
            rollups_table
                .commit(actions, &[], &[], Some((fence, partition)), optimize())
                .await?;
            self.commit_meter_rollups(&metered, &replaced_meters, now, partition, fence)
                .await
        })?;
        tracing::debug!(
            partition,
            date,
            files = run.len(),
            rows = rows.num_rows(),
            "compacted"
        );
        Ok(Compacted {
            merged: run.len(),
            written: 1,
            rows: rows.num_rows() as u64,
            ..Compacted::default()
        })
    }

    /// The meter rollups of the partition's files among `events`, in the meter rollups
    /// table's newest snapshot.
    fn meter_rollups_of(
        &self,
        partition: u16,
        events: &[&PartitionFile],
    ) -> Result<Vec<TableFile>> {
        let paths: HashSet<&str> = events.iter().map(|e| e.file.path.as_str()).collect();
        Ok(self
            .snapshot_files(&self.tables.meter_rollups, Some(partition))?
            .into_iter()
            .filter(|m| {
                crate::meter_rollup::events_path(&m.file.path)
                    .is_some_and(|e| paths.contains(e.as_str()))
            })
            .map(|m| m.file)
            .collect())
    }

    /// The paths of the meter rollups in the table's newest snapshot, of one partition or
    /// all.
    pub(crate) fn meter_rollup_paths(&self, partition: Option<u16>) -> Result<HashSet<String>> {
        Ok(self
            .snapshot_files(&self.tables.meter_rollups, partition)?
            .into_iter()
            .map(|m| m.file.path)
            .collect())
    }

    /// Writes the rollups of the live meters that the partition's events files up to
    /// `up_to_seq` lack (a meter defined after them, or a flush that crashed between its
    /// commits), so that meter queries read rollups rather than events. Returns the
    /// rollup files written.
    fn backfill_meter_rollups(
        &self,
        partition: u16,
        up_to_seq: u64,
        fence: &Fence,
        now: SystemTime,
    ) -> Result<usize> {
        let meters = self.live_meters();
        if meters.is_empty() {
            return Ok(0);
        }
        let have = self.meter_rollup_paths(Some(partition))?;
        let mut written = 0;
        for e in self.partition_files(partition)? {
            if e.last_seq > up_to_seq {
                continue;
            }
            let missing: Vec<crate::LiveMeter> = meters
                .iter()
                .filter(|m| {
                    !have.contains(&crate::meter_rollup::rollup_path(&e.file.path, m.key()))
                })
                .cloned()
                .collect();
            if missing.is_empty() {
                continue;
            }
            let rows = concat_batches(&lake_schema(), &read_rows(self.fetch(&e.key)?)?)?;
            let meta = FileMeta {
                partition,
                first_seq: e.first_seq,
                last_seq: e.last_seq,
                files: 1,
                compacted: None,
            };
            let uploads =
                self.meter_uploads(&missing, &e.file.path, &e.file.value, &meta, &rows)?;
            block_on(async {
                for upload in &uploads {
                    let key = format!("{}/{}", self.tables.meter_rollups.name, upload.path);
                    self.storage.create(&key, upload.bytes.clone()).await?;
                }
                self.commit_meter_rollups(&uploads, &[], now, partition, fence)
                    .await
            })?;
            written += uploads.len();
        }
        Ok(written)
    }

    /// Makes the partition's rollups up to `up_to_seq` match its events files: each events
    /// file without a rollup of its own path gets one, computed from it, replacing the
    /// rollups inside its range (a compaction interrupted between its two commits).
    /// Returns the rollup files replaced.
    fn reconcile_rollups(
        &self,
        partition: u16,
        up_to_seq: u64,
        fence: &Fence,
        now: SystemTime,
    ) -> Result<usize> {
        let rollups = self.partition_rollup_files(partition)?;
        let mut replaced = 0;
        for e in self.partition_files(partition)? {
            if e.last_seq > up_to_seq || rollups.iter().any(|r| r.file.path == e.file.path) {
                continue;
            }
            let inside: Vec<&PartitionFile> = rollups
                .iter()
                .filter(|r| {
                    r.file.value == e.file.value
                        && e.first_seq <= r.first_seq
                        && r.last_seq <= e.last_seq
                })
                .collect();
            let rows = concat_batches(&lake_schema(), &read_rows(self.fetch(&e.key)?)?)?;
            let summary = rollup(&rows)?;
            let meta = FileMeta {
                partition,
                first_seq: e.first_seq,
                last_seq: e.last_seq,
                files: 1,
                compacted: Some(inside.len()),
            };
            let upload = Upload {
                path: e.file.path.clone(),
                value: e.file.value.clone(),
                stats: stats(&summary),
                bytes: encode(&self.props, &meta, &summary)?,
            };
            let table = &self.tables.rollups;
            block_on(async {
                let key = format!("{}/{}", table.name, upload.path);
                self.storage.put(&key, upload.bytes.clone()).await?;
                let mut actions: Vec<_> =
                    inside.iter().map(|r| table.remove(&r.file, now)).collect();
                actions.push(upload.add(table));
                table
                    .commit(actions, &[], &[], Some((fence, partition)), optimize())
                    .await
            })?;
            replaced += inside.len();
        }
        Ok(replaced)
    }

    /// Removes from the tables' directories every file no snapshot
    /// needs any more: one removed from the table more than `retain` ago (a query planned
    /// before still reads it meanwhile), and one never committed (a failed flush's) older
    /// than `retain`. Returns the files removed.
    pub fn vacuum(&self, retain: Duration, now: SystemTime) -> Result<usize> {
        let retain_ms = i64::try_from(retain.as_millis()).unwrap_or(i64::MAX);
        let millis = |t: SystemTime| match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
        };
        let now_ms = millis(now);
        // Removals are dated by the compaction's clock, which is `now`'s; uploads by the
        // store's. How far this host's clock is from the store's turns one into the other.
        let skew_ms = millis(SystemTime::now()) - millis(block_on(self.storage.clock())?);
        let events: HashSet<String> = block_on(self.tables.events.files())?
            .into_iter()
            .map(|f| f.path)
            .collect();
        let mut removed = 0;
        let tables = &self.tables;
        for table in [
            &tables.events,
            &tables.rollups,
            &tables.monthly,
            &tables.billing,
            &tables.meter_rollups,
            &tables.meter_monthly,
        ] {
            let (live, tombstones) = block_on(table.files_and_tombstones())?;
            let prefix = format!("{}/", table.name);
            for (relative, object) in block_on(self.storage.list(table.name))? {
                let Some(path) = relative.strip_prefix(&prefix) else {
                    continue;
                };
                if path.starts_with("_delta_log/") || live.contains(path) {
                    continue;
                }
                // The rollup of a committed events file whose own commit is yet to come.
                if table.name == ROLLUPS_TABLE && events.contains(path) {
                    continue;
                }
                if table.name == crate::METER_ROLLUPS_TABLE
                    && crate::meter_rollup::events_path(path).is_some_and(|e| events.contains(&e))
                {
                    continue;
                }
                let since = tombstones
                    .get(path)
                    .copied()
                    .unwrap_or_else(|| object.last_modified.timestamp_millis() + skew_ms);
                if now_ms.saturating_sub(since) < retain_ms {
                    continue;
                }
                block_on(self.storage.delete(&relative))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Groups a date's candidates (by first sequence) into the runs to merge.
fn runs(candidates: Vec<Candidate>, closed: bool, options: &CompactOptions) -> Vec<Vec<Candidate>> {
    let small = options.target_rows / 8;
    let min_files = if closed {
        2
    } else {
        options.open_min_files.max(2)
    };
    let mut runs = Vec::new();
    let mut run: Vec<Candidate> = Vec::new();
    let mut rows = 0;
    let mut flush = |run: &mut Vec<Candidate>, rows: &mut u64| {
        if run.len() >= min_files {
            runs.push(std::mem::take(run));
        } else {
            run.clear();
        }
        *rows = 0;
    };
    for c in candidates {
        let mergeable = if closed {
            c.rows < options.target_rows
        } else {
            c.rows < small
        };
        if !mergeable {
            flush(&mut run, &mut rows);
            continue;
        }
        if rows + c.rows > options.target_rows {
            flush(&mut run, &mut rows);
        }
        rows += c.rows;
        run.push(c);
    }
    flush(&mut run, &mut rows);
    runs
}

/// The rows grouped by customer, each customer's rows still in stream order (a stable
/// sort): a query grouping by customer touches one customer's groups at a time, and the
/// customer column compresses to runs. A take-over sorts by sequence again (stably, so a
/// message's events keep their order).
fn by_customer(rows: &RecordBatch) -> Result<RecordBatch> {
    let customer = rows
        .column_by_name(schema::CUSTOMER)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or(Error::Schema(schema::CUSTOMER))?;
    let mut order: Vec<u32> = (0..rows.num_rows() as u32).collect();
    order.sort_by_key(|&i| customer.value(i as usize));
    Ok(arrow::compute::take_record_batch(
        rows,
        &arrow::array::UInt32Array::from(order),
    )?)
}

/// The codes of a batch's `decision` names (null for a name no decision has).
fn decision_codes(rows: &RecordBatch) -> Result<ArrayRef> {
    let names = rows
        .column_by_name(schema::DECISION)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or(Error::Schema(schema::DECISION))?;
    Ok(Arc::new(schema::decision_codes(names)))
}

/// The end of a `YYYY-MM-DD` date.
fn date_end(date: &str) -> Option<SystemTime> {
    let date: NaiveDate = date.parse().ok()?;
    let end = date.succ_opt()?.and_hms_opt(0, 0, 0)?.and_utc().timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(end).ok()?))
}

impl Lake {
    /// The rows of the Parquet file at `key` (relative to the lake), from its footer.
    pub fn footer_rows(&self, key: &str) -> Result<u64> {
        let footer = block_on(self.storage.footer(key))?;
        Ok(u64::try_from(footer.file_metadata().num_rows()).unwrap_or(0))
    }

    /// Whether every file of `files` (of the table `table`) has a column named `name`:
    /// from the log's statistics where they count its nulls, else from the file's footer,
    /// read 16 at a time (a lake's files are many and each footer is a request to the
    /// store).
    pub async fn all_have_column(
        &self,
        table: &str,
        files: &[TableFile],
        name: &str,
    ) -> Result<bool> {
        use futures::{StreamExt as _, TryStreamExt as _};
        let unknown: Vec<String> = files
            .iter()
            .filter(|f| !f.columns.iter().any(|c| c == name))
            .map(|f| format!("{table}/{}", f.path))
            .collect();
        // Owned futures: a stream that borrows is not `Send` for every lifetime, which
        // callers spawning the query need.
        let mut footers = futures::stream::iter(unknown)
            .map(|key| {
                let storage = self.storage.clone();
                async move { storage.footer(&key).await }
            })
            .buffer_unordered(16);
        while let Some(footer) = footers.try_next().await? {
            let schema = footer.file_metadata().schema_descr();
            if !schema.columns().iter().any(|c| c.name() == name) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// A file's rows in the lake's schema: a column the file predates reads as null (such as
/// `plan`), or as what the file's other columns say (`decision_code`, from `decision`).
pub(crate) fn read_rows(file: bytes::Bytes) -> Result<Vec<RecordBatch>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    let target = lake_schema();
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch?;
        let columns = target
            .fields()
            .iter()
            .map(|f| match batch.column_by_name(f.name()) {
                Some(c) => Ok(c.clone()),
                None if f.name() == schema::DECISION_CODE => decision_codes(&batch),
                None if f.is_nullable() => Ok(new_null_array(f.data_type(), batch.num_rows())),
                None => Err(Error::MissingColumn(f.name().clone())),
            })
            .collect::<Result<Vec<_>>>()?;
        out.push(RecordBatch::try_new(target.clone(), columns)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MICROS_PER_DAY;
    use crate::tail::seqs;
    use arrow::array::UInt64Array;
    use std::sync::Arc;
    use tally_core::SealedBatch;
    use tally_core::schema;

    fn sealed(first_seq: u64, last_seq: u64, times: &[i64]) -> SealedBatch {
        let batch = crate::tests::batch(times);
        let i = batch.schema().index_of(schema::STREAM_SEQ).unwrap();
        let mut columns = batch.columns().to_vec();
        let seqs: Vec<u64> = (first_seq..=last_seq).take(times.len()).collect();
        columns[i] = Arc::new(UInt64Array::from(seqs));
        SealedBatch {
            partition: 2,
            first_seq,
            last_seq,
            after_seq: None,
            batch: RecordBatch::try_new(batch.schema(), columns).unwrap(),
        }
    }

    fn seqs_in(lake: &Lake) -> Vec<u64> {
        let mut seqs: Vec<u64> = lake
            .partition_files(2)
            .unwrap()
            .iter()
            .flat_map(|f| read_rows(lake.fetch(&f.key).unwrap()).unwrap())
            .flat_map(|b| seqs(&b).unwrap())
            .collect();
        seqs.sort_unstable();
        seqs
    }

    #[test]
    fn names_parse_and_nested_ranges_are_superseded() {
        assert_eq!(
            parse_name("p003-000000000010-000000000012.parquet"),
            Some((3, 10, 12))
        );
        for bad in [
            "x.parquet",
            "p003-10.parquet",
            "p003-1-2.csv",
            ".p003-1-2.parquet.tmp",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
        let files = [
            ("d1", 1, 1, 10),
            ("d1", 1, 1, 4),  // inside 1–10
            ("d1", 1, 5, 10), // inside 1–10
            ("d1", 1, 11, 12),
            ("d1", 2, 3, 4),      // another partition
            ("d2", 1, 3, 4),      // another directory
            ("d1", 1, 1, 10_000), // holds every file of partition 1 in d1
        ];
        assert_eq!(
            visible(&files),
            [false, false, false, false, true, true, true]
        );
        assert_eq!(visible(&files[..6]), [true, false, false, true, true, true]);
    }

    #[test]
    fn a_closed_date_is_merged_whole_and_its_inputs_go_after_retain() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let day = 20_758 * MICROS_PER_DAY; // 2026-11-01
        // Four batches; the second spans midnight, the last is past the settled sequence.
        lake.write(&sealed(1, 3, &[day, day + 1, day + 2]), &Fence::open())
            .unwrap();
        lake.write(
            &sealed(4, 5, &[day + 3, day + MICROS_PER_DAY]),
            &Fence::open(),
        )
        .unwrap();
        lake.write(&sealed(6, 7, &[day + 4, day + 5]), &Fence::open())
            .unwrap();
        lake.write(&sealed(8, 9, &[day + 6, day + 7]), &Fence::open())
            .unwrap();
        let before = seqs_in(&lake);
        assert_eq!(before, (1..=9).collect::<Vec<_>>());

        let options = CompactOptions::default();
        let now = SystemTime::now();
        let done = lake.compact(2, 7, &Fence::open(), &options, now).unwrap();
        assert_eq!((done.merged, done.written, done.rows), (3, 1, 6));
        // The compacted file supersedes its inputs, which stay on disk for now.
        assert_eq!(seqs_in(&lake), before);
        let names: Vec<_> = lake
            .partition_files(2)
            .unwrap()
            .iter()
            .map(|f| (f.first_seq, f.last_seq))
            .collect();
        assert_eq!(names, [(1, 7), (4, 5), (8, 9)], "2026-11-02 keeps its file");
        assert_eq!(lake.rows().unwrap(), 9);
        // The inputs stay on disk for queries planned before; past `retain`, they go.
        assert_eq!(lake.vacuum(options.retain, now).unwrap(), 0);
        let later = now + options.retain + Duration::from_secs(1);
        let done = lake.compact(2, 7, &Fence::open(), &options, later).unwrap();
        assert_eq!(done.merged, 0);
        assert_eq!(lake.vacuum(options.retain, later).unwrap(), 6);
        assert_eq!(seqs_in(&lake), before);

        // A take-over from an older checkpoint reads every row past it once, in stream
        // order, the compacted file's included.
        let tail = lake.tail(2, 2).unwrap();
        let replayed: Vec<u64> = tail.rows.iter().flat_map(|b| seqs(b).unwrap()).collect();
        assert_eq!(replayed, (3..=9).collect::<Vec<_>>());
    }

    #[test]
    fn an_open_date_merges_only_many_small_files() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let now = SystemTime::now();
        let today = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64;
        let options = CompactOptions {
            open_min_files: 4,
            ..CompactOptions::default()
        };
        for i in 0..3 {
            lake.write(&sealed(i + 1, i + 1, &[today]), &Fence::open())
                .unwrap();
        }
        let done = lake.compact(2, 100, &Fence::open(), &options, now).unwrap();
        assert_eq!(done.written, 0, "three files are not yet worth a merge");
        lake.write(&sealed(4, 4, &[today]), &Fence::open()).unwrap();
        let done = lake.compact(2, 100, &Fence::open(), &options, now).unwrap();
        assert_eq!((done.merged, done.written), (4, 1));
        assert_eq!(seqs_in(&lake), [1, 2, 3, 4]);
    }

    #[test]
    fn one_compaction_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let held = lake.lock_compaction().unwrap();
        assert!(held.is_some());
        assert!(lake.lock_compaction().unwrap().is_none());
        drop(held);
        assert!(lake.lock_compaction().unwrap().is_some());
    }
}
