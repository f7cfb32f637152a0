//! The usage event: CloudEvents 1.0 structured JSON, decoded without copying.
//!
//! A NATS message (or an HTTP body) is a [`Frame`]: one event object, or a JSON array of
//! them. Decoding is a single pass over the bytes. A flaw in one event of a batch makes
//! only that event [`Invalid`]; its neighbours decode as usual. Only a message that is
//! not JSON at all, or breaks a message-level limit, fails as a whole.
//!
//! The contract is `schemas/event.schema.json`; `schemas/examples/` holds valid events
//! and one invalid event per [`Reason`], which a test feeds through [`Frame::decode`].

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// The CloudEvents version Tally accepts.
pub const SPEC_VERSION: &str = "1.0";

/// Limits a decoder applies before and while it reads a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecodeLimits {
    /// Largest message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Most events in one batch.
    pub max_batch_events: usize,
    /// Longest id, source, type, subject, feature, region or user, in bytes.
    pub max_field_len: usize,
    /// Furthest an event's `time` may lie after the moment it is received, in seconds:
    /// past it the event is refused (`future_time`), since a clock that far ahead would
    /// count usage in a period not yet open.
    pub max_future_secs: u64,
}

impl DecodeLimits {
    /// Refuses a message larger than `max_message_bytes`.
    pub fn check_size(&self, payload: &[u8]) -> Result<(), Invalid> {
        if payload.len() > self.max_message_bytes {
            return Err(Invalid::new(
                Reason::TooLarge,
                None,
                format!(
                    "message is {} bytes; the limit is {}",
                    payload.len(),
                    self.max_message_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Refuses an event whose `time` lies more than `max_future_secs` after `received`
    /// (microseconds since the epoch). An event without a time takes the time it is
    /// received, so it is never refused.
    pub fn check_time(&self, time: Option<DateTime<Utc>>, received: i64) -> Result<(), Invalid> {
        let Some(time) = time else {
            return Ok(());
        };
        let ahead_us = time.timestamp_micros().saturating_sub(received);
        let limit_us = i64::try_from(self.max_future_secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(1_000_000);
        if ahead_us > limit_us {
            return Err(Invalid::new(
                Reason::FutureTime,
                Some("time"),
                format!(
                    "`time` {} is {} s after the event was received; at most {} s ahead is accepted",
                    time.to_rfc3339(),
                    ahead_us / 1_000_000,
                    self.max_future_secs
                ),
            ));
        }
        Ok(())
    }
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 1024 * 1024,
            max_batch_events: 10_000,
            max_field_len: 256,
            max_future_secs: 300,
        }
    }
}

/// Why an event or a message was refused. Stable snake_case codes: they appear in dead
/// letters, API errors and the examples' file names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The payload is not JSON.
    NotJson,
    /// Valid JSON, but neither an event object nor an array of them.
    NotAnObject,
    /// A required field is absent.
    MissingField,
    /// A required string field is empty.
    EmptyField,
    /// A field has the wrong JSON type.
    WrongType,
    /// A string field is longer than the limit.
    FieldTooLong,
    /// `specversion` is not `1.0`.
    UnsupportedSpecversion,
    /// `time` is not an RFC 3339 timestamp.
    BadTime,
    /// `data.quantity` is below zero.
    NegativeQuantity,
    /// `data.quantity` is NaN or infinite.
    NonFiniteQuantity,
    /// The message is larger than the limit.
    TooLarge,
    /// The batch has more events than the limit.
    TooManyEvents,
    /// The batch is an empty array.
    EmptyBatch,
    /// The event's subject is not the customer the message was published for.
    SubjectMismatch,
    /// A message marked as Arrow IPC is not a readable Arrow IPC stream.
    NotArrow,
    /// `time` lies further ahead of the moment the event was received than allowed.
    FutureTime,
    /// A meter that a feature is bound to cannot read its value from the event's `data`
    /// (the property is missing, or not a number where the meter sums or compares).
    UnreadableValue,
}

impl Reason {
    /// Every reason, in a stable order.
    pub const ALL: [Reason; 17] = [
        Reason::NotJson,
        Reason::NotAnObject,
        Reason::MissingField,
        Reason::EmptyField,
        Reason::WrongType,
        Reason::FieldTooLong,
        Reason::UnsupportedSpecversion,
        Reason::BadTime,
        Reason::NegativeQuantity,
        Reason::NonFiniteQuantity,
        Reason::TooLarge,
        Reason::TooManyEvents,
        Reason::EmptyBatch,
        Reason::SubjectMismatch,
        Reason::NotArrow,
        Reason::FutureTime,
        Reason::UnreadableValue,
    ];

    /// The stable code.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::NotJson => "not_json",
            Reason::NotAnObject => "not_an_object",
            Reason::MissingField => "missing_field",
            Reason::EmptyField => "empty_field",
            Reason::WrongType => "wrong_type",
            Reason::FieldTooLong => "field_too_long",
            Reason::UnsupportedSpecversion => "unsupported_specversion",
            Reason::BadTime => "bad_time",
            Reason::NegativeQuantity => "negative_quantity",
            Reason::NonFiniteQuantity => "non_finite_quantity",
            Reason::TooLarge => "too_large",
            Reason::TooManyEvents => "too_many_events",
            Reason::EmptyBatch => "empty_batch",
            Reason::SubjectMismatch => "subject_mismatch",
            Reason::NotArrow => "not_arrow",
            Reason::FutureTime => "future_time",
            Reason::UnreadableValue => "unreadable_value",
        }
    }

    /// The reason with this code.
    pub fn from_code(code: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == code)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused event or message: the reason, the field it concerns, and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub reason: Reason,
    /// Dotted path of the offending field (`data.quantity`), if one field is to blame.
    pub field: Option<Cow<'static, str>>,
    pub message: String,
}

impl Invalid {
    pub fn new(reason: Reason, field: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            reason,
            field: field.map(Cow::Borrowed),
            message: message.into(),
        }
    }

