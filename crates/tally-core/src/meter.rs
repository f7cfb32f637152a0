//! Meters as OpenMeter defines them: which events a meter reads (`eventType`), the value
//! it takes from each (`valueProperty`, a JSONPath into the event's `data`), how it
//! aggregates them (`SUM`, `COUNT`, `UNIQUE_COUNT`, `AVG`, `MIN`, `MAX`, `LATEST`) and the
//! properties it can be grouped by (`groupBy`, names to JSONPaths).
//!
//! A meter is a definition like a plan: written as TOML or JSON (`[[meters]]` in a
//! catalogue file, or OpenMeter's `POST /api/v1/meters`), kept in the catalogue bucket
//! and audited. Its `id` is given when it is first stored and changes only when the meter
//! is deleted and created again; what a meter measures (`eventType`, `aggregation`,
//! `valueProperty`) cannot change under the same id ([`Meter::same_measure`]).
//!
//! **Paths.** The JSONPath subset OpenMeter's meters use: `$` followed by member names
//! (`.name`, `['name']`, `["name"]`) and array indexes (`[0]`), each step selecting one
//! value ([`JsonPath`]). Tally's own properties of `data` are columns of the lake rather
//! than part of its `data` text: `$.quantity`, `$.feature`, `$.region` and `$.user` read
//! them ([`JsonPath::own_property`]).
//!
//! **Values.** As ClickHouse's `JSON_VALUE` reads them for OpenMeter: a string is its
//! text, a number or a boolean is written as JSON writes it, anything else (absent, null,
//! an object, an array) is no value ([`JsonPath::text`]). A numeric aggregation reads the
//! text as a number (`"12"` and `12` are both 12); text that is not one is no value
//! ([`number`]).

use std::collections::BTreeMap;
use std::fmt;

use chrono::offset::LocalResult;
use chrono::{
    DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, Offset, TimeZone, Timelike, Utc,
};
pub use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::entitlement::Problem;
use crate::event::{Event, Invalid, Reason};

/// A meter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Meter {
    /// Lowercase letters and digits, words joined by `_` (OpenMeter's rule), at most 64.
    pub slug: String,
    /// Given when first stored (26 characters, as OpenMeter's ids); empty in a file.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The CloudEvents `type` of the events it reads.
    #[serde(alias = "event_type")]
    pub event_type: String,
    pub aggregation: Aggregation,
    /// Where each event's value is, in its `data`; required except for `COUNT`.
    #[serde(
        default,
        alias = "value_property",
        skip_serializing_if = "Option::is_none"
    )]
    pub value_property: Option<String>,
    /// Names to the paths of the properties the meter can be grouped and filtered by.
    #[serde(
        default,
        alias = "group_by",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub group_by: BTreeMap<String, String>,
    /// Events before this time are not metered.
    #[serde(default, alias = "event_from", skip_serializing_if = "Option::is_none")]
    pub event_from: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Set when stored.
    #[serde(default, alias = "created_at", skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default, alias = "updated_at", skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
    /// Set when deleted: the meter is kept for the record and reads nothing.
    #[serde(default, alias = "deleted_at", skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<DateTime<Utc>>,
}

/// How a meter aggregates the values of the events in a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Aggregation {
    Sum,
    /// Events, whatever their value.
    Count,
    /// Distinct values (as text).
    UniqueCount,
    Avg,
    Min,
    Max,
    /// The value of the last event by time.
    Latest,
}

impl Aggregation {
    pub const ALL: [Aggregation; 7] = [
        Aggregation::Sum,
        Aggregation::Count,
        Aggregation::UniqueCount,
        Aggregation::Avg,
        Aggregation::Min,
        Aggregation::Max,
        Aggregation::Latest,
    ];

    /// As written in definitions: `SUM`, `UNIQUE_COUNT`, …
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Sum => "SUM",
            Aggregation::Count => "COUNT",
            Aggregation::UniqueCount => "UNIQUE_COUNT",
            Aggregation::Avg => "AVG",
            Aggregation::Min => "MIN",
            Aggregation::Max => "MAX",
            Aggregation::Latest => "LATEST",
        }
    }

    /// Whether it reads its values as numbers (all but `COUNT` and `UNIQUE_COUNT`).
    pub fn is_numeric(self) -> bool {
        !matches!(self, Aggregation::Count | Aggregation::UniqueCount)
    }
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest slug.
pub const MAX_SLUG_LEN: usize = 64;
/// The most group-by properties of a meter.
pub const MAX_GROUP_BY: usize = 32;
/// The longest path.
pub const MAX_PATH_LEN: usize = 512;
/// Group-by names a query uses for Tally's own columns: not a meter's to define.
pub const RESERVED_GROUP_BY: [&str; 2] = ["subject", "customer_id"];

