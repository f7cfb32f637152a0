//! The compact encoding: a batch of usage events as an Arrow IPC stream.
//!
//! SDKs that want the top speed send a NATS message with the header
//! `Content-Type: application/vnd.apache.arrow.stream` whose body is an Arrow IPC stream
//! with one column per CloudEvents attribute:
//!
//! - `id`: a string, or `FixedSizeBinary(16)` holding a UUID (read as its lowercase
//!   hyphenated form, so it deduplicates against the same id sent as JSON);
//! - `source`, `type`, `subject`, `feature`: strings, required;
//! - `time`: a timestamp of any unit (null = ingest time);
//! - `quantity`: a number (null = 1);
//! - `region`, `user`, `data`: strings, optional (`data` holds the other data properties
//!   as a JSON object).
//!
//! Strings may be `Utf8`, `LargeUtf8`, `Utf8View` or dictionary-encoded. A string
//! attribute that is the same in every row (a message carries one customer, so `subject`
//! always is) may instead be given once, as schema metadata under the column's name.
//! Each row is checked by the same rules as a JSON event and yields the same [`Event`]; a
//! bad row is one [`Invalid`] event, its neighbours stay good.
//!
//! [`encode`] writes the most compact form: UUID ids as 16 bytes, constant attributes as
//! metadata, the rest dictionary-encoded. A 100-event message of the demo workload is
//! about a quarter of the size of its CloudEvents JSON.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Cursor;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, DictionaryArray, FixedSizeBinaryArray, Float64Array, RecordBatch,
    StringArray, StringBuilder, TimestampMicrosecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::{
    DataType, Field, Int16Type, Int32Type, Schema, TimeUnit, TimestampMicrosecondType,
};
use arrow::ipc::reader::StreamReader;
use chrono::DateTime;

use crate::event::{check_len, check_quantity, required};
use crate::{DecodeLimits, Event, Invalid, Reason};

/// The NATS header that names a message's encoding.
pub const CONTENT_TYPE_HEADER: &str = "Content-Type";
/// The `Content-Type` header value that marks a message as Arrow IPC.
pub const ARROW_CONTENT_TYPE: &str = "application/vnd.apache.arrow.stream";

/// The event field each column stands for (used in error messages and dead letters).
const COLUMNS: [(&str, &str); 10] = [
    ("id", "id"),
    ("source", "source"),
    ("type", "type"),
    ("subject", "subject"),
    ("feature", "data.feature"),
    ("time", "time"),
    ("quantity", "data.quantity"),
    ("region", "data.region"),
    ("user", "data.user"),
    ("data", "data"),
];

fn field_of(column: &str) -> &'static str {
    COLUMNS
        .iter()
        .find(|(c, _)| *c == column)
        .map_or("data", |(_, f)| f)
}

/// A string attribute of every row: a column, one value for all rows, or none.
enum Strings {
    Column(StringArray),
    Constant(String),
    Absent,
}

impl Strings {
    fn get(&self, i: usize) -> Option<&str> {
        match self {
            Strings::Column(a) => (!a.is_null(i)).then(|| a.value(i)),
            Strings::Constant(v) => Some(v),
            Strings::Absent => None,
        }
    }
}

/// One record batch with its columns normalised.
struct Columns {
    rows: usize,
    id: StringArray,
    source: Strings,
    event_type: Strings,
    subject: Strings,
    feature: Strings,
    time: Option<TimestampMicrosecondArray>,
    quantity: Option<Float64Array>,
    region: Strings,
    user: Strings,
    data: Strings,
}

/// A decoded Arrow IPC message.
pub struct Columnar {
    batches: Vec<Columns>,
    rows: usize,
}

impl std::fmt::Debug for Columnar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Columnar")
            .field("rows", &self.rows)
            .finish()
    }
}

fn column(
    batch: &RecordBatch,
    name: &'static str,
    to: &DataType,
) -> Result<Option<ArrayRef>, Invalid> {
    let Some(array) = batch.column_by_name(name) else {
        return Ok(None);
    };
    if array.data_type() == to {
        return Ok(Some(array.clone()));
    }
    let castable = match to {
        DataType::Utf8 => matches!(
            array.data_type(),
            DataType::LargeUtf8 | DataType::Utf8View | DataType::Dictionary(_, _)
        ),
        DataType::Float64 => array.data_type().is_numeric(),
        _ => false,
    };
    let field = field_of(name);
    if !castable {
        return Err(Invalid::wrong_type(
            field,
            &format!("{to}, not {}", array.data_type()),
        ));
    }
    cast(array, to)
        .map(Some)
        .map_err(|e| Invalid::wrong_type(field, &format!("{to}: {e}")))
}