    pub(crate) fn missing(field: &'static str) -> Self {
        Self::new(
            Reason::MissingField,
            Some(field),
            format!("`{field}` is required"),
        )
    }

    pub(crate) fn wrong_type(field: &'static str, expected: &str) -> Self {
        Self::new(
            Reason::WrongType,
            Some(field),
            format!("`{field}` must be {expected}"),
        )
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Invalid {}

/// One decoded usage event, borrowing from the message bytes where it can.
#[derive(Debug, Clone, PartialEq)]
pub struct Event<'a> {
    pub id: Cow<'a, str>,
    pub source: Cow<'a, str>,
    pub event_type: Cow<'a, str>,
    /// The customer id.
    pub subject: Cow<'a, str>,
    /// Event time; `None` when the sender gave none (the ingest time is used).
    pub time: Option<DateTime<Utc>>,
    pub feature: Cow<'a, str>,
    pub quantity: f64,
    pub region: Option<Cow<'a, str>>,
    pub user: Option<Cow<'a, str>>,
    /// The other `data` properties, as a JSON object, when there are any.
    pub extra: Option<String>,
}

/// What a message decodes to: one outcome per event, in order.
#[derive(Debug)]
pub struct Frame<'a> {
    /// Whether the message was a JSON array.
    pub is_batch: bool,
    pub events: Vec<Result<Event<'a>, Invalid>>,
}