impl Meter {
    /// Every flaw in the definition, each field named under `at` (`meters[0]`, or empty).
    pub fn problems(&self, at: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut flag = |field: &str, message: String| {
            problems.push(Problem {
                field: under(at, field),
                message,
            });
        };
        if let Err(message) = check_slug(&self.slug) {
            flag("slug", message);
        }
        if self.event_type.is_empty() {
            flag("eventType", "must not be empty".to_owned());
        } else if self.event_type.len() > crate::entitlement::MAX_ID_LEN {
            flag(
                "eventType",
                format!(
                    "is {} bytes; the limit is {}",
                    self.event_type.len(),
                    crate::entitlement::MAX_ID_LEN
                ),
            );
        }
        match (&self.value_property, self.aggregation) {
            (None, Aggregation::Count) => {}
            (None, a) => flag(
                "valueProperty",
                format!("is required for {a} (only COUNT reads no value)"),
            ),
            (Some(_), Aggregation::Count) => flag(
                "valueProperty",
                "must be left out for COUNT, which counts events".to_owned(),
            ),
            (Some(path), _) => {
                if let Err(e) = JsonPath::parse(path) {
                    flag("valueProperty", e.to_string());
                }
            }
        }
        if self.group_by.len() > MAX_GROUP_BY {
            flag(
                "groupBy",
                format!(
                    "has {} properties; the limit is {MAX_GROUP_BY}",
                    self.group_by.len()
                ),
            );
        }
        for (name, path) in &self.group_by {
            if RESERVED_GROUP_BY.contains(&name.as_str()) {
                flag(
                    &format!("groupBy.{name}"),
                    format!("{name:?} is reserved: queries group by it without a definition"),
                );
            } else if !is_group_by_name(name) {
                flag(
                    &format!("groupBy.{name}"),
                    "a group-by name is 1 to 64 letters, digits and `_`, starting with a letter or `_`".to_owned(),
                );
            }
            if let Err(e) = JsonPath::parse(path) {
                flag(&format!("groupBy.{name}"), e.to_string());
            }
        }
        if let Some(name) = &self.name
            && name.len() > 256
        {
            flag("name", format!("is {} bytes; the limit is 256", name.len()));
        }
        problems
    }

    /// Whether `other` measures what this meter does: the same events, aggregation and
    /// value. Only its name, description, group-bys and metadata may change in place.
    pub fn same_measure(&self, other: &Meter) -> bool {
        self.event_type == other.event_type
            && self.aggregation == other.aggregation
            && self.value_property == other.value_property
            && self.event_from == other.event_from
    }

    /// The value path, parsed (`None` for `COUNT`). The definition must have no
    /// problems.
    pub fn value_path(&self) -> Option<JsonPath> {
        self.value_property
            .as_deref()
            .and_then(|p| JsonPath::parse(p).ok())
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted_at.is_some()
    }

    /// Why this meter reads nothing of an event of its type with `data` (its value
    /// missing, or not a number for a numeric aggregation), naming the field
    /// (`data.tokens`); `None` when it reads a value, or counts events.
    pub fn validation_error(&self, data: &Value) -> Option<String> {
        let path = self.value_path()?;
        let field = path.field();
        match path.text(data) {
            None => Some(format!(
                "{field} is missing or not a value: meter {} reads {}",
                self.slug,
                self.value_property.as_deref().unwrap_or_default()
            )),
            Some(text) if self.aggregation.is_numeric() && number(&text).is_none() => {
                Some(format!(
                    "{field} is {text:?}, not a number: meter {} ({}) reads a number",
                    self.slug, self.aggregation
                ))
            }
            Some(_) => None,
        }
    }
}

/// A feature whose usage a meter measures (OpenMeter's feature with a `meterSlug`):
/// the entitlements of plans and add-ons to `key` count what the meter reads of each
/// event of its type, for the events whose group-by values are `meterGroupByFilters`.
///
/// A `SUM` or `COUNT` meter counts as a metered feature always has; a `UNIQUE_COUNT`
/// meter counts each distinct value once per period; a `MAX` or `LATEST` meter holds the
/// period's highest or latest value, and the limit bounds that value ("at most 10
/// concurrent builds"). `AVG` and `MIN` cannot be bound: no limit on them says what an
/// event may do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Feature {
    pub key: String,
    /// Given when first stored (26 characters, as OpenMeter's ids); empty in a file.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The meter, by slug.
    #[serde(alias = "meter", alias = "meter_slug")]
    pub meter_slug: String,
    /// Group-by names of the meter to the value an event must have to count.
    #[serde(
        default,
        alias = "filters",
        alias = "meter_group_by_filters",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub meter_group_by_filters: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Set when stored.
    #[serde(default, alias = "created_at", skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default, alias = "updated_at", skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
    /// Set when archived (OpenMeter's delete): kept for the record, binding nothing; its
    /// key may then be defined again.
    #[serde(
        default,
        alias = "archived_at",
        skip_serializing_if = "Option::is_none"
    )]
    pub archived_at: Option<DateTime<Utc>>,
}

impl Feature {
    pub fn is_archived(&self) -> bool {
        self.archived_at.is_some()
    }

    /// Every flaw in the definition, each field named under `at` (`features[0]`, or
    /// empty), with its `meter` when it is known (`None`: only the feature's own fields are
    /// checked; see [`Feature::no_meter`]).
    pub fn problems(&self, at: &str, meter: Option<&Meter>) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut flag = |field: &str, message: String| {
            problems.push(Problem {
                field: under(at, field),
                message,
            });
        };
        let max = crate::entitlement::MAX_ID_LEN;
        if self.key.is_empty() {
            flag("key", "must not be empty".to_owned());
        } else if self.key.len() > max {
            flag(
                "key",
                format!("is {} bytes; the limit is {max}", self.key.len()),
            );
        }
        if let Err(message) = check_slug(&self.meter_slug) {
            flag("meterSlug", message);
            return problems;
        }
        let Some(meter) = meter else {
            return problems;
        };
        if meter.is_deleted() {
            flag(
                "meterSlug",
                format!("meter {:?} is deleted", self.meter_slug),
            );
            return problems;
        }
        if Measure::of(meter.aggregation).is_none() {
            flag(
                "meterSlug",
                format!(
                    "meter {:?} aggregates by {}: a limit can bind SUM, COUNT, UNIQUE_COUNT, MAX \
                     and LATEST meters only",
                    meter.slug, meter.aggregation
                ),
            );
        }
        for name in self.meter_group_by_filters.keys() {
            if !meter.group_by.contains_key(name) {
                flag(
                    &format!("meterGroupByFilters.{name}"),
                    format!("meter {:?} has no group-by {name:?}", meter.slug),
                );
            }
        }
        problems
    }

    /// The problem of a feature whose meter does not exist.
    pub fn no_meter(&self, at: &str) -> Problem {
        Problem {
            field: under(at, "meterSlug"),
            message: format!("there is no meter {:?}", self.meter_slug),
        }
    }
}

