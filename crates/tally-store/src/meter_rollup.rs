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
//! **Closed months.** Once a month is closed, compaction sums a partition's meter rollups of
//! the month into one file per meter ([`METER_MONTHLY_TABLE`], [`days_of`]): a row per
//! customer × UTC day × group, named like the monthly rollups by the sequence range of the
//! events files it covers, with the meter's key as a rollup's. A query whose range is whole
//! UTC days reads these instead of the month's hourly files ([`crate::Lake::meter_sources`]).
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
/// The table of the meters' closed months, a row per customer × UTC day × group
/// ([`days_of`]), partitioned by month like the monthly rollups.
pub const METER_MONTHLY_TABLE: &str = "meter_monthly";

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
const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;

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

/// The key of the meter rollup at `path` ([`rollup_path`]'s `key`).
pub fn key_of(path: &str) -> Option<&str> {
    Some(path.strip_suffix(".parquet")?.rsplit_once('.')?.1)
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

    /// Whether its rows hold numbers: every meter's but a `UNIQUE_COUNT`'s.
    fn numbers(&self) -> bool {
        self.numeric || self.value.is_none()
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
/// read once, in one pass, for all of them, each distinct path's number is read once,
/// and meters that group by the same paths find a row's group once.
struct TypePlan<'m> {
    /// The meters, as indexes into the meters given.
    meters: Vec<usize>,
    /// The paths read from `data`.
    data_paths: Vec<&'m JsonPath>,
    /// Every distinct path the type's meters read, and where it is read.
    sources: Vec<(&'m JsonPath, Source)>,
    /// Per meter of `meters`: the index in `sources` of its value (`None`: `COUNT`), and
    /// the index in `group_sets` of its group-bys.
    value: Vec<Option<usize>>,
    set: Vec<usize>,
    /// The distinct lists of group-bys (as indexes in `sources`), and the groups of each.
    group_sets: Vec<Vec<usize>>,
    keys: Vec<Keys>,
}

impl<'m> TypePlan<'m> {
    fn new() -> Self {
        TypePlan {
            meters: Vec::new(),
            data_paths: Vec::new(),
            sources: Vec::new(),
            value: Vec::new(),
            set: Vec::new(),
            group_sets: Vec::new(),
            keys: Vec::new(),
        }
    }

    /// Adds meter `m`; returns the index of its group-bys' set.
    fn add(&mut self, m: usize, meter: &'m LiveMeter) -> usize {
        self.meters.push(m);
        let value = meter.value.as_ref().map(|p| self.source(p));
        self.value.push(value);
        let groups: Vec<usize> = meter.groups.iter().map(|p| self.source(p)).collect();
        let set = match self.group_sets.iter().position(|g| *g == groups) {
            Some(set) => set,
            None => {
                self.group_sets.push(groups);
                self.keys.push(Keys::default());
                self.group_sets.len() - 1
            }
        };
        self.set.push(set);
        set
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

/// A group: a customer, the start of a span (an hour, or a day) and group values.
#[derive(Debug)]
struct Key {
    customer: u32,
    hour: i64,
    groups: Vec<Option<String>>,
}

/// A meter's reading of one group.
#[derive(Debug)]
struct Totals {
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

impl Totals {
    fn new() -> Self {
        Totals {
            events: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            latest: (i64::MIN, i64::MIN, 0, 0.0),
            values: HashSet::new(),
            first: i64::MAX,
            last: i64::MIN,
        }
    }

    /// One value read at event time `t`, ingest time `ingest`, stream sequence `seq`.
    fn add(&mut self, read: Read<'_>, t: i64, ingest: i64, seq: u64) {
        self.events += 1;
        self.first = self.first.min(t);
        self.last = self.last.max(t);
        match read {
            Read::Number(n) => {
                self.sum += n;
                self.min = self.min.min(n);
                self.max = self.max.max(n);
                if (t, ingest, seq) >= (self.latest.0, self.latest.1, self.latest.2) {
                    self.latest = (t, ingest, seq, n);
                }
            }
            Read::Text(text) => {
                if !self.values.contains(text) {
                    self.values.insert(text.to_owned());
                }
            }
        }
    }
}

/// The groups seen so far, each found by (customer, span, group values) without building
/// a key for each row; meters keep their [`Totals`] by a group's index here.
#[derive(Default)]
struct Keys {
    index: HashTable<u32>,
    list: Vec<Key>,
}

impl Keys {
    /// The index of the group of `customer`, the span starting at `hour` and the group
    /// values `groups` yields, added when new.
    fn id<'g, I>(&mut self, customer: u32, hour: i64, groups: impl Fn() -> I) -> usize
    where
        I: Iterator<Item = Option<&'g str>>,
    {
        let Keys { index, list } = self;
        let hash = group_hash(customer, hour, groups());
        let found = index
            .find(hash, |&at| {
                let key = &list[at as usize];
                key.customer == customer && key.hour == hour && same_groups(&key.groups, groups())
            })
            .copied();
        if let Some(at) = found {
            return at as usize;
        }
        list.push(Key {
            customer,
            hour,
            groups: groups().map(|g| g.map(str::to_owned)).collect(),
        });
        let at = list.len() - 1;
        index.insert_unique(hash, at as u32, |&at| {
            let key = &list[at as usize];
            group_hash(
                key.customer,
                key.hour,
                key.groups.iter().map(Option::as_deref),
            )
        });
        at
    }

    /// The groups a meter read events of, with its totals, sorted by customer, span and
    /// group values.
    fn rows<'k>(&'k self, totals: &'k [Totals], customers: &[&str]) -> Vec<(&'k Key, &'k Totals)> {
        let mut rows: Vec<_> = self
            .list
            .iter()
            .zip(totals)
            .filter(|(_, t)| t.events > 0)
            .collect();
        rows.sort_unstable_by(|(a, _), (b, _)| {
            (customers[a.customer as usize], a.hour, &a.groups).cmp(&(
                customers[b.customer as usize],
                b.hour,
                &b.groups,
            ))
        });
        rows
    }
}

/// The totals of group `id` among a meter's, added when new.
fn totals_of(totals: &mut Vec<Totals>, id: usize) -> &mut Totals {
    if totals.len() <= id {
        totals.resize_with(id + 1, Totals::new);
    }
    &mut totals[id]
}

/// Whether a group's stored values are the values `groups` yields.
fn same_groups<'g>(
    stored: &[Option<String>],
    mut groups: impl Iterator<Item = Option<&'g str>>,
) -> bool {
    stored
        .iter()
        .all(|s| groups.next().is_some_and(|g| s.as_deref() == g))
        && groups.next().is_none()
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
    // Per meter: its type and its group-bys' set there.
    let mut placed: Vec<(&str, usize)> = Vec::with_capacity(meters.len());
    for (m, meter) in meters.iter().enumerate() {
        let set = by_type
            .entry(meter.event_type.as_str())
            .or_insert_with(TypePlan::new)
            .add(m, meter);
        placed.push((meter.event_type.as_str(), set));
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
    let mut totals: Vec<Vec<Totals>> = meters.iter().map(|_| Vec::new()).collect();
    let mut customers: Vec<&str> = Vec::new();
    let mut customer_ids: HashMap<&str, u32> = HashMap::new();
    let mut data: Vec<Option<String>> = Vec::new();
    // Per row: each source's number once read, each group set's group once found.
    let mut numbers: Vec<Option<Option<f64>>> = Vec::new();
    let mut ids: Vec<Option<usize>> = Vec::new();
    for i in 0..rows.num_rows() {
        let Some(plan) = by_type.get_mut(columns.event_type.value(i)) else {
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
        let TypePlan {
            meters: of_type,
            sources,
            value,
            set,
            group_sets,
            keys,
            ..
        } = plan;
        let source = |at: usize| sources[at].1;
        numbers.clear();
        numbers.resize(sources.len(), None);
        ids.clear();
        ids.resize(group_sets.len(), None);
        for (k, &m) in of_type.iter().enumerate() {
            let read = match (value[k], meters[m].numeric) {
                (None, _) => Read::Number(1.0),
                (Some(at), true) => {
                    match *numbers[at].get_or_insert_with(|| texts.number(source(at))) {
                        Some(n) => Read::Number(n),
                        None => continue,
                    }
                }
                (Some(at), false) => match texts.text(source(at)) {
                    Some(text) => Read::Text(text),
                    None => continue,
                },
            };
            let g = set[k];
            let id = *ids[g].get_or_insert_with(|| {
                keys[g].id(c, hour, || {
                    group_sets[g].iter().map(|&at| texts.text(source(at)))
                })
            });
            totals_of(&mut totals[m], id).add(read, t, ingest, seq);
        }
    }
    meters
        .iter()
        .zip(&placed)
        .zip(&totals)
        .map(|((meter, &(event_type, set)), totals)| {
            let rows = match by_type.get(event_type) {
                Some(plan) => plan.keys[set].rows(totals, &customers),
                None => Vec::new(),
            };
            batch(&rows, &customers, meter.numbers(), columns.partition)
        })
        .collect()
}

/// What a meter read of one event.
enum Read<'r> {
    Number(f64),
    Text(&'r str),
}

/// The rows of `list`; `numbers`: whether they hold the values' sum, least, greatest and
/// latest (null for a meter of texts).
fn batch(
    list: &[(&Key, &Totals)],
    customers: &[&str],
    numbers: bool,
    partition: u16,
) -> Result<RecordBatch> {
    let time = |values: Vec<i64>| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from(values).with_timezone("UTC"))
    };
    let maybe_time = |values: Vec<Option<i64>>| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from(values).with_timezone("UTC"))
    };
    let number = |f: fn(&Totals) -> f64| -> ArrayRef {
        let mut b = Float64Builder::with_capacity(list.len());
        for (_, a) in list {
            b.append_option(numbers.then(|| f(a)));
        }
        Arc::new(b.finish())
    };
    let mut groups = ListBuilder::new(StringBuilder::new()).with_field(GROUP_ITEM.clone());
    for (k, _) in list {
        for g in &k.groups {
            groups.values().append_option(g.as_deref());
        }
        groups.append(true);
    }
    let mut sorted: Vec<&str> = Vec::new();
    let mut lengths = Vec::with_capacity(list.len());
    for (_, a) in list {
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
    for (_, a) in list {
        seqs.append_option(numbers.then_some(a.latest.2));
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            list.iter().map(|(k, _)| customers[k.customer as usize]),
        )),
        time(list.iter().map(|(k, _)| k.hour).collect()),
        Arc::new(groups.finish()),
        Arc::new(UInt64Array::from_iter_values(
            list.iter().map(|(_, a)| a.events),
        )),
        number(|a| a.sum),
        number(|a| a.min),
        number(|a| a.max),
        number(|a| a.latest.3),
        maybe_time(
            list.iter()
                .map(|(_, a)| numbers.then_some(a.latest.0))
                .collect(),
        ),
        maybe_time(
            list.iter()
                .map(|(_, a)| numbers.then_some(a.latest.1))
                .collect(),
        ),
        Arc::new(seqs.finish()),
        Arc::new(values),
        time(list.iter().map(|(_, a)| a.first).collect()),
        time(list.iter().map(|(_, a)| a.last).collect()),
        Arc::new(UInt16Array::from_value(partition, list.len())),
    ];
    Ok(RecordBatch::try_new(meter_rollup_schema(), columns)?)
}

