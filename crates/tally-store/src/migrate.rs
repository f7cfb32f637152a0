//! `tally lake migrate`: a lake of the directory layout (before the tables were Delta
//! tables) turned into tables, in place and exactly.
//!
//! In that layout a table was a directory of `date=YYYY-MM-DD/p<partition>-<first>-<last>.parquet`
//! files, and which files were part of it was a rule only Tally applied:
//!
//! - a file whose sequence range lies inside another's of the same partition and date is
//!   superseded (a compaction's input, kept a while for running queries): [`visible`];
//! - a rollup whose events file is not part of the lake is an orphan of a crash;
//! - a `.tmp` file is a write that never finished.
//!
//! The migration applies that rule once and commits what it keeps: one commit per table
//! adding its files (with their statistics), with each partition's transaction version at
//! the last sequence its events files hold, so ingest goes on after them. The files it
//! leaves out stay on disk until [`Lake::vacuum`] removes them as uploads no commit took.
//! The monthly rollups and billing lines (`month=YYYY-MM/` directories then) are committed
//! the same way to their tables, under the same rule (a wider monthly file superseded a
//! narrower one; lines without their monthly file are left out), with `period` for their
//! month. Checkpoints keep their layout.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::path::Path;

use arrow::array::RecordBatchReader;
use arrow::compute::concat_batches;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::compact::{parse_name, visible};
use crate::table::{self, Table, block_on};
use crate::{Error, Lake, Result, io_err, stats};

/// What a migration committed and what it left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Migrated {
    /// Events files committed to the events table, and their rows.
    pub events_files: usize,
    pub events_rows: u64,
    /// Rollup files committed to the rollups table.
    pub rollup_files: usize,
    /// Monthly rollups committed to the monthly table (each with its billing lines, where
    /// it had them).
    pub monthly_files: usize,
    /// Files left out: superseded, orphan rollups, unfinished writes.
    pub left_out: usize,
    /// Each partition's transaction version: the last sequence its events files hold.
    pub partitions: BTreeMap<u16, u64>,
}

/// A file of the directory layout.
struct Legacy {
    /// Relative to the table's directory: `date=…/p…parquet`.
    path: String,
    /// Its partition value: the date, or the month.
    value: String,
    partition: u16,
    first: u64,
    last: u64,
}

impl Lake {
    /// Turns the directory-layout lake at this lake's root into tables. Refuses a lake on
    /// object storage (the directory layout was only ever on local disk) and one whose
    /// tables are Delta tables already.
    pub fn migrate(&self) -> Result<Migrated> {
        let Some(root) = self.local_dir() else {
            return Err(Error::Table(
                "only a lake directory on local disk can be migrated".to_owned(),
            ));
        };
        let tables = &self.tables;
        for name in [
            tables.events.name,
            tables.rollups.name,
            tables.monthly.name,
            tables.billing.name,
        ] {
            let log = root.join(name).join("_delta_log");
            if log.exists() {
                return Err(Error::Table(format!(
                    "{} is a Delta table already",
                    root.join(name).display()
                )));
            }
        }
        let mut done = Migrated::default();
        // Events: a wider file of a partition's date superseded a narrower one. Rollups:
        // those of the events files kept.
        let (events, rollups) = pairs(root, &tables.events, &tables.rollups, "date=", &mut done)?;
        for f in &events {
            let last = done.partitions.entry(f.partition).or_insert(0);
            *last = (*last).max(f.last);
        }
        let txns: Vec<(u16, u64)> = done.partitions.iter().map(|(&p, &v)| (p, v)).collect();
        done.events_rows = self.commit_legacy(root, &tables.events, &events, &txns)?;
        done.events_files = events.len();
        self.commit_legacy(root, &tables.rollups, &rollups, &txns)?;
        done.rollup_files = rollups.len();

        // Monthly rollups and their billing lines, by the same rule.
        let (monthly, lines) = pairs(root, &tables.monthly, &tables.billing, "month=", &mut done)?;
        self.commit_legacy(root, &tables.billing, &lines, &[])?;
        self.commit_legacy(root, &tables.monthly, &monthly, &[])?;
        done.monthly_files = monthly.len();
        Ok(done)
    }