/// How an entitlement counts a bound meter's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Measure {
    /// Adds each value (a `COUNT` meter's value is 1).
    Sum,
    /// Counts each distinct value once per period.
    Distinct,
    /// Holds the period's highest value.
    Max,
    /// Holds the value of the period's latest event (by event time).
    Latest,
}

impl Measure {
    /// The measure of a meter's aggregation; `None` for `AVG` and `MIN`.
    pub fn of(aggregation: Aggregation) -> Option<Measure> {
        match aggregation {
            Aggregation::Sum | Aggregation::Count => Some(Measure::Sum),
            Aggregation::UniqueCount => Some(Measure::Distinct),
            Aggregation::Max => Some(Measure::Max),
            Aggregation::Latest => Some(Measure::Latest),
            Aggregation::Avg | Aggregation::Min => None,
        }
    }
}

/// A feature bound to a live meter, ready to read events: what the ingest worker and the
/// worker's replay after a take-over both use, so that both read an event the same way.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub feature: String,
    pub meter: String,
    pub event_type: String,
    pub measure: Measure,
    /// `None`: a `COUNT` meter (each event is 1).
    value: Option<JsonPath>,
    numeric: bool,
    /// Group-by paths and the value each must have.
    filters: Vec<(JsonPath, String)>,
    /// Events before this time are not metered (the meter's `eventFrom`, µs).
    from: i64,
}

/// What a binding reads of one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    /// The event is not the meter's to count (a group-by filter or `eventFrom` excludes it).
    Skip,
    /// A value to add, or to compare with the limit.
    Quantity(f64),
    /// A `UNIQUE_COUNT` meter's value, as text.
    Distinct(String),
}

impl Binding {
    /// The binding of `feature` to `meter`; `None` when the feature is archived or the
    /// pair has problems ([`Feature::problems`]).
    pub fn new(feature: &Feature, meter: &Meter) -> Option<Binding> {
        if feature.is_archived()
            || !feature.problems("", Some(meter)).is_empty()
            || !meter.problems("").is_empty()
        {
            return None;
        }
        let filters = feature
            .meter_group_by_filters
            .iter()
            .map(|(name, want)| {
                Some((
                    JsonPath::parse(meter.group_by.get(name)?).ok()?,
                    want.clone(),
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Binding {
            feature: feature.key.clone(),
            meter: meter.slug.clone(),
            event_type: meter.event_type.clone(),
            measure: Measure::of(meter.aggregation)?,
            value: meter.value_path(),
            numeric: meter.aggregation.is_numeric(),
            filters,
            from: meter.event_from.map_or(i64::MIN, |t| t.timestamp_micros()),
        })
    }

    /// What the meter reads of `event` (of the meter's type, at `time` µs). `data` holds
    /// the event's other `data` properties once parsed, shared by the bindings of one
    /// event. A value the meter needs and cannot read is an [`Invalid`] naming its field.
    pub fn read(
        &self,
        event: &Event<'_>,
        time: i64,
        data: &mut Option<Value>,
    ) -> Result<Reading, Invalid> {
        if time < self.from {
            return Ok(Reading::Skip);
        }
        for (path, want) in &self.filters {
            if event_text(path, event, data).as_deref() != Some(want.as_str()) {
                return Ok(Reading::Skip);
            }
        }
        let Some(path) = &self.value else {
            return Ok(Reading::Quantity(1.0));
        };
        let unreadable = |message: String| {
            let mut invalid = Invalid::new(Reason::UnreadableValue, None, message);
            invalid.field = Some(std::borrow::Cow::Owned(path.field()));
            invalid
        };
        let Some(text) = event_text(path, event, data) else {
            return Err(unreadable(format!(
                "`{}` is missing or not a value: feature {:?} is metered by {:?}, which reads {path}",
                path.field(),
                self.feature,
                self.meter
            )));
        };
        if !self.numeric {
            return Ok(Reading::Distinct(text));
        }
        match number(&text) {
            Some(n) if n < 0.0 && self.measure == Measure::Sum => Err(unreadable(format!(
                "`{}` is {n}: feature {:?} adds up meter {:?}'s values, which must be ≥ 0",
                path.field(),
                self.feature,
                self.meter
            ))),
            Some(n) => Ok(Reading::Quantity(n)),
            None => Err(unreadable(format!(
                "`{}` is {text:?}, not a number: feature {:?} is metered by {:?} ({}), which reads a number",
                path.field(),
                self.feature,
                self.meter,
                match self.measure {
                    Measure::Sum => "SUM",
                    Measure::Max => "MAX",
                    Measure::Latest => "LATEST",
                    Measure::Distinct => "UNIQUE_COUNT",
                }
            ))),
        }
    }
}

/// The text at `path` of an event, as the lake's meter queries read it: Tally's own
/// properties from their fields, the rest from the other `data` properties (parsed into
/// `data` the first time one is needed).
fn event_text(path: &JsonPath, event: &Event<'_>, data: &mut Option<Value>) -> Option<String> {
    match path.own_property() {
        Some(OwnProperty::Quantity) => Some(event.quantity.to_string()),
        Some(OwnProperty::Feature) => Some(event.feature.to_string()),
        Some(OwnProperty::Region) => event.region.as_deref().map(str::to_owned),
        Some(OwnProperty::User) => event.user.as_deref().map(str::to_owned),
        None => {
            let data = data.get_or_insert_with(|| {
                event
                    .extra
                    .as_deref()
                    .and_then(|text| serde_json::from_str(text).ok())
                    .unwrap_or(Value::Null)
            });
            path.text(data)
        }
    }
}

/// `field` named under `at` (`meters[0]`), or alone when `at` is empty.
fn under(at: &str, field: &str) -> String {
    if at.is_empty() {
        field.to_owned()
    } else {
        format!("{at}.{field}")
    }
}

/// OpenMeter's slug rule: `^[a-z0-9]+(?:_[a-z0-9]+)*$`, at most 64 characters.
pub fn check_slug(slug: &str) -> Result<(), String> {
    let words_ok = slug.split('_').all(|w| {
        !w.is_empty()
            && w.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    });
    if slug.is_empty() {
        Err("must not be empty".to_owned())
    } else if slug.len() > MAX_SLUG_LEN {
        Err(format!(
            "is {} characters; the limit is {MAX_SLUG_LEN}",
            slug.len()
        ))
    } else if !words_ok {
        Err(format!(
            "{slug:?} is not a slug: lowercase letters and digits, words joined by single `_`"
        ))
    } else {
        Ok(())
    }
}

fn is_group_by_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && name.len() <= 64
}

/// One step of a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Step {
    Member(String),
    Index(usize),
}

/// A parsed JSONPath that selects at most one value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JsonPath {
    steps: Vec<Step>,
}

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path:?} is not a JSONPath Tally reads: {reason}")]
pub struct PathError {
    pub path: String,
    pub reason: String,
}

