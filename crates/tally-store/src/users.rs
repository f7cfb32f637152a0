//! Distinct users per feature per day, week and month, counted from the rollups.
//!
//! A user is a customer's `user_id` (the same id under two customers is two users), and
//! only use counts (events decided `accepted` or `overage`). Counting distinct users
//! exactly needs every (customer, feature, user) seen, so it cannot be summed from counts;
//! it is a fold over the rollups instead of a query: per partition (a customer lives in
//! one, so the partitions' counts add up), each (customer, feature, user) gets the days of
//! the range it was seen on — from the monthly rollups' day masks (`user_days`) where a
//! month is compacted, from the hourly rollups of the files they do not cover otherwise —
//! and adds one to each day, ISO week and month those days fall in. Only the range's days
//! count: a week or month the range cuts holds only the range's days.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{TimestampMicrosecondType, UInt32Type};
use chrono::{DateTime, Datelike, Days, NaiveDate};
use hashbrown::HashMap;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::compact::parse_name;
use crate::monthly::{Month, USER_DAYS};
use crate::rollup::{CUSTOMER, DECISION, FEATURE, HOUR, USERS};
use crate::{Error, Lake, Result, io_err};

/// The calendar unit of a distinct-users count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Grain {
    Day,
    /// An ISO week, from Monday.
    Week,
    Month,
}

impl Grain {
    pub const fn as_str(self) -> &'static str {
        match self {
            Grain::Day => "day",
            Grain::Week => "week",
            Grain::Month => "month",
        }
    }

    /// The first day of the day, week or month holding `d`.
    pub fn bucket_of(self, d: NaiveDate) -> NaiveDate {
        match self {
            Grain::Day => d,
            Grain::Week => d - Days::new(u64::from(d.weekday().num_days_from_monday())),
            Grain::Month => Month::of(d).first_day(),
        }
    }

    /// The first day of the next bucket after the one starting on `bucket`.
    pub fn next(self, bucket: NaiveDate) -> NaiveDate {
        match self {
            Grain::Day => bucket + Days::new(1),
            Grain::Week => bucket + Days::new(7),
            Grain::Month => Month::of(bucket).next().first_day(),
        }
    }

    /// The buckets the days `from` to `to` (both included) overlap, in order.
    pub fn buckets(self, from: NaiveDate, to: NaiveDate) -> Vec<NaiveDate> {
        let mut out = Vec::new();
        let mut b = self.bucket_of(from);
        while b <= to {
            out.push(b);
            b = self.next(b);
        }
        out
    }
}

/// Distinct users of a feature in one day, week or month.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveUsers {
    pub feature: String,
    pub grain: Grain,
    /// The bucket's first day.
    pub bucket: NaiveDate,
    pub users: u64,
}

/// A rollup file to read, and the month it belongs to.
#[derive(Debug)]
enum Source {
    Monthly(PathBuf),
    Hourly(PathBuf),
}

/// Counts per (feature, grain, bucket).
type Counts = BTreeMap<(String, Grain, NaiveDate), u64>;

impl Lake {
    /// Distinct users per feature (only `feature`, when given) per day, week and month
    /// with any, over the days `from` to `to` (both included); see the module.
    pub fn active_users(
        &self,
        from: NaiveDate,
        to: NaiveDate,
        feature: Option<&str>,
    ) -> Result<Vec<ActiveUsers>> {
        let mut months = Vec::new();
        let mut m = Month::of(from);
        while m.first_day() <= to {
            months.push(m);
            m = m.next();
        }
        // Each partition's sources, month by month.
        let mut partitions: BTreeMap<u16, Vec<(usize, Source)>> = BTreeMap::new();
        for (i, &month) in months.iter().enumerate() {
            let sources = self.month_sources(month)?;
            let files = sources
                .monthly
                .into_iter()
                .map(Source::Monthly)
                .chain(sources.hourly.into_iter().map(Source::Hourly));
            for source in files {
                let (Source::Monthly(path) | Source::Hourly(path)) = &source;
                let Some((p, _, _)) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(parse_name)
                else {
                    continue;
                };
                partitions.entry(p).or_default().push((i, source));
            }
        }
        let work = Mutex::new(partitions.into_values().collect::<Vec<_>>());
        let total = Mutex::new(Counts::new());
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        loop {
                            let next = work.lock().map_err(|_| poisoned())?.pop();
                            let Some(sources) = next else {
                                return Ok(());
                            };
                            let counts = fold(&months, &sources, from, to, feature)?;
                            let mut total = total.lock().map_err(|_| poisoned())?;
                            for (k, n) in counts {
                                *total.entry(k).or_default() += n;
                            }
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| poisoned())??;
            }
            Ok::<_, Error>(())
        })?;
        let total = total.into_inner().map_err(|_| poisoned())?;
        Ok(total
            .into_iter()
            .map(|((feature, grain, bucket), users)| ActiveUsers {
                feature,
                grain,
                bucket,
                users,
            })
            .collect())
    }
}

fn poisoned() -> Error {
    Error::Checkpoint("a thread counting distinct users panicked".to_owned())
}