    /// Commits `files` to `table` in one commit; returns their rows.
    fn commit_legacy(
        &self,
        root: &Path,
        table: &Table,
        files: &[Legacy],
        txns: &[(u16, u64)],
    ) -> Result<u64> {
        let dir = root.join(table.name);
        let mut rows = 0;
        let mut adds = Vec::with_capacity(files.len());
        for f in files {
            let path = dir.join(&f.path);
            let size = fs::metadata(&path).map_err(io_err(&path))?.len();
            let reader = ParquetRecordBatchReaderBuilder::try_new(
                File::open(&path).map_err(io_err(&path))?,
            )?
            .build()?;
            let schema = reader.schema();
            let batches = reader.collect::<std::result::Result<Vec<_>, _>>()?;
            let batch = concat_batches(&schema, &batches)?;
            rows += batch.num_rows() as u64;
            adds.push(table.add(f.path.clone(), &f.value, size, stats(&batch)));
        }
        block_on(table.commit(adds, txns, &[], None, table::append()))?;
        Ok(rows)
    }
}

/// The files of `main` the layout showed (a file whose range lies inside another's of its
/// partition and directory was superseded) and the files of `derived` made from them (a
/// rollup of a kept events file, the lines of a kept monthly file); what they leave out
/// is counted in `done`.
fn pairs(
    root: &Path,
    main: &Table,
    derived: &Table,
    by: &str,
    done: &mut Migrated,
) -> Result<(Vec<Legacy>, Vec<Legacy>)> {
    let (files, left) = legacy_files(&root.join(main.name), by)?;
    done.left_out += left;
    let keys: Vec<_> = files
        .iter()
        .map(|f| (f.value.clone(), f.partition, f.first, f.last))
        .collect();
    let (shown, superseded): (Vec<_>, Vec<_>) = files
        .into_iter()
        .zip(visible(&keys))
        .partition(|(_, shown)| *shown);
    done.left_out += superseded.len();
    let kept: Vec<Legacy> = shown.into_iter().map(|(f, _)| f).collect();
    let names: HashSet<&str> = kept.iter().map(|f| f.path.as_str()).collect();
    let (made, left) = legacy_files(&root.join(derived.name), by)?;
    done.left_out += left;
    let (made, orphans): (Vec<_>, Vec<_>) = made
        .into_iter()
        .partition(|f| names.contains(f.path.as_str()));
    done.left_out += orphans.len();
    Ok((kept, made))
}

