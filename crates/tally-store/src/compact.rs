//! Compaction: a partition's small files of one date merged into large ones, with no
//! query ever seeing a row twice or missing one.
//!
//! **Which files are part of the lake.** Every file's name is its partition and the range of
//! stream sequences it accounts for (`p<partition>-<first_seq>-<last_seq>.parquet`). A
//! compacted file takes the whole range of the files it merged, so a file whose range lies
//! inside another file's range of the same partition and directory is *superseded*: it is
//! not part of the lake, though it stays on disk for a while ([`visible`] decides, and every
//! reader applies it: the query layer's listing, [`Lake::partition_files`], [`Lake::rows`]).
//! Ingest never writes two files of a partition whose ranges overlap, so only compaction
//! makes a range hold another.
//!
//! **Making it visible.** The compacted rollup, then the compacted events file, appear by
//! rename (as a sealed batch's do). Before the second rename a reader sees the inputs; after
//! it, the compacted file and, by the rule above, not the inputs. A listing is a moment of
//! one directory, so it sees one or the other, whole. The inputs are removed by a later run,
//! once the compacted file is older than [`CompactOptions::retain`]: a query planned from an
//! older listing still finds the files it listed. A compacted file's age is read from its
//! modification time, which the run that wrote it sets to its own `now`, so retention runs
//! on the clock compaction is given, never on the wall clock behind it.
//!
//! **What may be merged.** Only sequences at or below the partition's *settled* sequence
//! ([`Lake::settled_seq`]: its newest checkpoint's). Every sealed batch up to a checkpoint
//! is durable, and a take-over skips every message at or below the checkpoint it restores,
//! so nothing is ever written again at or below that sequence: a compaction never races
//! ingest, and every batch it merges is complete. (A take-over that falls back to an older
//! checkpoint reads the compacted files past it like any other, see [`Lake::tail`].) One
//! compaction runs at a time per lake ([`Lake::lock_compaction`]), so two never merge
//! overlapping sets.
//!
//! **When.** A date closed for [`CompactOptions::closed_after`] is merged whole, into files
//! of at most [`CompactOptions::target_rows`] rows. On a date still open, only runs of at
//! least [`CompactOptions::open_min_files`] small files are merged, so a busy day's files do
//! not pile up and a large file is not rewritten again and again while its date is open.
//! A compacted file's rows are its inputs' rows grouped by customer, each customer's in
//! stream order, and its rollup is computed from them as a sealed batch's is.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arrow::array::AsArray;
use arrow::array::{ArrayRef, RecordBatch, new_null_array};
use arrow::compute::concat_batches;
use chrono::NaiveDate;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::reader::{FileReader, SerializedFileReader};
use tally_core::Fence;
use tally_core::schema::{self, lake_schema};

use crate::tail::files_of;
use crate::{Error, FileMeta, Lake, PartitionFile, Result, io_err, rollup, stamp, sync_dir};

