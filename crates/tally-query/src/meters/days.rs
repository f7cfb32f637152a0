//! A meter query answered from a meter's closed months alone.
//!
//! A closed month's file ([`tally_store::meter_rollup::METER_MONTHLY_TABLE`]) holds a
//! partition's rows of one meter per customer × UTC day × group, sorted by customer, day
//! and group. When those files cover the whole range, the answer is a fold of their rows:
//! read the few columns the aggregation needs ([`columns`]), add each row to the row
//! before it when both fall in one answer row (a customer's days of one window are
//! adjacent), then order the partial rows by window, customer and group as integers (each
//! customer and group value ranked once) and add the ones that meet. Nothing is hashed
//! per row but a group-by's text, and no text is copied but once per answer row. The
//! answer is the one the DataFusion plan over the same rows gives
//! ([`super::meter_query_from_rollups`]).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, TimeZone, Utc};
use datafusion::arrow::array::{Array, AsArray, RecordBatch, TimestampMicrosecondArray};
use datafusion::arrow::datatypes::{Float64Type, TimestampMicrosecondType, UInt64Type};
use datafusion::error::DataFusionError;
use tally_core::meter::{Aggregation, Meter};
use tally_store::meter_rollup as m;

use super::{MICROS_PER_DAY, MeterQuery, MeterRow, Windows, named_groups, whole_range};
use crate::Result;

/// Whether [`answer`] can answer `query` of `meter` (a `UNIQUE_COUNT` needs each day's
/// distinct values, which the DataFusion plan unnests).
pub fn can_answer(meter: &Meter) -> bool {
    meter.aggregation != Aggregation::UniqueCount
}

/// The columns of the month's files that [`answer`] reads.
pub fn columns(meter: &Meter, query: &MeterQuery) -> Vec<&'static str> {
    let mut out = vec![m::CUSTOMER, m::HOUR, m::EVENTS];
    let (_, named) = named_groups(query);
    let named_groups = named
        .into_iter()
        .chain(query.filter_group_by.keys())
        .any(|n| meter.group_by.contains_key(n));
    if named_groups {
        out.push(m::GROUPS);
    }
    match meter.aggregation {
        Aggregation::Sum | Aggregation::Avg => out.push(m::SUM),
        Aggregation::Min => out.push(m::MIN),
        Aggregation::Max => out.push(m::MAX),
        Aggregation::Latest => {
            out.extend([m::LATEST, m::LATEST_TIME, m::LATEST_INGEST, m::LATEST_SEQ])
        }
        Aggregation::Count | Aggregation::UniqueCount => {}
    }
    if query.window.is_none() {
        out.extend([m::FIRST_TIME, m::LAST_TIME]);
    }
    out
}

/// A partial or whole answer row's totals.
#[derive(Clone, Copy)]
struct Totals {
    events: u64,
    /// The sum, minimum or maximum of the values read, where the meter reads numbers.
    value: Option<f64>,
    /// The latest value by event time, ingest time and stream sequence (`LATEST`).
    latest: Option<((i64, i64, u64), f64)>,
    first: i64,
    last: i64,
}

impl Totals {
    fn add(&mut self, other: &Totals, aggregation: Aggregation) {
        self.events += other.events;
        self.value = match (self.value, other.value) {
            (Some(a), Some(b)) => Some(match aggregation {
                Aggregation::Min => a.min(b),
                Aggregation::Max => a.max(b),
                _ => a + b,
            }),
            (a, b) => a.or(b),
        };
        if let Some((at, v)) = other.latest
            && self.latest.is_none_or(|(mine, _)| at >= mine)
        {
            self.latest = Some((at, v));
        }
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
    }

    /// The answer row's value, `None` where the meter read no value.
    fn value(&self, aggregation: Aggregation) -> Option<f64> {
        match aggregation {
            Aggregation::Count => Some(self.events as f64),
            Aggregation::Avg => self.value.map(|s| s / self.events as f64),
            Aggregation::Latest => self.latest.map(|(_, v)| v),
            _ => self.value,
        }
    }
}

/// Texts numbered in the order first met, ranked in their sort order at the end.
#[derive(Default)]
struct Names<'a> {
    ids: HashMap<&'a str, u32>,
    names: Vec<&'a str>,
}

impl<'a> Names<'a> {
    fn id(&mut self, name: &'a str) -> u32 {
        *self.ids.entry(name).or_insert_with(|| {
            self.names.push(name);
            self.names.len() as u32 - 1
        })
    }

    /// The ids in their names' sort order.
    fn order(&self) -> Vec<u32> {
        sort_order(&self.names)
    }
}

