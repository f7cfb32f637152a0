//! Meter rollups: what each live meter reads of an events file, per customer × UTC hour ×
//! the meter's group-by values, in a file of its own beside the events file.
//!
//! ```text
//! <root>/meter_rollups/date=YYYY-MM-DD/<events file's name>.<key>.parquet
//! ```
//!
//! **What a row holds.** The events of its group the meter read a value of (every event
//! for `COUNT`), and what any of OpenMeter's aggregations needs to combine groups: the
//! values' sum, least and greatest; the latest value by event time, then ingest time, then
//! stream sequence, with those three; the distinct texts (`UNIQUE_COUNT`); the first and
//! last event times. A meter reads an event as its query reads the events table: the
//! metered decisions only ([`METERED`]), the lake's JSON rules ([`JsonPath::text`],
//! [`tally_core::meter::number`]), Tally's own properties from their columns.
//!
//! **Keys.** A meter's measure never changes under its id; its group-bys may. Its key is
//! its id and a digest of its group-by names and paths ([`rollup_key`]), so rollups written
//! under other group-bys are another key's.
//!
//! **Coverage.** A meter rollup answers for the events file of its name and nothing else:
//! a query reads the meter's rollups of the events files that have one and the events of
//! those that do not. Nothing is counted twice when compaction replaces a file (its name
//! changes), a meter defined later reads history from the events' `data` until compaction
//! writes its rollups, and a rollup lost to a crash costs speed, not an answer. Every
//! events file gets one rollup per live meter, empty when the file holds none of the
//! meter's events: the empty file says so.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, LazyLock};

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Float64Builder, ListArray, ListBuilder, RecordBatch,
    StringArray, StringBuilder, TimestampMicrosecondArray, UInt16Array, UInt64Array, UInt64Builder,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{
    DataType, Field, FieldRef, Float64Type, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType,
    UInt16Type, UInt64Type,
};
use hashbrown::{HashMap, HashSet, HashTable};
use tally_core::meter::{Aggregation, JsonPath, Meter, OwnProperty};
use tally_core::{Decision, schema};

use crate::{Error, Result};

/// The meter rollups table's directory under the lake root.
pub const METER_ROLLUPS_TABLE: &str = "meter_rollups";

/// The decisions whose events meters read: the billable ones, `late` (usage that
/// happened, billed apart) and `metered` (a customer without a definition, under
/// `ingest.meter_unknown_customers`).
pub const METERED: [Decision; 4] = [
    Decision::Accepted,
    Decision::Overage,
    Decision::Late,
    Decision::Metered,
];

pub const CUSTOMER: &str = schema::CUSTOMER;
/// The event time truncated to its UTC hour.
pub const HOUR: &str = "hour";
/// The group's values of the meter's group-bys, in the order of their names.
pub const GROUPS: &str = "groups";
/// The events whose value the meter read.
pub const EVENTS: &str = "events";
pub const SUM: &str = "sum";
pub const MIN: &str = "min";
pub const MAX: &str = "max";
/// The value of the group's latest event (by event time, ingest time, stream sequence).
pub const LATEST: &str = "latest";
pub const LATEST_TIME: &str = "latest_time";
pub const LATEST_INGEST: &str = "latest_ingest";
pub const LATEST_SEQ: &str = "latest_seq";
/// The distinct texts a `UNIQUE_COUNT` meter read, sorted (empty for the others).
pub const VALUES: &str = "values";
pub const FIRST_TIME: &str = "first_time";
pub const LAST_TIME: &str = "last_time";
pub const PARTITION_ID: &str = schema::PARTITION_ID;

const MICROS_PER_HOUR: i64 = 3_600_000_000;

static GROUP_ITEM: LazyLock<FieldRef> =
    LazyLock::new(|| Arc::new(Field::new_list_field(DataType::Utf8, true)));
static VALUE_ITEM: LazyLock<FieldRef> =
    LazyLock::new(|| Arc::new(Field::new_list_field(DataType::Utf8, false)));

static METER_ROLLUP_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let time = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new(CUSTOMER, DataType::Utf8, false),
        Field::new(HOUR, time(), false),
        Field::new(GROUPS, DataType::List(GROUP_ITEM.clone()), false),
        Field::new(EVENTS, DataType::UInt64, false),
        Field::new(SUM, DataType::Float64, true),
        Field::new(MIN, DataType::Float64, true),
        Field::new(MAX, DataType::Float64, true),
        Field::new(LATEST, DataType::Float64, true),
        Field::new(LATEST_TIME, time(), true),
        Field::new(LATEST_INGEST, time(), true),
        Field::new(LATEST_SEQ, DataType::UInt64, true),
        Field::new(VALUES, DataType::List(VALUE_ITEM.clone()), false),
        Field::new(FIRST_TIME, time(), false),
        Field::new(LAST_TIME, time(), false),
        Field::new(PARTITION_ID, DataType::UInt16, false),
    ]))
});