/// Tally's own properties of `data`, kept in columns of the lake rather than in its
/// `data` text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OwnProperty {
    Quantity,
    Feature,
    Region,
    User,
}

impl JsonPath {
    /// Parses `$.a.b`, `$['a-b'][0]`, `$["a"]`: member names and indexes, each selecting
    /// one value. Wildcards, slices, filters and recursive descent are refused: a meter's
    /// value is one value per event.
    pub fn parse(path: &str) -> Result<JsonPath, PathError> {
        let fail = |reason: &str| PathError {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        if path.len() > MAX_PATH_LEN {
            return Err(fail(&format!("longer than {MAX_PATH_LEN} bytes")));
        }
        let Some(mut rest) = path.strip_prefix('$') else {
            return Err(fail(
                "a path starts with `$` (the event's data), as in `$.tokens`",
            ));
        };
        let mut steps = Vec::new();
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix("..") {
                let _ = after;
                return Err(fail("recursive descent (`..`) selects many values"));
            } else if let Some(after) = rest.strip_prefix('.') {
                let end = after.find(['.', '[']).unwrap_or(after.len());
                let name = &after[..end];
                if name.is_empty() {
                    return Err(fail("a `.` is followed by a member name"));
                }
                if name == "*" {
                    return Err(fail("a wildcard (`*`) selects many values"));
                }
                if name
                    .chars()
                    .any(|c| c.is_whitespace() || "'\"]()?@,:".contains(c))
                {
                    return Err(fail(&format!(
                        "{name:?} is not a plain member name: write it as ['{name}']"
                    )));
                }
                steps.push(Step::Member(name.to_owned()));
                rest = &after[end..];
            } else if let Some(after) = rest.strip_prefix('[') {
                let (step, after) = bracket(after).map_err(|reason| fail(&reason))?;
                steps.push(step);
                rest = after;
            } else {
                return Err(fail(&format!(
                    "unexpected {:?}: each step is `.name`, `['name']` or `[index]`",
                    rest.chars().next().unwrap_or_default()
                )));
            }
        }
        if steps.is_empty() {
            return Err(fail(
                "`$` alone is the whole data object: name a property, as in `$.tokens`",
            ));
        }
        Ok(JsonPath { steps })
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The field it names in an event, as errors name fields: `data.a.b`, `data.a[0]`.
    pub fn field(&self) -> String {
        let mut out = String::from("data");
        for step in &self.steps {
            match step {
                Step::Member(name) => {
                    out.push('.');
                    out.push_str(name);
                }
                Step::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }

    /// The own property the path names (`$.quantity`, …), read from its column.
    pub fn own_property(&self) -> Option<OwnProperty> {
        match self.steps.as_slice() {
            [Step::Member(name)] => match name.as_str() {
                "quantity" => Some(OwnProperty::Quantity),
                "feature" => Some(OwnProperty::Feature),
                "region" => Some(OwnProperty::Region),
                "user" => Some(OwnProperty::User),
                _ => None,
            },
            _ => None,
        }
    }

    /// The value the path selects in `data`, if any.
    pub fn select<'v>(&self, data: &'v Value) -> Option<&'v Value> {
        let mut at = data;
        for step in &self.steps {
            at = match (step, at) {
                (Step::Member(name), Value::Object(map)) => map.get(name)?,
                (Step::Index(i), Value::Array(items)) => items.get(*i)?,
                _ => return None,
            };
        }
        Some(at)
    }

    /// The selected value as `JSON_VALUE` gives it: a string's text, a number's or a
    /// boolean's JSON; `None` for anything else.
    pub fn text(&self, data: &Value) -> Option<String> {
        match self.select(data)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Null | Value::Object(_) | Value::Array(_) => None,
        }
    }

