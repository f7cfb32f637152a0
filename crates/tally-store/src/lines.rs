//! Billing lines of a closed month: a partition's billable usage per customer × plan ×
//! feature, in the order billing prints it, written beside each monthly rollup.
//!
//! ```text
//! <lake>/billing/period=YYYY-MM/p<partition>-<first_seq>-<last_seq>-<token>.parquet
//! ```
//!
//! The lines are a Delta table partitioned by month (`period`). A lines file has the name
//! of the monthly file it was made from and is committed just before it, so a monthly
//! file in its table has its lines in theirs (as a rollup is committed with its events
//! file); a compaction replaces both. Billing of a month read from monthly
//! files alone merges the lines files of those monthly files ([`merge_lines`]): each is
//! sorted, and a merge keeps the order while it sums a line that two files share (a
//! customer whose events went to two partitions), so nothing is grouped or sorted again.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::{Arc, LazyLock};

use arrow::array::{
    Array, AsArray, Float64Array, Float64Builder, RecordBatch, StringArray, StringBuilder,
    UInt64Array, UInt64Builder,
};
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef, UInt64Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tally_core::Decision;

use crate::rollup::{CUSTOMER, DECISION, EVENTS, FEATURE, PLAN, QUANTITY};
use crate::{Error, Lake, Result};

/// The billing lines' directory under the lake root.
pub const BILLING_TABLE: &str = "billing";
/// Quantity decided `accepted`.
pub const ACCEPTED: &str = "accepted";
/// Quantity decided `overage`.
pub const OVERAGE: &str = "overage";

static LINES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new(CUSTOMER, DataType::Utf8, false),
        Field::new(PLAN, DataType::Utf8, true),
        Field::new(FEATURE, DataType::Utf8, false),
        // Nullable or not as the sums of billing's query are (a quantity decided
        // `accepted` or `overage` is 0 where there is none): its answers have one schema
        // whichever way they were made.
        Field::new(EVENTS, DataType::UInt64, true),
        Field::new(QUANTITY, DataType::Float64, true),
        Field::new(ACCEPTED, DataType::Float64, false),
        Field::new(OVERAGE, DataType::Float64, false),
    ]))
});

/// `customer, plan, feature, events, quantity, accepted, overage`, ordered by customer,
/// plan (a null plan last) and feature.
pub fn lines_schema() -> SchemaRef {
    LINES_SCHEMA.clone()
}

/// A line's key, ordered as billing orders its lines: a null plan after every plan.
type Key<'a> = (&'a str, (bool, &'a str), &'a str);

#[derive(Default, Clone, Copy)]
struct Sums {
    events: u64,
    quantity: f64,
    accepted: f64,
    overage: f64,
}

impl Sums {
    fn add(&mut self, other: Sums) {
        self.events += other.events;
        self.quantity += other.quantity;
        self.accepted += other.accepted;
        self.overage += other.overage;
    }
}

/// The billing lines of a monthly rollup's rows: those decided `accepted` or `overage`,
/// summed per customer × plan × feature, sorted.
pub(crate) fn lines_of(monthly: &RecordBatch) -> Result<RecordBatch> {
    let text = |name: &'static str| {
        monthly
            .column_by_name(name)
            .and_then(|c| c.as_string_opt::<i32>())
            .ok_or(Error::Schema(name))
    };
    let (customer, plan, feature, decision) = (
        text(CUSTOMER)?,
        text(PLAN)?,
        text(FEATURE)?,
        text(DECISION)?,
    );
    let events = monthly
        .column_by_name(EVENTS)
        .and_then(|c| c.as_primitive_opt::<UInt64Type>())
        .ok_or(Error::Schema(EVENTS))?;
    let quantity = monthly
        .column_by_name(QUANTITY)
        .and_then(|c| c.as_primitive_opt::<Float64Type>())
        .ok_or(Error::Schema(QUANTITY))?;
    let mut lines: BTreeMap<Key<'_>, Sums> = BTreeMap::new();
    for i in 0..monthly.num_rows() {
        let q = quantity.value(i);
        let (accepted, overage) = match decision.value(i) {
            d if d == Decision::Accepted.as_str() => (q, 0.0),
            d if d == Decision::Overage.as_str() => (0.0, q),
            _ => continue,
        };
        let key = (customer.value(i), plan_key(plan, i), feature.value(i));
        lines.entry(key).or_default().add(Sums {
            events: events.value(i),
            quantity: q,
            accepted,
            overage,
        });
    }
    let mut out = LinesBuilder::with_capacity(lines.len());
    for (key, sums) in lines {
        out.push(key, sums);
    }
    out.finish()
}