/// Each distinct tuple of group-by values (ids of their texts, `None` for no value),
/// numbered in the order first met.
#[derive(Default)]
struct Tuples {
    ids: HashMap<Vec<Option<u32>>, u32>,
    list: Vec<Vec<Option<u32>>>,
}

impl Tuples {
    fn id(&mut self, tuple: Vec<Option<u32>>) -> u32 {
        if let Some(&id) = self.ids.get(&tuple) {
            return id;
        }
        let id = self.list.len() as u32;
        self.ids.insert(tuple.clone(), id);
        self.list.push(tuple);
        id
    }
}

/// The indexes of `keys` in the keys' sort order.
fn sort_order<K: Ord>(keys: &[K]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..keys.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| keys[a as usize].cmp(&keys[b as usize]));
    order
}

/// Each index's rank, from the indexes in sort order.
fn ranks(order: &[u32]) -> Vec<u32> {
    let mut rank = vec![0; order.len()];
    for (r, &i) in order.iter().enumerate() {
        rank[i as usize] = r as u32;
    }
    rank
}

/// Where a group-by's value comes from in a month's row.
#[derive(Clone, Copy)]
enum Source {
    Customer,
    /// The meter's group-by at this position of `groups`.
    Group(usize),
    /// Not a group-by of the meter: no value.
    Nothing,
}

fn source(meter: &Meter, name: &str) -> Source {
    match name {
        "subject" | "customer_id" => Source::Customer,
        _ => meter
            .group_by
            .keys()
            .position(|k| k == name)
            .map_or(Source::Nothing, Source::Group),
    }
}

/// One month file's rows folded ([`fold`]): partial answer rows keyed by window, customer
/// and group-by values, the last two numbered in the file's own order.
pub struct Folded {
    customers: Vec<String>,
    values: Vec<String>,
    /// Each distinct tuple of group-by values (ids of `values`, `None` for no value).
    tuples: Vec<Vec<Option<u32>>>,
    rows: Vec<((i64, u32, u32), Totals)>,
}

/// The answer's group-bys but the customer, each once, in the order a row's map compares
/// them, and where each is read.
fn answer_groups<'q>(meter: &Meter, query: &'q MeterQuery) -> (Vec<&'q String>, Vec<Source>) {
    let (_, mut named) = named_groups(query);
    named.sort_unstable();
    named.dedup();
    let sources = named.iter().map(|n| source(meter, n)).collect();
    (named, sources)
}