/// The schema of one meter rollup row.
pub fn meter_rollup_schema() -> SchemaRef {
    METER_ROLLUP_SCHEMA.clone()
}

/// The key a meter's rollups are written under: its id and a digest of its group-bys.
pub fn rollup_key(meter: &Meter) -> String {
    let mut groups = String::new();
    for (name, path) in &meter.group_by {
        groups.push_str(name);
        groups.push('\0');
        groups.push_str(path);
        groups.push('\0');
    }
    let digest = xxhash_rust::xxh3::xxh3_64(groups.as_bytes());
    format!("{}-{:08x}", meter.id.to_ascii_lowercase(), digest as u32)
}

/// The name of the rollup of `key` beside the events file at `events_path`
/// (`date=…/p…-<token>.parquet` → `date=…/p…-<token>.<key>.parquet`).
pub fn rollup_path(events_path: &str, key: &str) -> String {
    let stem = events_path.strip_suffix(".parquet").unwrap_or(events_path);
    format!("{stem}.{key}.parquet")
}

/// The events file a meter rollup at `path` answers for: [`rollup_path`] undone.
pub fn events_path(path: &str) -> Option<String> {
    let (stem, _key) = path.strip_suffix(".parquet")?.rsplit_once('.')?;
    Some(format!("{stem}.parquet"))
}

/// A live meter, ready to read stored events.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveMeter {
    key: String,
    event_type: String,
    /// `None`: a `COUNT` meter (each event is 1).
    value: Option<JsonPath>,
    numeric: bool,
    /// The group-bys' paths, in the order of their names.
    groups: Vec<JsonPath>,
}

impl LiveMeter {
    /// `None` for a deleted meter, one not yet stored (no id) or one with problems.
    pub fn new(meter: &Meter) -> Option<LiveMeter> {
        if meter.is_deleted() || meter.id.is_empty() || !meter.problems("").is_empty() {
            return None;
        }
        let groups = meter
            .group_by
            .values()
            .map(|p| JsonPath::parse(p).ok())
            .collect::<Option<Vec<_>>>()?;
        Some(LiveMeter {
            key: rollup_key(meter),
            event_type: meter.event_type.clone(),
            value: match meter.aggregation {
                Aggregation::Count => None,
                _ => Some(meter.value_path()?),
            },
            numeric: meter.aggregation.is_numeric(),
            groups,
        })
    }

    /// The key its rollups are written under ([`rollup_key`]).
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// The columns of lake rows a meter reads.
struct Columns<'a> {
    customer: &'a StringArray,
    event_type: &'a StringArray,
    decision: &'a StringArray,
    feature: &'a StringArray,
    region: &'a StringArray,
    user: &'a StringArray,
    data: &'a StringArray,
    quantity: &'a [f64],
    time: &'a [i64],
    ingest: &'a [i64],
    seq: &'a [u64],
    partition: u16,
}

impl<'a> Columns<'a> {
    fn of(rows: &'a RecordBatch) -> Result<Self> {
        let strings = |name: &'static str| {
            rows.column_by_name(name)
                .and_then(|c| c.as_string_opt::<i32>())
                .ok_or(Error::Schema(name))
        };
        let times = |name: &'static str| {
            rows.column_by_name(name)
                .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
                .map(|a| a.values().as_ref())
                .ok_or(Error::Schema(name))
        };
        let partition = rows
            .column_by_name(schema::PARTITION_ID)
            .and_then(|c| c.as_primitive_opt::<UInt16Type>())
            .ok_or(Error::Schema(schema::PARTITION_ID))?;
        Ok(Columns {
            customer: strings(schema::CUSTOMER)?,
            event_type: strings(schema::EVENT_TYPE)?,
            decision: strings(schema::DECISION)?,
            feature: strings(schema::FEATURE)?,
            region: strings(schema::REGION)?,
            user: strings(schema::USER_ID)?,
            data: strings(schema::DATA)?,
            quantity: rows
                .column_by_name(schema::QUANTITY)
                .and_then(|c| c.as_primitive_opt::<Float64Type>())
                .map(|a| a.values().as_ref())
                .ok_or(Error::Schema(schema::QUANTITY))?,
            time: times(schema::EVENT_TIME)?,
            ingest: times(schema::INGEST_TIME)?,
            seq: rows
                .column_by_name(schema::STREAM_SEQ)
                .and_then(|c| c.as_primitive_opt::<UInt64Type>())
                .map(|a| a.values().as_ref())
                .ok_or(Error::Schema(schema::STREAM_SEQ))?,
            partition: partition.values().first().copied().unwrap_or_default(),
        })
    }
}

