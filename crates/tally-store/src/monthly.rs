//! Monthly rollups: a partition's usage of a closed calendar month (UTC) per customer ×
//! feature × decision × plan, the level billing reads for a closed month.
//!
//! ```text
//! <lake>/monthly/period=YYYY-MM/p<partition>-<first_seq>-<last_seq>-<token>.parquet
//! ```
//!
//! The monthly rollups are a Delta table partitioned by month (`period`), as are the
//! billing lines made from them ([`crate::lines`]).
//!
//! Hourly rollups hold about one row per event once customers × features × hours outnumber
//! the events (10,000 customers × 50 features do at any rate below a billion events a
//! month), so summing them is no cheaper than scanning the events. A monthly rollup holds
//! at most one row per customer × feature × decision × plan, whatever the volume.
//!
//! **What it covers.** Compaction ([`Lake::compact`]) writes it once the month is closed,
//! from the hourly rollups of the partition's events files dated in the month that are
//! settled (at or below the newest checkpoint), and names it by the widest range of those
//! files. It *covers* every events file of its partition dated in its month whose range
//! lies inside its own; a later file (an event arriving after the month closed) is not
//! covered, and its rows are read from its own rollup until a later compaction writes a
//! wider monthly file and commits it in place of this one (one commit: readers see either).
//! [`Lake::month_sources`] lists what a query reads for a month: the monthly files, and
//! the rollups of the events files no monthly file covers.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, ListArray, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt16Array, UInt32Array, UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{
    DataType, Field, Float64Type, Schema, SchemaRef, TimestampMicrosecondType, UInt16Type,
    UInt64Type,
};
use chrono::{DateTime, Datelike, NaiveDate};
use hashbrown::HashMap;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tally_core::Fence;

use crate::rollup::{
    CUSTOMER, DECISION, EVENTS, FEATURE, FIRST_TIME, HOUR, PARTITION_ID, PLAN, QUANTITY, REGION,
    USERS,
};
use crate::table::{Expect, Table, block_on};
use crate::{Error, FileMeta, Lake, PartitionFile, Result, Upload};

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// The monthly table's directory under the lake root.
pub const MONTHLY_TABLE: &str = "monthly";
/// The first instant of the row's calendar month (UTC).
pub const MONTH: &str = "month";
/// The partition column of the monthly tables (monthly rollups, billing lines): the
/// month, `YYYY-MM`, as billing names its periods.
pub const PERIOD: &str = "period";
/// Beside each of `users`, the days of the month it was seen on: bit `d - 1` for day `d`.
pub const USER_DAYS: &str = "user_days";

static MONTHLY_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    // The rollup's columns, `month` for `hour`, and the users' days after the users.
    let day = Arc::new(Field::new_list_field(DataType::UInt32, false));
    let mut fields = Vec::new();
    for f in crate::rollup_schema().fields() {
        if f.name() == HOUR {
            fields.push(Field::new(MONTH, f.data_type().clone(), false));
        } else {
            fields.push(f.as_ref().clone());
        }
        if f.name() == USERS {
            fields.push(Field::new(USER_DAYS, DataType::List(day.clone()), false));
        }
    }
    Arc::new(Schema::new(fields))
});

/// The schema of one monthly row: a rollup row with `month` for `hour`, and the days each
/// user was seen on.
pub fn monthly_schema() -> SchemaRef {
    MONTHLY_SCHEMA.clone()
}

/// A calendar month (UTC): a billing period, and the span of a monthly rollup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    pub year: i32,
    pub month: u32,
}

/// A month that is not `YYYY-MM`.
#[derive(Debug, thiserror::Error)]
#[error("bad period {0:?}: expected YYYY-MM")]
pub struct BadMonth(pub String);

impl Month {
    pub fn first_day(self) -> NaiveDate {
        NaiveDate::from_ymd_opt(self.year, self.month, 1).unwrap_or_default()
    }