/// The rows of one month file (`batches`, read with [`columns`]) that `query` of `meter`
/// reads, folded. `None` when a window splits a UTC day (a zone whose days are not UTC's
/// in the range), which only rows of hours can answer.
pub fn fold(meter: &Meter, query: &MeterQuery, batches: &[RecordBatch]) -> Result<Option<Folded>> {
    let aggregation = meter.aggregation;
    let start = query.start(meter).map(|t| t.timestamp_micros());
    let end = query.to.map(|t| t.timestamp_micros());
    let (by_customer, _) = named_groups(query);
    let (_, sources) = answer_groups(meter, query);
    let filters: Vec<(Source, &Vec<String>)> = query
        .filter_group_by
        .iter()
        .map(|(n, values)| (source(meter, n), values))
        .collect();
    let mut windows = query.window.map(|size| Windows::new(size, query.time_zone));

    let mut customers = Names::default();
    let mut values = Names::default();
    let mut tuples = Tuples::default();
    let mut partial: Vec<((i64, u32, u32), Totals)> = Vec::new();
    for batch in batches {
        let column = |name: &str| batch.column_by_name(name);
        let missing = |name: &str| {
            DataFusionError::Internal(format!("a meter's month file lacks its {name} column"))
        };
        let customer = column(m::CUSTOMER)
            .and_then(|c| c.as_string_opt::<i32>())
            .ok_or_else(|| missing(m::CUSTOMER))?;
        let hour = column(m::HOUR)
            .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
            .ok_or_else(|| missing(m::HOUR))?
            .values();
        let events = column(m::EVENTS)
            .and_then(|c| c.as_primitive_opt::<UInt64Type>())
            .ok_or_else(|| missing(m::EVENTS))?;
        let groups = column(m::GROUPS).and_then(|c| c.as_list_opt::<i32>());
        let group_values = groups.map(|g| g.values().as_string::<i32>());
        let number = |name: &str| column(name).and_then(|c| c.as_primitive_opt::<Float64Type>());
        let value = match aggregation {
            Aggregation::Sum | Aggregation::Avg => number(m::SUM),
            Aggregation::Min => number(m::MIN),
            Aggregation::Max => number(m::MAX),
            Aggregation::Latest => number(m::LATEST),
            Aggregation::Count | Aggregation::UniqueCount => None,
        };
        let time = |name: &str| {
            column(name).and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
        };
        let (first, last) = (time(m::FIRST_TIME), time(m::LAST_TIME));
        let latest_at = (
            time(m::LATEST_TIME),
            time(m::LATEST_INGEST),
            column(m::LATEST_SEQ).and_then(|c| c.as_primitive_opt::<UInt64Type>()),
        );
        // The row's value of the meter's group-by at `at`.
        let group = |row: usize, at: usize| -> Option<&str> {
            let (g, texts) = (groups?, group_values?);
            let offsets = g.value_offsets();
            let j = offsets[row] as usize + at;
            (j < offsets[row + 1] as usize && texts.is_valid(j)).then(|| texts.value(j))
        };
        let text = |row: usize, source: Source| -> Option<&str> {
            match source {
                Source::Customer => Some(customer.value(row)),
                Source::Group(at) => group(row, at),
                Source::Nothing => None,
            }
        };
        // The customer of the row before, its id and whether the query asks for it.
        let mut current: Option<(&str, u32, bool)> = None;
        for row in 0..batch.num_rows() {
            let day = hour[row];
            if start.is_some_and(|s| day < s) || end.is_some_and(|e| day >= e) {
                continue;
            }
            let name = customer.value(row);
            let (id, asked) = match current {
                Some((c, id, asked)) if c == name => (id, asked),
                _ => {
                    let asked =
                        query.customers.is_empty() || query.customers.iter().any(|c| c == name);
                    let id = customers.id(name);
                    current = Some((name, id, asked));
                    (id, asked)
                }
            };
            if !asked
                || !filters.iter().all(|(source, values)| {
                    text(row, *source).is_some_and(|t| values.iter().any(|v| v == t))
                })
            {
                continue;
            }
            let window = match &mut windows {
                Some(w) => {
                    let first = w.start(day);
                    if w.start(day + MICROS_PER_DAY - 1) != first {
                        return Ok(None);
                    }
                    first
                }
                None => 0,
            };
            let tuple = if sources.is_empty() {
                0
            } else {
                tuples.id(sources
                    .iter()
                    .map(|&s| text(row, s).map(|t| values.id(t)))
                    .collect())
            };
            let at = |a: Option<&TimestampMicrosecondArray>| a.map_or(0, |a| a.value(row));
            let valued = value.filter(|v| v.is_valid(row));
            let totals = Totals {
                events: events.value(row),
                value: valued
                    .map(|v| v.value(row))
                    .filter(|_| aggregation != Aggregation::Latest),
                latest: match (aggregation, valued, latest_at.2) {
                    (Aggregation::Latest, Some(v), Some(seq)) => Some((
                        (at(latest_at.0), at(latest_at.1), seq.value(row)),
                        v.value(row),
                    )),
                    _ => None,
                },
                first: first.map_or(i64::MAX, |f| f.value(row)),
                last: last.map_or(i64::MIN, |l| l.value(row)),
            };
            let key = (window, if by_customer { id } else { 0 }, tuple);
            match partial.last_mut() {
                Some((k, t)) if *k == key => t.add(&totals, aggregation),
                _ => partial.push((key, totals)),
            }
        }
    }
    let owned = |n: Names<'_>| n.names.into_iter().map(str::to_owned).collect();
    Ok(Some(Folded {
        customers: owned(customers),
        values: owned(values),
        tuples: tuples.list,
        rows: partial,
    }))
}