/// A lake file's partition and sequence range, from its name
/// (`p<partition>-<first_seq>-<last_seq>.parquet`).
pub fn parse_name(name: &str) -> Option<(u16, u64, u64)> {
    let rest = name.strip_prefix('p')?.strip_suffix(".parquet")?;
    let mut parts = rest.splitn(3, '-');
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

/// The visible ones of a partition's files (see [`visible`]).
pub(crate) fn visible_files(files: Vec<PartitionFile>) -> Vec<PartitionFile> {
    let keys: Vec<_> = files
        .iter()
        .map(|f| {
            (
                f.path.parent().map(Path::to_owned),
                0,
                f.first_seq,
                f.last_seq,
            )
        })
        .collect();
    let shown = visible(&keys);
    files
        .into_iter()
        .zip(shown)
        .filter_map(|(f, s)| s.then_some(f))
        .collect()
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
    /// Superseded files (events, rollups, monthly rollups) and orphaned rollups removed.
    pub removed: usize,
}

impl std::ops::AddAssign for Compacted {
    fn add_assign(&mut self, o: Compacted) {
        self.merged += o.merged;
        self.written += o.written;
        self.rows += o.rows;
        self.monthly += o.monthly;
        self.removed += o.removed;
    }
}

/// The lake's compaction lock, held while it lives.
#[derive(Debug)]
pub struct CompactionLock {
    _file: File,
}

/// An events file the run may merge.
struct Candidate {
    file: PartitionFile,
    rows: u64,
}

impl Lake {
    /// Takes the lake's compaction lock (a lock file under the root, released when the
    /// returned guard drops or the process ends), or `None` while another holds it.
    pub fn lock_compaction(&self) -> Result<Option<CompactionLock>> {
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        let path = self.root.join(".compact.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(CompactionLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
        }
    }

    /// The highest sequence of a partition at and below which nothing is written any more:
    /// that of its newest checkpoint file (written only once every batch up to it was
    /// durable, so its name says so even if its content were unreadable). `None` without
    /// checkpoints.
    pub fn settled_seq(&self, partition: u16) -> Result<Option<u64>> {
        let files = self.checkpoint_files(partition)?;
        Ok(files
            .iter()
            .filter_map(|p| p.file_stem()?.to_str()?.parse().ok())
            .max())
    }

    /// The partitions the lake has events files of.
    pub fn partitions(&self) -> Result<BTreeSet<u16>> {
        let root = self.events_dir();
        let dates = match fs::read_dir(&root) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
            Err(e) => return Err(io_err(&root)(e)),
        };
        let mut partitions = BTreeSet::new();
        for date in dates {
            let dir = date.map_err(io_err(&root))?.path();
            if !dir.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
                let name = entry.map_err(io_err(&dir))?.file_name();
                if let Some((p, _, _)) = name.to_str().and_then(parse_name) {
                    partitions.insert(p);
                }
            }
        }
        Ok(partitions)
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
        let mut by_dir: std::collections::BTreeMap<PathBuf, Vec<Candidate>> =
            std::collections::BTreeMap::new();
        for file in files {
            if file.last_seq > up_to_seq {
                continue;
            }
            let Some(dir) = file.path.parent().map(Path::to_owned) else {
                continue;
            };
            let rows = footer_rows(&file.path)?;
            by_dir
                .entry(dir)
                .or_default()
                .push(Candidate { file, rows });
        }
        for (dir, candidates) in by_dir {
            let closed = date_of(&dir).is_some_and(|end| {
                now.duration_since(end)
                    .is_ok_and(|d| d >= options.closed_after)
            });
            for run in runs(candidates, closed, options) {
                done += self.merge(partition, &dir, &run, fence, now)?;
            }
        }
        done.monthly +=
            self.compact_months(partition, up_to_seq, fence, options.closed_after, now)?;
        done.removed += self.remove_superseded(partition, options.retain, now)?;
        done.removed += self.remove_superseded_months(partition, options.retain, now)?;
        done.removed += self.remove_compaction_orphans(partition, up_to_seq)?;
        Ok(done)
    }

    /// Writes one compacted file (its rollup first) of a run of a date's files.
    fn merge(
        &self,
        partition: u16,
        dir: &Path,
        run: &[Candidate],
        fence: &Fence,
        now: SystemTime,
    ) -> Result<Compacted> {
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            return Ok(Compacted::default());
        };
        let mut batches = Vec::new();
        for c in run {
            batches.extend(read_rows(&c.file.path)?);
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
        let name = format!(
            "p{partition:03}-{:012}-{:012}.parquet",
            meta.first_seq, meta.last_seq
        );
        let date = dir.file_name().ok_or_else(|| Error::Io {
            path: dir.to_owned(),
            source: std::io::Error::other("a lake file outside a date directory"),
        })?;
        self.write_file(
            &self.rollups_dir().join(date),
            &name,
            &meta,
            &summary,
            fence,
        )?;
        self.write_file(dir, &name, &meta, &rows, fence)?;
        stamp(&dir.join(&name), now)?;
        tracing::debug!(partition, dir = %dir.display(), files = run.len(),
            rows = rows.num_rows(), "compacted");
        Ok(Compacted {
            merged: run.len(),
            written: 1,
            rows: rows.num_rows() as u64,
            ..Compacted::default()
        })
    }

    /// Removes each superseded events file (then its rollup) whose superseding file is
    /// older than `retain`.
    fn remove_superseded(
        &self,
        partition: u16,
        retain: Duration,
        now: SystemTime,
    ) -> Result<usize> {
        let all = files_of(&self.events_dir(), partition)?;
        let shown = visible_files(all.clone());
        let mut removed = 0;
        let mut dirs = BTreeSet::new();
        for gone in all.iter().filter(|f| !shown.contains(f)) {
            let Some(by) = shown.iter().find(|v| {
                v.path.parent() == gone.path.parent()
                    && v.first_seq <= gone.first_seq
                    && gone.last_seq <= v.last_seq
            }) else {
                continue;
            };
            let age = fs::metadata(&by.path)
                .and_then(|m| m.modified())
                .map_err(io_err(&by.path))?;
            if now.duration_since(age).unwrap_or_default() < retain {
                continue;
            }
            fs::remove_file(&gone.path).map_err(io_err(&gone.path))?;
            removed += 1;
            dirs.extend(gone.path.parent().map(Path::to_owned));
            let rollup = self.rollup_of(&gone.path);
            match fs::remove_file(&rollup) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&rollup)(e)),
            }
        }
        for dir in dirs {
            sync_dir(&dir)?;
        }
        Ok(removed)
    }

    /// Removes the partition's rollups up to `up_to_seq` whose events file is absent: an
    /// interrupted compaction's (ingest writes nothing there any more).
    fn remove_compaction_orphans(&self, partition: u16, up_to_seq: u64) -> Result<usize> {
        let (rollups, events) = (self.rollups_dir(), self.events_dir());
        let mut removed = 0;
        for f in files_of(&rollups, partition)? {
            let Ok(relative) = f.path.strip_prefix(&rollups) else {
                continue;
            };
            if f.last_seq > up_to_seq || events.join(relative).exists() {
                continue;
            }
            fs::remove_file(&f.path).map_err(io_err(&f.path))?;
            removed += 1;
        }
        Ok(removed)
    }

    /// The rollup file of an events file.
    fn rollup_of(&self, events_file: &Path) -> PathBuf {
        match events_file.strip_prefix(self.events_dir()) {
            Ok(relative) => self.rollups_dir().join(relative),
            Err(_) => events_file.to_owned(),
        }
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

/// The end of the date a `date=YYYY-MM-DD` directory holds.
fn date_of(dir: &Path) -> Option<SystemTime> {
    let name = dir.file_name()?.to_str()?;
    let date: NaiveDate = name.strip_prefix("date=")?.parse().ok()?;
    let end = date.succ_opt()?.and_hms_opt(0, 0, 0)?.and_utc().timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(end).ok()?))
}