/// A meter's rollup rows (of one partition) summed per customer × UTC day × group: a row
/// of the meter's closed month ([`METER_MONTHLY_TABLE`]), whose `hour` is its day's
/// start. Sorted as a meter rollup is.
pub fn days_of(rollups: &[RecordBatch], meter: &LiveMeter, partition: u16) -> Result<RecordBatch> {
    let mut names: Vec<Box<str>> = Vec::new();
    let mut ids: HashMap<Box<str>, u32> = HashMap::new();
    let mut days = Keys::default();
    let mut totals: Vec<Totals> = Vec::new();
    for rows in rollups {
        let column = |name: &'static str| rows.column_by_name(name).ok_or(Error::Schema(name));
        let strings = |name: &'static str| {
            column(name)?
                .as_string_opt::<i32>()
                .ok_or(Error::Schema(name))
        };
        let numbers = |name: &'static str| {
            column(name)?
                .as_primitive_opt::<Float64Type>()
                .ok_or(Error::Schema(name))
        };
        let times = |name: &'static str| {
            column(name)?
                .as_primitive_opt::<TimestampMicrosecondType>()
                .ok_or(Error::Schema(name))
        };
        let lists = |name: &'static str| {
            column(name)?
                .as_list_opt::<i32>()
                .ok_or(Error::Schema(name))
        };
        let customer = strings(CUSTOMER)?;
        let hour = times(HOUR)?.values();
        let groups = lists(GROUPS)?;
        let group_values = groups.values().as_string::<i32>();
        let group_offsets = groups.value_offsets();
        let events = column(EVENTS)?
            .as_primitive_opt::<UInt64Type>()
            .ok_or(Error::Schema(EVENTS))?
            .values();
        let (sum, min, max, latest) = (
            numbers(SUM)?,
            numbers(MIN)?,
            numbers(MAX)?,
            numbers(LATEST)?,
        );
        let (latest_time, latest_ingest) = (times(LATEST_TIME)?, times(LATEST_INGEST)?);
        let latest_seq = column(LATEST_SEQ)?
            .as_primitive_opt::<UInt64Type>()
            .ok_or(Error::Schema(LATEST_SEQ))?;
        let values = lists(VALUES)?;
        let value_texts = values.values().as_string::<i32>();
        let value_offsets = values.value_offsets();
        let (first, last) = (times(FIRST_TIME)?.values(), times(LAST_TIME)?.values());
        for i in 0..rows.num_rows() {
            let name = customer.value(i);
            let c = match ids.get(name) {
                Some(&c) => c,
                None => {
                    let c = names.len() as u32;
                    names.push(name.into());
                    ids.insert(name.into(), c);
                    c
                }
            };
            let day = hour[i] - hour[i].rem_euclid(MICROS_PER_DAY);
            let (from, to) = (group_offsets[i] as usize, group_offsets[i + 1] as usize);
            let id = days.id(c, day, || {
                (from..to).map(|j| group_values.is_valid(j).then(|| group_values.value(j)))
            });
            let acc = totals_of(&mut totals, id);
            acc.events += events[i];
            acc.first = acc.first.min(first[i]);
            acc.last = acc.last.max(last[i]);
            if sum.is_valid(i) {
                acc.sum += sum.value(i);
                acc.min = acc.min.min(min.value(i));
                acc.max = acc.max.max(max.value(i));
                let at = (
                    latest_time.value(i),
                    latest_ingest.value(i),
                    latest_seq.value(i),
                );
                if at >= (acc.latest.0, acc.latest.1, acc.latest.2) {
                    acc.latest = (at.0, at.1, at.2, latest.value(i));
                }
            }
            for j in value_offsets[i] as usize..value_offsets[i + 1] as usize {
                let text = value_texts.value(j);
                if !acc.values.contains(text) {
                    acc.values.insert(text.to_owned());
                }
            }
        }
    }
    let customers: Vec<&str> = names.iter().map(|n| &**n).collect();
    batch(
        &days.rows(&totals, &customers),
        &customers,
        meter.numbers(),
        partition,
    )
}

