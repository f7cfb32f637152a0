//! What the lake holds of one partition past a checkpoint: the rows a worker replays when
//! it takes the partition over, and the stream sequences they cover.
//!
//! The take-over also completes a flush a crash interrupted between its two commits: it
//! writes and commits the rollups of the partition's events files that have none.

use std::path::PathBuf;

use arrow::array::{AsArray, RecordBatch, UInt32Array};
use arrow::compute::{concat_batches, take_record_batch};
use arrow::datatypes::UInt64Type;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tally_core::schema;

use crate::compact::parse_name;
use crate::table::{self, Expect, Table, TableFile, block_on};
use crate::{Error, FileMeta, Lake, META_FILES, Result, Upload, rollup};

/// A file of one partition in a table's snapshot, as its name describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionFile {
    /// Its key in the lake's store: `<table>/date=…/p….parquet`.
    pub key: String,
    pub partition: u16,
    pub first_seq: u64,
    pub last_seq: u64,
    /// As the table knows it: its path relative to the table, partition value and size.
    pub file: TableFile,
}

/// The lake's rows of a partition past a stream sequence.
#[derive(Debug, Default)]
pub struct Tail {
    /// In stream order (within a message, in the order its events were appended).
    pub rows: Vec<RecordBatch>,
    /// The sequence ranges of the sealed batches read: every message in them is accounted
    /// for (rows here, a dead letter or a duplicate dropped) and must not be handled again.
    pub covered: Vec<(u64, u64)>,
    /// The partition's version in the events table's log: the last sequence committed.
    /// The worker's next batch follows it.
    pub version: u64,
    /// Rollup files written for batches whose events were committed but whose rollups
    /// were not (a crash between the two commits).
    pub repaired_rollups: usize,
}

impl Lake {
    /// A partition's files in `table`'s newest snapshot, by first sequence.
    pub(crate) fn snapshot_files(
        &self,
        table: &Table,
        partition: Option<u16>,
    ) -> Result<Vec<PartitionFile>> {
        let listed = block_on(table.files())?;
        Ok(self.partition_files_of(table, listed, partition))
    }

    pub(crate) fn partition_files_of(
        &self,
        table: &Table,
        listed: Vec<TableFile>,
        partition: Option<u16>,
    ) -> Vec<PartitionFile> {
        let mut files: Vec<PartitionFile> = listed
            .into_iter()
            .filter_map(|file| {
                let name = file.path.rsplit('/').next()?;
                let (p, first_seq, last_seq) = parse_name(name)?;
                if partition.is_some_and(|want| want != p) {
                    return None;
                }
                Some(PartitionFile {
                    key: format!("{}/{}", table.name, file.path),
                    partition: p,
                    first_seq,
                    last_seq,
                    file,
                })
            })
            .collect();
        files.sort_by(|a, b| (a.first_seq, &a.key).cmp(&(b.first_seq, &b.key)));
        files
    }

    /// Every events file of a partition in the events table, by first sequence.
    pub fn partition_files(&self, partition: u16) -> Result<Vec<PartitionFile>> {
        self.snapshot_files(&self.tables.events, Some(partition))
    }

    /// Every rollup file of a partition in the rollups table, by first sequence.
    pub fn partition_rollup_files(&self, partition: u16) -> Result<Vec<PartitionFile>> {
        self.snapshot_files(&self.tables.rollups, Some(partition))
    }

    /// Rows in the events table, from its log's statistics or, where a file has none,
    /// its footer.
    pub fn rows(&self) -> Result<u64> {
        let mut rows = 0;
        for f in self.snapshot_files(&self.tables.events, None)? {
            rows += self.file_rows(&f)?;
        }
        Ok(rows)
    }

    /// A file's rows: from the log's statistics, or its footer where they are missing.
    pub(crate) fn file_rows(&self, f: &PartitionFile) -> Result<u64> {
        match f.file.rows {
            Some(rows) => Ok(rows),
            None => self.footer_rows(&f.key),
        }
    }