fn plan_key(plan: &StringArray, i: usize) -> (bool, &str) {
    if plan.is_valid(i) {
        (false, plan.value(i))
    } else {
        (true, "")
    }
}

struct LinesBuilder {
    customer: StringBuilder,
    plan: StringBuilder,
    feature: StringBuilder,
    events: UInt64Builder,
    quantity: Float64Builder,
    accepted: Float64Builder,
    overage: Float64Builder,
}

impl LinesBuilder {
    fn with_capacity(n: usize) -> Self {
        LinesBuilder {
            customer: StringBuilder::with_capacity(n, n * 12),
            plan: StringBuilder::with_capacity(n, n * 8),
            feature: StringBuilder::with_capacity(n, n * 12),
            events: UInt64Builder::with_capacity(n),
            quantity: Float64Builder::with_capacity(n),
            accepted: Float64Builder::with_capacity(n),
            overage: Float64Builder::with_capacity(n),
        }
    }

    fn push(&mut self, (customer, (no_plan, plan), feature): Key<'_>, sums: Sums) {
        self.customer.append_value(customer);
        if no_plan {
            self.plan.append_null();
        } else {
            self.plan.append_value(plan);
        }
        self.feature.append_value(feature);
        self.events.append_value(sums.events);
        self.quantity.append_value(sums.quantity);
        self.accepted.append_value(sums.accepted);
        self.overage.append_value(sums.overage);
    }

    fn finish(mut self) -> Result<RecordBatch> {
        Ok(RecordBatch::try_new(
            lines_schema(),
            vec![
                Arc::new(self.customer.finish()),
                Arc::new(self.plan.finish()),
                Arc::new(self.feature.finish()),
                Arc::new(self.events.finish()),
                Arc::new(self.quantity.finish()),
                Arc::new(self.accepted.finish()),
                Arc::new(self.overage.finish()),
            ],
        )?)
    }
}

/// One lines file as read.
struct Cursor {
    customer: StringArray,
    plan: StringArray,
    feature: StringArray,
    events: UInt64Array,
    quantity: Float64Array,
    accepted: Float64Array,
    overage: Float64Array,
}

impl Cursor {
    fn read(bytes: bytes::Bytes, customer: Option<&str>) -> Result<Cursor> {
        let batches = ParquetRecordBatchReaderBuilder::try_new(bytes)?
            .with_batch_size(64 * 1024)
            .build()?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut all = concat_batches(&lines_schema(), &batches)?;
        if let Some(c) = customer {
            // A customer's lines are adjacent: one slice of the file.
            let names = all.column(0).as_string::<i32>();
            let from = partition_point(names, |n| n < c);
            let to = partition_point(names, |n| n <= c);
            all = all.slice(from, to - from);
        }
        let text = |i: usize| all.column(i).as_string::<i32>().clone();
        let number = |i: usize| all.column(i).as_primitive::<Float64Type>().clone();
        Ok(Cursor {
            customer: text(0),
            plan: text(1),
            feature: text(2),
            events: all.column(3).as_primitive::<UInt64Type>().clone(),
            quantity: number(4),
            accepted: number(5),
            overage: number(6),
        })
    }

    fn len(&self) -> usize {
        self.customer.len()
    }