/// Where a meter reads one of its paths: a column of Tally's own, or the `data` text.
#[derive(Debug, Clone, Copy)]
enum Source {
    Own(OwnProperty),
    /// The index among the type's paths read from `data`.
    Data(usize),
}

/// The live meters of one event type, and the distinct paths they read: a row's `data` is
/// read once, in one pass, for all of them.
struct TypePlan<'m> {
    /// The meters, as indexes into the meters given.
    meters: Vec<usize>,
    /// The paths read from `data`.
    data_paths: Vec<&'m JsonPath>,
    /// Every distinct path the type's meters read, and where it is read.
    sources: Vec<(&'m JsonPath, Source)>,
    /// Per meter of `meters`: the index in `sources` of its value (`None`: `COUNT`) and of
    /// each of its group-bys.
    value: Vec<Option<usize>>,
    groups: Vec<Vec<usize>>,
}

impl<'m> TypePlan<'m> {
    fn new() -> Self {
        TypePlan {
            meters: Vec::new(),
            data_paths: Vec::new(),
            sources: Vec::new(),
            value: Vec::new(),
            groups: Vec::new(),
        }
    }

    fn add(&mut self, m: usize, meter: &'m LiveMeter) {
        self.meters.push(m);
        let value = meter.value.as_ref().map(|p| self.source(p));
        self.value.push(value);
        let groups = meter.groups.iter().map(|p| self.source(p)).collect();
        self.groups.push(groups);
    }

    fn source(&mut self, path: &'m JsonPath) -> usize {
        if let Some(at) = self.sources.iter().position(|(p, _)| *p == path) {
            return at;
        }
        let source = match path.own_property() {
            Some(own) => Source::Own(own),
            None => {
                self.data_paths.push(path);
                Source::Data(self.data_paths.len() - 1)
            }
        };
        self.sources.push((path, source));
        self.sources.len() - 1
    }
}

/// The texts of one row at the paths of its type's meters.
struct RowTexts<'r, 'a> {
    columns: &'r Columns<'a>,
    /// `quantity` as the query layer's cast writes it, where a meter reads it as text.
    quantity_text: Option<&'r StringArray>,
    data: &'r [Option<String>],
    row: usize,
}

impl<'r> RowTexts<'r, '_> {
    fn text(&self, source: Source) -> Option<&'r str> {
        let i = self.row;
        let column = |c: &'r StringArray| c.is_valid(i).then(|| c.value(i));
        match source {
            Source::Data(j) => self.data[j].as_deref(),
            Source::Own(OwnProperty::Quantity) => self.quantity_text.and_then(column),
            Source::Own(OwnProperty::Feature) => column(self.columns.feature),
            Source::Own(OwnProperty::Region) => column(self.columns.region),
            Source::Own(OwnProperty::User) => column(self.columns.user),
        }
    }

    /// The number at a path, as the query layer's `json_number` reads it.
    fn number(&self, source: Source) -> Option<f64> {
        match source {
            Source::Own(OwnProperty::Quantity) => Some(self.columns.quantity[self.row]),
            _ => self.text(source).and_then(tally_core::meter::number),
        }
    }
}

#[derive(Debug)]
struct Acc {
    customer: u32,
    hour: i64,
    groups: Vec<Option<String>>,
    events: u64,
    sum: f64,
    min: f64,
    max: f64,
    /// (event time, ingest time, stream sequence, value) of the latest event.
    latest: (i64, i64, u64, f64),
    values: HashSet<String>,
    first: i64,
    last: i64,
}

/// A meter's groups so far, found by (customer, hour, group values) without building a
/// key for each row.
#[derive(Default)]
struct Groups {
    index: HashTable<usize>,
    list: Vec<Acc>,
}

/// The hash of a group's key.
fn group_hash<'g>(customer: u32, hour: i64, groups: impl Iterator<Item = Option<&'g str>>) -> u64 {
    let mut h = foldhash::fast::FixedState::default().build_hasher();
    customer.hash(&mut h);
    hour.hash(&mut h);
    for g in groups {
        g.hash(&mut h);
    }
    h.finish()
}