impl<'a> Frame<'a> {
    /// Decodes a message that carries one event or a JSON array of events.
    ///
    /// `Err` means the whole message is refused; otherwise each event has its own outcome.
    pub fn decode(payload: &'a [u8], limits: &DecodeLimits) -> Result<Frame<'a>, Invalid> {
        limits.check_size(payload)?;
        let mut de = serde_json::Deserializer::from_slice(payload);
        let frame = de
            .deserialize_any(FrameVisitor { limits })
            .map_err(|e| frame_error(&e))?;
        de.end().map_err(|e| frame_error(&e))?;
        frame
    }

    /// The raw JSON of each element of a batch message, for dead letters. A single-event
    /// message is its own one element.
    pub fn raw_events(payload: &'a [u8]) -> Vec<&'a [u8]> {
        match serde_json::from_slice::<Vec<&RawValue>>(payload) {
            Ok(items) => items.into_iter().map(|r| r.get().as_bytes()).collect(),
            Err(_) => vec![payload],
        }
    }
}

fn frame_error(e: &serde_json::Error) -> Invalid {
    Invalid::new(
        Reason::NotJson,
        None,
        format!("message is not valid JSON: {e}"),
    )
}

/// Implements the visitor methods for JSON scalars (bool, numbers, string, null), each
/// producing the same value: used where a scalar is a flaw to report, not a parse error.
macro_rules! scalars_give {
    ($value:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

struct FrameVisitor<'l> {
    limits: &'l DecodeLimits,
}

/// `Ok(Err(_))` is a message-level refusal found while reading (too many events); an
/// `Err` from serde is malformed JSON.
impl<'de> Visitor<'de> for FrameVisitor<'_> {
    type Value = Result<Frame<'de>, Invalid>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a CloudEvents object or an array of them")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        let event = EventVisitor {
            limits: self.limits,
        }
        .visit_map(map)?;
        Ok(Ok(Frame {
            is_batch: false,
            events: vec![event],
        }))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut events = Vec::with_capacity(seq.size_hint().unwrap_or(16).min(1024));
        while let Some(outcome) = seq.next_element_seed(EventSeed {
            limits: self.limits,
        })? {
            if events.len() == self.limits.max_batch_events {
                // Read to the end so the JSON is still checked, then refuse the message.
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                return Ok(Err(Invalid::new(
                    Reason::TooManyEvents,
                    None,
                    format!(
                        "a batch holds at most {} events",
                        self.limits.max_batch_events
                    ),
                )));
            }
            events.push(outcome);
        }
        if events.is_empty() {
            return Ok(Err(Invalid::new(
                Reason::EmptyBatch,
                None,
                "the batch is an empty array",
            )));
        }
        Ok(Ok(Frame {
            is_batch: true,
            events,
        }))
    }

    scalars_give!(Err(not_an_object()));
}

fn not_an_object() -> Invalid {
    Invalid::new(
        Reason::NotAnObject,
        None,
        "expected a CloudEvents object or an array of them",
    )
}

struct EventSeed<'l> {
    limits: &'l DecodeLimits,
}

impl<'de> de::DeserializeSeed<'de> for EventSeed<'_> {
    type Value = Result<Event<'de>, Invalid>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(LenientEvent(EventVisitor {
            limits: self.limits,
        }))
    }
}

/// Accepts any JSON value for a batch element, so that a non-object element is one
/// invalid event rather than a broken message.
struct LenientEvent<'l>(EventVisitor<'l>);

impl<'de> Visitor<'de> for LenientEvent<'_> {
    type Value = Result<Event<'de>, Invalid>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a CloudEvents object")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.visit_map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Err(not_an_object()))
    }
    scalars_give!(Err(not_an_object()));
}

/// A JSON value expected to be a string, read without judging its type so that a wrong
/// type becomes a [`Reason`] instead of a parse error.
enum LooseStr<'a> {
    Str(Cow<'a, str>),
    Null,
    Other,
}

impl<'de> Deserialize<'de> for LooseStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LooseStrVisitor)
    }
}

struct LooseStrVisitor;

