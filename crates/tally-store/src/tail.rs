//! What the lake holds of one partition past a checkpoint: the rows a worker replays when
//! it takes the partition over, and the stream sequences they cover.
//!
//! Reading the tail is also when the partition's leftovers of a crash go: the files of an
//! incomplete sealed batch, then every rollup of the partition whose events file is absent
//! (an orphan, see [`rollup`](mod@crate::rollup)), those of the batches just removed
//! included.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use arrow::array::{AsArray, RecordBatch, UInt32Array};
use arrow::compute::{concat_batches, take_record_batch};
use arrow::datatypes::UInt64Type;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tally_core::schema;

use crate::compact::{parse_name, visible, visible_files};
use crate::{Error, Lake, META_FILES, Result, io_err, sync_dir};

/// A lake file of one partition, as its name describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionFile {
    pub path: PathBuf,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// The lake's rows of a partition past a stream sequence.
#[derive(Debug, Default)]
pub struct Tail {
    /// In stream order (within a message, in the order its events were appended).
    pub rows: Vec<RecordBatch>,
    /// The sequence ranges of the sealed batches read: every message in them is accounted
    /// for (rows here, a dead letter or a duplicate dropped) and must not be handled again.
    pub covered: Vec<(u64, u64)>,
    /// Sealed batches found incomplete (a crash between the files of a batch that spans
    /// dates) and removed: their messages were never acknowledged and come again.
    pub removed: usize,
    /// Rollup files removed because their events file was absent: orphans of a crash
    /// between the two renames, or of a batch removed as incomplete.
    pub removed_rollups: usize,
}

impl Lake {
    /// Every events file of a partition that is part of the lake (not superseded by a
    /// compacted file, see [`compact`](mod@crate::compact)), by first sequence.
    pub fn partition_files(&self, partition: u16) -> Result<Vec<PartitionFile>> {
        Ok(visible_files(files_of(&self.events_dir(), partition)?))
    }