/// The rollup of each of `meters` over lake rows (of [`tally_core::schema::lake_schema`],
/// one partition's), in the order of `meters`, each sorted by customer, hour and group
/// values; a meter that reads none of the rows gets an empty batch.
pub fn meter_rollups(rows: &RecordBatch, meters: &[LiveMeter]) -> Result<Vec<RecordBatch>> {
    let columns = Columns::of(rows)?;
    let metered: Vec<&str> = METERED.iter().map(|d| d.as_str()).collect();
    let mut by_type: HashMap<&str, TypePlan<'_>> = HashMap::new();
    for (m, meter) in meters.iter().enumerate() {
        by_type
            .entry(meter.event_type.as_str())
            .or_insert_with(TypePlan::new)
            .add(m, meter);
    }
    let quantity_text = by_type
        .values()
        .flat_map(|plan| &plan.sources)
        .any(|(_, s)| matches!(s, Source::Own(OwnProperty::Quantity)))
        .then(|| {
            let q = Float64Array::from(columns.quantity.to_vec());
            arrow::compute::cast(&q, &DataType::Utf8)
        })
        .transpose()?;
    let quantity_text = quantity_text.as_ref().map(|t| t.as_string::<i32>());
    let mut accs: Vec<Groups> = meters.iter().map(|_| Groups::default()).collect();
    let mut customers: Vec<&str> = Vec::new();
    let mut customer_ids: HashMap<&str, u32> = HashMap::new();
    let mut data: Vec<Option<String>> = Vec::new();
    for i in 0..rows.num_rows() {
        let Some(plan) = by_type.get(columns.event_type.value(i)) else {
            continue;
        };
        if !metered.contains(&columns.decision.value(i)) {
            continue;
        }
        let customer = columns.customer.value(i);
        let c = *customer_ids.entry(customer).or_insert_with(|| {
            customers.push(customer);
            (customers.len() - 1) as u32
        });
        let (t, ingest, seq) = (columns.time[i], columns.ingest[i], columns.seq[i]);
        let hour = t - t.rem_euclid(MICROS_PER_HOUR);
        data.clear();
        data.resize(plan.data_paths.len(), None);
        if !plan.data_paths.is_empty() && columns.data.is_valid(i) {
            JsonPath::texts_in(&plan.data_paths, columns.data.value(i), &mut data);
        }
        let texts = RowTexts {
            columns: &columns,
            quantity_text,
            data: &data,
            row: i,
        };
        let source = |at: usize| plan.sources[at].1;
        for (k, &m) in plan.meters.iter().enumerate() {
            let read = match (plan.value[k], meters[m].numeric) {
                (None, _) => Read::Number(1.0),
                (Some(at), true) => match texts.number(source(at)) {
                    Some(n) => Read::Number(n),
                    None => continue,
                },
                (Some(at), false) => match texts.text(source(at)) {
                    Some(text) => Read::Text(text),
                    None => continue,
                },
            };
            let groups = || plan.groups[k].iter().map(|&at| texts.text(source(at)));
            let Groups { index, list } = &mut accs[m];
            let hash = group_hash(c, hour, groups());
            let found = index.find(hash, |&at| {
                let acc = &list[at];
                acc.customer == c
                    && acc.hour == hour
                    && acc.groups.iter().map(Option::as_deref).eq(groups())
            });
            let at = match found {
                Some(&at) => at,
                None => {
                    list.push(Acc {
                        customer: c,
                        hour,
                        groups: groups().map(|g| g.map(str::to_owned)).collect(),
                        events: 0,
                        sum: 0.0,
                        min: f64::INFINITY,
                        max: f64::NEG_INFINITY,
                        latest: (i64::MIN, i64::MIN, 0, 0.0),
                        values: HashSet::new(),
                        first: t,
                        last: t,
                    });
                    let at = list.len() - 1;
                    index.insert_unique(hash, at, |&at| {
                        let acc = &list[at];
                        group_hash(
                            acc.customer,
                            acc.hour,
                            acc.groups.iter().map(Option::as_deref),
                        )
                    });
                    at
                }
            };
            let acc = &mut list[at];
            acc.events += 1;
            acc.first = acc.first.min(t);
            acc.last = acc.last.max(t);
            match read {
                Read::Number(n) => {
                    acc.sum += n;
                    acc.min = acc.min.min(n);
                    acc.max = acc.max.max(n);
                    if (t, ingest, seq) >= (acc.latest.0, acc.latest.1, acc.latest.2) {
                        acc.latest = (t, ingest, seq, n);
                    }
                }
                Read::Text(text) => {
                    if !acc.values.contains(text) {
                        acc.values.insert(text.to_owned());
                    }
                }
            }
        }
    }
    meters
        .iter()
        .zip(accs)
        .map(|(meter, Groups { mut list, .. })| {
            list.sort_unstable_by(|a, b| {
                (customers[a.customer as usize], a.hour, &a.groups).cmp(&(
                    customers[b.customer as usize],
                    b.hour,
                    &b.groups,
                ))
            });
            batch(&list, &customers, meter, columns.partition)
        })
        .collect()
}