impl<'de> Visitor<'de> for LooseStrVisitor {
    type Value = LooseStr<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(LooseStr::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(LooseStr::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(LooseStr::Str(Cow::Owned(v)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(LooseStr::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(LooseStr::Null)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(LooseStr::Other)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(LooseStr::Other)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(LooseStr::Other)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(LooseStr::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(LooseStr::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(LooseStr::Other)
    }
}

/// Keeps the first flaw found; later ones are not reported.
#[derive(Default)]
struct FirstError(Option<Invalid>);

impl FirstError {
    fn set(&mut self, e: Invalid) {
        if self.0.is_none() {
            self.0 = Some(e);
        }
    }
}

/// Refuses a string longer than the limit.
pub(crate) fn check_len(
    s: &str,
    field: &'static str,
    limits: &DecodeLimits,
) -> Result<(), Invalid> {
    if s.len() > limits.max_field_len {
        return Err(Invalid::new(
            Reason::FieldTooLong,
            Some(field),
            format!(
                "`{field}` is {} bytes; the limit is {}",
                s.len(),
                limits.max_field_len
            ),
        ));
    }
    Ok(())
}

/// Refuses a negative or non-finite quantity.
pub(crate) fn check_quantity(q: f64, shown: &dyn fmt::Display) -> Result<f64, Invalid> {
    const FIELD: &str = "data.quantity";
    if !q.is_finite() {
        Err(Invalid::new(
            Reason::NonFiniteQuantity,
            Some(FIELD),
            format!("`{FIELD}` must be finite; {shown} is not"),
        ))
    } else if q < 0.0 {
        Err(Invalid::new(
            Reason::NegativeQuantity,
            Some(FIELD),
            format!("`{FIELD}` must not be negative; got {shown}"),
        ))
    } else {
        Ok(q)
    }
}

/// Checks a required or optional string field and keeps it.
fn take_str<'a>(
    value: LooseStr<'a>,
    field: &'static str,
    limits: &DecodeLimits,
    errors: &mut FirstError,
) -> Option<Cow<'a, str>> {
    match value {
        LooseStr::Str(s) => match check_len(&s, field, limits) {
            Ok(()) => Some(s),
            Err(e) => {
                errors.set(e);
                None
            }
        },
        LooseStr::Null => None,
        LooseStr::Other => {
            errors.set(Invalid::wrong_type(field, "a string"));
            None
        }
    }
}

/// A required string: missing and empty are distinct reasons.
pub(crate) fn required<'a>(
    value: Option<Cow<'a, str>>,
    field: &'static str,
) -> Result<Cow<'a, str>, Invalid> {
    match value {
        None => Err(Invalid::missing(field)),
        Some(s) if s.is_empty() => Err(Invalid::new(
            Reason::EmptyField,
            Some(field),
            format!("`{field}` must not be empty"),
        )),
        Some(s) => Ok(s),
    }
}

fn parse_quantity(raw: &RawValue) -> Result<Option<f64>, Invalid> {
    const FIELD: &str = "data.quantity";
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'-' | b'0'..=b'9') => {
            let q: f64 = text
                .parse()
                .map_err(|_| Invalid::wrong_type(FIELD, "a number"))?;
            check_quantity(q, &text).map(Some)
        }
        Some(b'n') => Ok(None),
        Some(b'"') => {
            // Some serializers write NaN and infinities as strings: name them for what they are.
            let s: Cow<'_, str> = serde_json::from_str(text).unwrap_or(Cow::Borrowed(""));
            let lower = s.trim().trim_start_matches(['-', '+']).to_ascii_lowercase();
            if matches!(lower.as_str(), "nan" | "inf" | "infinity") {
                Err(Invalid::new(
                    Reason::NonFiniteQuantity,
                    Some(FIELD),
                    format!("`{FIELD}` must be finite; got {text}"),
                ))
            } else if is_decimal(s.trim()) {
                // OpenMeter's SDKs and many producers send values as numeric strings.
                let q: f64 = s
                    .trim()
                    .parse()
                    .map_err(|_| Invalid::wrong_type(FIELD, "a number"))?;
                check_quantity(q, &text).map(Some)
            } else {
                Err(Invalid::wrong_type(FIELD, "a number or a numeric string"))
            }
        }
        _ => Err(Invalid::wrong_type(FIELD, "a number")),
    }
}

/// A JSON-number-shaped string: `-12`, `0.5`, `1e3`.
fn is_decimal(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let (mantissa, exponent) = match digits.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e.strip_prefix(['+', '-']).unwrap_or(e))),
        None => (digits, None),
    };
    let (whole, fraction) = match mantissa.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (mantissa, None),
    };
    let all_digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    all_digits(whole) && fraction.is_none_or(all_digits) && exponent.is_none_or(all_digits)
}