/// The `*.parquet` files of a table directory in the directory layout (in directories
/// named `<by>YYYY-MM-DD` or `<by>YYYY-MM`), and how many other files (unfinished `.tmp`
/// writes, names not of the layout) it holds.
fn legacy_files(dir: &Path, by: &str) -> Result<(Vec<Legacy>, usize)> {
    let mut files = Vec::new();
    let mut others = 0;
    let Ok(dates) = fs::read_dir(dir) else {
        return Ok((files, others));
    };
    for date in dates {
        let date = date.map_err(io_err(dir))?.path();
        let Some(value) = date
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(by))
            .map(str::to_owned)
        else {
            continue;
        };
        for entry in fs::read_dir(&date).map_err(io_err(&date))? {
            let entry = entry.map_err(io_err(&date))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            match parse_name(&name) {
                Some((partition, first, last)) => files.push(Legacy {
                    path: format!("{by}{value}/{name}"),
                    value: value.clone(),
                    partition,
                    first,
                    last,
                }),
                None => others += 1,
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((files, others))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use arrow::array::{AsArray, RecordBatch};
    use arrow::datatypes::UInt64Type;
    use tally_core::{Fence, SealedBatch};

    use super::*;
    use crate::{CompactOptions, MICROS_PER_DAY, Month};

    /// 2026-12-02: November is closed.
    fn december() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(20_789 * 86_400)
    }

    fn write(lake: &Lake, first_seq: u64, times: &[i64]) {
        let sealed = SealedBatch {
            partition: 3,
            first_seq,
            last_seq: first_seq + times.len() as u64 - 1,
            after_seq: None,
            batch: crate::tests::batch(times),
        };
        lake.write(&sealed, &Fence::open()).unwrap();
    }

    /// November's billing lines as the lake reads them, and their events.
    fn november_lines(lake: &Lake) -> (RecordBatch, u64) {
        let sources = lake
            .month_sources("2026-11".parse::<Month>().unwrap())
            .unwrap();
        assert!(sources.hourly.is_empty(), "{sources:?}");
        assert_eq!(sources.monthly.len(), 1, "{sources:?}");
        let lines = lake
            .merge_lines(&sources.lines.expect("the month's lines"), None)
            .unwrap();
        let events = lines
            .column(3)
            .as_primitive::<UInt64Type>()
            .iter()
            .flatten()
            .sum();
        (lines, events)
    }

    /// A lake of the directory layout with monthly rollups and billing lines: written with
    /// today's code and turned back into that layout (the logs removed, `period=`
    /// directories named `month=`), with a narrower monthly file the wider one superseded
    /// (and its lines) and lines without a monthly file beside them.
    #[test]
    fn monthly_rollups_and_billing_lines_migrate_by_the_layouts_rule() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let lake = Lake::new(root);
        let d0 = 20_758 * MICROS_PER_DAY;
        write(&lake, 1, &[d0 + 5, d0 + 7]);
        write(&lake, 3, &[d0 + MICROS_PER_DAY + 1]);
        let done = lake
            .compact(3, 3, &Fence::open(), &CompactOptions::default(), december())
            .unwrap();
        assert_eq!(done.monthly, 1, "{done:?}");
        let (before, events) = november_lines(&lake);
        assert_eq!(events, 3);
        drop(lake);

        for table in ["events", "rollups", "monthly", "billing"] {
            fs::remove_dir_all(root.join(table).join("_delta_log")).unwrap();
        }
        let monthly = root.join("monthly/month=2026-11");
        let lines = root.join("billing/month=2026-11");
        fs::rename(root.join("monthly/period=2026-11"), &monthly).unwrap();
        fs::rename(root.join("billing/period=2026-11"), &lines).unwrap();
        let name = fs::read_dir(&monthly)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name();
        let narrower = "p003-000000000001-000000000002.parquet";
        fs::copy(monthly.join(&name), monthly.join(narrower)).unwrap();
        fs::copy(lines.join(&name), lines.join(narrower)).unwrap();
        fs::copy(
            lines.join(&name),
            lines.join("p003-000000000009-000000000009.parquet"),
        )
        .unwrap();

        let lake = Lake::new(root);
        let migrated = lake.migrate().unwrap();
        assert_eq!(migrated.monthly_files, 1, "{migrated:?}");
        assert_eq!(migrated.partitions, BTreeMap::from([(3, 3)]));
        // The narrower monthly file and its lines, and the lines without a monthly file
        // (each date had one events file: the compaction merged none).
        assert_eq!(
            (migrated.events_files, migrated.left_out),
            (2, 3),
            "{migrated:?}"
        );
        assert_eq!(november_lines(&lake), (before.clone(), 3));
        assert!(
            lake.migrate().is_err(),
            "a lake of tables is not migrated again"
        );

        // A late event of November: the next compaction's monthly file replaces the
        // migrated one in its table.
        write(&lake, 4, &[d0 + 9]);
        let done = lake
            .compact(3, 4, &Fence::open(), &CompactOptions::default(), december())
            .unwrap();
        assert_eq!(done.monthly, 1, "{done:?}");
        let (after, events) = november_lines(&lake);
        assert_eq!(events, 4);
        assert_ne!(after, before);
    }
}
