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
//! The monthly rollups, billing lines and checkpoints keep their layout.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::path::Path;

use arrow::array::RecordBatchReader;
use arrow::compute::concat_batches;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::compact::{parse_name, visible};
use crate::table::{self, Location, Table, block_on};
use crate::{Error, Lake, Result, io_err, stats};

/// What a migration committed and what it left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Migrated {
    /// Events files committed to the events table, and their rows.
    pub events_files: usize,
    pub events_rows: u64,
    /// Rollup files committed to the rollups table.
    pub rollup_files: usize,
    /// Files left out: superseded, orphan rollups, unfinished writes.
    pub left_out: usize,
    /// Each partition's transaction version: the last sequence its events files hold.
    pub partitions: BTreeMap<u16, u64>,
}

/// A file of the directory layout.
struct Legacy {
    /// Relative to the table's directory: `date=…/p…parquet`.
    path: String,
    date: String,
    partition: u16,
    first: u64,
    last: u64,
}

impl Lake {
    /// Turns the directory-layout lake at this lake's root into tables. Refuses a lake on
    /// object storage (the directory layout was only ever on local disk) and one whose
    /// tables are Delta tables already.
    pub fn migrate(&self) -> Result<Migrated> {
        let Location::Local(_) = self.storage.location() else {
            return Err(Error::Table(
                "only a lake directory on local disk can be migrated".to_owned(),
            ));
        };
        for name in [self.tables.events.name, self.tables.rollups.name] {
            let log = self.root.join(name).join("_delta_log");
            if log.exists() {
                return Err(Error::Table(format!(
                    "{} is a Delta table already",
                    self.root.join(name).display()
                )));
            }
        }
        let mut done = Migrated::default();
        let (events, left) = legacy_files(&self.root.join(self.tables.events.name))?;
        done.left_out += left;
        let keys: Vec<_> = events
            .iter()
            .map(|f| (f.date.clone(), f.partition, f.first, f.last))
            .collect();
        let (events, superseded): (Vec<_>, Vec<_>) = events
            .into_iter()
            .zip(visible(&keys))
            .partition(|(_, shown)| *shown);
        done.left_out += superseded.len();
        let events: Vec<Legacy> = events.into_iter().map(|(f, _)| f).collect();
        for f in &events {
            let last = done.partitions.entry(f.partition).or_insert(0);
            *last = (*last).max(f.last);
        }
        let kept: HashSet<&str> = events.iter().map(|f| f.path.as_str()).collect();
        let (rollups, left) = legacy_files(&self.root.join(self.tables.rollups.name))?;
        done.left_out += left;
        let (rollups, orphans): (Vec<_>, Vec<_>) = rollups
            .into_iter()
            .partition(|f| kept.contains(f.path.as_str()));
        done.left_out += orphans.len();

        let txns: Vec<(u16, u64)> = done.partitions.iter().map(|(&p, &v)| (p, v)).collect();
        done.events_rows = self.commit_legacy(&self.tables.events, &events, &txns)?;
        done.events_files = events.len();
        self.commit_legacy(&self.tables.rollups, &rollups, &txns)?;
        done.rollup_files = rollups.len();
        Ok(done)
    }

    /// Commits `files` to `table` in one commit; returns their rows.
    fn commit_legacy(&self, table: &Table, files: &[Legacy], txns: &[(u16, u64)]) -> Result<u64> {
        let dir = self.root.join(table.name);
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
            adds.push(table.add(f.path.clone(), &f.date, size, stats(&batch)));
        }
        block_on(table.commit(adds, txns, &[], None, table::append()))?;
        Ok(rows)
    }
}

/// The `*.parquet` files of a table directory in the directory layout, and how many other
/// files (unfinished `.tmp` writes, names not of the layout) it holds.
fn legacy_files(dir: &Path) -> Result<(Vec<Legacy>, usize)> {
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
            .and_then(|n| n.strip_prefix("date="))
            .map(str::to_owned)
        else {
            continue;
        };
        for entry in fs::read_dir(&date).map_err(io_err(&date))? {
            let entry = entry.map_err(io_err(&date))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            match parse_name(&name) {
                Some((partition, first, last)) => files.push(Legacy {
                    path: format!("date={value}/{name}"),
                    date: value.clone(),
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