    /// Rows in every events file of the lake (superseded ones aside), from the files'
    /// footers.
    pub fn rows(&self) -> Result<u64> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let root = self.events_dir();
        let dates = match fs::read_dir(&root) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err(&root)(e)),
        };
        let mut rows = 0;
        for date in dates {
            let dir = date.map_err(io_err(&root))?.path();
            if !dir.is_dir() {
                continue;
            }
            let mut files = Vec::new();
            for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
                let path = entry.map_err(io_err(&dir))?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if let Some((p, first, last)) = parse_name(name) {
                    files.push(((), p, first, last, path));
                }
            }
            let keys: Vec<_> = files.iter().map(|f| (f.0, f.1, f.2, f.3)).collect();
            for (f, shown) in files.iter().zip(visible(&keys)) {
                if !shown {
                    continue;
                }
                let path = &f.4;
                let file = File::open(path).map_err(io_err(path))?;
                let footer = SerializedFileReader::new(file)?;
                rows += u64::try_from(footer.metadata().file_metadata().num_rows()).unwrap_or(0);
            }
        }
        Ok(rows)
    }

    /// Every rollup file of a partition, by first sequence (orphans included).
    pub fn partition_rollup_files(&self, partition: u16) -> Result<Vec<PartitionFile>> {
        files_of(&self.rollups_dir(), partition)
    }

    /// The partition's rows with a stream sequence past `after_seq`, in stream order.
    /// Removes the files of incomplete sealed batches and the partition's orphaned rollups
    /// past `after_seq`: call it only while no write of the partition is under way (at
    /// take-over, before pulling).
    pub fn tail(&self, partition: u16, after_seq: u64) -> Result<Tail> {
        let files = self.partition_files(partition)?;
        let mut present: HashSet<PathBuf> = files_of(&self.events_dir(), partition)?
            .into_iter()
            .map(|f| f.path)
            .collect();
        // A compacted file merges complete batches only: a batch across dates whose file
        // of one date was merged into it is complete.
        let compacted: Vec<(u64, u64)> = files.iter().map(|f| (f.first_seq, f.last_seq)).collect();
        let merged = |(first, last): (u64, u64)| {
            compacted
                .iter()
                .any(|&(a, b)| a <= first && last <= b && (a, b) != (first, last))
        };
        let mut batches: BTreeMap<(u64, u64), Vec<PartitionFile>> = BTreeMap::new();
        for f in files {
            if f.last_seq > after_seq {
                batches
                    .entry((f.first_seq, f.last_seq))
                    .or_default()
                    .push(f);
            }
        }
        let mut tail = Tail::default();
        let mut emptied = BTreeSet::new();
        for (range, files) in batches {
            let mut parts = Vec::with_capacity(files.len());
            let mut expected = 1;
            for f in &files {
                let (rows, n) = read(&f.path)?;
                expected = n;
                parts.push(rows);
            }
            if files.len() < expected && !merged(range) {
                tracing::warn!(
                    partition,
                    first_seq = range.0,
                    last_seq = range.1,
                    found = files.len(),
                    expected,
                    "removing an incomplete sealed batch; its messages were not acknowledged and come again"
                );
                for f in &files {
                    fs::remove_file(&f.path).map_err(io_err(&f.path))?;
                    present.remove(&f.path);
                    emptied.extend(f.path.parent().map(Path::to_owned));
                }
                tail.removed += 1;
                continue;
            }
            tail.rows.extend(parts);
            tail.covered.push(range);
        }
        // One stream order over every file read: a compacted file's range may hold
        // another file's (of another date).
        if !tail.rows.is_empty() {
            let rows = in_stream_order(std::mem::take(&mut tail.rows))?;
            tail.rows.push(past(rows, after_seq)?);
        }
        // An events file may be without its rollup at no moment, a crash included: the
        // removals above are made durable before any rollup of theirs goes.
        for dir in &emptied {
            sync_dir(dir)?;
        }
        tail.removed_rollups = self.remove_orphan_rollups(partition, after_seq, &present)?;
        Ok(tail)
    }

    /// Removes the partition's rollups past `after_seq` whose events file is absent.
    /// `events` lists the partition's events files; one not in it is looked for again
    /// before its rollup goes. (At or below `after_seq`, ingest leaves no orphan: every
    /// batch there is durable. Those a compaction leaves are its own to remove.)
    fn remove_orphan_rollups(
        &self,
        partition: u16,
        after_seq: u64,
        events: &HashSet<PathBuf>,
    ) -> Result<usize> {
        let (rollups, events_dir) = (self.rollups_dir(), self.events_dir());
        let mut removed = 0;
        for f in files_of(&rollups, partition)? {
            let Ok(relative) = f.path.strip_prefix(&rollups) else {
                continue;
            };
            if f.last_seq <= after_seq {
                continue;
            }
            let raw = events_dir.join(relative);
            if events.contains(&raw) || raw.try_exists().map_err(io_err(&raw))? {
                continue;
            }
            fs::remove_file(&f.path).map_err(io_err(&f.path))?;
            removed += 1;
        }
        if removed > 0 {
            tracing::warn!(
                partition,
                rollups = removed,
                "removed rollups whose events file is absent (left by a crash)"
            );
        }
        Ok(removed)
    }
}