    /// The bytes of the object at `key` (relative to the lake) from the lake's store.
    pub fn fetch(&self, key: &str) -> Result<bytes::Bytes> {
        block_on(self.storage.get(key))
    }

    /// Each of `files` (keys relative to the lake) fetched and `read`, on a thread per
    /// core, in the order given.
    pub(crate) fn read_each<T: Send>(
        &self,
        files: &[String],
        read: impl Fn(bytes::Bytes) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per_thread = files.len().div_ceil(threads).max(1);
        let read = &read;
        std::thread::scope(|s| {
            let readers: Vec<_> = files
                .chunks(per_thread)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|f| read(self.fetch(f)?))
                            .collect::<Result<Vec<_>>>()
                    })
                })
                .collect();
            let mut out = Vec::with_capacity(files.len());
            for reader in readers {
                let read = reader
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                out.extend(read?);
            }
            Ok(out)
        })
    }

    /// The files of the table named `table` (`events` or `rollups`) in its newest
    /// snapshot, read on the caller's runtime.
    pub async fn table_files(&self, table: &str) -> Result<Vec<TableFile>> {
        let table = match table {
            t if t == self.tables.events.name => &self.tables.events,
            t if t == self.tables.rollups.name => &self.tables.rollups,
            other => return Err(Error::Table(format!("the lake has no table {other}"))),
        };
        table.files().await
    }

    /// Where on local disk the files of the table named `table` in its newest snapshot are
    /// (none for a lake on object storage).
    pub fn table_paths(&self, table: &str) -> Result<Vec<PathBuf>> {
        let Some(dir) = self.local_dir().map(|d| d.join(table)) else {
            return Ok(Vec::new());
        };
        Ok(block_on(self.table_files(table))?
            .into_iter()
            .map(|f| dir.join(f.path))
            .collect())
    }

    /// The partition's last committed sequence in the events table (0: none).
    pub fn version_of(&self, partition: u16) -> Result<u64> {
        block_on(self.tables.events.version_of(partition))
    }

    /// The partition's rows with a stream sequence past `after_seq`, in stream order, and
    /// its version in the log. First completes the rollups of batches whose events were
    /// committed without them: call it only while no write of the partition is under way
    /// (at take-over, before pulling).
    pub fn tail(&self, partition: u16, after_seq: u64) -> Result<Tail> {
        let version = self.version_of(partition)?;
        let repaired_rollups = self.repair_rollups(partition, version)?;
        let mut tail = self.rows_after(partition, after_seq)?;
        tail.version = version;
        tail.repaired_rollups = repaired_rollups;
        Ok(tail)
    }

    /// The partition's rows with a stream sequence past `after_seq`, in stream order, as
    /// [`Lake::tail`] reads them but writing nothing: for reading a partition another
    /// worker owns (a new partition's parent, after a growth).
    pub fn rows_after(&self, partition: u16, after_seq: u64) -> Result<Tail> {
        let files = self.partition_files(partition)?;
        let mut tail = Tail::default();
        for f in files.iter().filter(|f| f.last_seq > after_seq) {
            let (rows, _) = read(self.fetch(&f.key)?)?;
            tail.rows.push(rows);
            tail.covered.push((f.first_seq, f.last_seq));
        }
        tail.covered.sort_unstable();
        tail.covered.dedup();
        // One stream order over every file read: a compacted file's range may hold
        // another file's (of another date).
        if !tail.rows.is_empty() {
            let rows = in_stream_order(std::mem::take(&mut tail.rows))?;
            tail.rows.push(past(rows, after_seq)?);
        }
        Ok(tail)
    }

    /// Commits the rollups of the partition's events files past the rollups table's
    /// version for it, up to `version` (the events table's), computed from those files:
    /// the events of a batch are committed before its rollups, so a crash between the two
    /// leaves the rollups behind, never ahead. Returns the rollup files written.
    fn repair_rollups(&self, partition: u16, version: u64) -> Result<usize> {
        let rollups = &self.tables.rollups;
        let behind = block_on(rollups.version_of(partition))?;
        if behind >= version {
            return Ok(0);
        }
        let missing: Vec<PartitionFile> = self
            .partition_files(partition)?
            .into_iter()
            .filter(|f| f.last_seq > behind)
            .collect();
        let mut uploads = Vec::with_capacity(missing.len());
        for f in &missing {
            let (rows, files) = read(self.fetch(&f.key)?)?;
            let summary = rollup(&rows)?;
            let meta = FileMeta {
                partition,
                first_seq: f.first_seq,
                last_seq: f.last_seq,
                files,
                compacted: None,
            };
            uploads.push(Upload {
                path: f.file.path.clone(),
                value: f.file.value.clone(),
                stats: crate::stats(&summary),
                bytes: crate::encode(&self.props, &meta, &summary)?,
            });
        }
        block_on(async {
            for u in &uploads {
                let key = format!("{}/{}", rollups.name, u.path);
                self.storage.put(&key, u.bytes.clone()).await?;
            }
            rollups
                .commit(
                    uploads.iter().map(|u| u.add(rollups)).collect(),
                    &[(partition, version)],
                    &[Expect {
                        partition,
                        after_seq: behind,
                    }],
                    None,
                    table::append(),
                )
                .await
        })?;
        tracing::warn!(
            partition,
            files = uploads.len(),
            "wrote the rollups of batches committed without them (left by a crash)"
        );
        Ok(uploads.len())
    }
}