fn strings(batch: &RecordBatch, name: &'static str) -> Result<Strings, Invalid> {
    if let Some(a) = column(batch, name, &DataType::Utf8)? {
        return Ok(Strings::Column(a.as_string::<i32>().clone()));
    }
    Ok(match batch.schema_ref().metadata().get(name) {
        Some(v) => Strings::Constant(v.clone()),
        None => Strings::Absent,
    })
}

fn required_strings(batch: &RecordBatch, name: &'static str) -> Result<Strings, Invalid> {
    match strings(batch, name)? {
        Strings::Absent => Err(Invalid::new(
            Reason::MissingField,
            Some(field_of(name)),
            format!("the Arrow batch has no `{name}` column or schema metadata"),
        )),
        s => Ok(s),
    }
}

/// The `time` column in microseconds since the epoch. A timestamp of any unit is read as
/// a UTC instant (what Arrow stores, with or without a time zone); one out of range
/// becomes `i64::MIN`, which the row check refuses as a bad time.
fn times(batch: &RecordBatch) -> Result<Option<TimestampMicrosecondArray>, Invalid> {
    use arrow::datatypes::{
        TimestampMillisecondType as Ms, TimestampNanosecondType as Ns, TimestampSecondType as S,
    };
    let Some(a) = batch.column_by_name("time") else {
        return Ok(None);
    };
    let scaled = |v: Option<i64>| v.unwrap_or(i64::MIN);
    Ok(Some(match a.data_type() {
        DataType::Timestamp(TimeUnit::Second, _) => a
            .as_primitive::<S>()
            .unary(|v| scaled(v.checked_mul(1_000_000))),
        DataType::Timestamp(TimeUnit::Millisecond, _) => a
            .as_primitive::<Ms>()
            .unary(|v| scaled(v.checked_mul(1_000))),
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            a.as_primitive::<TimestampMicrosecondType>().unary(|v| v)
        }
        DataType::Timestamp(TimeUnit::Nanosecond, _) => {
            a.as_primitive::<Ns>().unary(|v| v.div_euclid(1_000))
        }
        other => {
            return Err(Invalid::wrong_type(
                "time",
                &format!("a timestamp, not {other}"),
            ));
        }
    }))
}

/// The `id` column as strings; 16-byte ids are UUIDs in their lowercase hyphenated form.
fn ids(batch: &RecordBatch) -> Result<StringArray, Invalid> {
    if let Some(a) = batch.column_by_name("id")
        && *a.data_type() == DataType::FixedSizeBinary(16)
    {
        let a: &FixedSizeBinaryArray = a.as_fixed_size_binary();
        let mut out = StringBuilder::with_capacity(a.len(), a.len() * 36);
        let mut text = [0u8; 36];
        for i in 0..a.len() {
            if a.is_null(i) {
                out.append_null();
            } else {
                out.append_value(uuid_text(a.value(i), &mut text));
            }
        }
        return Ok(out.finish());
    }
    match strings(batch, "id")? {
        Strings::Column(a) => Ok(a),
        _ => Err(Invalid::new(
            Reason::MissingField,
            Some("id"),
            "the Arrow batch has no `id` column",
        )),
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";
/// Where the hyphens of a UUID's text form stand.
const HYPHENS: [usize; 4] = [8, 13, 18, 23];

/// Writes a UUID's lowercase hyphenated form.
fn uuid_text<'b>(bytes: &[u8], out: &'b mut [u8; 36]) -> &'b str {
    let mut at = 0;
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[at] = b'-';
            at += 1;
        }
        out[at] = HEX[usize::from(b >> 4)];
        out[at + 1] = HEX[usize::from(b & 0xf)];
        at += 2;
    }
    std::str::from_utf8(out).unwrap_or_default()
}

/// The 16 bytes of a UUID in lowercase hyphenated form; `None` for any other string, so
/// that every id survives the round trip unchanged.
fn uuid_bytes(text: &str) -> Option<[u8; 16]> {
    let text = text.as_bytes();
    if text.len() != 36 || HYPHENS.iter().any(|&h| text[h] != b'-') {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 16];
    let mut digits = text.iter().filter(|c| **c != b'-');
    for byte in &mut out {
        *byte = (nibble(*digits.next()?)? << 4) | nibble(*digits.next()?)?;
    }
    Some(out)
}