#[derive(Default)]
struct Data<'a> {
    feature: Option<Cow<'a, str>>,
    quantity: Option<f64>,
    region: Option<Cow<'a, str>>,
    user: Option<Cow<'a, str>>,
    extra: Option<String>,
}

struct DataVisitor<'l> {
    limits: &'l DecodeLimits,
}

/// The inner `Result` carries the first flaw in `data`; `data` that is not an object
/// (null included) is `wrong_type`.
impl<'de> Visitor<'de> for DataVisitor<'_> {
    type Value = Result<Data<'de>, Invalid>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the data object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut data = Data::default();
        let mut errors = FirstError::default();
        let mut extra: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "feature" => {
                    data.feature =
                        take_str(map.next_value()?, "data.feature", self.limits, &mut errors);
                }
                "quantity" => match parse_quantity(map.next_value::<&RawValue>()?) {
                    Ok(q) => data.quantity = q,
                    Err(e) => errors.set(e),
                },
                "region" => {
                    data.region =
                        take_str(map.next_value()?, "data.region", self.limits, &mut errors);
                }
                "user" => {
                    data.user = take_str(map.next_value()?, "data.user", self.limits, &mut errors);
                }
                _ => extra.push((key, map.next_value()?)),
            }
        }
        if let Some(e) = errors.0 {
            return Ok(Err(e));
        }
        if !extra.is_empty() {
            let mut s = String::with_capacity(64);
            s.push('{');
            for (i, (k, v)) in extra.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                s.push_str(&serde_json::to_string(k.as_ref()).unwrap_or_default());
                s.push(':');
                s.push_str(v.get());
            }
            s.push('}');
            data.extra = Some(s);
        }
        Ok(Ok(data))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Err(Invalid::wrong_type("data", "an object")))
    }
    scalars_give!(Err(Invalid::wrong_type("data", "an object")));
}

struct DataSeed<'l> {
    limits: &'l DecodeLimits,
}

impl<'de> de::DeserializeSeed<'de> for DataSeed<'_> {
    type Value = Result<Data<'de>, Invalid>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(DataVisitor {
            limits: self.limits,
        })
    }
}

struct EventVisitor<'l> {
    limits: &'l DecodeLimits,
}

impl<'de> Visitor<'de> for EventVisitor<'_> {
    type Value = Result<Event<'de>, Invalid>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a CloudEvents object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let limits = self.limits;
        let mut errors = FirstError::default();
        let (mut specversion, mut id, mut source, mut event_type, mut subject, mut time) =
            (None, None, None, None, None, None);
        let mut data: Option<Data<'de>> = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "specversion" => {
                    specversion = take_str(map.next_value()?, "specversion", limits, &mut errors)
                }
                "id" => id = take_str(map.next_value()?, "id", limits, &mut errors),
                "source" => source = take_str(map.next_value()?, "source", limits, &mut errors),
                "type" => event_type = take_str(map.next_value()?, "type", limits, &mut errors),
                "subject" => subject = take_str(map.next_value()?, "subject", limits, &mut errors),
                "time" => time = take_str(map.next_value()?, "time", limits, &mut errors),
                "data" => match map.next_value_seed(DataSeed { limits })? {
                    Ok(d) => data = Some(d),
                    Err(e) => errors.set(e),
                },
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if let Some(e) = errors.0 {
            return Ok(Err(e));
        }
        Ok(finish(
            specversion,
            id,
            source,
            event_type,
            subject,
            time,
            data,
        ))
    }
}