fn read(file: bytes::Bytes) -> Result<(RecordBatch, usize)> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
    let files = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == META_FILES))
        .and_then(|k| k.value.as_deref()?.parse().ok())
        .unwrap_or(1);
    let schema = builder.schema().clone();
    let batches = builder
        .build()?
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((concat_batches(&schema, &batches)?, files))
}

/// Rows of the files read, by stream sequence; the sort is stable, so a message's events
/// keep their order within a file.
fn in_stream_order(parts: Vec<RecordBatch>) -> Result<RecordBatch> {
    let batch = match parts.len() {
        0 => return Ok(empty()),
        1 => parts.into_iter().next().unwrap_or_else(empty),
        _ => concat_batches(&parts[0].schema(), &parts)?,
    };
    let seqs = seqs(&batch)?;
    // A sealed batch's file is in stream order; a compacted one is grouped by customer.
    if seqs.is_sorted() {
        return Ok(batch);
    }
    let mut order: Vec<u32> = (0..batch.num_rows() as u32).collect();
    order.sort_by_key(|&i| seqs[i as usize]);
    Ok(take_record_batch(&batch, &UInt32Array::from(order))?)
}

fn past(batch: RecordBatch, after_seq: u64) -> Result<RecordBatch> {
    let seqs = seqs(&batch)?;
    let skip = seqs.iter().take_while(|&&s| s <= after_seq).count();
    Ok(batch.slice(skip, batch.num_rows() - skip))
}

pub(crate) fn seqs(batch: &RecordBatch) -> Result<Vec<u64>> {
    Ok(batch
        .column_by_name(schema::STREAM_SEQ)
        .and_then(|c| c.as_primitive_opt::<UInt64Type>())
        .ok_or(Error::Schema(schema::STREAM_SEQ))?
        .values()
        .to_vec())
}

fn empty() -> RecordBatch {
    RecordBatch::new_empty(schema::lake_schema())
}

#[cfg(test)]
mod tests {
    use arrow::array::UInt64Array;
    use std::path::Path;
    use std::sync::Arc;
    use tally_core::{Fence, SealedBatch};

    use super::*;
    use crate::MICROS_PER_DAY;