/// What a meter query reads (keys relative to the lake): the meter's closed months where
/// they cover the events files (when the query asked for whole days), its rollups of the
/// other events files that have one, and the events files that have neither.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeterSources {
    /// Files of [`METER_MONTHLY_TABLE`]: a row per customer × UTC day × group.
    pub monthly: Vec<String>,
    /// Meter rollups: a row per customer × UTC hour × group.
    pub rollups: Vec<String>,
    pub events: Vec<String>,
}

impl crate::Lake {
    /// The `columns` of each of a meter's rollup files `files` (keys relative to the
    /// lake) read and handed to `each`, on a thread per core; its answers in the order of
    /// `files`.
    pub fn read_meter_rollups<T: Send>(
        &self,
        files: &[String],
        columns: &[&'static str],
        each: impl Fn(Vec<RecordBatch>) -> T + Sync,
    ) -> Result<Vec<T>> {
        use parquet::arrow::ProjectionMask;
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        self.read_each(files, |bytes| {
            let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
            let roots = columns
                .iter()
                .map(|&c| builder.schema().index_of(c).map_err(|_| Error::Schema(c)))
                .collect::<Result<Vec<_>>>()?;
            let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
            let rows = builder.metadata().file_metadata().num_rows().max(1) as usize;
            let batches = builder
                .with_projection(mask)
                .with_batch_size(rows)
                .build()?
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(each(batches))
        })
    }

    /// The sources of a query of the meter with rollup key `key` over the events dated
    /// `days` (both included; `None`: every date); `by_day`: whether the query's range
    /// starts and ends on UTC days, so that the meter's closed months can answer it.
    ///
    /// The events table's snapshot is read first; a rollup counts only for an events file
    /// of that snapshot. A month's file counts for the events files of its partition and
    /// month inside its sequence range, and only if no events file of them reaches past
    /// that range (a late file merged with one it covers, until compaction writes the
    /// month again): else the month is read from its hourly rollups.
    pub fn meter_sources(
        &self,
        key: &str,
        days: Option<(chrono::NaiveDate, chrono::NaiveDate)>,
        by_day: bool,
    ) -> Result<MeterSources> {
        let in_range =
            |date: chrono::NaiveDate| days.is_none_or(|(from, to)| (from..=to).contains(&date));
        let events: Vec<crate::PartitionFile> = self
            .snapshot_files(&self.tables.events, None)?
            .into_iter()
            .filter(|e| {
                e.file
                    .value
                    .parse::<chrono::NaiveDate>()
                    .is_ok_and(&in_range)
            })
            .collect();
        let month_of = |e: &crate::PartitionFile| {
            e.file
                .value
                .parse::<chrono::NaiveDate>()
                .map(|d| crate::Month::of(d).to_string())
                .unwrap_or_default()
        };
        let mut months: Vec<crate::PartitionFile> = Vec::new();
        if by_day {
            months = self
                .snapshot_files(&self.tables.meter_monthly, None)?
                .into_iter()
                .filter(|m| key_of(&m.file.path) == Some(key))
                .filter(|m| {
                    !events.iter().any(|e| {
                        let overlaps = e.first_seq <= m.last_seq && m.first_seq <= e.last_seq;
                        let inside = m.first_seq <= e.first_seq && e.last_seq <= m.last_seq;
                        e.partition == m.partition
                            && month_of(e) == m.file.value
                            && overlaps
                            && !inside
                    })
                })
                .collect();
        }
        let have = self.meter_rollup_paths(None)?;
        let mut sources = MeterSources::default();
        let mut used = HashSet::new();
        for e in &events {
            let month = months.iter().position(|m| {
                m.partition == e.partition
                    && m.file.value == month_of(e)
                    && m.first_seq <= e.first_seq
                    && e.last_seq <= m.last_seq
            });
            if let Some(at) = month {
                if used.insert(at) {
                    sources.monthly.push(months[at].key.clone());
                }
                continue;
            }
            let rollup = rollup_path(&e.file.path, key);
            if have.contains(&rollup) {
                sources
                    .rollups
                    .push(format!("{METER_ROLLUPS_TABLE}/{rollup}"));
            } else {
                sources.events.push(e.key.clone());
            }
        }
        Ok(sources)
    }
}