/// One partition's counts.
fn fold(
    months: &[Month],
    sources: &[(usize, Source)],
    from: NaiveDate,
    to: NaiveDate,
    only: Option<&str>,
) -> Result<Counts> {
    let mut names: HashMap<Box<str>, u32> = HashMap::new();
    let mut strings: Vec<Box<str>> = Vec::new();
    let mut intern = |s: &str| -> u32 {
        if let Some(&id) = names.get(s) {
            return id;
        }
        let id = strings.len() as u32;
        strings.push(s.into());
        names.insert(s.into(), id);
        id
    };
    // (customer, feature, user) → (month, days seen in the range) per month.
    let mut seen: HashMap<(u32, u32, u32), Vec<(usize, u32)>> = HashMap::new();
    let mut mark = |key: (u32, u32, u32), month: usize, days: u32| {
        let entry = seen.entry(key).or_default();
        match entry.iter_mut().find(|(m, _)| *m == month) {
            Some((_, d)) => *d |= days,
            None => entry.push((month, days)),
        }
    };
    for (i, source) in sources {
        let month = months[*i];
        let first = month.first_day().max(from);
        let last = (month.next().first_day() - Days::new(1)).min(to);
        // The range's days of this month, as bits.
        let in_range = (first.day0()..=last.day0()).fold(0u32, |m, d| m | 1 << d);
        match source {
            Source::Monthly(path) => {
                for batch in read(path, &[CUSTOMER, FEATURE, DECISION, USERS, USER_DAYS])? {
                    let (customer, feature, decision) = (
                        batch.column(0).as_string::<i32>(),
                        batch.column(1).as_string::<i32>(),
                        batch.column(2).as_string::<i32>(),
                    );
                    let users = batch.column(3).as_list::<i32>();
                    let days = batch.column(4).as_list::<i32>();
                    let user_names = users.values().as_string::<i32>();
                    let user_days = days.values().as_primitive::<UInt32Type>();
                    let offsets = users.value_offsets();
                    for r in 0..batch.num_rows() {
                        if !used(decision.value(r)) || only.is_some_and(|f| f != feature.value(r)) {
                            continue;
                        }
                        let (c, f) = (intern(customer.value(r)), intern(feature.value(r)));
                        for u in offsets[r] as usize..offsets[r + 1] as usize {
                            let d = user_days.value(u) & in_range;
                            if d != 0 {
                                mark((c, f, intern(user_names.value(u))), *i, d);
                            }
                        }
                    }
                }
            }
            Source::Hourly(path) => {
                for batch in read(path, &[CUSTOMER, FEATURE, DECISION, USERS, HOUR])? {
                    let (customer, feature, decision) = (
                        batch.column(0).as_string::<i32>(),
                        batch.column(1).as_string::<i32>(),
                        batch.column(2).as_string::<i32>(),
                    );
                    let users = batch.column(3).as_list::<i32>();
                    let user_names = users.values().as_string::<i32>();
                    let offsets = users.value_offsets();
                    let hours = batch.column(4).as_primitive::<TimestampMicrosecondType>();
                    for r in 0..batch.num_rows() {
                        if !used(decision.value(r)) || only.is_some_and(|f| f != feature.value(r)) {
                            continue;
                        }
                        let Some(day) =
                            DateTime::from_timestamp_micros(hours.value(r)).map(|t| t.date_naive())
                        else {
                            continue;
                        };
                        if day < first || day > last {
                            continue;
                        }
                        let (c, f) = (intern(customer.value(r)), intern(feature.value(r)));
                        for u in offsets[r] as usize..offsets[r + 1] as usize {
                            mark((c, f, intern(user_names.value(u))), *i, 1 << day.day0());
                        }
                    }
                }
            }
        }
    }
    let mut counts: HashMap<(u32, Grain, NaiveDate), u64> = HashMap::new();
    let mut weeks: Vec<NaiveDate> = Vec::new();
    for ((_, f, _), by_month) in seen {
        weeks.clear();
        for (i, days) in by_month {
            let start = months[i].first_day();
            *counts.entry((f, Grain::Month, start)).or_default() += 1;
            let mut bits = days;
            while bits != 0 {
                let d = start + Days::new(u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
                *counts.entry((f, Grain::Day, d)).or_default() += 1;
                let week = Grain::Week.bucket_of(d);
                if !weeks.contains(&week) {
                    weeks.push(week);
                }
            }
        }
        for &w in &weeks {
            *counts.entry((f, Grain::Week, w)).or_default() += 1;
        }
    }
    Ok(counts
        .into_iter()
        .map(|((f, g, b), n)| ((strings[f as usize].to_string(), g, b), n))
        .collect())
}

fn used(decision: &str) -> bool {
    decision == "accepted" || decision == "overage"
}

/// A Parquet file's `columns`, in that order.
fn read(path: &Path, columns: &[&str]) -> Result<Vec<RecordBatch>> {
    let file = File::open(path).map_err(io_err(path))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
    let schema = builder.schema().clone();
    let mut roots = Vec::with_capacity(columns.len());
    for &c in columns {
        roots.push(
            schema
                .index_of(c)
                .map_err(|_| Error::MissingColumn(c.to_owned()))?,
        );
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots.iter().copied());
    let mut out = Vec::new();
    for batch in builder.with_projection(mask).build()? {
        let batch = batch?;
        // The projection keeps the file's column order; put them in the asked order.
        let projected = batch.schema();
        let order: Vec<usize> = columns
            .iter()
            .map(|c| {
                projected
                    .index_of(c)
                    .map_err(|_| Error::MissingColumn((*c).to_owned()))
            })
            .collect::<Result<_>>()?;
        out.push(batch.project(&order)?);
    }
    Ok(out)
}