/// The files of one partition under a table's directory (`<dir>/date=…/p<partition>-…`),
/// superseded ones included.
pub(crate) fn files_of(root: &Path, partition: u16) -> Result<Vec<PartitionFile>> {
    let dates = match fs::read_dir(root) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(root)(e)),
    };
    let prefix = format!("p{partition:03}-");
    let mut files = Vec::new();
    for date in dates {
        let dir = date.map_err(io_err(root))?.path();
        if !dir.is_dir() {
            continue;
        }
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let path = entry.map_err(io_err(&dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let Some(range) = name
                .strip_prefix(&prefix)
                .and_then(|n| n.strip_suffix(".parquet"))
            else {
                continue;
            };
            if let Some((first, last)) = range.split_once('-')
                && let (Ok(first_seq), Ok(last_seq)) = (first.parse(), last.parse())
            {
                files.push(PartitionFile {
                    path,
                    first_seq,
                    last_seq,
                });
            }
        }
    }
    files.sort_by(|a, b| (a.first_seq, &a.path).cmp(&(b.first_seq, &b.path)));
    Ok(files)
}

/// A file's rows and the number of files its sealed batch was written as.
fn read(path: &Path) -> Result<(RecordBatch, usize)> {
    let file = File::open(path).map_err(io_err(path))?;
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
    fn a_batch_missing_one_of_its_files_is_removed_as_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let day = 20_758 * MICROS_PER_DAY;
        lake.write(
            &sealed(1, 2, &[day, day + MICROS_PER_DAY], &[1, 2]),
            &Fence::open(),
        )
        .unwrap();
        lake.write(&sealed(3, 3, &[day], &[3]), &Fence::open())
            .unwrap();
        let files = lake.partition_files(2).unwrap();
        fs::remove_file(&files[0].path).unwrap();

        let tail = lake.tail(2, 0).unwrap();
        assert_eq!(tail.removed, 1);
        assert_eq!(tail.covered, [(3, 3)]);
        assert_eq!(all_seqs(&tail), [3]);
        assert_eq!(lake.partition_files(2).unwrap().len(), 1);
        // Both rollups of the removed batch went with it; the complete batch keeps its own.
        assert_eq!(tail.removed_rollups, 2);
        let rollups = lake.partition_rollup_files(2).unwrap();
        assert_eq!(
            rollups
                .iter()
                .map(|f| (f.first_seq, f.last_seq))
                .collect::<Vec<_>>(),
            [(3, 3)]
        );
    }

    #[test]
    fn a_rollup_without_its_events_file_is_removed_at_take_over() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let day = 20_758 * MICROS_PER_DAY;
        for s in [
            sealed(1, 2, &[day, day], &[1, 2]),
            sealed(3, 4, &[day, day], &[3, 4]),
        ] {
            lake.write(&s, &Fence::open()).unwrap();
        }
        // Another partition's orphan is not this take-over's business.
        let other = SealedBatch {
            partition: 9,
            ..sealed(1, 1, &[day], &[1])
        };
        lake.write(&other, &Fence::open()).unwrap();
        fs::remove_file(&lake.partition_files(9).unwrap()[0].path).unwrap();
        // A crash between the two renames of batch 1–2: its rollup is visible, its events
        // file is not.
        let events = lake.partition_files(2).unwrap();
        let rollups = lake.partition_rollup_files(2).unwrap();
        assert_eq!(rollups.len(), 2);
        assert_eq!(
            rollups[0].path.file_name(),
            events[0].path.file_name(),
            "a rollup is named as its events file"
        );
        fs::remove_file(&events[0].path).unwrap();

        // At or below the checkpoint's sequence a rollup is not the take-over's to judge
        // (only a compaction leaves orphans there); past it, the orphan goes.
        let tail = lake.tail(2, 2).unwrap();
        assert_eq!((tail.removed, tail.removed_rollups), (0, 0));
        let tail = lake.tail(2, 0).unwrap();
        assert_eq!((tail.removed, tail.removed_rollups), (0, 1));
        assert_eq!(tail.covered, [(3, 4)]);
        assert!(!rollups[0].path.exists());
        assert!(
            rollups[1].path.exists(),
            "a rollup with its events file stays"
        );
        assert_eq!(lake.partition_rollup_files(9).unwrap().len(), 1);
        // Nothing is left to remove the next time.
        assert_eq!(lake.tail(2, 0).unwrap().removed_rollups, 0);
    }
}