    fn key(&self, i: usize) -> Key<'_> {
        (
            self.customer.value(i),
            plan_key(&self.plan, i),
            self.feature.value(i),
        )
    }

    fn sums(&self, i: usize) -> Sums {
        Sums {
            events: self.events.value(i),
            quantity: self.quantity.value(i),
            accepted: self.accepted.value(i),
            overage: self.overage.value(i),
        }
    }
}

/// The first index of sorted `names` for which `before` is false.
fn partition_point(names: &StringArray, before: impl Fn(&str) -> bool) -> usize {
    let (mut lo, mut hi) = (0, names.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if before(names.value(mid)) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The next line of one file in the merge's heap.
struct Head<'a> {
    key: Key<'a>,
    cursor: usize,
    row: usize,
}

impl PartialEq for Head<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Head<'_> {}
impl PartialOrd for Head<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Head<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: `BinaryHeap` pops its greatest, the merge wants the smallest key.
        (other.key, other.cursor).cmp(&(self.key, self.cursor))
    }
}

impl Lake {
    /// The lines of `files` (keys of the lake's billing table, each sorted) merged into
    /// one sorted batch, a line found in several files summed; with `customer`, that
    /// customer's lines only.
    pub fn merge_lines(&self, files: &[String], customer: Option<&str>) -> Result<RecordBatch> {
        merge(&self.read_each(files, |bytes| Cursor::read(bytes, customer))?)
    }
}