    pub fn next(self) -> Month {
        if self.month == 12 {
            Month {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Month {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// The month holding a date.
    pub fn of(date: NaiveDate) -> Month {
        Month {
            year: date.year(),
            month: date.month(),
        }
    }

    /// The month of a `date=YYYY-MM-DD` directory.
    /// The month of a `date` partition value (`2026-11-30`).
    fn of_date_value(value: &str) -> Option<Month> {
        Some(Month::of(value.parse::<NaiveDate>().ok()?))
    }

    /// The directory of the month's files in a monthly table.
    fn dir_name(self) -> String {
        format!("{PERIOD}={self}")
    }

    fn micros(date: NaiveDate) -> i64 {
        date.and_hms_opt(0, 0, 0)
            .map_or(0, |t| t.and_utc().timestamp_micros())
    }

    /// `[start, end)` in microseconds since the epoch.
    fn span(self) -> (i64, i64) {
        (
            Self::micros(self.first_day()),
            Self::micros(self.next().first_day()),
        )
    }
}

impl std::str::FromStr for Month {
    type Err = BadMonth;

    fn from_str(s: &str) -> Result<Self, BadMonth> {
        let bad = || BadMonth(s.to_owned());
        let (y, m) = s.split_once('-').ok_or_else(bad)?;
        let (year, month) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if y.len() != 4 || m.len() != 2 || !(1..=12).contains(&month) {
            return Err(bad());
        }
        Ok(Month { year, month })
    }
}

impl std::fmt::Display for Month {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// Interned customer, feature, month start, decision, partition, plan, region.
type GroupKey = (u32, u32, i64, u32, u16, u32, u32);

/// Sums rollup rows per customer × feature × month × decision × partition × plan ×
/// region, with the union of their users (and the days each was seen on) and the earliest
/// event time. Strings are interned once; a row whose key equals the previous row's
/// (rollups are sorted by customer, feature, hour) costs comparisons only.
#[derive(Default)]
struct Summer {
    names: HashMap<Box<str>, u32>,
    strings: Vec<Box<str>>,
    groups: HashMap<GroupKey, Sums>,
}

struct Sums {
    events: u64,
    quantity: f64,
    /// The earliest event time.
    first: i64,
    /// (user, day of the month's bit), one per rollup row a user is in.
    users: Vec<(u32, u32)>,
}

/// The id of a null plan or region.
const NONE: u32 = u32::MAX;

impl Summer {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.names.get(s) {
            return id;
        }
        let id = self.strings.len() as u32;
        self.strings.push(s.into());
        self.names.insert(s.into(), id);
        id
    }

    /// The id of `s`, from `last` when `s` is the string it last held.
    fn cached<'a>(&mut self, last: &mut (Option<&'a str>, u32), s: Option<&'a str>) -> u32 {
        match (s, *last) {
            (None, _) => NONE,
            (Some(v), (Some(prev), id)) if prev == v => id,
            (Some(v), _) => {
                let id = self.intern(v);
                *last = (Some(v), id);
                id
            }
        }
    }

    fn add(&mut self, rollup: &RecordBatch) -> Result<()> {
        let text = |name: &'static str| {
            rollup
                .column_by_name(name)
                .and_then(|c| c.as_string_opt::<i32>())
                .ok_or(Error::Schema(name))
        };
        let (customer, feature, decision, plan) = (
            text(CUSTOMER)?,
            text(FEATURE)?,
            text(DECISION)?,
            text(PLAN)?,
        );
        // Rollups written before they kept the region and the first time lack them.
        let region = rollup
            .column_by_name(REGION)
            .and_then(|c| c.as_string_opt::<i32>());
        let first = rollup
            .column_by_name(FIRST_TIME)
            .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>());
        let hour = rollup
            .column_by_name(HOUR)
            .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
            .ok_or(Error::Schema(HOUR))?
            .values();
        let events = rollup
            .column_by_name(EVENTS)
            .and_then(|c| c.as_primitive_opt::<UInt64Type>())
            .ok_or(Error::Schema(EVENTS))?
            .values();
        let quantity = rollup
            .column_by_name(QUANTITY)
            .and_then(|c| c.as_primitive_opt::<Float64Type>())
            .ok_or(Error::Schema(QUANTITY))?
            .values();
        let partition = rollup
            .column_by_name(PARTITION_ID)
            .and_then(|c| c.as_primitive_opt::<UInt16Type>())
            .ok_or(Error::Schema(PARTITION_ID))?
            .values();
        let users = rollup
            .column_by_name(USERS)
            .and_then(|c| c.as_list_opt::<i32>())
            .ok_or(Error::Schema(USERS))?;
        let user_values = users.values().as_string::<i32>();
        let offsets = users.value_offsets();

        let mut month: Option<(i64, i64)> = None;
        let mut last: [(Option<&str>, u32); 5] = [(None, 0); 5];
        for i in 0..rollup.num_rows() {
            let t = hour[i];
            let start = match month {
                Some((s, e)) if (s..e).contains(&t) => s,
                _ => {
                    let date = DateTime::from_timestamp_micros(t)
                        .map(|d| d.date_naive())
                        .unwrap_or_default();
                    let span = Month::of(date).span();
                    month = Some(span);
                    span.0
                }
            };
            let key = (
                self.cached(&mut last[0], Some(customer.value(i))),
                self.cached(&mut last[1], Some(feature.value(i))),
                start,
                self.cached(&mut last[2], Some(decision.value(i))),
                partition[i],
                self.cached(&mut last[3], plan.is_valid(i).then(|| plan.value(i))),
                self.cached(
                    &mut last[4],
                    region.and_then(|r| r.is_valid(i).then(|| r.value(i))),
                ),
            );
            let seen = first.filter(|f| f.is_valid(i)).map_or(t, |f| f.value(i));
            let (from, to) = (offsets[i] as usize, offsets[i + 1] as usize);
            let day = 1u32 << ((t - start) / MICROS_PER_DAY).clamp(0, 30);
            let mut users: Vec<(u32, u32)> = Vec::with_capacity(to - from);
            for u in from..to {
                users.push((self.intern(user_values.value(u)), day));
            }
            let sums = self.groups.entry(key).or_insert(Sums {
                events: 0,
                quantity: 0.0,
                first: seen,
                users: Vec::new(),
            });
            sums.events += events[i];
            sums.quantity += quantity[i];
            sums.first = sums.first.min(seen);
            sums.users.extend(users);
        }
        Ok(())
    }