/// A Parquet file's rows, from its footer.
pub fn footer_rows(path: &Path) -> Result<u64> {
    let file = File::open(path).map_err(io_err(path))?;
    let reader = SerializedFileReader::new(file)?;
    Ok(u64::try_from(reader.metadata().file_metadata().num_rows()).unwrap_or(0))
}

/// Whether a Parquet file has a column named `name`, from its footer.
pub fn has_column(path: &Path, name: &str) -> Result<bool> {
    let file = File::open(path).map_err(io_err(path))?;
    let reader = SerializedFileReader::new(file)?;
    let schema = reader.metadata().file_metadata().schema_descr();
    Ok(schema.columns().iter().any(|c| c.name() == name))
}

/// A file's rows in the lake's schema: a column the file predates reads as null (such as
/// `plan`), or as what the file's other columns say (`decision_code`, from `decision`).
pub(crate) fn read_rows(path: &Path) -> Result<Vec<RecordBatch>> {
    let file = File::open(path).map_err(io_err(path))?;
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
            batch: RecordBatch::try_new(batch.schema(), columns).unwrap(),
        }
    }

    fn seqs_in(lake: &Lake) -> Vec<u64> {
        let mut seqs: Vec<u64> = lake
            .partition_files(2)
            .unwrap()
            .iter()
            .flat_map(|f| read_rows(&f.path).unwrap())
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
        assert_eq!(files_of(&lake.events_dir(), 2).unwrap().len(), 6);
        assert_eq!(lake.rows().unwrap(), 9);

        // Nothing more to merge; past `retain`, the inputs and their rollups go.
        let later = now + options.retain + Duration::from_secs(1);
        let done = lake.compact(2, 7, &Fence::open(), &options, later).unwrap();
        assert_eq!((done.merged, done.removed), (0, 6));
        assert_eq!(files_of(&lake.events_dir(), 2).unwrap().len(), 3);
        assert_eq!(files_of(&lake.rollups_dir(), 2).unwrap().len(), 3);
        assert_eq!(seqs_in(&lake), before);

        // A take-over from an older checkpoint reads every row past it once, in stream
        // order, the compacted file's included.
        let tail = lake.tail(2, 2).unwrap();
        let replayed: Vec<u64> = tail.rows.iter().flat_map(|b| seqs(b).unwrap()).collect();
        assert_eq!(replayed, (3..=9).collect::<Vec<_>>());
        assert_eq!(tail.removed, 0, "the batch across midnight is complete");
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