impl Columnar {
    /// Decodes an Arrow IPC stream. `Err` refuses the whole message.
    pub fn decode(payload: &[u8], limits: &DecodeLimits) -> Result<Columnar, Invalid> {
        limits.check_size(payload)?;
        let not_arrow = |e: arrow::error::ArrowError| {
            Invalid::new(
                Reason::NotArrow,
                None,
                format!("not an Arrow IPC stream: {e}"),
            )
        };
        let reader = StreamReader::try_new(Cursor::new(payload), None).map_err(not_arrow)?;
        let mut batches = Vec::new();
        let mut rows = 0;
        for batch in reader {
            let batch = batch.map_err(not_arrow)?;
            rows += batch.num_rows();
            if rows > limits.max_batch_events {
                return Err(Invalid::new(
                    Reason::TooManyEvents,
                    None,
                    format!("a batch holds at most {} events", limits.max_batch_events),
                ));
            }
            batches.push(Columns {
                rows: batch.num_rows(),
                id: ids(&batch)?,
                source: required_strings(&batch, "source")?,
                event_type: required_strings(&batch, "type")?,
                subject: required_strings(&batch, "subject")?,
                feature: required_strings(&batch, "feature")?,
                time: times(&batch)?,
                quantity: column(&batch, "quantity", &DataType::Float64)?
                    .map(|a| a.as_primitive::<arrow::datatypes::Float64Type>().clone()),
                region: strings(&batch, "region")?,
                user: strings(&batch, "user")?,
                data: strings(&batch, "data")?,
            });
        }
        if rows == 0 {
            return Err(Invalid::new(
                Reason::EmptyBatch,
                None,
                "the Arrow stream holds no rows",
            ));
        }
        Ok(Columnar { batches, rows })
    }

    /// Rows in the message.
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Each row as an event, checked like a JSON event, in order.
    pub fn events<'s>(
        &'s self,
        limits: &'s DecodeLimits,
    ) -> impl Iterator<Item = Result<Event<'s>, Invalid>> + 's {
        self.batches
            .iter()
            .flat_map(move |c| (0..c.rows).map(move |i| row(c, i, limits)))
    }

    /// One row as CloudEvents JSON, for a dead letter.
    pub fn row_json(&self, mut index: usize) -> Vec<u8> {
        for c in &self.batches {
            if index < c.rows {
                let value = serde_json::json!({
                    "specversion": "1.0",
                    "id": (!c.id.is_null(index)).then(|| c.id.value(index)),
                    "source": c.source.get(index),
                    "type": c.event_type.get(index),
                    "subject": c.subject.get(index),
                    "time": c.time.as_ref().filter(|t| !t.is_null(index))
                        .and_then(|t| DateTime::from_timestamp_micros(t.value(index)))
                        .map(|t| t.to_rfc3339()),
                    "data": {
                        "feature": c.feature.get(index),
                        "quantity": c.quantity.as_ref().filter(|q| !q.is_null(index))
                            .map(|q| q.value(index).to_string()),
                        "region": c.region.get(index),
                        "user": c.user.get(index),
                        "properties": c.data.get(index),
                    },
                });
                return serde_json::to_vec(&value).unwrap_or_default();
            }
            index -= c.rows;
        }
        Vec::new()
    }
}

fn row<'s>(c: &'s Columns, i: usize, limits: &DecodeLimits) -> Result<Event<'s>, Invalid> {
    let req = |v: Option<&'s str>, field: &'static str| -> Result<Cow<'s, str>, Invalid> {
        let v = required(v.map(Cow::Borrowed), field)?;
        check_len(&v, field, limits)?;
        Ok(v)
    };
    let opt = |s: &'s Strings, field: &'static str| -> Result<Option<Cow<'s, str>>, Invalid> {
        s.get(i)
            .map(|v| check_len(v, field, limits).map(|()| Cow::Borrowed(v)))
            .transpose()
    };
    let id = req((!c.id.is_null(i)).then(|| c.id.value(i)), "id")?;
    let source = req(c.source.get(i), "source")?;
    let event_type = req(c.event_type.get(i), "type")?;
    let subject = req(c.subject.get(i), "subject")?;
    let feature = req(c.feature.get(i), "data.feature")?;
    let time = match &c.time {
        Some(t) if !t.is_null(i) => {
            Some(DateTime::from_timestamp_micros(t.value(i)).ok_or_else(|| {
                Invalid::new(Reason::BadTime, Some("time"), "`time` is out of range")
            })?)
        }
        _ => None,
    };
    let quantity = match &c.quantity {
        Some(q) if !q.is_null(i) => check_quantity(q.value(i), &q.value(i))?,
        _ => 1.0,
    };
    Ok(Event {
        id,
        source,
        event_type,
        subject,
        time,
        feature,
        quantity,
        region: opt(&c.region, "data.region")?,
        user: opt(&c.user, "data.user")?,
        extra: c.data.get(i).map(str::to_owned),
    })
}