    fn finish(self) -> Result<RecordBatch> {
        let Summer {
            strings, groups, ..
        } = self;
        let name = |id: u32| strings.get(id as usize).map(|s| &**s);
        let mut rows: Vec<_> = groups.into_iter().collect();
        rows.sort_unstable_by(|a, b| {
            // Decision first: billing reads two decisions of six, and skips the row groups
            // of the others by their statistics.
            let k = |r: &GroupKey| {
                (
                    name(r.3),
                    name(r.0),
                    name(r.1),
                    r.2,
                    r.4,
                    name(r.5),
                    name(r.6),
                )
            };
            k(&a.0).cmp(&k(&b.0))
        });
        let mut user_names: Vec<&str> = Vec::new();
        let mut user_days: Vec<u32> = Vec::new();
        let mut lengths = Vec::with_capacity(rows.len());
        for (_, sums) in &mut rows {
            let mut seen: Vec<(&str, u32)> = sums
                .users
                .iter()
                .filter_map(|&(u, day)| Some((name(u)?, day)))
                .collect();
            seen.sort_unstable();
            let before = user_names.len();
            for (user, days) in seen {
                if user_names.len() > before && user_names.last() == Some(&user) {
                    if let Some(last) = user_days.last_mut() {
                        *last |= days;
                    }
                } else {
                    user_names.push(user);
                    user_days.push(days);
                }
            }
            lengths.push(user_names.len() - before);
        }
        let offsets = OffsetBuffer::from_lengths(lengths);
        let users = ListArray::try_new(
            Arc::new(Field::new_list_field(DataType::Utf8, false)),
            offsets.clone(),
            Arc::new(StringArray::from_iter_values(user_names)),
            None,
        )?;
        let days = ListArray::try_new(
            Arc::new(Field::new_list_field(DataType::UInt32, false)),
            offsets,
            Arc::new(UInt32Array::from(user_days)),
            None,
        )?;
        let text = |f: fn(&GroupKey) -> u32| -> ArrayRef {
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| name(f(&r.0)).unwrap_or("")),
            ))
        };
        let columns: Vec<ArrayRef> = vec![
            text(|k| k.0),
            text(|k| k.1),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.0.2))
                    .with_timezone("UTC"),
            ),
            text(|k| k.3),
            Arc::new(UInt64Array::from_iter_values(
                rows.iter().map(|r| r.1.events),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.1.quantity),
            )),
            Arc::new(users),
            Arc::new(days),
            Arc::new(UInt16Array::from_iter_values(rows.iter().map(|r| r.0.4))),
            Arc::new(StringArray::from_iter(rows.iter().map(|r| name(r.0.5)))),
            Arc::new(StringArray::from_iter(rows.iter().map(|r| name(r.0.6)))),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.1.first))
                    .with_timezone("UTC"),
            ),
        ];
        Ok(RecordBatch::try_new(monthly_schema(), columns)?)
    }
}