/// The lines of `cursors` merged into one sorted batch, a shared line summed.
fn merge(cursors: &[Cursor]) -> Result<RecordBatch> {
    let mut out = LinesBuilder::with_capacity(cursors.iter().map(Cursor::len).sum());
    let mut heap: BinaryHeap<Head<'_>> = cursors
        .iter()
        .enumerate()
        .filter(|(_, c)| c.len() > 0)
        .map(|(cursor, c)| Head {
            key: c.key(0),
            cursor,
            row: 0,
        })
        .collect();
    let mut open: Option<(Key<'_>, Sums)> = None;
    while let Some(Head { key, cursor, row }) = heap.pop() {
        let c = &cursors[cursor];
        let sums = c.sums(row);
        match &mut open {
            Some((k, s)) if *k == key => s.add(sums),
            _ => {
                if let Some((k, s)) = open.replace((key, sums)) {
                    out.push(k, s);
                }
            }
        }
        if row + 1 < c.len() {
            heap.push(Head {
                key: c.key(row + 1),
                cursor,
                row: row + 1,
            });
        }
    }
    if let Some((k, s)) = open {
        out.push(k, s);
    }
    out.finish()
}

#[cfg(test)]
mod tests {
    use arrow::array::ArrayRef;

    use super::*;

    type Row<'a> = (&'a str, Option<&'a str>, &'a str, &'a str, u64, f64);

    /// Monthly rows: (customer, plan, feature, decision, events, quantity), the columns
    /// the lines are made of.
    fn monthly(rows: &[Row<'_>]) -> RecordBatch {
        let text = |i: fn(&Row<'_>) -> Option<String>| -> ArrayRef {
            Arc::new(rows.iter().map(i).collect::<StringArray>())
        };
        RecordBatch::try_from_iter([
            (CUSTOMER, text(|r| Some(r.0.into()))),
            (PLAN, text(|r| r.1.map(Into::into))),
            (FEATURE, text(|r| Some(r.2.into()))),
            (DECISION, text(|r| Some(r.3.into()))),
            (
                EVENTS,
                Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.4))) as ArrayRef,
            ),
            (
                QUANTITY,
                Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.5))),
            ),
        ])
        .unwrap()
    }

    /// A line as read back: customer, plan, feature, events, quantity, accepted, overage.
    type Line = (String, Option<String>, String, u64, f64, f64, f64);

    fn rows(b: &RecordBatch) -> Vec<Line> {
        let text = |i: usize| b.column(i).as_string::<i32>().clone();
        let number = |i: usize| b.column(i).as_primitive::<Float64Type>().clone();
        let (c, p, f) = (text(0), text(1), text(2));
        let e = b.column(3).as_primitive::<UInt64Type>().clone();
        let (q, a, o) = (number(4), number(5), number(6));
        (0..b.num_rows())
            .map(|i| {
                (
                    c.value(i).to_owned(),
                    p.is_valid(i).then(|| p.value(i).to_owned()),
                    f.value(i).to_owned(),
                    e.value(i),
                    q.value(i),
                    a.value(i),
                    o.value(i),
                )
            })
            .collect()
    }

    fn line(c: &str, p: Option<&str>, f: &str, e: u64, q: f64, a: f64, o: f64) -> Line {
        (c.into(), p.map(Into::into), f.into(), e, q, a, o)
    }

    #[test]
    fn lines_sum_the_billable_rows_in_billing_order() {
        let batch = monthly(&[
            ("b", Some("pro"), "api", "overage", 2, 5.0),
            ("b", Some("pro"), "api", "accepted", 3, 10.0),
            ("b", Some("pro"), "api", "limit_reached", 9, 90.0),
            ("a", None, "api", "accepted", 1, 1.0),
            ("a", Some("free"), "api", "accepted", 4, 4.0),
            ("a", Some("free"), "seats", "late", 1, 1.0),
            ("a", Some("free"), "export", "not_entitled", 1, 1.0),
        ]);
        let lines = lines_of(&batch).unwrap();
        assert_eq!(lines.schema(), lines_schema());
        assert_eq!(
            rows(&lines),
            [
                line("a", Some("free"), "api", 4, 4.0, 4.0, 0.0),
                line("a", None, "api", 1, 1.0, 1.0, 0.0),
                line("b", Some("pro"), "api", 5, 15.0, 10.0, 5.0),
            ]
        );
    }

    #[test]
    fn a_merge_keeps_the_order_sums_shared_lines_and_picks_a_customer() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let write = |name: &str, rows: &[Row<'_>]| {
            let meta = crate::FileMeta {
                partition: 0,
                first_seq: 1,
                last_seq: 1,
                files: 1,
                compacted: None,
            };
            let lines = lines_of(&monthly(rows)).unwrap();
            let key = format!("{BILLING_TABLE}/{name}");
            let bytes = crate::encode(&lake.monthly_props, &meta, &lines).unwrap();
            crate::table::block_on(lake.storage().put(&key, bytes)).unwrap();
            key
        };
        let files = [
            write(
                "p000-1-1.parquet",
                &[
                    ("a", Some("free"), "api", "accepted", 1, 1.0),
                    ("c", Some("pro"), "api", "overage", 1, 2.0),
                ],
            ),
            write(
                "p001-1-1.parquet",
                &[
                    ("b", Some("pro"), "api", "accepted", 1, 3.0),
                    ("c", Some("pro"), "api", "accepted", 2, 4.0),
                    ("c", None, "api", "accepted", 1, 1.0),
                ],
            ),
            write("p002-1-1.parquet", &[]),
        ];
        assert_eq!(
            rows(&lake.merge_lines(&files, None).unwrap()),
            [
                line("a", Some("free"), "api", 1, 1.0, 1.0, 0.0),
                line("b", Some("pro"), "api", 1, 3.0, 3.0, 0.0),
                line("c", Some("pro"), "api", 3, 6.0, 4.0, 2.0),
                line("c", None, "api", 1, 1.0, 1.0, 0.0),
            ]
        );
        assert_eq!(
            rows(&lake.merge_lines(&files, Some("b")).unwrap()),
            [line("b", Some("pro"), "api", 1, 3.0, 3.0, 0.0)]
        );
        assert!(rows(&lake.merge_lines(&files, Some("nobody")).unwrap()).is_empty());
        assert!(rows(&lake.merge_lines(&[], None).unwrap()).is_empty());
    }
}
