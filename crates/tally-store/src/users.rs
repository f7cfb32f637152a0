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
use std::sync::Mutex;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{TimestampMicrosecondType, UInt32Type};
use chrono::{DateTime, Datelike, Days, NaiveDate};
use hashbrown::HashMap;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::compact::parse_name;
use crate::monthly::{Month, USER_DAYS};
use crate::rollup::{CUSTOMER, DECISION, FEATURE, HOUR, USERS};
use crate::{Error, Lake, Result};

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
/// A file a fold reads, by its key in the lake.
enum Source {
    Monthly(String),
    Hourly(String),
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
                let (Source::Monthly(key) | Source::Hourly(key)) = &source;
                let Some((p, _, _)) = key.rsplit('/').next().and_then(parse_name) else {
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
                            let counts = fold(self, &months, &sources, from, to, feature)?;
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
///
/// Users are a customer's own, so the fold goes customer by customer: every row of the
/// partition's sources is read, the rows are ordered by customer, and each customer's
/// (user, feature) pairs are gathered in a small table that stays in cache and is
/// emptied for the next customer. Counts go to dense arrays by feature and day, week or
/// month of the range.
///
/// The partition's rollup rows of the range are held at once (the order by customer
/// needs them all): a month's monthly file per month compacted, and the hourly rollups of
/// the files none covers, which hold about a row per event until the month is compacted.
fn fold(
    lake: &Lake,
    months: &[Month],
    sources: &[(usize, Source)],
    from: NaiveDate,
    to: NaiveDate,
    only: Option<&str>,
) -> Result<Counts> {
    let mut batches: Vec<(usize, bool, RecordBatch)> = Vec::new();
    for (i, source) in sources {
        let (key, monthly, last) = match source {
            Source::Monthly(key) => (key, true, USER_DAYS),
            Source::Hourly(key) => (key, false, HOUR),
        };
        for batch in read(
            lake.fetch(key)?,
            &[CUSTOMER, FEATURE, DECISION, USERS, last],
        )? {
            batches.push((*i, monthly, batch));
        }
    }
    let views: Vec<Rows<'_>> = batches
        .iter()
        .map(|(i, monthly, batch)| Rows::of(*i, *monthly, batch))
        .collect();
    // Every used row of the range, by customer.
    let mut rows: Vec<(&str, u32, u32)> = Vec::new();
    for (b, v) in views.iter().enumerate() {
        for r in 0..v.customer.len() {
            if used(v.decision.value(r)) && only.is_none_or(|f| f == v.feature.value(r)) {
                rows.push((v.customer.value(r), b as u32, r as u32));
            }
        }
    }
    rows.sort_unstable();

    let range = Range::new(months, from, to);
    let mut features: HashMap<&str, usize> = HashMap::new();
    let mut counts = Dense::default();
    let mut seen: HashMap<(&str, usize), Seen> = HashMap::new();
    let mut more: Vec<Vec<(usize, u32)>> = Vec::new();
    let mut weeks: Vec<u64> = vec![0; range.weeks.div_ceil(64)];
    for group in rows.chunk_by(|a, b| a.0 == b.0) {
        seen.clear();
        more.clear();
        for &(_, b, r) in group {
            let v = &views[b as usize];
            let r = r as usize;
            let name = v.feature.value(r);
            let next = features.len();
            let f = *features.entry(name).or_insert(next);
            let i = v.month;
            let (start, end) = (v.offsets[r] as usize, v.offsets[r + 1] as usize);
            match v.days {
                UserDays::Monthly(days) => {
                    for u in start..end {
                        let d = days.value(u) & range.in_month[i];
                        if d != 0 {
                            mark(&mut seen, &mut more, (v.users.value(u), f), i, d);
                        }
                    }
                }
                UserDays::Hourly(hours) => {
                    let Some(day) =
                        DateTime::from_timestamp_micros(hours.value(r)).map(|t| t.date_naive())
                    else {
                        continue;
                    };
                    if range.months[i] != Month::of(day).first_day()
                        || range.in_month[i] & 1 << day.day0() == 0
                    {
                        continue;
                    }
                    for u in start..end {
                        mark(
                            &mut seen,
                            &mut more,
                            (v.users.value(u), f),
                            i,
                            1 << day.day0(),
                        );
                    }
                }
            }
        }
        for (&(_, f), s) in &seen {
            let extra = s.more.map_or(&[][..], |k| more[k].as_slice());
            for &(i, days) in std::iter::once(&(s.month, s.days)).chain(extra) {
                counts.add(f, Grain::Month, i, 1);
                let offset = range.month_offset[i];
                let mut bits = days;
                while bits != 0 {
                    let day = (offset + i64::from(bits.trailing_zeros())) as usize;
                    bits &= bits - 1;
                    counts.add(f, Grain::Day, day, 1);
                    let week = (day + range.monday_offset) / 7;
                    weeks[week / 64] |= 1 << (week % 64);
                }
            }
            for (w, word) in weeks.iter_mut().enumerate() {
                let mut bits = std::mem::take(word);
                while bits != 0 {
                    counts.add(f, Grain::Week, w * 64 + bits.trailing_zeros() as usize, 1);
                    bits &= bits - 1;
                }
            }
        }
    }
    let mut out = Counts::new();
    for (name, f) in features {
        for (grain, by_index) in counts.of(f) {
            for (index, &n) in by_index.iter().enumerate() {
                if n > 0 {
                    out.insert((name.to_owned(), grain, range.bucket(grain, index)), n);
                }
            }
        }
    }
    Ok(out)
}

/// Adds `days` of month `i` to what a (user, feature) of the customer was seen on.
fn mark<'a>(
    seen: &mut HashMap<(&'a str, usize), Seen>,
    more: &mut Vec<Vec<(usize, u32)>>,
    key: (&'a str, usize),
    i: usize,
    days: u32,
) {
    let s = seen.entry(key).or_insert(Seen {
        month: i,
        days: 0,
        more: None,
    });
    if s.month == i {
        s.days |= days;
        return;
    }
    let extra = match s.more {
        Some(k) => &mut more[k],
        None => {
            s.more = Some(more.len());
            more.push(Vec::new());
            more.last_mut().expect("just pushed")
        }
    };
    match extra.iter_mut().find(|(m, _)| *m == i) {
        Some((_, d)) => *d |= days,
        None => extra.push((i, days)),
    }
}

/// A (customer, feature, user)'s days: those of `month`, and of any other month of the
/// range in `more` (an index into the fold's side list; a range of one month has none).
struct Seen {
    month: usize,
    days: u32,
    more: Option<usize>,
}

/// The days of a rollup row's users: each user's day mask (monthly), or the row's hour
/// (hourly: every user was seen that day).
enum UserDays<'a> {
    Monthly(&'a arrow::array::UInt32Array),
    Hourly(&'a arrow::array::TimestampMicrosecondArray),
}

/// A rollup batch's columns, typed.
struct Rows<'a> {
    month: usize,
    customer: &'a arrow::array::StringArray,
    feature: &'a arrow::array::StringArray,
    decision: &'a arrow::array::StringArray,
    users: &'a arrow::array::StringArray,
    offsets: &'a [i32],
    days: UserDays<'a>,
}

impl<'a> Rows<'a> {
    fn of(month: usize, monthly: bool, batch: &'a RecordBatch) -> Rows<'a> {
        let users = batch.column(3).as_list::<i32>();
        Rows {
            month,
            customer: batch.column(0).as_string::<i32>(),
            feature: batch.column(1).as_string::<i32>(),
            decision: batch.column(2).as_string::<i32>(),
            users: users.values().as_string::<i32>(),
            offsets: users.value_offsets(),
            days: if monthly {
                UserDays::Monthly(
                    batch
                        .column(4)
                        .as_list::<i32>()
                        .values()
                        .as_primitive::<UInt32Type>(),
                )
            } else {
                UserDays::Hourly(batch.column(4).as_primitive::<TimestampMicrosecondType>())
            },
        }
    }
}

/// The range's days, weeks and months as indices from its start.
struct Range {
    from: NaiveDate,
    /// Per month of the range: the range's days of it, as bits (bit `d - 1` for day `d`).
    in_month: Vec<u32>,
    /// Per month: the index of its first day from the range's first (negative for a
    /// month that starts before the range; its days before the range are not in
    /// `in_month`).
    month_offset: Vec<i64>,
    /// Days from the Monday of the range's first week to the range's first day.
    monday_offset: usize,
    weeks: usize,
    months: Vec<NaiveDate>,
}

impl Range {
    fn new(months: &[Month], from: NaiveDate, to: NaiveDate) -> Range {
        let mut in_month = Vec::with_capacity(months.len());
        let mut month_offset = Vec::with_capacity(months.len());
        for m in months {
            let first = m.first_day().max(from);
            let last = (m.next().first_day() - Days::new(1)).min(to);
            in_month.push((first.day0()..=last.day0()).fold(0u32, |bits, d| bits | 1 << d));
            month_offset.push((m.first_day() - from).num_days());
        }
        let monday_offset = from.weekday().num_days_from_monday() as usize;
        let days = (to - from).num_days().max(0) as usize + 1;
        Range {
            from,
            in_month,
            month_offset,
            monday_offset,
            weeks: (days + monday_offset).div_ceil(7),
            months: months.iter().map(|m| m.first_day()).collect(),
        }
    }

    /// The first day of the bucket at `index` of `grain`.
    fn bucket(&self, grain: Grain, index: usize) -> NaiveDate {
        match grain {
            Grain::Day => self.from + Days::new(index as u64),
            Grain::Week => {
                self.from - Days::new(self.monday_offset as u64) + Days::new(7 * index as u64)
            }
            Grain::Month => self.months[index],
        }
    }
}

/// Counts by feature (the fold's own numbers) and index of day, week or month.
#[derive(Default)]
struct Dense {
    by_feature: Vec<[Vec<u64>; 3]>,
}

impl Dense {
    fn add(&mut self, feature: usize, grain: Grain, index: usize, n: u64) {
        if self.by_feature.len() <= feature {
            self.by_feature.resize_with(feature + 1, Default::default);
        }
        let counts = &mut self.by_feature[feature][grain as usize];
        if counts.len() <= index {
            counts.resize(index + 1, 0);
        }
        counts[index] += n;
    }

    fn of(&self, feature: usize) -> impl Iterator<Item = (Grain, &[u64])> {
        [Grain::Day, Grain::Week, Grain::Month]
            .into_iter()
            .zip(self.by_feature.get(feature).into_iter().flatten())
            .map(|(g, c)| (g, c.as_slice()))
    }
}

fn used(decision: &str) -> bool {
    decision == "accepted" || decision == "overage"
}

/// A Parquet file's `columns`, in that order.
fn read(file: bytes::Bytes, columns: &[&str]) -> Result<Vec<RecordBatch>> {
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