fn finish<'a>(
    specversion: Option<Cow<'a, str>>,
    id: Option<Cow<'a, str>>,
    source: Option<Cow<'a, str>>,
    event_type: Option<Cow<'a, str>>,
    subject: Option<Cow<'a, str>>,
    time: Option<Cow<'a, str>>,
    data: Option<Data<'a>>,
) -> Result<Event<'a>, Invalid> {
    let specversion = required(specversion, "specversion")?;
    if specversion != SPEC_VERSION {
        return Err(Invalid::new(
            Reason::UnsupportedSpecversion,
            Some("specversion"),
            format!("`specversion` must be \"{SPEC_VERSION}\"; got \"{specversion}\""),
        ));
    }
    let id = required(id, "id")?;
    let source = required(source, "source")?;
    let event_type = required(event_type, "type")?;
    let subject = required(subject, "subject")?;
    let time = match time {
        None => None,
        Some(t) => Some(
            DateTime::parse_from_rfc3339(&t)
                .map_err(|e| {
                    Invalid::new(
                        Reason::BadTime,
                        Some("time"),
                        format!("`time` must be an RFC 3339 timestamp; \"{t}\": {e}"),
                    )
                })?
                .with_timezone(&Utc),
        ),
    };
    let data = data.ok_or_else(|| Invalid::missing("data"))?;
    // As OpenMeter's meters key on the event type, an event without `data.feature` counts
    // against the feature named by its type.
    let feature = match data.feature {
        None => event_type.clone(),
        feature => required(feature, "data.feature")?,
    };
    Ok(Event {
        id,
        source,
        event_type,
        subject,
        time,
        feature,
        quantity: data.quantity.unwrap_or(1.0),
        region: data.region,
        user: data.user,
        extra: data.extra,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_too_far_ahead_of_its_arrival_is_refused_naming_the_time() {
        let limits = DecodeLimits::default();
        let received = 1_790_000_000_000_000;
        let at = |secs: i64| DateTime::from_timestamp_micros(received + secs * 1_000_000);
        assert!(limits.check_time(None, received).is_ok());
        assert!(
            limits.check_time(at(-86_400), received).is_ok(),
            "late is not future"
        );
        assert!(
            limits.check_time(at(300), received).is_ok(),
            "the limit itself is allowed"
        );
        let refused = limits.check_time(at(301), received).unwrap_err();
        assert_eq!(refused.reason, Reason::FutureTime);
        assert_eq!(refused.field.as_deref(), Some("time"));
        assert!(refused.message.contains("301 s"), "{}", refused.message);
    }

    fn one(json: &str) -> Result<Event<'_>, Invalid> {
        let frame = Frame::decode(json.as_bytes(), &DecodeLimits::default())?;
        assert!(!frame.is_batch);
        frame.events.into_iter().next().unwrap()
    }

    const GOOD: &str = r#"{"specversion":"1.0","id":"e1","source":"app","type":"api",
        "subject":"acme","time":"2026-11-03T15:05:00.5+01:00",
        "data":{"feature":"calls","quantity":2.5,"region":"eu","user":"u1","plan":"x","n":[1,2]}}"#;

    #[test]
    fn decodes_every_field_borrowed() {
        let e = one(GOOD).unwrap();
        assert_eq!(e.id, "e1");
        assert!(matches!(e.id, Cow::Borrowed(_)));
        assert_eq!(e.subject, "acme");
        assert_eq!(e.feature, "calls");
        assert_eq!(e.quantity, 2.5);
        assert_eq!(e.region.as_deref(), Some("eu"));
        assert_eq!(e.user.as_deref(), Some("u1"));
        assert_eq!(
            e.time.unwrap().to_rfc3339(),
            "2026-11-03T14:05:00.500+00:00"
        );
        assert_eq!(e.extra.as_deref(), Some(r#"{"plan":"x","n":[1,2]}"#));
    }

    #[test]
    fn as_with_openmeter_the_type_names_the_feature_and_numeric_strings_count() {
        let e = one(r#"{"specversion":"1.0","id":"e","source":"s","type":"prompt","subject":"c","data":{"tokens":"12","quantity":"12.5"}}"#)
            .unwrap();
        assert_eq!((e.feature.as_ref(), e.quantity), ("prompt", 12.5));
        for (quantity, reason) in [
            (r#""-3""#, Reason::NegativeQuantity),
            (r#""12 tokens""#, Reason::WrongType),
            (r#""1.""#, Reason::WrongType),
            (r#""""#, Reason::WrongType),
            (r#""NaN""#, Reason::NonFiniteQuantity),
        ] {
            let flaw = one(&format!(
                r#"{{"specversion":"1.0","id":"e","source":"s","type":"t","subject":"c","data":{{"quantity":{quantity}}}}}"#
            ))
            .unwrap_err();
            assert_eq!(
                (flaw.reason, flaw.field.as_deref()),
                (reason, Some("data.quantity")),
                "{quantity}"
            );
        }
    }

    #[test]
    fn quantity_defaults_to_one() {
        let e = one(r#"{"specversion":"1.0","id":"e","source":"s","type":"t","subject":"c","data":{"feature":"f"}}"#)
            .unwrap();
        assert_eq!(e.quantity, 1.0);
        assert!(e.time.is_none());
        assert!(e.extra.is_none());
    }

    #[test]
    fn a_bad_event_in_a_batch_leaves_its_neighbours() {
        let json = format!(r#"[{GOOD}, 7, {{"id":"x"}}, {GOOD}]"#);
        let frame = Frame::decode(json.as_bytes(), &DecodeLimits::default()).unwrap();
        assert!(frame.is_batch);
        let reasons: Vec<_> = frame
            .events
            .iter()
            .map(|e| e.as_ref().err().map(|i| i.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                None,
                Some(Reason::NotAnObject),
                Some(Reason::MissingField),
                None
            ]
        );
        let raw = Frame::raw_events(json.as_bytes());
        assert_eq!(raw.len(), 4);
        assert_eq!(raw[1], b"7");
    }

    #[test]
    fn message_level_limits() {
        let limits = DecodeLimits {
            max_message_bytes: 10,
            ..DecodeLimits::default()
        };
        assert_eq!(
            Frame::decode(GOOD.as_bytes(), &limits).unwrap_err().reason,
            Reason::TooLarge
        );
        let limits = DecodeLimits {
            max_batch_events: 1,
            ..DecodeLimits::default()
        };
        let two = format!("[{GOOD},{GOOD}]");
        assert_eq!(
            Frame::decode(two.as_bytes(), &limits).unwrap_err().reason,
            Reason::TooManyEvents
        );
        let limits = DecodeLimits::default();
        assert_eq!(
            Frame::decode(b"[]", &limits).unwrap_err().reason,
            Reason::EmptyBatch
        );
        assert_eq!(
            Frame::decode(b"{", &limits).unwrap_err().reason,
            Reason::NotJson
        );
        assert_eq!(
            Frame::decode(b"{} x", &limits).unwrap_err().reason,
            Reason::NotJson
        );
        assert_eq!(
            Frame::decode(b"42", &limits).unwrap_err().reason,
            Reason::NotAnObject
        );
    }

    #[test]
    fn quantity_flaws_have_their_own_reasons() {
        let with = |q: &str| {
            let json = format!(
                r#"{{"specversion":"1.0","id":"e","source":"s","type":"t","subject":"c","data":{{"feature":"f","quantity":{q}}}}}"#
            );
            one(&json)
                .map(|e| e.quantity)
                .map_err(|e| (e.reason, e.field.map(String::from)))
        };
        let q = || Some("data.quantity".to_owned());
        assert_eq!(with("-1"), Err((Reason::NegativeQuantity, q())));
        assert_eq!(with("1e999"), Err((Reason::NonFiniteQuantity, q())));
        assert_eq!(with("\"NaN\""), Err((Reason::NonFiniteQuantity, q())));
        assert_eq!(with("\"-Infinity\""), Err((Reason::NonFiniteQuantity, q())));
        assert_eq!(with("\"5\""), Ok(5.0));
        assert_eq!(with("\"five\""), Err((Reason::WrongType, q())));
        assert_eq!(with("true"), Err((Reason::WrongType, q())));
        assert_eq!(with("null"), Ok(1.0));
        assert_eq!(with("0"), Ok(0.0));
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let e = one(r#"{"specversion":"1.0","id":"e\u0031","source":"s","type":"t","subject":"a\"b","data":{"feature":"f"}}"#)
            .unwrap();
        assert_eq!(e.id, "e1");
        assert_eq!(e.subject, "a\"b");
    }
}