    /// What [`JsonPath::text`] gives of the JSON document `json` (`None` for a document
    /// that is not JSON), read in one pass over the text: the values off the path are
    /// skipped, not built. Where a member repeats, the last one counts, as in a parsed
    /// document.
    pub fn text_in(&self, json: &str) -> Option<String> {
        let mut out = [None];
        JsonPath::texts_in(&[self], json, &mut out);
        let [text] = out;
        text
    }

    /// [`JsonPath::text_in`] of each of `paths` into the slot of `out` of the same index,
    /// all in the same one pass over `json`.
    pub fn texts_in(paths: &[&JsonPath], json: &str, out: &mut [Option<String>]) {
        use serde::de::DeserializeSeed;
        out.fill(None);
        let active: Vec<(usize, &[Step])> = paths
            .iter()
            .enumerate()
            .map(|(i, p)| (i, p.steps.as_slice()))
            .collect();
        let mut de = serde_json::Deserializer::from_str(json);
        let read = Along {
            active: &active,
            out: &mut *out,
        }
        .deserialize(&mut de)
        .and_then(|()| de.end());
        if read.is_err() {
            out.fill(None);
        }
    }
}

/// Reads the values at paths' remaining steps out of a JSON document as it streams by:
/// `active` holds each path's slot in `out` and the steps left.
struct Along<'a, 'p> {
    active: &'a [(usize, &'p [Step])],
    out: &'a mut [Option<String>],
}

impl Along<'_, '_> {
    /// Writes a scalar's text into the slot of every path that ends here.
    fn ends(self, text: impl Fn() -> Option<String>) {
        for &(slot, steps) in self.active {
            if steps.is_empty() {
                self.out[slot] = text();
            }
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Along<'_, '_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Along<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    // An object is no value, and an index selects nothing in it: only members go on.
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Along { active, out } = self;
        let mut hits = Vec::new();
        loop {
            hits.clear();
            let seed = Members {
                active,
                hits: &mut hits,
            };
            if map.next_key_seed(seed)?.is_none() {
                return Ok(());
            }
            if hits.is_empty() {
                map.next_value::<serde::de::IgnoredAny>()?;
            } else {
                // A repeated member replaces what the one before it gave.
                for &(slot, _) in &hits {
                    out[slot] = None;
                }
                map.next_value_seed(Along {
                    active: &hits,
                    out: &mut *out,
                })?;
            }
        }
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Along { active, out } = self;
        let mut hits = Vec::new();
        for i in 0.. {
            hits.clear();
            hits.extend(
                active
                    .iter()
                    .filter_map(|&(slot, steps)| match steps.split_first() {
                        Some((Step::Index(want), rest)) if *want == i => Some((slot, rest)),
                        _ => None,
                    }),
            );
            let more = if hits.is_empty() {
                seq.next_element::<serde::de::IgnoredAny>()?.is_some()
            } else {
                seq.next_element_seed(Along {
                    active: &hits,
                    out: &mut *out,
                })?
                .is_some()
            };
            if !more {
                break;
            }
        }
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.ends(|| Some(v.to_owned()));
        Ok(())
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.ends(|| Some(v.to_string()));
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.ends(|| Some(v.to_string()));
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.ends(|| Some(v.to_string()));
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        // As a parsed document's number writes itself.
        self.ends(|| serde_json::Number::from_f64(v).map(|n| n.to_string()));
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// Which paths an object's key is the next member of (into `hits`, with their steps after
/// it), read without copying the key.
struct Members<'a, 'p> {
    active: &'a [(usize, &'p [Step])],
    hits: &'a mut Vec<(usize, &'p [Step])>,
}

impl<'de> serde::de::DeserializeSeed<'de> for Members<'_, '_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Members<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        for &(slot, steps) in self.active {
            if let Some((Step::Member(name), rest)) = steps.split_first()
                && name == v
            {
                self.hits.push((slot, rest));
            }
        }
        Ok(())
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("$")?;
        for step in &self.steps {
            match step {
                Step::Member(name) => write!(f, "[{}]", Value::from(name.as_str()))?,
                Step::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
}

/// A bracketed step after its `[`: `'name'`, `"name"` or an index, then `]`.
fn bracket(after: &str) -> Result<(Step, &str), String> {
    let quote = after.chars().next().ok_or("an unclosed `[`")?;
    if quote == '\'' || quote == '"' {
        let mut name = String::new();
        let mut chars = after[1..].char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, escaped)) => name.push(escaped),
                    None => return Err("an unfinished escape".to_owned()),
                },
                c if c == quote => {
                    let rest = &after[1 + i + 1..];
                    let rest = rest
                        .strip_prefix(']')
                        .ok_or("a quoted name is followed by `]`")?;
                    return Ok((Step::Member(name), rest));
                }
                c => name.push(c),
            }
        }
        return Err("an unclosed quoted name".to_owned());
    }
    let end = after.find(']').ok_or("an unclosed `[`")?;
    let inside = after[..end].trim();
    if inside == "*" {
        return Err("a wildcard (`[*]`) selects many values".to_owned());
    }
    let index = inside
        .parse::<usize>()
        .map_err(|_| format!("[{inside}] is neither a quoted name nor an index ≥ 0"))?;
    Ok((Step::Index(index), &after[end + 1..]))
}

