//! The compact encoding: a batch of usage events as an Arrow IPC stream.
//!
//! SDKs that want the top speed send a NATS message with the header
//! `Content-Type: application/vnd.apache.arrow.stream` whose body is an Arrow IPC stream
//! with one column per CloudEvents attribute: `id`, `source`, `type`, `subject`,
//! `feature` (strings, required), `time` (timestamp, any unit; null = ingest time),
//! `quantity` (number; null = 1), `region`, `user`, `data` (strings, optional; `data` holds
//! the other data properties as a JSON object). Strings may be `Utf8`, `LargeUtf8`,
//! `Utf8View` or dictionary-encoded. Each row is checked by the same rules as a JSON event
//! and yields the same [`Event`]; a bad row is one [`Invalid`] event, its neighbours
//! stay good.

use std::borrow::Cow;
use std::io::Cursor;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, TimeUnit, TimestampMicrosecondType};
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

/// One record batch with its columns normalised.
struct Columns {
    id: StringArray,
    source: StringArray,
    event_type: StringArray,
    subject: StringArray,
    feature: StringArray,
    time: Option<arrow::array::TimestampMicrosecondArray>,
    quantity: Option<Float64Array>,
    region: Option<StringArray>,
    user: Option<StringArray>,
    data: Option<StringArray>,
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
        DataType::Timestamp(_, _) => matches!(array.data_type(), DataType::Timestamp(_, _)),
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

fn strings(batch: &RecordBatch, name: &'static str) -> Result<Option<StringArray>, Invalid> {
    Ok(column(batch, name, &DataType::Utf8)?.map(|a| a.as_string::<i32>().clone()))
}

fn required_strings(batch: &RecordBatch, name: &'static str) -> Result<StringArray, Invalid> {
    strings(batch, name)?.ok_or_else(|| {
        Invalid::new(
            Reason::MissingField,
            Some(field_of(name)),
            format!("the Arrow batch has no `{name}` column"),
        )
    })
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
        let micros = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
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
                id: required_strings(&batch, "id")?,
                source: required_strings(&batch, "source")?,
                event_type: required_strings(&batch, "type")?,
                subject: required_strings(&batch, "subject")?,
                feature: required_strings(&batch, "feature")?,
                time: column(&batch, "time", &micros)?
                    .map(|a| a.as_primitive::<TimestampMicrosecondType>().clone()),
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
            .flat_map(move |c| (0..c.id.len()).map(move |i| row(c, i, limits)))
    }

    /// One row as CloudEvents JSON, for a dead letter.
    pub fn row_json(&self, mut index: usize) -> Vec<u8> {
        for c in &self.batches {
            if index < c.id.len() {
                fn s(a: &StringArray, i: usize) -> Option<&str> {
                    (!a.is_null(i)).then(|| a.value(i))
                }
                fn o(a: &Option<StringArray>, i: usize) -> Option<&str> {
                    a.as_ref().and_then(|a| s(a, i))
                }
                let value = serde_json::json!({
                    "specversion": "1.0",
                    "id": s(&c.id, index),
                    "source": s(&c.source, index),
                    "type": s(&c.event_type, index),
                    "subject": s(&c.subject, index),
                    "time": c.time.as_ref().filter(|t| !t.is_null(index))
                        .and_then(|t| DateTime::from_timestamp_micros(t.value(index)))
                        .map(|t| t.to_rfc3339()),
                    "data": {
                        "feature": s(&c.feature, index),
                        "quantity": c.quantity.as_ref().filter(|q| !q.is_null(index))
                            .map(|q| q.value(index).to_string()),
                        "region": o(&c.region, index),
                        "user": o(&c.user, index),
                        "properties": o(&c.data, index),
                    },
                });
                return serde_json::to_vec(&value).unwrap_or_default();
            }
            index -= c.id.len();
        }
        Vec::new()
    }
}

fn row<'s>(c: &'s Columns, i: usize, limits: &DecodeLimits) -> Result<Event<'s>, Invalid> {
    let req = |a: &'s StringArray, field: &'static str| -> Result<Cow<'s, str>, Invalid> {
        let v = (!a.is_null(i)).then(|| Cow::Borrowed(a.value(i)));
        let v = required(v, field)?;
        check_len(&v, field, limits)?;
        Ok(v)
    };
    let opt = |a: &'s Option<StringArray>,
               field: &'static str|
     -> Result<Option<Cow<'s, str>>, Invalid> {
        match a {
            Some(a) if !a.is_null(i) => {
                check_len(a.value(i), field, limits)?;
                Ok(Some(Cow::Borrowed(a.value(i))))
            }
            _ => Ok(None),
        }
    };
    let id = req(&c.id, "id")?;
    let source = req(&c.source, "source")?;
    let event_type = req(&c.event_type, "type")?;
    let subject = req(&c.subject, "subject")?;
    let feature = req(&c.feature, "data.feature")?;
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
        extra: c
            .data
            .as_ref()
            .filter(|d| !d.is_null(i))
            .map(|d| d.value(i).to_owned()),
    })
}

/// Encodes events as an Arrow IPC stream: what an SDK sends, and what tests and the load
/// generator use.
pub fn encode(events: &[Event<'_>]) -> Result<Vec<u8>, arrow::error::ArrowError> {
    use arrow::array::{Float64Builder, StringBuilder, TimestampMicrosecondBuilder};
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    let mut strings: Vec<StringBuilder> = (0..5).map(|_| StringBuilder::new()).collect();
    let mut optional: Vec<StringBuilder> = (0..3).map(|_| StringBuilder::new()).collect();
    let mut time = TimestampMicrosecondBuilder::new();
    let mut quantity = Float64Builder::new();
    for e in events {
        for (b, v) in
            strings
                .iter_mut()
                .zip([&e.id, &e.source, &e.event_type, &e.subject, &e.feature])
        {
            b.append_value(v);
        }
        optional[0].append_option(e.region.as_deref());
        optional[1].append_option(e.user.as_deref());
        optional[2].append_option(e.extra.as_deref());
        time.append_option(e.time.map(|t| t.timestamp_micros()));
        quantity.append_value(e.quantity);
    }
    let micros = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let mut fields: Vec<Field> = ["id", "source", "type", "subject", "feature"]
        .iter()
        .map(|n| Field::new(*n, DataType::Utf8, false))
        .collect();
    fields.push(Field::new("time", micros, true));
    fields.push(Field::new("quantity", DataType::Float64, false));
    for n in ["region", "user", "data"] {
        fields.push(Field::new(n, DataType::Utf8, true));
    }
    let mut columns: Vec<ArrayRef> = strings
        .iter_mut()
        .map(|b| Arc::new(b.finish()) as ArrayRef)
        .collect();
    columns.push(Arc::new(time.finish().with_timezone("UTC")));
    columns.push(Arc::new(quantity.finish()));
    columns.extend(
        optional
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef),
    );
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
    let mut out = Vec::new();
    let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, &batch.schema())?;
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
            .map(|e| e.map(|_| ()).map_err(|i| (i.reason, i.field)))
            .collect();
        assert_eq!(
            reasons,
            [
                Err((Reason::NegativeQuantity, Some("data.quantity"))),
                Err((Reason::EmptyField, Some("id")))
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
}
