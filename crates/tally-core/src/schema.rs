//! The lake record: one Arrow schema, defined here once.
//!
//! `schemas/lake.schema.json` describes the same columns for readers outside Rust; a test
//! keeps the two equal. Files live under `events/date=YYYY-MM-DD/`, where the date is the
//! event time's UTC date; `date` is a hive partition column, not stored in the files.

use std::sync::{Arc, LazyLock};

use arrow::array::{StringArray, UInt8Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::Decision;

pub const EVENT_ID: &str = "event_id";
pub const CUSTOMER: &str = "customer";
pub const FEATURE: &str = "feature";
pub const QUANTITY: &str = "quantity";
pub const EVENT_TIME: &str = "event_time";
pub const REGION: &str = "region";
pub const USER_ID: &str = "user_id";
pub const SOURCE: &str = "source";
pub const EVENT_TYPE: &str = "event_type";
pub const DATA: &str = "data";
pub const DECISION: &str = "decision";
pub const INGEST_TIME: &str = "ingest_time";
pub const STREAM_SEQ: &str = "stream_seq";
pub const PARTITION_ID: &str = "partition_id";
/// The plan that decided the event (null when no entitlement did: enforcement off, an
/// unknown customer). Billing rates each event with its plan's prices. Last, and
/// nullable, so that files written before it read as null.
pub const PLAN: &str = "plan";
/// The decision as its number ([`Decision::code`](crate::Decision::code)): billing
/// filters and splits on it, which costs a query a fraction of comparing the names.
/// Nullable, so that files written before it read as null; readers then fall back to
/// `decision`.
pub const DECISION_CODE: &str = "decision_code";

/// The hive partition column of the events table.
pub const DATE: &str = "date";
/// The events table's directory under the lake root.
pub const EVENTS_TABLE: &str = "events";

fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

static LAKE_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new(EVENT_ID, DataType::Utf8, false),
        Field::new(CUSTOMER, DataType::Utf8, false),
        Field::new(FEATURE, DataType::Utf8, false),
        Field::new(QUANTITY, DataType::Float64, false),
        Field::new(EVENT_TIME, utc_micros(), false),
        Field::new(REGION, DataType::Utf8, true),
        Field::new(USER_ID, DataType::Utf8, true),
        Field::new(SOURCE, DataType::Utf8, false),
        Field::new(EVENT_TYPE, DataType::Utf8, false),
        Field::new(DATA, DataType::Utf8, true),
        Field::new(DECISION, DataType::Utf8, false),
        Field::new(INGEST_TIME, utc_micros(), false),
        Field::new(STREAM_SEQ, DataType::UInt64, false),
        Field::new(PARTITION_ID, DataType::UInt16, false),
        Field::new(PLAN, DataType::Utf8, true),
        Field::new(DECISION_CODE, DataType::UInt8, true),
    ]))
});

/// The schema of one event row in the lake.
pub fn lake_schema() -> SchemaRef {
    LAKE_SCHEMA.clone()
}

/// The `decision_code` column of a `decision` column: each name's
/// [code](crate::Decision::code), null for a name no decision has.
pub fn decision_codes(names: &StringArray) -> UInt8Array {
    names
        .iter()
        .map(|name| name.and_then(Decision::parse).map(Decision::code))
        .collect()
}

/// A JSON description of a schema's columns (`name`, `type`, `nullable`), the format of
/// `schemas/lake.schema.json`.
pub fn describe(schema: &Schema) -> Vec<(String, String, bool)> {
    schema
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().to_string(), f.is_nullable()))
        .collect()
}