/// What a query reads for one month, as keys relative to the lake
/// (`monthly/period=2026-11/p…parquet`): the monthly files, and the hourly rollups of the
/// events files dated in the month that no monthly file covers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MonthSources {
    pub monthly: Vec<String>,
    pub hourly: Vec<String>,
    /// The billing lines of each monthly file ([`crate::lines`]), when the month is read
    /// from monthly files alone and each has its lines: billing then merges these.
    pub lines: Option<Vec<String>>,
}

impl Lake {
    /// The earliest date the lake has events of (`None`: none).
    pub fn first_date(&self) -> Result<Option<NaiveDate>> {
        Ok(block_on(self.tables.events.files())?
            .iter()
            .filter_map(|f| f.value.parse().ok())
            .min())
    }

    /// The files a query of `month`'s usage reads (see the module). The events table's
    /// snapshot is read before the monthly table's: a monthly file covers settled files
    /// only, which were in the events table when its snapshot was read.
    pub fn month_sources(&self, month: Month) -> Result<MonthSources> {
        let (first, next) = (month.first_day(), month.next().first_day());
        let shown: Vec<PartitionFile> = self
            .snapshot_files(&self.tables.events, None)?
            .into_iter()
            .filter(|f| {
                f.file
                    .value
                    .parse::<NaiveDate>()
                    .is_ok_and(|d| (first..next).contains(&d))
            })
            .collect();
        let monthly = self.month_files(&self.tables.monthly, month, None)?;
        let covered = |f: &PartitionFile| {
            monthly.iter().any(|m| {
                m.partition == f.partition && m.first_seq <= f.first_seq && f.last_seq <= m.last_seq
            })
        };
        let hourly: Vec<String> = shown
            .iter()
            .filter(|f| !covered(f))
            .map(|f| format!("{}/{}", crate::ROLLUPS_TABLE, f.file.path))
            .collect();
        let lines = if hourly.is_empty() {
            let made = self.month_files(&self.tables.billing, month, None)?;
            monthly
                .iter()
                .map(|m| {
                    made.iter()
                        .find(|l| l.file.file_name() == m.file.file_name())
                        .map(|l| l.key.clone())
                })
                .collect::<Option<Vec<_>>>()
        } else {
            None
        };
        Ok(MonthSources {
            monthly: monthly.into_iter().map(|m| m.key).collect(),
            hourly,
            lines,
        })
    }

    /// The files of a monthly table (`monthly` or `billing`) in `month`, of one partition
    /// or all.
    fn month_files(
        &self,
        table: &Table,
        month: Month,
        partition: Option<u16>,
    ) -> Result<Vec<PartitionFile>> {
        let value = month.to_string();
        Ok(self
            .snapshot_files(table, partition)?
            .into_iter()
            .filter(|f| f.file.value == value)
            .collect())
    }

    /// Writes and commits the monthly rollup of each closed month of a partition that its
    /// monthly file does not yet cover entirely, in place of that file. Returns the files
    /// written.
    pub(crate) fn compact_months(
        &self,
        partition: u16,
        up_to_seq: u64,
        fence: &Fence,
        closed_after: Duration,
        now: SystemTime,
    ) -> Result<usize> {
        let mut months: BTreeMap<Month, Vec<PartitionFile>> = BTreeMap::new();
        for f in self.partition_files(partition)? {
            if f.last_seq > up_to_seq {
                continue;
            }
            if let Some(m) = Month::of_date_value(&f.file.value) {
                months.entry(m).or_default().push(f);
            }
        }
        let mut written = 0;
        for (month, files) in months {
            let end = SystemTime::UNIX_EPOCH
                + Duration::from_micros(u64::try_from(month.span().1).unwrap_or(0));
            if now.duration_since(end).map_or(true, |d| d < closed_after) {
                continue;
            }
            written += self.compact_month(partition, month, &files, fence, now)?;
            written += self.compact_meter_month(partition, month, &files, fence, now)?;
        }
        Ok(written)
    }

