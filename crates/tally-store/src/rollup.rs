//! Hourly rollups: an events file's rows summed per customer × feature × UTC hour ×
//! decision, written beside it.
//!
//! ```text
//! <root>/rollups/date=YYYY-MM-DD/p<partition>-<first_seq>-<last_seq>.parquet
//! ```
//!
//! Each events file has one rollup file of the same date and name, with the same `tally.*`
//! metadata, committed to the rollups table right after the events file to the events
//! table. Events a crash left committed without their rollups get them at the take-over of
//! their partition ([`Lake::tail`](crate::Lake::tail)).
//!
//! [`rollup`] runs for every file on the ingest path, so it reads the columns in one pass
//! and keys its groups on borrowed string slices: no allocation per row.

use std::sync::{Arc, LazyLock};

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, ListArray, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt16Array, UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{
    DataType, Field, FieldRef, Float64Type, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType,
    UInt16Type,
};
use hashbrown::{HashMap, HashSet};
use tally_core::schema;

use crate::{Error, Result};

/// The rollups table's directory under the lake root.
pub const ROLLUPS_TABLE: &str = "rollups";

pub const CUSTOMER: &str = schema::CUSTOMER;
pub const FEATURE: &str = schema::FEATURE;
/// The event time truncated to its UTC hour.
pub const HOUR: &str = "hour";
pub const DECISION: &str = schema::DECISION;
/// The number of rows in the group.
pub const EVENTS: &str = "events";
/// The sum of the rows' quantities.
pub const QUANTITY: &str = schema::QUANTITY;
/// The distinct non-null user ids of the group, sorted.
pub const USERS: &str = "users";
pub const PARTITION_ID: &str = schema::PARTITION_ID;
/// The plan that decided the group's events (null where none did).
pub const PLAN: &str = schema::PLAN;
/// The region the group's events named (null where they named none).
pub const REGION: &str = schema::REGION;
/// The earliest event time of the group (null in rollups written before it was kept).
pub const FIRST_TIME: &str = "first_time";

const MICROS_PER_HOUR: i64 = 3_600_000_000;

static USER_ITEM: LazyLock<FieldRef> =
    LazyLock::new(|| Arc::new(Field::new_list_field(DataType::Utf8, false)));

static ROLLUP_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new(CUSTOMER, DataType::Utf8, false),
        Field::new(FEATURE, DataType::Utf8, false),
        Field::new(
            HOUR,
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new(DECISION, DataType::Utf8, false),
        Field::new(EVENTS, DataType::UInt64, false),
        Field::new(QUANTITY, DataType::Float64, false),
        Field::new(USERS, DataType::List(USER_ITEM.clone()), false),
        Field::new(PARTITION_ID, DataType::UInt16, false),
        Field::new(PLAN, DataType::Utf8, true),
        Field::new(REGION, DataType::Utf8, true),
        Field::new(
            FIRST_TIME,
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
    ]))
});

/// The schema of one rollup row.
pub fn rollup_schema() -> SchemaRef {
    ROLLUP_SCHEMA.clone()
}

/// A group's key. The field order is the output order; `partition` never splits a group
/// of the lake (a customer lives in one partition) and only keeps other input exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key<'a> {
    customer: &'a str,
    feature: &'a str,
    hour: i64,
    decision: &'a str,
    partition: u16,
    plan: Option<&'a str>,
    region: Option<&'a str>,
}

#[derive(Debug)]
struct Group<'a> {
    key: Key<'a>,
    events: u64,
    quantity: f64,
    users: u32,
    first: i64,
}