/// `query` of `meter` answered from the month files' rows, each file [`fold`]ed: rows
/// ordered by window, customer and group-by values, as [`super::meter_query`] orders
/// them.
pub fn answer(meter: &Meter, query: &MeterQuery, folded: &[Folded]) -> Vec<MeterRow> {
    let aggregation = meter.aggregation;
    let (by_customer, _) = named_groups(query);
    let (named, sources) = answer_groups(meter, query);
    // The files' customers, values and tuples numbered across the files.
    let mut customers = Names::default();
    let mut values = Names::default();
    let mut tuples = Tuples::default();
    let mut customer_ids: Vec<Vec<u32>> = Vec::with_capacity(folded.len());
    let mut tuple_ids: Vec<Vec<u32>> = Vec::with_capacity(folded.len());
    for f in folded {
        customer_ids.push(f.customers.iter().map(|c| customers.id(c)).collect());
        let value_ids: Vec<u32> = f.values.iter().map(|v| values.id(v)).collect();
        tuple_ids.push(
            f.tuples
                .iter()
                .map(|t| tuples.id(t.iter().map(|v| v.map(|v| value_ids[v as usize])).collect()))
                .collect(),
        );
    }

    // The partial rows by window, customer and groups as the answer orders them.
    let customer_order = customers.order();
    let customer_rank = ranks(&customer_order);
    let value_rank = ranks(&values.order());
    let tuple_order = sort_order(
        &tuples
            .list
            .iter()
            .map(|t| {
                t.iter()
                    .map(|v| v.map(|v| value_rank[v as usize]))
                    .collect()
            })
            .collect::<Vec<Vec<Option<u32>>>>(),
    );
    let tuple_rank = ranks(&tuple_order);
    // The partial rows by window, customer and groups. The files' rows come by customer,
    // the answer's by window: each window's rows are gathered in a bucket of their own,
    // in the files' order (a pass that reads and writes in sequence), then each bucket is
    // sorted by customer and groups.
    let mut window_ids: hashbrown::HashMap<i64, u32> = hashbrown::HashMap::new();
    let mut windows: Vec<i64> = Vec::new();
    let rows_of = || {
        folded
            .iter()
            .enumerate()
            .flat_map(|(f, file)| file.rows.iter().map(move |r| (f, r)))
    };
    let ids: Vec<u32> = rows_of()
        .map(|(_, ((w, _, _), _))| {
            *window_ids.entry(*w).or_insert_with(|| {
                windows.push(*w);
                windows.len() as u32 - 1
            })
        })
        .collect();
    let by_window = sort_order(&windows);
    let bucket_of = ranks(&by_window);
    let mut sizes = vec![0usize; windows.len()];
    for &i in &ids {
        sizes[bucket_of[i as usize] as usize] += 1;
    }
    let mut buckets: Vec<Vec<((u32, u32), Totals)>> =
        sizes.iter().map(|&n| Vec::with_capacity(n)).collect();
    for ((f, &((_, c, t), totals)), &i) in rows_of().zip(&ids) {
        let c = if by_customer {
            customer_rank[customer_ids[f][c as usize] as usize]
        } else {
            0
        };
        let t = if sources.is_empty() {
            0
        } else {
            tuple_rank[tuple_ids[f][t as usize] as usize]
        };
        buckets[bucket_of[i as usize] as usize].push(((c, t), totals));
    }
    let ids_len = ids.len();
    drop(ids);
    let utc = |t: i64| Utc.timestamp_micros(t).single().unwrap_or_default();
    // The window of the row before and its end (rows come by window).
    let mut window_at: Option<(i64, DateTime<Utc>, DateTime<Utc>)> = None;
    let mut rows: Vec<MeterRow> = Vec::with_capacity(ids_len);
    let mut row = |(window, c, t): (i64, u32, u32), totals: Totals| {
        let Some(value) = totals.value(aggregation) else {
            return;
        };
        let (window_start, window_end) = match query.window {
            Some(size) => match window_at {
                Some((w, s, e)) if w == window => (s, e),
                _ => {
                    let s = utc(window);
                    let e = size.end(s, query.time_zone);
                    window_at = Some((window, s, e));
                    (s, e)
                }
            },
            None => whole_range(
                query.start(meter),
                query.to,
                utc(totals.first),
                utc(totals.last),
            ),
        };
        let group_by: BTreeMap<String, Option<String>> = if sources.is_empty() {
            BTreeMap::new()
        } else {
            named
                .iter()
                .zip(&tuples.list[tuple_order[t as usize] as usize])
                .map(|(n, v)| ((*n).clone(), v.map(|v| values.names[v as usize].to_owned())))
                .collect()
        };
        rows.push(MeterRow {
            value,
            window_start,
            window_end,
            customer: by_customer
                .then(|| customers.names[customer_order[c as usize] as usize].to_owned()),
            group_by,
        });
    };
    // Partial rows of one key, added up.
    for (b, mut bucket) in buckets.into_iter().enumerate() {
        let window = windows[by_window[b] as usize];
        bucket.sort_unstable_by_key(|(k, _)| *k);
        let mut open: Option<((u32, u32), Totals)> = None;
        for (key, totals) in bucket {
            match &mut open {
                Some((k, t)) if *k == key => t.add(&totals, aggregation),
                _ => {
                    if let Some(((c, t), totals)) = open.replace((key, totals)) {
                        row((window, c, t), totals);
                    }
                }
            }
        }
        if let Some(((c, t), totals)) = open {
            row((window, c, t), totals);
        }
    }
    if query.window.is_none() {
        // Each group's window is its own there: ordered by it first (a stable sort keeps
        // the order of customers and groups).
        rows.sort_by_key(|r| r.window_start);
    }
    rows
}