    /// Writes the monthly rollup of a closed month of a partition from the hourly rollups
    /// of its events `files`, unless its monthly file covers them all. Returns the files
    /// written (0 or 1).
    fn compact_month(
        &self,
        partition: u16,
        month: Month,
        files: &[PartitionFile],
        fence: &Fence,
        now: SystemTime,
    ) -> Result<usize> {
        let current = self.month_files(&self.tables.monthly, month, Some(partition))?;
        let all_covered = files.iter().all(|f| {
            current
                .iter()
                .any(|m| m.first_seq <= f.first_seq && f.last_seq <= m.last_seq)
        });
        if all_covered {
            // Monthly files written before billing lines existed get theirs.
            for m in &current {
                self.backfill_lines(partition, month, m, fence, now)?;
            }
            return Ok(0);
        }
        let mut summer = Summer::default();
        for f in files {
            let rollup = format!("{}/{}", crate::ROLLUPS_TABLE, f.file.path);
            for batch in ParquetRecordBatchReaderBuilder::try_new(self.fetch(&rollup)?)?.build()? {
                summer.add(&batch?)?;
            }
        }
        let rows = summer.finish()?;
        let lines = crate::lines::lines_of(&rows)?;
        let meta = month_meta(partition, files);
        let name = crate::file_name(
            partition,
            meta.first_seq,
            meta.last_seq,
            &crate::file_token(),
        );
        // The lines first: a monthly file in the table has its lines in theirs.
        let replaced = self.month_files(&self.tables.billing, month, Some(partition))?;
        self.replace_month(
            &self.tables.billing,
            month,
            &name,
            &meta,
            &lines,
            &replaced,
            fence,
            now,
        )?;
        self.replace_month(
            &self.tables.monthly,
            month,
            &name,
            &meta,
            &rows,
            &current,
            fence,
            now,
        )?;
        Ok(1)
    }

    /// Writes the closed month of each live meter of a partition
    /// ([`crate::meter_rollup::METER_MONTHLY_TABLE`]: a row per customer × UTC day ×
    /// group) from the meter's rollups of the month's events `files`, unless the meter's
    /// file of the month covers them all, or one of them lacks its rollup (written by the
    /// next compaction's backfill). Returns the files written.
    fn compact_meter_month(
        &self,
        partition: u16,
        month: Month,
        files: &[PartitionFile],
        fence: &Fence,
        now: SystemTime,
    ) -> Result<usize> {
        use crate::meter_rollup::{METER_ROLLUPS_TABLE, days_of, key_of, rollup_path};
        let meters = self.live_meters();
        if meters.is_empty() {
            return Ok(0);
        }
        let have = self.meter_rollup_paths(Some(partition))?;
        let current = self.month_files(&self.tables.meter_monthly, month, Some(partition))?;
        let mut written = 0;
        for meter in meters.iter() {
            let mine: Vec<PartitionFile> = current
                .iter()
                .filter(|m| key_of(&m.file.path) == Some(meter.key()))
                .cloned()
                .collect();
            let covered = files.iter().all(|f| {
                mine.iter()
                    .any(|m| m.first_seq <= f.first_seq && f.last_seq <= m.last_seq)
            });
            let hourly: Vec<String> = files
                .iter()
                .map(|f| rollup_path(&f.file.path, meter.key()))
                .collect();
            if covered || !hourly.iter().all(|h| have.contains(h)) {
                continue;
            }
            let mut rollups = Vec::new();
            for h in &hourly {
                let key = format!("{METER_ROLLUPS_TABLE}/{h}");
                for batch in ParquetRecordBatchReaderBuilder::try_new(self.fetch(&key)?)?.build()? {
                    rollups.push(batch?);
                }
            }
            let rows = days_of(&rollups, meter, partition)?;
            let meta = month_meta(partition, files);
            let name = rollup_path(
                &crate::file_name(
                    partition,
                    meta.first_seq,
                    meta.last_seq,
                    &crate::file_token(),
                ),
                meter.key(),
            );
            self.replace_month(
                &self.tables.meter_monthly,
                month,
                &name,
                &meta,
                &rows,
                &mine,
                fence,
                now,
            )?;
            written += 1;
        }
        Ok(written)
    }