/// The windows a meter query groups by (OpenMeter's `windowSize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WindowSize {
    Minute,
    Hour,
    Day,
    Month,
}

impl WindowSize {
    pub fn as_str(self) -> &'static str {
        match self {
            WindowSize::Minute => "MINUTE",
            WindowSize::Hour => "HOUR",
            WindowSize::Day => "DAY",
            WindowSize::Month => "MONTH",
        }
    }

    /// `MINUTE`, `HOUR`, `DAY` or `MONTH` (any case).
    pub fn parse(text: &str) -> Option<WindowSize> {
        [
            WindowSize::Minute,
            WindowSize::Hour,
            WindowSize::Day,
            WindowSize::Month,
        ]
        .into_iter()
        .find(|w| w.as_str().eq_ignore_ascii_case(text))
    }

    /// The start of the window holding `t`, in `tz`'s local time: the minute, the hour,
    /// local midnight, midnight of the month's first day. A local start that a DST change
    /// skips is the first moment after the gap; one it repeats is its first occurrence.
    pub fn start(self, t: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
        let local = t.with_timezone(&tz);
        let naive = local.naive_local();
        let truncated = match self {
            WindowSize::Minute => naive.with_second(0).and_then(|n| n.with_nanosecond(0)),
            WindowSize::Hour => naive
                .with_minute(0)
                .and_then(|n| n.with_second(0))
                .and_then(|n| n.with_nanosecond(0)),
            WindowSize::Day => naive.date().and_hms_opt(0, 0, 0),
            WindowSize::Month => naive
                .date()
                .with_day(1)
                .and_then(|d| d.and_hms_opt(0, 0, 0)),
        }
        .unwrap_or(naive);
        let offset = chrono::Duration::seconds(i64::from(local.offset().fix().local_minus_utc()));
        match self {
            // A minute or an hour starts at the offset the moment has (a DST change falls
            // on an hour's boundary), so a repeated hour is two windows.
            WindowSize::Minute | WindowSize::Hour => (truncated - offset).and_utc(),
            WindowSize::Day | WindowSize::Month => resolve(truncated, tz),
        }
    }

    /// The start of the window after the one starting at `start`.
    pub fn end(self, start: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
        match self {
            WindowSize::Minute => start + chrono::Duration::minutes(1),
            WindowSize::Hour => start + chrono::Duration::hours(1),
            WindowSize::Day => {
                let date = start.with_timezone(&tz).date_naive();
                let next = date.succ_opt().unwrap_or(date);
                resolve(next.and_time(NaiveTime::MIN), tz)
            }
            WindowSize::Month => {
                let date = start.with_timezone(&tz).date_naive();
                let (y, m) = if date.month() == 12 {
                    (date.year() + 1, 1)
                } else {
                    (date.year(), date.month() + 1)
                };
                let first = NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(date);
                resolve(first.and_time(NaiveTime::MIN), tz)
            }
        }
    }
}

/// The first moment at or after local time `naive` in `tz`.
fn resolve(naive: NaiveDateTime, tz: Tz) -> DateTime<Utc> {
    let mut at = naive;
    // DST gaps are at most a few hours; step through one by minutes.
    for _ in 0..(24 * 60) {
        match tz.from_local_datetime(&at) {
            LocalResult::Single(t) => return t.with_timezone(&Utc),
            LocalResult::Ambiguous(first, _) => return first.with_timezone(&Utc),
            LocalResult::None => at += chrono::Duration::minutes(1),
        }
    }
    naive.and_utc()
}

/// A value's text read as a number, as a numeric meter reads it: `None` when it is not
/// a finite number.
pub fn number(text: &str) -> Option<f64> {
    let n: f64 = text.trim().parse().ok()?;
    n.is_finite().then_some(n)
}