/// Sums lake rows (of [`tally_core::schema::lake_schema`]) per customer, feature, UTC
/// hour of the event time, decision (and partition, plan and region, which a customer's
/// rows of one hour share unless the plan changed within it or its events came from
/// several regions), into rows of [`rollup_schema`] sorted by those, with the group's
/// earliest event time.
pub fn rollup(rows: &RecordBatch) -> Result<RecordBatch> {
    let customer = strings(rows, schema::CUSTOMER)?;
    let feature = strings(rows, schema::FEATURE)?;
    let decision = strings(rows, schema::DECISION)?;
    let user = strings(rows, schema::USER_ID)?;
    let plan = strings(rows, schema::PLAN)?;
    let region = strings(rows, schema::REGION)?;
    let time = rows
        .column_by_name(schema::EVENT_TIME)
        .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
        .ok_or(Error::Schema(schema::EVENT_TIME))?
        .values();
    let quantity = rows
        .column_by_name(schema::QUANTITY)
        .and_then(|c| c.as_primitive_opt::<Float64Type>())
        .ok_or(Error::Schema(schema::QUANTITY))?
        .values();
    let partition = rows
        .column_by_name(schema::PARTITION_ID)
        .and_then(|c| c.as_primitive_opt::<UInt16Type>())
        .ok_or(Error::Schema(schema::PARTITION_ID))?
        .values();

    let hasher = foldhash::fast::RandomState::default();
    let mut index: HashMap<Key<'_>, u32, _> = HashMap::with_hasher(hasher.clone());
    let mut groups: Vec<Group<'_>> = Vec::new();
    // Each group's distinct users, as (group, user) pairs in order of first sight.
    let mut seen: HashSet<(u32, &str), _> = HashSet::with_hasher(hasher);
    let mut users: Vec<(u32, &str)> = Vec::new();
    // A message's events are consecutive rows and mostly share a key (and often a user):
    // such a row costs a comparison rather than a hash lookup.
    let mut last: Option<(Key<'_>, u32)> = None;
    let mut last_user: Option<(u32, &str)> = None;
    for i in 0..rows.num_rows() {
        let t = time[i];
        let key = Key {
            customer: customer.value(i),
            feature: feature.value(i),
            hour: t - t.rem_euclid(MICROS_PER_HOUR),
            decision: decision.value(i),
            partition: partition[i],
            plan: plan.is_valid(i).then(|| plan.value(i)),
            region: region.is_valid(i).then(|| region.value(i)),
        };
        let g = match last {
            Some((k, g)) if k == key => g,
            _ => {
                let g = *index.entry(key).or_insert_with(|| {
                    groups.push(Group {
                        key,
                        events: 0,
                        quantity: 0.0,
                        users: 0,
                        first: t,
                    });
                    (groups.len() - 1) as u32
                });
                last = Some((key, g));
                g
            }
        };
        let group = &mut groups[g as usize];
        group.events += 1;
        group.quantity += quantity[i];
        group.first = group.first.min(t);
        if user.is_valid(i) {
            let pair = (g, user.value(i));
            if last_user != Some(pair) && seen.insert(pair) {
                group.users += 1;
                users.push(pair);
            }
            last_user = Some(pair);
        }
    }

    let mut order: Vec<u32> = (0..groups.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| groups[a as usize].key.cmp(&groups[b as usize].key));
    // Where each group's users start in the output's list values, then the users placed
    // there (a counting sort by group) and sorted within each group.
    let mut start = vec![0usize; groups.len()];
    let mut at = 0;
    for &g in &order {
        start[g as usize] = at;
        at += groups[g as usize].users as usize;
    }
    let mut values = vec![""; users.len()];
    for (g, u) in users {
        values[start[g as usize]] = u;
        start[g as usize] += 1;
    }
    let mut at = 0;
    for &g in &order {
        let n = groups[g as usize].users as usize;
        values[at..at + n].sort_unstable();
        at += n;
    }

    let sorted = || order.iter().map(|&g| &groups[g as usize]);
    let users = ListArray::try_new(
        USER_ITEM.clone(),
        OffsetBuffer::from_lengths(sorted().map(|g| g.users as usize)),
        Arc::new(StringArray::from_iter_values(values)),
        None,
    )?;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            sorted().map(|g| g.key.customer),
        )),
        Arc::new(StringArray::from_iter_values(
            sorted().map(|g| g.key.feature),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(sorted().map(|g| g.key.hour))
                .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from_iter_values(
            sorted().map(|g| g.key.decision),
        )),
        Arc::new(UInt64Array::from_iter_values(sorted().map(|g| g.events))),
        Arc::new(Float64Array::from_iter_values(sorted().map(|g| g.quantity))),
        Arc::new(users),
        Arc::new(UInt16Array::from_iter_values(
            sorted().map(|g| g.key.partition),
        )),
        Arc::new(StringArray::from_iter(sorted().map(|g| g.key.plan))),
        Arc::new(StringArray::from_iter(sorted().map(|g| g.key.region))),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(sorted().map(|g| g.first))
                .with_timezone("UTC"),
        ),
    ];
    Ok(RecordBatch::try_new(rollup_schema(), columns)?)
}