    /// Uploads `rows` as `name` in `month` of a monthly table and commits it in place of
    /// `replaced` (the partition's files of the month), in one commit: readers see the old
    /// files or the new one. The partition's transaction version in the table counts its
    /// commits, and each commit expects the count it read, so of two compactions of the
    /// same partition (one a worker that lost it) only one lands.
    #[allow(clippy::too_many_arguments)]
    fn replace_month(
        &self,
        table: &Table,
        month: Month,
        name: &str,
        meta: &FileMeta,
        rows: &RecordBatch,
        replaced: &[PartitionFile],
        fence: &Fence,
        now: SystemTime,
    ) -> Result<()> {
        let partition = meta.partition;
        let upload = Upload {
            path: format!("{}/{name}", month.dir_name()),
            value: month.to_string(),
            stats: crate::stats(rows),
            bytes: crate::encode(&self.monthly_props, meta, rows)?,
        };
        block_on(async {
            let count = table.version_of(partition).await?;
            let key = format!("{}/{}", table.name, upload.path);
            self.storage.create(&key, upload.bytes.clone()).await?;
            let mut actions = vec![upload.add(table)];
            actions.extend(replaced.iter().map(|f| table.remove(&f.file, now)));
            table
                .commit(
                    actions,
                    &[(partition, count + 1)],
                    &[Expect {
                        partition,
                        after_seq: count,
                    }],
                    Some((fence, partition)),
                    crate::table::optimize(),
                )
                .await
        })?;
        Ok(())
    }

    /// Writes the billing lines of a monthly file that has none (one written before they
    /// existed, or whose lines' commit a crash cut off), from the file's own rows.
    fn backfill_lines(
        &self,
        partition: u16,
        month: Month,
        monthly: &PartitionFile,
        fence: &Fence,
        now: SystemTime,
    ) -> Result<()> {
        let made = self.month_files(&self.tables.billing, month, Some(partition))?;
        if made
            .iter()
            .any(|l| l.file.file_name() == monthly.file.file_name())
        {
            return Ok(());
        }
        let builder = ParquetRecordBatchReaderBuilder::try_new(self.fetch(&monthly.key)?)?;
        // The columns the lines are made of, not the users.
        let wanted = [CUSTOMER, PLAN, FEATURE, DECISION, EVENTS, QUANTITY];
        let roots: Vec<usize> = wanted
            .iter()
            .map(|c| builder.schema().index_of(c).map_err(|_| Error::Schema(c)))
            .collect::<Result<_>>()?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        let batches = builder
            .with_projection(mask)
            .build()?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let schema = batches
            .first()
            .map(RecordBatch::schema)
            .ok_or(Error::Schema(CUSTOMER))?;
        let rows = arrow::compute::concat_batches(&schema, &batches)?;
        let meta = FileMeta {
            partition,
            first_seq: monthly.first_seq,
            last_seq: monthly.last_seq,
            files: 1,
            compacted: None,
        };
        let lines = crate::lines::lines_of(&rows)?;
        self.replace_month(
            &self.tables.billing,
            month,
            monthly.file.file_name(),
            &meta,
            &lines,
            &made,
            fence,
            now,
        )
    }
}

/// What a month's file of a partition's events `files` is: the whole range of their
/// sequences, written once.
fn month_meta(partition: u16, files: &[PartitionFile]) -> FileMeta {
    FileMeta {
        partition,
        first_seq: files.iter().map(|f| f.first_seq).min().unwrap_or(0),
        last_seq: files.iter().map(|f| f.last_seq).max().unwrap_or(0),
        files: 1,
        compacted: Some(files.len()),
    }
}