/// A 128-bit id written as OpenMeter writes its ids (a ULID's 26 characters of
/// Crockford's base 32); a UUID v7's bits make one that sorts by creation time.
pub fn ulid_text(bits: u128) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut out = [0u8; 26];
    let mut n = bits;
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n & 31) as usize];
        n >>= 5;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(aggregation: Aggregation, value: Option<&str>) -> Meter {
        Meter {
            slug: "tokens".into(),
            id: String::new(),
            name: None,
            description: None,
            event_type: "prompt".into(),
            aggregation,
            value_property: value.map(str::to_owned),
            group_by: BTreeMap::from([("model".to_owned(), "$.model".to_owned())]),
            event_from: None,
            metadata: BTreeMap::new(),
            created_at: None,
            updated_at: None,
            deleted_at: None,
        }
    }

    #[test]
    fn paths_select_one_value_each() {
        let data: Value = serde_json::from_str(
            r#"{"tokens":"123","n":7,"ok":true,"a":{"b-c":[1,{"d":"x"}]},"nothing":null,"obj":{}}"#,
        )
        .unwrap();
        let text = |p: &str| JsonPath::parse(p).unwrap().text(&data);
        assert_eq!(text("$.tokens").as_deref(), Some("123"));
        assert_eq!(text("$.n").as_deref(), Some("7"));
        assert_eq!(text("$.ok").as_deref(), Some("true"));
        assert_eq!(text("$.a['b-c'][0]").as_deref(), Some("1"));
        assert_eq!(text(r#"$["a"]["b-c"][1].d"#).as_deref(), Some("x"));
        assert_eq!(text("$.a['b-c'][2]"), None);
        assert_eq!(text("$.nothing"), None);
        assert_eq!(text("$.obj"), None);
        assert_eq!(text("$.missing"), None);
        assert_eq!(text("$.tokens.deeper"), None);
        assert_eq!(
            JsonPath::parse("$.quantity").unwrap().own_property(),
            Some(OwnProperty::Quantity)
        );
        assert_eq!(
            JsonPath::parse("$.q.quantity").unwrap().own_property(),
            None
        );
    }

    #[test]
    fn paths_that_select_many_or_nothing_are_refused() {
        for (path, why) in [
            ("tokens", "starts with `$`"),
            ("$", "`$` alone"),
            ("$.", "member name"),
            ("$..tokens", "recursive descent"),
            ("$.*", "wildcard"),
            ("$.a[*]", "wildcard"),
            ("$.a[-1]", "index ≥ 0"),
            ("$.a['b", "unclosed"),
            ("$.a[1", "unclosed"),
            ("$.a b", "plain member name"),
            ("$['a'x", "followed by `]`"),
        ] {
            let e = JsonPath::parse(path).expect_err(path);
            assert!(e.to_string().contains(why), "{path}: {e}");
        }
    }

    #[test]
    fn a_path_is_written_back_in_one_form() {
        let p = JsonPath::parse("$.a['b c'][2].d").unwrap();
        assert_eq!(p.to_string(), r#"$["a"]["b c"][2]["d"]"#);
        assert_eq!(JsonPath::parse(&p.to_string()).unwrap(), p);
    }

    #[test]
    fn an_event_a_meter_cannot_read_is_told_why_naming_the_field() {
        let data = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        let sum = meter(Aggregation::Sum, Some("$.usage.tokens"));
        assert_eq!(
            sum.validation_error(&data(r#"{"usage":{"tokens":"12"}}"#)),
            None
        );
        let missing = sum.validation_error(&data(r#"{"usage":{}}"#)).unwrap();
        assert!(
            missing.starts_with("data.usage.tokens is missing"),
            "{missing}"
        );
        let text = sum
            .validation_error(&data(r#"{"usage":{"tokens":"lots"}}"#))
            .unwrap();
        assert!(
            text.starts_with(r#"data.usage.tokens is "lots", not a number"#),
            "{text}"
        );
        let unique = meter(Aggregation::UniqueCount, Some("$.user"));
        assert_eq!(unique.validation_error(&data(r#"{"user":"ana"}"#)), None);
        assert!(unique.validation_error(&data("{}")).is_some());
        assert_eq!(
            meter(Aggregation::Count, None).validation_error(&data("{}")),
            None
        );
        assert_eq!(
            JsonPath::parse("$['a b'][2]").unwrap().field(),
            "data.a b[2]"
        );
    }

    #[test]
    fn reading_the_text_in_one_pass_gives_what_the_parsed_document_gives() {
        let documents = [
            r#"{"tokens":123,"model":"gpt-4o","n":{"a":[1,{"b":"x"},true]}}"#,
            r#"{"tokens":"12","tokens":7.5,"model":null}"#,
            r#"{"tokens":1.0,"big":18446744073709551616,"neg":-3,"e":1e2,"s":"é\"q\u00e9"}"#,
            r#"{"n":{"a":[]},"tokens":[1,2],"model":{"x":1},"t":false}"#,
            r#"{"we\u0069rd key":5,"a":{"a":{"a":"deep"}}}"#,
            r#"{"a":{"a":{"a":"first"}},"tokens":2,"a":{"b":1}}"#,
            r#"{"tokens":1} trailing"#,
            r#"{"tokens":1,"#,
            r#"[1,2,3]"#,
            r#""text""#,
            "",
        ];
        let paths = [
            "$.tokens",
            "$.model",
            "$.n.a[0]",
            "$.n.a[1].b",
            "$.n.a[2]",
            "$.n.a[9]",
            "$.big",
            "$.neg",
            "$.e",
            "$.s",
            "$.t",
            "$['weird key']",
            "$.a.a.a",
            "$.a.a",
            "$.missing",
            "$[0]",
        ];
        let parsed_paths: Vec<JsonPath> =
            paths.iter().map(|p| JsonPath::parse(p).unwrap()).collect();
        // Every path at once, one of them twice: each slot as if read alone.
        let mut all: Vec<&JsonPath> = parsed_paths.iter().collect();
        all.push(&parsed_paths[0]);
        for doc in documents {
            let parsed: Option<Value> = serde_json::from_str(doc).ok();
            let mut at_once = vec![Some("stale".to_owned()); all.len()];
            JsonPath::texts_in(&all, doc, &mut at_once);
            for (path, got) in all.iter().zip(&at_once) {
                let want = parsed.as_ref().and_then(|v| path.text(v));
                assert_eq!(path.text_in(doc), want, "{path} of {doc}");
                assert_eq!(got, &want, "{path} of {doc}, read with the others");
            }
        }
        let tokens = JsonPath::parse("$.tokens").unwrap();
        assert_eq!(tokens.text_in(documents[0]).as_deref(), Some("123"));
        assert_eq!(tokens.text_in(documents[1]).as_deref(), Some("7.5"));
        assert_eq!(tokens.text_in(documents[6]), None, "not a JSON document");
    }

    #[test]
    fn numbers_are_read_from_text() {
        assert_eq!(number("12"), Some(12.0));
        assert_eq!(number(" 2.5 "), Some(2.5));
        assert_eq!(number("1e3"), Some(1000.0));
        assert_eq!(number("abc"), None);
        assert_eq!(number(""), None);
        assert_eq!(number("NaN"), None);
        assert_eq!(number("inf"), None);
    }

    #[test]
    fn definitions_are_checked_field_by_field() {
        assert!(
            meter(Aggregation::Sum, Some("$.tokens"))
                .problems("")
                .is_empty()
        );
        assert!(meter(Aggregation::Count, None).problems("").is_empty());
        let fields = |m: &Meter| -> Vec<String> {
            m.problems("meters[0]")
                .into_iter()
                .map(|p| p.field)
                .collect()
        };
        assert_eq!(
            fields(&meter(Aggregation::Sum, None)),
            ["meters[0].valueProperty"]
        );
        assert_eq!(
            fields(&meter(Aggregation::Count, Some("$.tokens"))),
            ["meters[0].valueProperty"]
        );
        assert_eq!(
            fields(&meter(Aggregation::Max, Some("$..x"))),
            ["meters[0].valueProperty"]
        );
        let mut m = meter(Aggregation::Sum, Some("$.tokens"));
        m.slug = "Tokens-Used".into();
        m.event_type = String::new();
        m.group_by.insert("subject".into(), "$.s".into());
        m.group_by.insert("bad name".into(), "$.x".into());
        m.group_by.insert("region2".into(), "region".into());
        assert_eq!(
            fields(&m),
            [
                "meters[0].slug",
                "meters[0].eventType",
                "meters[0].groupBy.bad name",
                "meters[0].groupBy.region2",
                "meters[0].groupBy.subject",
            ]
        );
        for slug in ["a", "tokens_total", "v2_calls"] {
            assert!(check_slug(slug).is_ok(), "{slug}");
        }
        for slug in ["", "_a", "a_", "a__b", "A", "a-b", &"a".repeat(65)] {
            assert!(check_slug(slug).is_err(), "{slug}");
        }
    }

    #[test]
    fn files_may_use_either_case_and_stored_meters_use_openmeters() {
        let m: Meter = serde_json::from_str(
            r#"{"slug":"tokens","event_type":"prompt","aggregation":"UNIQUE_COUNT","value_property":"$.user_id","group_by":{"model":"$.model"}}"#,
        )
        .unwrap();
        assert_eq!(m.aggregation, Aggregation::UniqueCount);
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["eventType"], "prompt");
        assert_eq!(json["valueProperty"], "$.user_id");
        assert_eq!(json["groupBy"]["model"], "$.model");
        assert!(
            serde_json::from_str::<Meter>(r#"{"slug":"x","eventType":"t","aggregation":"MEDIAN"}"#)
                .is_err()
        );
    }

    #[test]
    fn windows_follow_local_time_across_dst() {
        let tz: Tz = "America/New_York".parse().unwrap();
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        // 2026-03-08: clocks go from 02:00 to 03:00 EST→EDT (07:00 UTC).
        assert_eq!(
            WindowSize::Day.start(at("2026-03-08T12:00:00Z"), tz),
            at("2026-03-08T05:00:00Z")
        );
        assert_eq!(
            WindowSize::Day.end(at("2026-03-08T05:00:00Z"), tz),
            at("2026-03-09T04:00:00Z")
        );
        // 2026-11-01: 02:00 EDT back to 01:00 EST (06:00 UTC); the day has 25 hours.
        assert_eq!(
            WindowSize::Day.start(at("2026-11-01T23:00:00Z"), tz),
            at("2026-11-01T04:00:00Z")
        );
        assert_eq!(
            WindowSize::Day.end(at("2026-11-01T04:00:00Z"), tz),
            at("2026-11-02T05:00:00Z")
        );
        // The repeated hour 01:00–02:00 is two windows.
        assert_eq!(
            WindowSize::Hour.start(at("2026-11-01T05:30:00Z"), tz),
            at("2026-11-01T05:00:00Z")
        );
        assert_eq!(
            WindowSize::Hour.start(at("2026-11-01T06:30:00Z"), tz),
            at("2026-11-01T06:00:00Z")
        );
        assert_eq!(
            WindowSize::Month.start(at("2026-12-01T03:00:00Z"), tz),
            at("2026-11-01T04:00:00Z")
        );
        assert_eq!(
            WindowSize::Month.end(at("2026-11-01T04:00:00Z"), tz),
            at("2026-12-01T05:00:00Z")
        );
        let kolkata: Tz = "Asia/Kolkata".parse().unwrap();
        assert_eq!(
            WindowSize::Hour.start(at("2026-11-01T10:10:00Z"), kolkata),
            at("2026-11-01T09:30:00Z")
        );
        assert_eq!(
            WindowSize::Minute.start(at("2026-11-01T10:10:42.5Z"), kolkata),
            at("2026-11-01T10:10:00Z")
        );
        // A midnight a DST change skips (Santiago, 2026-09-06 00:00 → 01:00).
        let santiago: Tz = "America/Santiago".parse().unwrap();
        let start = WindowSize::Day.start(at("2026-09-06T12:00:00Z"), santiago);
        assert_eq!(
            start.with_timezone(&santiago).naive_local().to_string(),
            "2026-09-06 01:00:00"
        );
        assert_eq!(WindowSize::parse("day"), Some(WindowSize::Day));
        assert_eq!(WindowSize::parse("WEEK"), None);
    }

    #[test]
    fn ids_look_like_openmeters() {
        let id = ulid_text(0x0190_1234_5678_7abc_8def_0123_4567_89ab);
        assert_eq!(id.len(), 26);
        assert!(id.starts_with(['0', '1', '2', '3', '4', '5', '6', '7']));
        assert_eq!(ulid_text(0), "0".repeat(26));
        assert_eq!(ulid_text(u128::MAX), format!("7{}", "Z".repeat(25)));
    }
}