    /// A sealed batch whose rows carry the sequences `seqs`, at these times.
    fn sealed(first_seq: u64, last_seq: u64, times: &[i64], seqs: &[u64]) -> SealedBatch {
        let batch = crate::tests::batch(times);
        let i = batch.schema().index_of(schema::STREAM_SEQ).unwrap();
        let mut columns = batch.columns().to_vec();
        columns[i] = Arc::new(UInt64Array::from(seqs.to_vec()));
        SealedBatch {
            partition: 2,
            first_seq,
            last_seq,
            after_seq: None,
            batch: RecordBatch::try_new(batch.schema(), columns).unwrap(),
        }
    }

    fn all_seqs(tail: &Tail) -> Vec<u64> {
        tail.rows.iter().flat_map(|b| seqs(b).unwrap()).collect()
    }

    #[test]
    fn the_tail_is_every_row_past_a_sequence_in_stream_order() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let day = 20_758 * MICROS_PER_DAY;
        lake.write(&sealed(1, 3, &[day, day, day], &[1, 2, 3]), &Fence::open())
            .unwrap();
        // A batch across midnight: two files, rows interleaved by sequence.
        let next = day + MICROS_PER_DAY;
        lake.write(
            &sealed(4, 7, &[next, day, next, day], &[4, 5, 6, 7]),
            &Fence::open(),
        )
        .unwrap();
        assert_eq!(lake.partition_files(2).unwrap().len(), 3);
        assert!(lake.partition_files(3).unwrap().is_empty());

        let tail = lake.tail(2, 0).unwrap();
        assert_eq!(all_seqs(&tail), [1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(tail.covered, [(1, 3), (4, 7)]);
        let tail = lake.tail(2, 5).unwrap();
        assert_eq!(all_seqs(&tail), [6, 7]);
        assert_eq!(tail.covered, [(4, 7)]);
        assert!(lake.tail(2, 7).unwrap().covered.is_empty());
    }

    #[test]
    fn a_batch_across_dates_lands_in_one_commit_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let day = 20_758 * MICROS_PER_DAY;
        let fence = Fence::open();
        fence.revoke();
        let across = sealed(1, 2, &[day, day + MICROS_PER_DAY], &[1, 2]);
        assert!(matches!(lake.write(&across, &fence), Err(Error::Fenced(2))));
        // Its files were uploaded, but neither table holds any of them.
        assert!(lake.partition_files(2).unwrap().is_empty());
        assert!(lake.partition_rollup_files(2).unwrap().is_empty());
        assert_eq!(lake.version_of(2).unwrap(), 0);
        assert_eq!(
            parquet_files(&dir.path().join(schema::EVENTS_TABLE)).len(),
            2
        );

        lake.write(&across, &Fence::open()).unwrap();
        let tail = lake.tail(2, 0).unwrap();
        assert_eq!(tail.covered, [(1, 2)]);
        assert_eq!(all_seqs(&tail), [1, 2]);
        assert_eq!(tail.version, 2);
        // The files no commit took go once they are older than the retention.
        let now = std::time::SystemTime::now();
        let retain = std::time::Duration::from_secs(60);
        assert_eq!(lake.vacuum(retain, now).unwrap(), 0);
        assert_eq!(lake.vacuum(retain, now + retain * 2).unwrap(), 4);
        assert_eq!(
            parquet_files(&dir.path().join(schema::EVENTS_TABLE)).len(),
            2
        );
        assert_eq!(all_seqs(&lake.tail(2, 0).unwrap()), [1, 2]);
    }