fn strings<'a>(rows: &'a RecordBatch, name: &'static str) -> Result<&'a StringArray> {
    rows.column_by_name(name)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or(Error::Schema(name))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, UInt64Array};

    use super::*;

    const H: i64 = MICROS_PER_HOUR;
    /// 2026-11-01T00:00:00Z.
    const T0: i64 = 20_758 * 24 * H;

    /// (customer, feature, event time, decision, user, quantity).
    type Row<'a> = (&'a str, &'a str, i64, &'a str, Option<&'a str>, f64);
    /// (customer, feature, hour, decision, events, quantity, users, partition).
    type Summary = (String, String, i64, String, u64, f64, Vec<String>, u16);

    /// Lake rows from their rollup-relevant columns.
    fn rows(spec: &[Row<'_>]) -> RecordBatch {
        let base = crate::tests::batch(&spec.iter().map(|r| r.2).collect::<Vec<_>>());
        let schema = base.schema();
        let mut columns = base.columns().to_vec();
        let mut set = |name: &str, column: ArrayRef| {
            columns[schema.index_of(name).unwrap()] = column;
        };
        set(
            schema::CUSTOMER,
            Arc::new(StringArray::from_iter_values(spec.iter().map(|r| r.0))),
        );
        set(
            schema::FEATURE,
            Arc::new(StringArray::from_iter_values(spec.iter().map(|r| r.1))),
        );
        set(
            schema::DECISION,
            Arc::new(StringArray::from_iter_values(spec.iter().map(|r| r.3))),
        );
        set(
            schema::USER_ID,
            Arc::new(StringArray::from_iter(spec.iter().map(|r| r.4))),
        );
        set(
            schema::QUANTITY,
            Arc::new(Float64Array::from_iter_values(spec.iter().map(|r| r.5))),
        );
        RecordBatch::try_new(schema, columns).unwrap()
    }

    /// A rollup's rows.
    fn read(rollup: &RecordBatch) -> Vec<Summary> {
        let s = |name: &str| rollup.column_by_name(name).unwrap().as_string::<i32>();
        let hour = rollup
            .column_by_name(HOUR)
            .unwrap()
            .as_primitive::<TimestampMicrosecondType>();
        let events = rollup
            .column_by_name(EVENTS)
            .unwrap()
            .as_any()
            .downcast_ref::<UInt64Array>()
            .unwrap();
        let quantity = rollup
            .column_by_name(QUANTITY)
            .unwrap()
            .as_primitive::<Float64Type>();
        let users = rollup.column_by_name(USERS).unwrap().as_list::<i32>();
        let partition = rollup
            .column_by_name(PARTITION_ID)
            .unwrap()
            .as_primitive::<UInt16Type>();
        (0..rollup.num_rows())
            .map(|i| {
                let u = users.value(i);
                (
                    s(CUSTOMER).value(i).to_owned(),
                    s(FEATURE).value(i).to_owned(),
                    hour.value(i),
                    s(DECISION).value(i).to_owned(),
                    events.value(i),
                    quantity.value(i),
                    u.as_string::<i32>()
                        .iter()
                        .map(|v| v.unwrap().to_owned())
                        .collect(),
                    partition.value(i),
                )
            })
            .collect()
    }

    #[test]
    fn rows_are_summed_per_customer_feature_hour_and_decision() {
        let (h0, h1) = (T0, T0 + H);
        let input = rows(&[
            ("globex", "calls", h1 + 5, "accepted", Some("u2"), 1.0),
            ("acme", "calls", h0 + 10, "accepted", Some("u2"), 1.0),
            ("acme", "calls", h0 + 20, "accepted", Some("u1"), 2.5),
            ("acme", "calls", h0 + 30, "accepted", Some("u2"), 0.5),
            ("acme", "calls", h0 + 40, "accepted", None, 1.0),
            ("acme", "storage", h0 + H - 1, "accepted", None, 4.0),
            ("acme", "calls", h1, "accepted", Some("u3"), 1.0),
            ("acme", "calls", h0 + 50, "denied", Some("u1"), 3.0),
            ("globex", "calls", h1 + 6, "accepted", Some("u1"), 2.0),
            ("globex", "calls", h1 + 7, "accepted", Some("u2"), 1.0),
            ("globex", "calls", h1 + 8, "accepted", None, 0.5),
            ("globex", "storage", h0, "denied", Some("u9"), 10.0),
            ("acme", "calls", h0 + 60, "accepted", Some("u1"), 1.0),
        ]);
        let users = |u: &[&str]| u.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let row = |c: &str, f: &str, h, d: &str, e, q, u: &[&str]| {
            (c.into(), f.into(), h, d.into(), e, q, users(u), 3)
        };
        let out = rollup(&input).unwrap();
        assert_eq!(out.schema(), rollup_schema());
        assert_eq!(
            read(&out),
            [
                // Rows 2, 3, 4, 5 and 13: u2, u1, u2, (none), u1.
                row("acme", "calls", h0, "accepted", 5, 6.0, &["u1", "u2"]),
                row("acme", "calls", h0, "denied", 1, 3.0, &["u1"]),
                row("acme", "calls", h1, "accepted", 1, 1.0, &["u3"]),
                // The last microsecond of the first hour stays in it.
                row("acme", "storage", h0, "accepted", 1, 4.0, &[]),
                // Rows 1, 9, 10, 11: u2, u1, u2, (none).
                row("globex", "calls", h1, "accepted", 4, 4.5, &["u1", "u2"]),
                row("globex", "storage", h0, "denied", 1, 10.0, &["u9"]),
            ]
        );
        // Each group's earliest event; no region named.
        let first = out
            .column_by_name(FIRST_TIME)
            .unwrap()
            .as_primitive::<TimestampMicrosecondType>();
        assert_eq!(
            first.values().to_vec(),
            [h0 + 10, h0 + 50, h1, h0 + H - 1, h1 + 5, h0]
        );
        assert_eq!(out.column_by_name(REGION).unwrap().null_count(), 6);
    }

    #[test]
    fn no_rows_roll_up_to_no_rows() {
        let out = rollup(&RecordBatch::new_empty(schema::lake_schema())).unwrap();
        assert_eq!(out.num_rows(), 0);
        assert_eq!(out.schema(), rollup_schema());
    }

    #[test]
    fn a_batch_without_the_lake_columns_is_refused() {
        let rows = rows(&[("acme", "calls", T0, "accepted", None, 1.0)]);
        let without = rows.project(&[0, 1, 2, 3, 4]).unwrap();
        assert!(matches!(
            rollup(&without),
            Err(Error::Schema(schema::DECISION))
        ));
    }
}