/// Reads one string attribute of an event.
type Attribute = for<'e> fn(&'e Event<'_>) -> Option<&'e str>;

/// Encodes events as an Arrow IPC stream in the compact form: what an SDK sends, and what
/// tests and the load generator use.
pub fn encode(events: &[Event<'_>]) -> Result<Vec<u8>, arrow::error::ArrowError> {
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    let mut metadata = HashMap::new();

    let uuids: Option<Vec<[u8; 16]>> = events.iter().map(|e| uuid_bytes(&e.id)).collect();
    match uuids {
        Some(uuids) => {
            fields.push(Field::new("id", DataType::FixedSizeBinary(16), false));
            columns.push(Arc::new(FixedSizeBinaryArray::try_from_iter(
                uuids.into_iter(),
            )?));
        }
        None => {
            fields.push(Field::new("id", DataType::Utf8, false));
            columns.push(Arc::new(StringArray::from_iter_values(
                events.iter().map(|e| &*e.id),
            )));
        }
    }
    let attributes: [(&str, Attribute); 7] = [
        ("source", |e| Some(&e.source)),
        ("type", |e| Some(&e.event_type)),
        ("subject", |e| Some(&e.subject)),
        ("feature", |e| Some(&e.feature)),
        ("region", |e| e.region.as_deref()),
        ("user", |e| e.user.as_deref()),
        ("data", |e| e.extra.as_deref()),
    ];
    for (name, get) in attributes {
        let first = events.first().and_then(get);
        if events.iter().all(|e| get(e) == first) {
            // The same in every row (or absent from all): metadata, or nothing.
            if let Some(v) = first {
                metadata.insert(name.to_owned(), v.to_owned());
            }
            continue;
        }
        let array: ArrayRef = if name == "data" {
            Arc::new(events.iter().map(get).collect::<StringArray>())
        } else if events.len() <= i16::MAX as usize {
            Arc::new(
                events
                    .iter()
                    .map(get)
                    .collect::<DictionaryArray<Int16Type>>(),
            )
        } else {
            Arc::new(
                events
                    .iter()
                    .map(get)
                    .collect::<DictionaryArray<Int32Type>>(),
            )
        };
        fields.push(Field::new(name, array.data_type().clone(), true));
        columns.push(array);
    }
    if events.iter().any(|e| e.time.is_some()) {
        let time: TimestampMicrosecondArray = events
            .iter()
            .map(|e| e.time.map(|t| t.timestamp_micros()))
            .collect();
        let time = time.with_timezone("UTC");
        fields.push(Field::new("time", time.data_type().clone(), true));
        columns.push(Arc::new(time));
    }
    fields.push(Field::new("quantity", DataType::Float64, false));
    columns.push(Arc::new(Float64Array::from_iter_values(
        events.iter().map(|e| e.quantity),
    )));

    let schema = Arc::new(Schema::new_with_metadata(fields, metadata));
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let mut out = Vec::new();
    let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema)?;
    writer.write(&batch)?;
    writer.finish()?;
    drop(writer);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Frame;

    const JSON: &str = r#"[
        {"specversion":"1.0","id":"a","source":"s","type":"t","subject":"acme","time":"2026-11-03T10:00:00Z",
         "data":{"feature":"calls","quantity":2.5,"region":"eu","user":"u1","plan":"pro"}},
        {"specversion":"1.0","id":"b","source":"s","type":"t","subject":"acme","data":{"feature":"calls"}}
    ]"#;

    #[test]
    fn round_trips_the_same_events_as_json() {
        let limits = DecodeLimits::default();
        let frame = Frame::decode(JSON.as_bytes(), &limits).unwrap();
        let events: Vec<Event<'_>> = frame.events.into_iter().map(Result::unwrap).collect();
        let bytes = encode(&events).unwrap();
        let columnar = Columnar::decode(&bytes, &limits).unwrap();
        assert_eq!(columnar.len(), 2);
        let back: Vec<Event<'_>> = columnar.events(&limits).map(Result::unwrap).collect();
        assert_eq!(back, events);
    }

    #[test]
    fn bad_rows_and_bad_messages_have_reasons() {
        let limits = DecodeLimits::default();
        let frame = Frame::decode(JSON.as_bytes(), &limits).unwrap();
        let mut events: Vec<Event<'_>> = frame.events.into_iter().map(Result::unwrap).collect();
        events[0].quantity = -1.0;
        events[1].id = Cow::Borrowed("");
        let bytes = encode(&events).unwrap();
        let columnar = Columnar::decode(&bytes, &limits).unwrap();
        let reasons: Vec<_> = columnar
            .events(&limits)
            .map(|e| {
                e.map(|_| ())
                    .map_err(|i| (i.reason, i.field.as_deref().map(str::to_owned)))
            })
            .collect();
        assert_eq!(
            reasons,
            [
                Err((Reason::NegativeQuantity, Some("data.quantity".to_owned()))),
                Err((Reason::EmptyField, Some("id".to_owned())))
            ]
        );
        let json: serde_json::Value = serde_json::from_slice(&columnar.row_json(1)).unwrap();
        assert_eq!(json["id"], "");
        assert_eq!(json["data"]["feature"], "calls");

        assert_eq!(
            Columnar::decode(b"{}", &limits).unwrap_err().reason,
            Reason::NotArrow
        );
        let small = DecodeLimits {
            max_batch_events: 1,
            ..limits
        };
        assert_eq!(
            Columnar::decode(&bytes, &small).unwrap_err().reason,
            Reason::TooManyEvents
        );
    }

    /// A demo-like message: 100 events of one customer, UUID ids, a few features.
    fn demo_message() -> String {
        let events: Vec<String> = (0..100)
            .map(|i| {
                format!(
                    r#"{{"specversion":"1.0","id":"0196a3c4-5b6d-7e8f-9a0b-{i:012x}","source":"demo-app","type":"usage","subject":"cust-00042","time":"2026-11-03T10:00:{:02}.{i:06}Z","data":{{"feature":"{}","quantity":{}.0,"region":"eu-west","user":"user-{}"}}}}"#,
                    i % 60,
                    ["api-calls", "storage-gb", "exports"][i % 3],
                    i % 10 + 1,
                    i % 7
                )
            })
            .collect();
        format!("[{}]", events.join(","))
    }

    #[test]
    fn uuid_ids_travel_as_16_bytes_and_come_back_as_the_same_text() {
        let limits = DecodeLimits::default();
        let json = demo_message();
        let frame = Frame::decode(json.as_bytes(), &limits).unwrap();
        let events: Vec<Event<'_>> = frame.events.into_iter().map(Result::unwrap).collect();
        let bytes = encode(&events).unwrap();
        let reader = StreamReader::try_new(Cursor::new(&bytes), None).unwrap();
        let schema = reader.schema();
        assert_eq!(
            schema.field_with_name("id").unwrap().data_type(),
            &DataType::FixedSizeBinary(16)
        );
        // One customer and one source per message: metadata, not columns.
        assert_eq!(schema.metadata()["subject"], "cust-00042");
        assert!(schema.field_with_name("subject").is_err());
        assert!(matches!(
            schema.field_with_name("feature").unwrap().data_type(),
            DataType::Dictionary(_, _)
        ));
        let columnar = Columnar::decode(&bytes, &limits).unwrap();
        let back: Vec<Event<'_>> = columnar.events(&limits).map(Result::unwrap).collect();
        assert_eq!(back, events);
        assert!(
            bytes.len() * 100 < json.len() * 30,
            "compact {} bytes, JSON {} bytes",
            bytes.len(),
            json.len()
        );
    }

    #[test]
    fn ids_that_are_not_lowercase_uuids_stay_text() {
        for id in [
            "0196A3C4-5B6D-7E8F-9A0B-000000000001",
            "{0196a3c4-5b6d-7e8f-9a0b-000000000001}",
            "0196a3c45b6d7e8f9a0b000000000001",
            "0196a3c4-5b6d-7e8f-9a0b-00000000000g",
            "order-17",
        ] {
            assert_eq!(uuid_bytes(id), None, "{id}");
        }
        let id = "0196a3c4-5b6d-7e8f-9a0b-00000000002a";
        let bytes = uuid_bytes(id).unwrap();
        assert_eq!(bytes[15], 0x2a);
        assert_eq!(uuid_text(&bytes, &mut [0; 36]), id);

        let limits = DecodeLimits::default();
        let frame = Frame::decode(JSON.as_bytes(), &limits).unwrap();
        let mut events: Vec<Event<'_>> = frame.events.into_iter().map(Result::unwrap).collect();
        events[1].id = Cow::Borrowed(id);
        let bytes = encode(&events).unwrap();
        let columnar = Columnar::decode(&bytes, &limits).unwrap();
        let back: Vec<Event<'_>> = columnar.events(&limits).map(Result::unwrap).collect();
        assert_eq!(back, events);
    }

    #[test]
    fn plain_columns_from_any_arrow_writer_decode_too() {
        use arrow::array::{LargeStringArray, TimestampMillisecondArray, UInt32Array};
        let schema = Schema::new(vec![
            Field::new("id", DataType::LargeUtf8, false),
            Field::new("source", DataType::Utf8, false),
            Field::new("type", DataType::Utf8, false),
            Field::new("subject", DataType::Utf8, false),
            Field::new("feature", DataType::Utf8, false),
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                true,
            ),
            Field::new("quantity", DataType::UInt32, true),
        ]);
        let s = |v: &str| Arc::new(StringArray::from(vec![v, v])) as ArrayRef;
        let batch = RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(LargeStringArray::from(vec!["e1", "e2"])),
                s("app"),
                s("usage"),
                s("acme"),
                s("calls"),
                Arc::new(TimestampMillisecondArray::from(vec![
                    Some(1_793_700_000_000),
                    None,
                ])),
                Arc::new(UInt32Array::from(vec![Some(3), None])),
            ],
        )
        .unwrap();
        let limits = DecodeLimits::default();
        let columnar = Columnar::decode(&ipc(&batch), &limits).unwrap();
        let events: Vec<Event<'_>> = columnar.events(&limits).map(Result::unwrap).collect();
        assert_eq!(events[0].id, "e1");
        assert_eq!(events[0].subject, "acme");
        assert_eq!(events[0].quantity, 3.0);
        assert_eq!(
            events[0].time.unwrap().timestamp_millis(),
            1_793_700_000_000
        );
        assert_eq!((events[1].quantity, events[1].time), (1.0, None));

        // Seconds past what microseconds can hold: that row is a bad time, not "now".
        let schema = Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("feature", DataType::Utf8, false),
            Field::new("time", DataType::Timestamp(TimeUnit::Second, None), true),
        ])
        .with_metadata(HashMap::from(
            ["source", "type", "subject"].map(|k| (k.to_owned(), "x".to_owned())),
        ));
        let batch = RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(StringArray::from(vec!["e1", "e2"])),
                Arc::new(StringArray::from(vec!["calls", "calls"])),
                Arc::new(arrow::array::TimestampSecondArray::from(vec![
                    i64::MAX / 1000,
                    1_793_700_000,
                ])),
            ],
        )
        .unwrap();
        let columnar = Columnar::decode(&ipc(&batch), &limits).unwrap();
        let outcomes: Vec<_> = columnar.events(&limits).collect();
        assert_eq!(outcomes[0].as_ref().unwrap_err().reason, Reason::BadTime);
        assert_eq!(
            outcomes[1].as_ref().unwrap().time.unwrap().timestamp(),
            1_793_700_000
        );
    }

    fn ipc(batch: &RecordBatch) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut writer =
            arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &batch.schema()).unwrap();
        writer.write(batch).unwrap();
        writer.finish().unwrap();
        drop(writer);
        bytes
    }

    #[test]
    fn a_missing_required_attribute_is_named() {
        let schema = Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("feature", DataType::Utf8, false),
        ])
        .with_metadata(HashMap::from([
            ("source".to_owned(), "app".to_owned()),
            ("subject".to_owned(), "acme".to_owned()),
        ]));
        let batch = RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(StringArray::from(vec!["e1"])),
                Arc::new(StringArray::from(vec!["calls"])),
            ],
        )
        .unwrap();
        let err = Columnar::decode(&ipc(&batch), &DecodeLimits::default()).unwrap_err();
        assert_eq!(
            (err.reason, err.field.as_deref()),
            (Reason::MissingField, Some("type"))
        );
    }
}