/// What a meter read of one event.
enum Read<'r> {
    Number(f64),
    Text(&'r str),
}

fn batch(
    list: &[Acc],
    customers: &[&str],
    meter: &LiveMeter,
    partition: u16,
) -> Result<RecordBatch> {
    let numbers = meter.numeric || meter.value.is_none();
    let time = |values: Vec<i64>| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from(values).with_timezone("UTC"))
    };
    let maybe_time = |values: Vec<Option<i64>>| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from(values).with_timezone("UTC"))
    };
    let number = |f: fn(&Acc) -> f64| -> ArrayRef {
        let mut b = Float64Builder::with_capacity(list.len());
        for a in list {
            b.append_option(numbers.then(|| f(a)));
        }
        Arc::new(b.finish())
    };
    let mut groups = ListBuilder::new(StringBuilder::new()).with_field(GROUP_ITEM.clone());
    for a in list {
        for g in &a.groups {
            groups.values().append_option(g.as_deref());
        }
        groups.append(true);
    }
    let mut sorted: Vec<&str> = Vec::new();
    let mut lengths = Vec::with_capacity(list.len());
    for a in list {
        let start = sorted.len();
        sorted.extend(a.values.iter().map(String::as_str));
        sorted[start..].sort_unstable();
        lengths.push(a.values.len());
    }
    let values = ListArray::try_new(
        VALUE_ITEM.clone(),
        OffsetBuffer::from_lengths(lengths),
        Arc::new(StringArray::from_iter_values(sorted)),
        None,
    )?;
    let mut seqs = UInt64Builder::with_capacity(list.len());
    for a in list {
        seqs.append_option(numbers.then_some(a.latest.2));
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            list.iter().map(|a| customers[a.customer as usize]),
        )),
        time(list.iter().map(|a| a.hour).collect()),
        Arc::new(groups.finish()),
        Arc::new(UInt64Array::from_iter_values(list.iter().map(|a| a.events))),
        number(|a| a.sum),
        number(|a| a.min),
        number(|a| a.max),
        number(|a| a.latest.3),
        maybe_time(list.iter().map(|a| numbers.then_some(a.latest.0)).collect()),
        maybe_time(list.iter().map(|a| numbers.then_some(a.latest.1)).collect()),
        Arc::new(seqs.finish()),
        Arc::new(values),
        time(list.iter().map(|a| a.first).collect()),
        time(list.iter().map(|a| a.last).collect()),
        Arc::new(UInt16Array::from_value(partition, list.len())),
    ];
    Ok(RecordBatch::try_new(meter_rollup_schema(), columns)?)
}

/// What a meter query reads: the meter's rollups of the events files that have one, and
/// the events files that do not (keys relative to the lake).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeterSources {
    pub rollups: Vec<String>,
    pub events: Vec<String>,
}

impl crate::Lake {
    /// The sources of a query of the meter with rollup key `key` over the events dated
    /// `days` (both included; `None`: every date). The events table's snapshot is read
    /// first; a rollup counts only for an events file of that snapshot.
    pub fn meter_sources(
        &self,
        key: &str,
        days: Option<(chrono::NaiveDate, chrono::NaiveDate)>,
    ) -> Result<MeterSources> {
        let events = self.snapshot_files(&self.tables.events, None)?;
        let have: HashSet<String> = self
            .snapshot_files(&self.tables.meter_rollups, None)?
            .into_iter()
            .map(|m| m.file.path)
            .collect();
        let mut sources = MeterSources::default();
        for e in events {
            if let Some((from, to)) = days
                && !e
                    .file
                    .value
                    .parse::<chrono::NaiveDate>()
                    .is_ok_and(|d| (from..=to).contains(&d))
            {
                continue;
            }
            let rollup = rollup_path(&e.file.path, key);
            if have.contains(&rollup) {
                sources
                    .rollups
                    .push(format!("{METER_ROLLUPS_TABLE}/{rollup}"));
            } else {
                sources.events.push(e.key);
            }
        }
        Ok(sources)
    }
}