    #[test]
    fn a_batch_after_its_successor_or_a_stale_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let day = 20_758 * MICROS_PER_DAY;
        let mut first = sealed(1, 2, &[day, day], &[1, 2]);
        first.after_seq = Some(0);
        lake.write(&first, &Fence::open()).unwrap();
        // Written again (its answer was lost): it does not land twice.
        lake.write(&first, &Fence::open()).unwrap();
        assert_eq!(lake.partition_files(2).unwrap().len(), 1);
        // A writer that took over at 0 and seals 1–3 finds 2 in the log: refused.
        let mut stale = sealed(1, 3, &[day, day, day], &[1, 2, 3]);
        stale.after_seq = Some(0);
        assert!(matches!(
            lake.write(&stale, &Fence::open()),
            Err(Error::Unexpected {
                expected: 0,
                found: 2,
                ..
            })
        ));
        let mut next = sealed(3, 4, &[day, day], &[3, 4]);
        next.after_seq = Some(2);
        lake.write(&next, &Fence::open()).unwrap();
        assert_eq!(lake.version_of(2).unwrap(), 4);
        assert_eq!(all_seqs(&lake.tail(2, 0).unwrap()), [1, 2, 3, 4]);
    }

    /// The log's statistics say which columns a flushed file has, so whether all of a
    /// table's files have one is answered without reading them: here with the file gone
    /// from the store. A file whose statistics do not say is read.
    #[test]
    fn the_log_says_which_columns_a_file_has() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let day = 20_758 * MICROS_PER_DAY;
        lake.write(&sealed(1, 2, &[day, day], &[1, 2]), &Fence::open())
            .unwrap();
        let mut files = block_on(lake.table_files("events")).unwrap();
        assert_eq!(files.len(), 1);
        assert!(files[0].columns.iter().any(|c| c == schema::DECISION_CODE));
        assert_eq!(files[0].rows, Some(2));
        for f in parquet_files(&dir.path().join(schema::EVENTS_TABLE)) {
            std::fs::remove_file(f).unwrap();
        }
        let has = |files: &[TableFile], name| {
            block_on(lake.all_have_column(schema::EVENTS_TABLE, files, name))
        };
        assert!(has(&files, schema::DECISION_CODE).unwrap());
        // Without the statistics, the footer is read: the file is gone.
        files[0].columns = Arc::from([]);
        assert!(has(&files, schema::DECISION_CODE).is_err());
    }

    /// Rows of the events table's files, read through the store.
    fn rows_in_store(lake: &Lake) -> u64 {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        block_on(lake.table_files("events"))
            .unwrap()
            .iter()
            .map(|f| {
                let bytes = block_on(lake.storage.get(&format!("events/{}", f.path))).unwrap();
                let footer = SerializedFileReader::new(bytes).unwrap();
                u64::try_from(footer.metadata().file_metadata().num_rows()).unwrap()
            })
            .sum()
    }

    #[test]
    fn on_s3_each_flush_lands_once_through_a_server_restart_and_a_stale_writer_is_refused() {
        let mut server = tally_s3d::S3Server::start_temp().unwrap();
        let location = table::Location::S3(table::S3Location {
            bucket: server.bucket().to_owned(),
            prefix: "lake".to_owned(),
            endpoint: Some(server.endpoint()),
            region: server.region().to_owned(),
            access_key_id: server.access_key().to_owned(),
            secret_access_key: server.secret_key().to_owned(),
        });
        let day = 20_758 * MICROS_PER_DAY;
        let batch = |first: u64, last: u64, after: u64| {
            let seqs: Vec<u64> = (first..=last).collect();
            let mut b = sealed(first, last, &vec![day; seqs.len()], &seqs);
            b.after_seq = Some(after);
            b
        };
        let worker = Lake::open(&location).unwrap();
        worker.write(&batch(1, 10, 0), &Fence::open()).unwrap();
        worker.write(&batch(11, 20, 10), &Fence::open()).unwrap();
        // Its answer lost, the flush is written again: it does not land twice.
        worker.write(&batch(11, 20, 10), &Fence::open()).unwrap();
        assert_eq!(worker.version_of(2).unwrap(), 20);

        // Another worker takes the partition over from the log and writes on; the first,
        // which has not noticed, is refused.
        let successor = Lake::open(&location).unwrap();
        assert_eq!(successor.version_of(2).unwrap(), 20);
        successor.write(&batch(21, 30, 20), &Fence::open()).unwrap();
        assert!(matches!(
            worker.write(&batch(21, 25, 20), &Fence::open()),
            Err(Error::Unexpected {
                expected: 20,
                found: 30,
                ..
            })
        ));

        // The store goes away: the flush fails and lands once it is back.
        server.stop();
        assert!(successor.write(&batch(31, 40, 30), &Fence::open()).is_err());
        server.restart().unwrap();
        successor.write(&batch(31, 40, 30), &Fence::open()).unwrap();

        // A reader that was not there sees each flush once, in both tables.
        let reader = Lake::open(&location).unwrap();
        assert_eq!(reader.version_of(2).unwrap(), 40);
        assert_eq!(rows_in_store(&reader), 40);
        assert_eq!(block_on(reader.table_files("events")).unwrap().len(), 4);
        assert_eq!(block_on(reader.table_files("rollups")).unwrap().len(), 4);
        // A take-over reads the partition's rows from the store.
        let tail = reader.tail(2, 15).unwrap();
        assert_eq!(all_seqs(&tail), (16..=40).collect::<Vec<_>>());
        assert_eq!(tail.version, 40);
        // What the repeated flush and the refused writer uploaded (an events file and a
        // rollup each) is in no table, and goes once older than the retention.
        let retain = std::time::Duration::from_secs(60);
        assert_eq!(
            reader.vacuum(retain, std::time::SystemTime::now()).unwrap(),
            0
        );
        let later = std::time::SystemTime::now() + retain * 2;
        assert_eq!(reader.vacuum(retain, later).unwrap(), 4);
        assert_eq!(rows_in_store(&reader), 40);
    }

    #[test]
    fn rollups_a_crash_left_behind_are_written_at_take_over() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let day = 20_758 * MICROS_PER_DAY;
        lake.write(&sealed(1, 2, &[day, day], &[1, 2]), &Fence::open())
            .unwrap();
        // A crash between the events commit and the rollups commit of batch 3–4.
        let behind = sealed(3, 4, &[day, day + MICROS_PER_DAY], &[3, 4]);
        let mut uploads = Vec::new();
        for (day, rows) in crate::split_by_day(&behind.batch).unwrap() {
            let meta = FileMeta {
                partition: 2,
                first_seq: 3,
                last_seq: 4,
                files: 2,
                compacted: None,
            };
            uploads.push(Upload {
                path: format!(
                    "date={}/{}",
                    crate::date_of_day(day),
                    crate::file_name(2, 3, 4, "t")
                ),
                value: crate::date_of_day(day),
                stats: None,
                bytes: crate::encode(&lake.props, &meta, &rows).unwrap(),
            });
        }
        let events = &lake.tables.events;
        block_on(async {
            for u in &uploads {
                lake.storage
                    .create(&format!("events/{}", u.path), u.bytes.clone())
                    .await
                    .unwrap();
            }
            crate::commit_flush(events, &uploads, &behind, &Fence::open()).await
        })
        .unwrap();
        assert_eq!(lake.partition_rollup_files(2).unwrap().len(), 1);

        let tail = lake.tail(2, 0).unwrap();
        assert_eq!(tail.repaired_rollups, 2);
        let rollups = lake.partition_rollup_files(2).unwrap();
        let events = lake.partition_files(2).unwrap();
        assert_eq!(
            rollups.iter().map(|f| &f.file.path).collect::<Vec<_>>(),
            events.iter().map(|f| &f.file.path).collect::<Vec<_>>(),
            "each events file has the rollup of its own path"
        );
        assert_eq!(block_on(lake.tables.rollups.version_of(2)).unwrap(), 4);
        // Nothing is left to repair the next time.
        assert_eq!(lake.tail(2, 0).unwrap().repaired_rollups, 0);
    }

    /// The Parquet files in a table's directory (its log aside).
    fn parquet_files(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() && name != "_delta_log" {
                files.extend(parquet_files(&path));
            } else if name.ends_with(".parquet") {
                files.push(path);
            }
        }
        files
    }
}
