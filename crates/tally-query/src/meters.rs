//! Meter queries over the lake's events, and the functions they read `data` with.
//!
//! A meter ([`tally_core::meter`]) reads the events of its type that were metered: decided
//! `accepted`, `overage` or `late` (late usage happened; it is billed apart), or
//! `metered` (a customer without a definition, under `ingest.meter_unknown_customers`);
//! never the refused ones nor `unknown_customer` ([`METERED`]). Its value comes from each
//! event's `data` through the SQL functions registered in every session:
//!
//! - `json_value(data, path)`: the text at a JSONPath (a string's text, a number's or a
//!   boolean's JSON; `NULL` for anything else), as ClickHouse's `JSON_VALUE` gives it to
//!   OpenMeter;
//! - `json_number(data, path)`: that text as a finite `DOUBLE`, else `NULL`;
//! - `meter_window(time, size, time_zone)`: the start of the `MINUTE`, `HOUR`, `DAY` or
//!   `MONTH` holding `time` in an IANA time zone.
//!
//! A path that names one of Tally's own properties (`$.quantity`, `$.feature`,
//! `$.region`, `$.user`) reads its column instead. [`meter_query`] groups by window,
//! customer and group-by values as OpenMeter's meter query does; values of events whose
//! property is missing or not a number are left out of numeric aggregations, as
//! OpenMeter leaves them out.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Offset, TimeZone, Utc};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Float64Builder, RecordBatch, StringBuilder,
    TimestampMicrosecondArray, TimestampMicrosecondBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{
    DataType, Field, Float64Type, TimeUnit, TimestampMicrosecondType,
};
use datafusion::arrow::error::ArrowError;
use datafusion::common::{exec_err, plan_err};
use datafusion::error::Result as DfResult;
use datafusion::functions_aggregate::expr_fn::{
    avg, count, count_distinct, last_value, max, min, sum,
};
use datafusion::logical_expr::{
    Cast, ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TryCast,
    Volatility,
};
use datafusion::prelude::{DataFrame, SessionContext, col, lit};
use datafusion::scalar::ScalarValue;
use serde_json::Value;
use tally_core::meter::{Aggregation, JsonPath, Meter, OwnProperty, Tz, WindowSize};
use tally_core::schema;

use crate::Result;

pub mod days;

/// The decisions whose events meters read.
pub use tally_store::meter_rollup::METERED;

/// Registers `json_value`, `json_number` and `meter_window` in `ctx`.
pub fn register_functions(ctx: &SessionContext) {
    ctx.register_udf(json_value_udf());
    ctx.register_udf(json_number_udf());
    ctx.register_udf(ScalarUDF::from(MeterWindow::new()));
}

pub fn json_value_udf() -> ScalarUDF {
    ScalarUDF::from(JsonAt::new("json_value", DataType::Utf8))
}

pub fn json_number_udf() -> ScalarUDF {
    ScalarUDF::from(JsonAt::new("json_number", DataType::Float64))
}

/// `json_value(data, path)` and `json_number(data, path)`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct JsonAt {
    name: &'static str,
    output: DataType,
    signature: Signature,
}

impl JsonAt {
    fn new(name: &'static str, output: DataType) -> Self {
        Self {
            name,
            output,
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for JsonAt {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> DfResult<DataType> {
        if !is_text(&args[0]) {
            return plan_err!("{}: data must be text, not {}", self.name, args[0]);
        }
        Ok(self.output.clone())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let path = literal_text(self.name, "path", &args.args[1])?;
        let path = JsonPath::parse(&path).map_err(|e| {
            datafusion::error::DataFusionError::Execution(format!("{}: {e}", self.name))
        })?;
        let data = args.args[0].to_array(args.number_rows)?;
        let data = cast(&data, &DataType::Utf8)?;
        let data = data.as_string::<i32>();
        let each = data.iter().map(|text| path.text_in(text?));
        let out: ArrayRef = if self.output == DataType::Float64 {
            let mut b = Float64Builder::with_capacity(data.len());
            for text in each {
                b.append_option(text.as_deref().and_then(tally_core::meter::number));
            }
            Arc::new(b.finish())
        } else {
            let mut b = StringBuilder::with_capacity(data.len(), 0);
            for text in each {
                b.append_option(text);
            }
            Arc::new(b.finish())
        };
        Ok(ColumnarValue::Array(out))
    }
}

/// `meter_window(time, size, time_zone)`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct MeterWindow {
    signature: Signature,
}

impl MeterWindow {
    fn new() -> Self {
        Self {
            signature: Signature::any(3, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for MeterWindow {
    fn name(&self) -> &str {
        "meter_window"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> DfResult<DataType> {
        if !matches!(args[0], DataType::Timestamp(_, _)) {
            return plan_err!("meter_window: time must be a timestamp, not {}", args[0]);
        }
        Ok(utc_micros())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let size = literal_text("meter_window", "size", &args.args[1])?;
        let Some(size) = WindowSize::parse(&size) else {
            return exec_err!("meter_window: size is MINUTE, HOUR, DAY or MONTH, not {size:?}");
        };
        let zone = literal_text("meter_window", "time_zone", &args.args[2])?;
        let Ok(tz) = zone.parse::<Tz>() else {
            return exec_err!("meter_window: {zone:?} is not an IANA time zone");
        };
        let times = args.args[0].to_array(args.number_rows)?;
        let times = cast(&times, &DataType::Timestamp(TimeUnit::Microsecond, None))?;
        let times = times.as_primitive::<TimestampMicrosecondType>();
        let mut out = TimestampMicrosecondBuilder::with_capacity(times.len());
        let mut windows = Windows::new(size, tz);
        for t in times.iter() {
            match t {
                Some(t) => out.append_value(windows.start(t)),
                None => out.append_null(),
            }
        }
        let out: TimestampMicrosecondArray = out.finish().with_timezone("UTC");
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

/// The windows of one size and zone found so far, so that each is worked out once per
/// batch whatever the order of the times (a rollup's rows run through a month's days
/// once per customer). Minutes, hours and days of UTC need no calendar.
struct Windows {
    size: WindowSize,
    tz: Tz,
    /// Fixed length, where the zone is UTC and the size is not a month.
    fixed: Option<i64>,
    /// Window start → its end, in microseconds.
    found: BTreeMap<i64, i64>,
}

impl Windows {
    fn new(size: WindowSize, tz: Tz) -> Self {
        let fixed = match size {
            _ if tz != Tz::UTC => None,
            WindowSize::Minute => Some(60_000_000),
            WindowSize::Hour => Some(MICROS_PER_HOUR),
            WindowSize::Day => Some(MICROS_PER_DAY),
            WindowSize::Month => None,
        };
        Windows {
            size,
            tz,
            fixed,
            found: BTreeMap::new(),
        }
    }

    /// The start of the window holding `t` (microseconds since the epoch).
    fn start(&mut self, t: i64) -> i64 {
        if let Some(length) = self.fixed {
            return t - t.rem_euclid(length);
        }
        if let Some((&start, &end)) = self.found.range(..=t).next_back()
            && t < end
        {
            return start;
        }
        let at = Utc.timestamp_micros(t).single().unwrap_or_default();
        let start = self.size.start(at, self.tz);
        let end = self.size.end(start, self.tz);
        let (start, end) = (start.timestamp_micros(), end.timestamp_micros());
        // A window that does not hold `t` (a time past the calendar's range) is not kept.
        if (start..end).contains(&t) {
            self.found.insert(start, end);
        }
        start
    }
}

fn is_text(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 | DataType::Null
    )
}

fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// A function's argument that must be a text literal.
fn literal_text(function: &str, name: &str, arg: &ColumnarValue) -> DfResult<String> {
    match arg {
        ColumnarValue::Scalar(s) => match s.try_as_str() {
            Some(Some(text)) => Ok(text.to_owned()),
            _ => exec_err!("{function}: {name} must be a text literal, not {s}"),
        },
        ColumnarValue::Array(_) => exec_err!("{function}: {name} must be a literal, not a column"),
    }
}

/// A meter query: OpenMeter's parameters, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct MeterQuery {
    /// Events at or after (with the meter's `eventFrom`, the later of the two).
    pub from: Option<DateTime<Utc>>,
    /// Events before.
    pub to: Option<DateTime<Utc>>,
    /// `None`: one window over the whole range per group.
    pub window: Option<WindowSize>,
    pub time_zone: Tz,
    /// Only these customers (OpenMeter's `subject` and `filterCustomerId`: one id here).
    pub customers: Vec<String>,
    /// `subject`, `customer_id` or the meter's group-by names.
    pub group_by: Vec<String>,
    /// Only events whose group-by value is one of these.
    pub filter_group_by: BTreeMap<String, Vec<String>>,
}

impl Default for MeterQuery {
    fn default() -> Self {
        Self {
            from: None,
            to: None,
            window: None,
            time_zone: Tz::UTC,
            customers: Vec::new(),
            group_by: Vec::new(),
            filter_group_by: BTreeMap::new(),
        }
    }
}

/// One row of a meter query's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct MeterRow {
    pub value: f64,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    /// The customer, when grouped by `subject` or `customer_id`.
    pub customer: Option<String>,
    /// Each group-by asked for but `subject` and `customer_id`: its value, if the event
    /// had one.
    pub group_by: BTreeMap<String, Option<String>>,
}

/// What is wrong with a meter query, naming its parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct BadMeterQuery {
    pub field: String,
    pub message: String,
}

fn bad(field: &str, message: impl Into<String>) -> BadMeterQuery {
    BadMeterQuery {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// The most customers or values one filter may list.
pub const MAX_FILTER_VALUES: usize = 100;

impl MeterQuery {
    /// Checks the query against `meter`: known group-bys, a range that is not empty.
    pub fn check(&self, meter: &Meter) -> std::result::Result<(), BadMeterQuery> {
        if let (Some(from), Some(to)) = (self.from, self.to)
            && to <= from
        {
            return Err(bad("to", format!("to ({to}) must be after from ({from})")));
        }
        let known = |name: &str| {
            tally_core::meter::RESERVED_GROUP_BY.contains(&name)
                || meter.group_by.contains_key(name)
        };
        for name in &self.group_by {
            if !known(name) {
                return Err(bad(
                    "groupBy",
                    format!(
                        "meter {:?} has no group-by {name:?}; it has subject, customer_id{}",
                        meter.slug,
                        meter
                            .group_by
                            .keys()
                            .map(|k| format!(", {k}"))
                            .collect::<String>()
                    ),
                ));
            }
        }
        for (name, values) in &self.filter_group_by {
            if !known(name) {
                return Err(bad(
                    "filterGroupBy",
                    format!("meter {:?} has no group-by {name:?}", meter.slug),
                ));
            }
            if values.len() > MAX_FILTER_VALUES {
                return Err(bad(
                    "filterGroupBy",
                    format!("at most {MAX_FILTER_VALUES} values per group-by"),
                ));
            }
        }
        if self.customers.len() > MAX_FILTER_VALUES {
            return Err(bad(
                "filterCustomerId",
                format!("at most {MAX_FILTER_VALUES} customers"),
            ));
        }
        Ok(())
    }

    /// The range's start, the meter's `eventFrom` included.
    pub fn start(&self, meter: &Meter) -> Option<DateTime<Utc>> {
        match (self.from, meter.event_from) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The text of the property at `path` of each event, as an expression over `events`.
fn text_at(path: &JsonPath) -> Expr {
    match path.own_property() {
        Some(OwnProperty::Quantity) => cast_expr(col(schema::QUANTITY), DataType::Utf8),
        Some(OwnProperty::Feature) => col(schema::FEATURE),
        Some(OwnProperty::Region) => col(schema::REGION),
        Some(OwnProperty::User) => col(schema::USER_ID),
        None => json_value_udf().call(vec![col(schema::DATA), lit(path.to_string())]),
    }
}

/// The number at `path` of each event.
fn number_at(path: &JsonPath) -> Expr {
    match path.own_property() {
        Some(OwnProperty::Quantity) => col(schema::QUANTITY),
        Some(_) => Expr::TryCast(TryCast::new(Box::new(text_at(path)), DataType::Float64)),
        None => json_number_udf().call(vec![col(schema::DATA), lit(path.to_string())]),
    }
}

fn cast_expr(e: Expr, to: DataType) -> Expr {
    Expr::Cast(Cast::new(Box::new(e), to))
}

/// `t` as a literal of the events' time columns.
fn micros(t: DateTime<Utc>) -> Expr {
    lit(ScalarValue::TimestampMicrosecond(
        Some(t.timestamp_micros()),
        Some("UTC".into()),
    ))
}

/// The `date` partition holding `t`, as a literal (the partitions outside a range are
/// not read).
fn day(t: DateTime<Utc>) -> Expr {
    lit(t.date_naive().format("%Y-%m-%d").to_string())
}

/// The events `query` of `meter` reads: of the meter's type, metered, in the range, of
/// the customers and group-by values asked for. `dates`: the range also prunes the
/// events table's `date` partitions (files listed one by one have no such column).
fn events_filter(meter: &Meter, query: &MeterQuery, dates: bool) -> Expr {
    let mut filter = col(schema::EVENT_TYPE)
        .eq(lit(meter.event_type.as_str()))
        .and(
            col(schema::DECISION).in_list(METERED.iter().map(|d| lit(d.as_str())).collect(), false),
        );
    if let Some(from) = query.start(meter) {
        if dates {
            filter = filter.and(col(schema::DATE).gt_eq(day(from)));
        }
        filter = filter.and(col(schema::EVENT_TIME).gt_eq(micros(from)));
    }
    if let Some(to) = query.to {
        if dates {
            filter = filter.and(col(schema::DATE).lt_eq(day(to)));
        }
        filter = filter.and(col(schema::EVENT_TIME).lt(micros(to)));
    }
    if !query.customers.is_empty() {
        filter = filter.and(col(schema::CUSTOMER).in_list(
            query.customers.iter().map(|c| lit(c.as_str())).collect(),
            false,
        ));
    }
    for (name, values) in &query.filter_group_by {
        filter = filter.and(
            group_text(meter, name)
                .in_list(values.iter().map(|v| lit(v.as_str())).collect(), false),
        );
    }
    filter
}

/// `e` where the event has a value for the meter, else `NULL`. Aggregates leave the events
/// without one out this way rather than by a filter, so that each event's value is read
/// once (a filter on it and an aggregate of it would each read it).
fn where_valued(meter: &Meter, e: Expr) -> Expr {
    if meter.aggregation == Aggregation::Count {
        return e;
    }
    datafusion::logical_expr::when(value_expr(meter).is_not_null(), e)
        .end()
        .expect("a CASE with one branch")
}

/// `e` of the latest event that has a value for the meter: events without one are
/// ordered before every event with one.
fn last_of(meter: &Meter, e: Expr) -> Expr {
    let mut order = vec![value_expr(meter).is_not_null().sort(true, false)];
    order.extend(latest_order());
    last_value(e, order)
}

/// The text of group-by `name` of each event.
fn group_text(meter: &Meter, name: &str) -> Expr {
    match name {
        "subject" | "customer_id" => col(schema::CUSTOMER),
        _ => JsonPath::parse(&meter.group_by[name])
            .map(|p| text_at(&p))
            .unwrap_or_else(|_| lit(ScalarValue::Utf8(None))),
    }
}

/// What the meter reads of each event: its number, its text (`UNIQUE_COUNT`) or 1
/// (`COUNT`).
fn value_expr(meter: &Meter) -> Expr {
    match (meter.aggregation, meter.value_path()) {
        (Aggregation::Count, _) | (_, None) => lit(1.0),
        (Aggregation::UniqueCount, Some(p)) => text_at(&p),
        (_, Some(p)) => number_at(&p),
    }
}

/// The group-bys of `query` but `subject` and `customer_id`, and whether it groups by
/// customer.
fn named_groups(query: &MeterQuery) -> (bool, Vec<&String>) {
    let is_customer = |g: &String| g == "subject" || g == "customer_id";
    (
        query.group_by.iter().any(is_customer),
        query.group_by.iter().filter(|g| !is_customer(g)).collect(),
    )
}

/// The latest event first by event time, then ingest time, then stream sequence.
fn latest_order() -> Vec<datafusion::logical_expr::SortExpr> {
    vec![
        col(schema::EVENT_TIME).sort(true, false),
        col(schema::INGEST_TIME).sort(true, false),
        col(schema::STREAM_SEQ).sort(true, false),
    ]
}

/// Runs `query` of `meter` over the `events` table of `ctx` (the meter must be valid and
/// the query checked). Rows are ordered by window, customer and group-by values.
pub async fn meter_query(
    ctx: &SessionContext,
    meter: &Meter,
    query: &MeterQuery,
) -> Result<Vec<MeterRow>> {
    let filter = events_filter(meter, query, true);
    let value_expr = value_expr(meter);
    let aggregate = match meter.aggregation {
        Aggregation::Sum => sum(value_expr),
        Aggregation::Count => count(lit(1)),
        Aggregation::UniqueCount => count_distinct(value_expr),
        Aggregation::Avg => avg(value_expr),
        Aggregation::Min => min(value_expr),
        Aggregation::Max => max(value_expr),
        Aggregation::Latest => last_of(meter, value_expr),
    };
    let (by_customer, named) = named_groups(query);
    let mut groups = Vec::new();
    if let Some(size) = query.window {
        groups
            .push(window_of(col(schema::EVENT_TIME), size, query.time_zone).alias("window_start"));
    }
    if by_customer {
        groups.push(col(schema::CUSTOMER).alias("customer"));
    }
    for (i, name) in named.iter().enumerate() {
        groups.push(group_text(meter, name).alias(format!("group_{i}")));
    }
    let aggregates = vec![
        aggregate.alias("value"),
        min(where_valued(meter, col(schema::EVENT_TIME))).alias("first_time"),
        max(where_valued(meter, col(schema::EVENT_TIME))).alias("last_time"),
    ];
    let batches = ctx
        .table(schema::EVENTS_TABLE)
        .await?
        .filter(filter)?
        .aggregate(groups, aggregates)?
        .collect()
        .await?;
    answer(&batches, query, query.start(meter), &named)
}

/// `meter_window(time, size, zone)`.
fn window_of(time: Expr, size: WindowSize, zone: Tz) -> Expr {
    ScalarUDF::from(MeterWindow::new()).call(vec![time, lit(size.as_str()), lit(zone.name())])
}

/// A UTC hour in microseconds: the span of a meter rollup's rows.
pub const MICROS_PER_HOUR: i64 = 3_600_000_000;

/// Whether a meter's rollups (per UTC hour) can answer `query`: its range starts and ends
/// on UTC hours, and its windows are hours, days or months of a zone whose offset is whole
/// hours at the range's start (an offset of other times is found by the query itself,
/// [`meter_query_from_rollups`]).
pub fn rollups_can_answer(meter: &Meter, query: &MeterQuery) -> bool {
    let on_hour = |t: DateTime<Utc>| t.timestamp_micros().rem_euclid(MICROS_PER_HOUR) == 0;
    let start = query.start(meter);
    if query.window == Some(WindowSize::Minute)
        || start.is_some_and(|t| !on_hour(t))
        || query.to.is_some_and(|t| !on_hour(t))
    {
        return false;
    }
    let at = start.or(query.to).unwrap_or_else(Utc::now);
    query.window.is_none()
        || query
            .time_zone
            .offset_from_utc_datetime(&at.naive_utc())
            .fix()
            .local_minus_utc()
            % 3600
            == 0
}

/// Whether a meter's closed months (rows per UTC day) can answer `query`, which
/// [`rollups_can_answer`]: its range starts and ends on UTC days and its windows are not
/// hours. (A window of a zone whose days are not UTC's is found by the query itself.)
pub fn days_can_answer(meter: &Meter, query: &MeterQuery) -> bool {
    let on_day = |t: DateTime<Utc>| t.timestamp_micros().rem_euclid(MICROS_PER_DAY) == 0;
    rollups_can_answer(meter, query)
        && query.window != Some(WindowSize::Hour)
        && query.start(meter).is_none_or(on_day)
        && query.to.is_none_or(on_day)
}

/// The last instant of a partial row's span (an hour, or a day of a closed month).
const SPAN_LAST: &str = "span_last";

/// The columns of a partial row: a customer's reading of a meter in one UTC hour or day
/// and group, from a rollup or from events, in the order every source selects them.
fn partial_columns(named: usize, distinct: bool) -> Vec<String> {
    use tally_store::meter_rollup as m;
    let mut out = vec![
        m::HOUR.to_owned(),
        SPAN_LAST.to_owned(),
        m::CUSTOMER.to_owned(),
    ];
    out.extend((0..named).map(|i| format!("group_{i}")));
    for name in [
        m::EVENTS,
        m::SUM,
        m::MIN,
        m::MAX,
        m::LATEST,
        m::LATEST_TIME,
        m::LATEST_INGEST,
        m::LATEST_SEQ,
        m::FIRST_TIME,
        m::LAST_TIME,
    ] {
        out.push(name.to_owned());
    }
    if distinct {
        out.push(m::VALUES.to_owned());
    }
    out
}

/// Rows of a meter's rollups ([`tally_store::meter_rollup`]), each summing the span of
/// `span_micros` from its `hour`: an hour for the meter rollups table's, a day for a
/// closed month's.
pub struct RollupRows {
    pub rows: DataFrame,
    pub span_micros: i64,
}

/// A UTC day in microseconds: the span of a closed month's rows.
pub const MICROS_PER_DAY: i64 = 24 * MICROS_PER_HOUR;

/// Runs `query` of `meter` over the meter's `rollups` and the `events` of the files that
/// have none: the answer [`meter_query`] gives over the whole events table. `None` when a
/// window would split a row's span (a zone's offset not whole hours somewhere in the
/// range, or not whole days for rows of days), which only finer rows can answer. The
/// query must pass [`rollups_can_answer`], and its range must start and end on a span of
/// each of `rollups`.
pub async fn meter_query_from_rollups(
    meter: &Meter,
    query: &MeterQuery,
    rollups: Vec<RollupRows>,
    events: DataFrame,
) -> Result<Option<Vec<MeterRow>>> {
    use tally_store::meter_rollup as m;
    let start = query.start(meter);
    let (by_customer, named) = named_groups(query);
    let distinct = meter.aggregation == Aggregation::UniqueCount;
    let columns = partial_columns(named.len(), distinct);
    let time = || DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let types = |name: &str| -> DataType {
        match name {
            m::HOUR
            | SPAN_LAST
            | m::LATEST_TIME
            | m::LATEST_INGEST
            | m::FIRST_TIME
            | m::LAST_TIME => time(),
            m::EVENTS | m::LATEST_SEQ => DataType::UInt64,
            m::SUM | m::MIN | m::MAX | m::LATEST => DataType::Float64,
            m::VALUES => DataType::List(Arc::new(Field::new_list_field(DataType::Utf8, true))),
            _ => DataType::Utf8,
        }
    };
    let pick = |exprs: Vec<Expr>| -> Vec<Expr> {
        exprs
            .into_iter()
            .zip(&columns)
            .map(|(e, name)| cast_expr(e, types(name)).alias(name))
            .collect()
    };

    // The rollups' rows in the range, of the customers and group-by values asked for.
    let position = |name: &str| meter.group_by.keys().position(|k| k == name);
    let rollup_group = |name: &str| -> Expr {
        match (name, position(name)) {
            ("subject" | "customer_id", _) => col(m::CUSTOMER),
            (_, Some(i)) => datafusion::functions_nested::expr_fn::array_element(
                col(m::GROUPS),
                lit(i as i64 + 1),
            ),
            (_, None) => lit(ScalarValue::Utf8(None)),
        }
    };
    let mut filter = lit(true);
    if let Some(from) = start {
        filter = filter.and(col(m::HOUR).gt_eq(micros(from)));
    }
    if let Some(to) = query.to {
        filter = filter.and(col(m::HOUR).lt(micros(to)));
    }
    if !query.customers.is_empty() {
        filter = filter.and(col(m::CUSTOMER).in_list(
            query.customers.iter().map(|c| lit(c.as_str())).collect(),
            false,
        ));
    }
    for (name, values) in &query.filter_group_by {
        filter = filter.and(
            rollup_group(name).in_list(values.iter().map(|v| lit(v.as_str())).collect(), false),
        );
    }
    // The last microsecond of a span starting at `start`, in integers (an interval's
    // addition goes through the calendar for each row).
    let span_last = |start: Expr, span: i64| {
        cast_expr(cast_expr(start, DataType::Int64) + lit(span - 1), time())
    };
    let mut partial: Option<DataFrame> = None;
    for RollupRows { rows, span_micros } in rollups {
        let mut from_rollups = vec![
            col(m::HOUR),
            span_last(col(m::HOUR), span_micros),
            col(m::CUSTOMER),
        ];
        from_rollups.extend(named.iter().map(|n| rollup_group(n)));
        from_rollups.extend(columns[3 + named.len()..].iter().map(|c| col(c.as_str())));
        let rows = rows.filter(filter.clone())?.select(pick(from_rollups))?;
        partial = Some(match partial {
            Some(p) => p.union(rows)?,
            None => rows,
        });
    }

    // The events of the files without a rollup, summed the same way.
    let value = value_expr(meter);
    let number = if distinct {
        lit(ScalarValue::Float64(None))
    } else {
        value.clone()
    };
    let hour = || window_of(col(schema::EVENT_TIME), WindowSize::Hour, Tz::UTC);
    let mut groups = vec![
        hour().alias(m::HOUR),
        span_last(hour(), MICROS_PER_HOUR).alias(SPAN_LAST),
        col(schema::CUSTOMER).alias(m::CUSTOMER),
    ];
    groups.extend(
        named
            .iter()
            .enumerate()
            .map(|(i, n)| group_text(meter, n).alias(format!("group_{i}"))),
    );
    let valued = |e: Expr| where_valued(meter, e);
    let mut aggregates = vec![
        count(value.clone()).alias(m::EVENTS),
        sum(number.clone()).alias(m::SUM),
        min(number.clone()).alias(m::MIN),
        max(number.clone()).alias(m::MAX),
        last_of(meter, number).alias(m::LATEST),
        max(valued(col(schema::EVENT_TIME))).alias(m::LATEST_TIME),
        last_of(meter, col(schema::INGEST_TIME)).alias(m::LATEST_INGEST),
        last_of(meter, col(schema::STREAM_SEQ)).alias(m::LATEST_SEQ),
        min(valued(col(schema::EVENT_TIME))).alias(m::FIRST_TIME),
        max(valued(col(schema::EVENT_TIME))).alias(m::LAST_TIME),
    ];
    if distinct {
        aggregates.push(
            datafusion::logical_expr::ExprFunctionExt::distinct(
                datafusion::functions_aggregate::expr_fn::array_agg(value),
            )
            .build()?
            .alias(m::VALUES),
        );
    }
    let events = events
        .filter(events_filter(meter, query, false))?
        .aggregate(groups, aggregates)?
        .filter(col(m::EVENTS).gt(lit(0u64)))?
        .select(pick(columns.iter().map(|c| col(c.as_str())).collect()))?;

    // All combined per window, customer and group.
    let mut partial = match partial {
        Some(p) => p.union(events)?,
        None => events,
    };
    if distinct {
        partial = partial.unnest_columns(&[m::VALUES])?;
    }
    let mut groups = Vec::new();
    if let Some(size) = query.window {
        groups.push(window_of(col(m::HOUR), size, query.time_zone).alias("window_start"));
        groups.push(window_of(col(SPAN_LAST), size, query.time_zone).alias("window_last"));
    }
    if by_customer {
        groups.push(col(m::CUSTOMER).alias("customer"));
    }
    groups.extend((0..named.len()).map(|i| col(format!("group_{i}"))));
    let value = match meter.aggregation {
        Aggregation::Sum => sum(col(m::SUM)),
        Aggregation::Count => sum(col(m::EVENTS)),
        Aggregation::UniqueCount => count_distinct(col(m::VALUES)),
        // The sum for now: divided by the events below.
        Aggregation::Avg => sum(col(m::SUM)),
        Aggregation::Min => min(col(m::MIN)),
        Aggregation::Max => max(col(m::MAX)),
        Aggregation::Latest => last_value(
            col(m::LATEST),
            vec![
                col(m::LATEST_TIME).sort(true, false),
                col(m::LATEST_INGEST).sort(true, false),
                col(m::LATEST_SEQ).sort(true, false),
            ],
        ),
    };
    let mut combined = partial.aggregate(
        groups,
        vec![
            value.alias("value"),
            sum(col(m::EVENTS)).alias("events"),
            min(col(m::FIRST_TIME)).alias("first_time"),
            max(col(m::LAST_TIME)).alias("last_time"),
        ],
    )?;
    if meter.aggregation == Aggregation::Avg {
        combined = combined.with_column(
            "value",
            col("value") / cast_expr(col("events"), DataType::Float64),
        )?;
    }
    let batches = combined.collect().await?;
    if query.window.is_some() {
        for batch in &batches {
            let (Some(first), Some(last)) = (
                batch.column_by_name("window_start"),
                batch.column_by_name("window_last"),
            ) else {
                continue;
            };
            if first != last {
                return Ok(None);
            }
        }
    }
    answer(&batches, query, start, &named).map(Some)
}

/// The rows of an aggregated meter query: `value`, `first_time`, `last_time`, and
/// `window_start`, `customer`, `group_<i>` where asked for.
fn answer(
    batches: &[RecordBatch],
    query: &MeterQuery,
    start: Option<DateTime<Utc>>,
    named: &[&String],
) -> Result<Vec<MeterRow>> {
    let mut rows = Vec::new();
    // Each window's end, worked out once.
    let mut ends: HashMap<DateTime<Utc>, DateTime<Utc>> = HashMap::new();
    for batch in batches {
        let value = cast(
            batch.column_by_name("value").expect("value"),
            &DataType::Float64,
        )
        .map_err(arrow_error)?;
        let value = value.as_primitive::<Float64Type>();
        let time = |name: &str| -> Result<ArrayRef> {
            cast(
                batch.column_by_name(name).expect("selected"),
                &DataType::Timestamp(TimeUnit::Microsecond, None),
            )
            .map_err(arrow_error)
        };
        let first = time("first_time")?;
        let last = time("last_time")?;
        let window = match query.window {
            Some(_) => Some(time("window_start")?),
            None => None,
        };
        let text = |name: &str| -> Result<Option<ArrayRef>> {
            Ok(match batch.column_by_name(name) {
                Some(c) => Some(cast(c, &DataType::Utf8).map_err(arrow_error)?),
                None => None,
            })
        };
        let customer = text("customer")?;
        let group_columns: Vec<ArrayRef> = (0..named.len())
            .map(|i| text(&format!("group_{i}")).map(|c| c.expect("grouped")))
            .collect::<Result<_>>()?;
        for row in 0..batch.num_rows() {
            // A group whose events have no value (a `UNIQUE_COUNT` of nothing is 0).
            if value.is_null(row) || first.is_null(row) {
                continue;
            }
            let at = |a: &ArrayRef| {
                let t = a.as_primitive::<TimestampMicrosecondType>().value(row);
                Utc.timestamp_micros(t).single().unwrap_or_default()
            };
            let (window_start, window_end) = match (query.window, &window) {
                (Some(size), Some(w)) => {
                    let s = at(w);
                    let end = *ends
                        .entry(s)
                        .or_insert_with(|| size.end(s, query.time_zone));
                    (s, end)
                }
                _ => whole_range(start, query.to, at(&first), at(&last)),
            };
            let string = |a: &ArrayRef| {
                let s = a.as_string::<i32>();
                (!s.is_null(row)).then(|| s.value(row).to_owned())
            };
            rows.push(MeterRow {
                value: value.value(row),
                window_start,
                window_end,
                customer: customer.as_ref().and_then(string),
                group_by: named
                    .iter()
                    .zip(&group_columns)
                    .map(|(name, c)| ((*name).clone(), string(c)))
                    .collect(),
            });
        }
    }
    Ok(sorted(rows))
}

/// The one window of a query without windows over the range `[start, to)`: its bounds,
/// or the minutes that hold the `first` and the `last` event, as OpenMeter answers.
fn whole_range(
    start: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    first: DateTime<Utc>,
    last: DateTime<Utc>,
) -> (DateTime<Utc>, DateTime<Utc>) {
    let minute = |t| WindowSize::Minute.start(t, Tz::UTC);
    (
        start.unwrap_or_else(|| minute(first)),
        to.unwrap_or_else(|| WindowSize::Minute.end(minute(last), Tz::UTC)),
    )
}

/// The rows by window, customer and groups. The customers are ranked once, so that most
/// comparisons are of integers (an answer has a row per customer and day of a month).
fn sorted(rows: Vec<MeterRow>) -> Vec<MeterRow> {
    let mut customers: Vec<&str> = rows.iter().filter_map(|r| r.customer.as_deref()).collect();
    customers.sort_unstable();
    customers.dedup();
    let rank: HashMap<&str, usize> = customers
        .iter()
        .enumerate()
        .map(|(i, c)| (*c, i + 1))
        .collect();
    let mut order: Vec<(DateTime<Utc>, usize, usize)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let customer = r.customer.as_deref().map_or(0, |c| rank[c]);
            (r.window_start, customer, i)
        })
        .collect();
    // Each row's window, customer and groups are its own: an unstable sort is as exact.
    order.sort_unstable_by(|a, b| {
        (a.0, a.1)
            .cmp(&(b.0, b.1))
            .then_with(|| rows[a.2].group_by.cmp(&rows[b.2].group_by))
    });
    let mut rows: Vec<Option<MeterRow>> = rows.into_iter().map(Some).collect();
    order
        .into_iter()
        .filter_map(|(_, _, i)| rows[i].take())
        .collect()
}

fn arrow_error(e: ArrowError) -> crate::Error {
    crate::Error::DataFusion(e.into())
}

/// The distinct values of `meter`'s group-by `name` over `[from, to)` (OpenMeter's
/// group-by values), sorted; events without one are left out.
pub async fn group_by_values(
    ctx: &SessionContext,
    meter: &Meter,
    name: &str,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<Vec<String>> {
    let query = MeterQuery {
        from,
        to,
        group_by: vec![name.to_owned()],
        ..MeterQuery::default()
    };
    let counted = Meter {
        aggregation: Aggregation::Count,
        value_property: None,
        ..meter.clone()
    };
    let rows = meter_query(ctx, &counted, &query).await?;
    let mut values: Vec<String> = rows
        .into_iter()
        .filter_map(|r| match name {
            "subject" | "customer_id" => r.customer,
            _ => r.group_by.into_values().next().flatten(),
        })
        .collect();
    values.sort();
    values.dedup();
    Ok(values)
}

/// Which events [`list_events`] returns (OpenMeter's `GET /api/v1/events`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilter {
    /// Events whose id contains this.
    pub id: Option<String>,
    /// Events whose customer contains this.
    pub subject: Option<String>,
    /// Events of these customers.
    pub customers: Vec<String>,
    /// Event time from, to (both included).
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// Ingest time from, to (both included).
    pub ingested_from: Option<DateTime<Utc>>,
    pub ingested_to: Option<DateTime<Utc>>,
    /// The most events returned, the latest first.
    pub limit: usize,
}

/// One event as the lake keeps it, with its decision.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub id: String,
    pub source: String,
    pub event_type: String,
    pub customer: String,
    pub time: DateTime<Utc>,
    /// The event's `data`: its own properties, Tally's as it read them (`quantity` when it
    /// is not 1, `feature` when it is not the type, `region`, `user`).
    pub data: serde_json::Map<String, Value>,
    pub decision: String,
    pub ingested_at: DateTime<Utc>,
}

/// The latest events matching `filter` (by event time, then id), at most `filter.limit`.
pub async fn list_events(ctx: &SessionContext, filter: &EventFilter) -> Result<Vec<StoredEvent>> {
    let mut predicate = lit(true);
    let contains = |column: &str, text: &str| {
        datafusion::functions::expr_fn::strpos(col(column), lit(text)).gt(lit(0))
    };
    if let Some(id) = &filter.id {
        predicate = predicate.and(contains(schema::EVENT_ID, id));
    }
    if let Some(subject) = &filter.subject {
        predicate = predicate.and(contains(schema::CUSTOMER, subject));
    }
    if !filter.customers.is_empty() {
        predicate = predicate.and(col(schema::CUSTOMER).in_list(
            filter.customers.iter().map(|c| lit(c.as_str())).collect(),
            false,
        ));
    }
    if let Some(from) = filter.from {
        predicate = predicate
            .and(col(schema::DATE).gt_eq(day(from)))
            .and(col(schema::EVENT_TIME).gt_eq(micros(from)));
    }
    if let Some(to) = filter.to {
        predicate = predicate
            .and(col(schema::DATE).lt_eq(day(to)))
            .and(col(schema::EVENT_TIME).lt_eq(micros(to)));
    }
    if let Some(from) = filter.ingested_from {
        predicate = predicate.and(col(schema::INGEST_TIME).gt_eq(micros(from)));
    }
    if let Some(to) = filter.ingested_to {
        predicate = predicate.and(col(schema::INGEST_TIME).lt_eq(micros(to)));
    }
    let columns = [
        schema::EVENT_ID,
        schema::SOURCE,
        schema::EVENT_TYPE,
        schema::CUSTOMER,
        schema::EVENT_TIME,
        schema::DATA,
        schema::FEATURE,
        schema::QUANTITY,
        schema::REGION,
        schema::USER_ID,
        schema::DECISION,
        schema::INGEST_TIME,
    ];
    let batches = ctx
        .table(schema::EVENTS_TABLE)
        .await?
        .filter(predicate)?
        .select_columns(&columns)?
        .sort(vec![
            col(schema::EVENT_TIME).sort(false, false),
            col(schema::EVENT_ID).sort(false, false),
        ])?
        .limit(0, Some(filter.limit))?
        .collect()
        .await?;
    let mut out = Vec::new();
    for batch in &batches {
        let text = |name: &str| -> Result<ArrayRef> {
            cast(
                batch.column_by_name(name).expect("selected"),
                &DataType::Utf8,
            )
            .map_err(arrow_error)
        };
        let time = |name: &str| -> Result<ArrayRef> {
            cast(
                batch.column_by_name(name).expect("selected"),
                &DataType::Timestamp(TimeUnit::Microsecond, None),
            )
            .map_err(arrow_error)
        };
        let (ids, sources, types, customers) = (
            text(schema::EVENT_ID)?,
            text(schema::SOURCE)?,
            text(schema::EVENT_TYPE)?,
            text(schema::CUSTOMER)?,
        );
        let (data, features, regions, users, decisions) = (
            text(schema::DATA)?,
            text(schema::FEATURE)?,
            text(schema::REGION)?,
            text(schema::USER_ID)?,
            text(schema::DECISION)?,
        );
        let quantities = cast(
            batch.column_by_name(schema::QUANTITY).expect("selected"),
            &DataType::Float64,
        )
        .map_err(arrow_error)?;
        let quantities = quantities.as_primitive::<Float64Type>();
        let (times, ingested) = (time(schema::EVENT_TIME)?, time(schema::INGEST_TIME)?);
        let string = |a: &ArrayRef, row: usize| {
            let s = a.as_string::<i32>();
            (!s.is_null(row)).then(|| s.value(row).to_owned())
        };
        let instant = |a: &ArrayRef, row: usize| {
            let t = a.as_primitive::<TimestampMicrosecondType>().value(row);
            Utc.timestamp_micros(t).single().unwrap_or_default()
        };
        for row in 0..batch.num_rows() {
            let event_type = string(&types, row).unwrap_or_default();
            let mut own: serde_json::Map<String, Value> = string(&data, row)
                .and_then(|d| serde_json::from_str(&d).ok())
                .unwrap_or_default();
            let quantity = quantities.value(row);
            if quantity != 1.0 {
                own.insert("quantity".to_owned(), Value::from(quantity));
            }
            if let Some(feature) = string(&features, row).filter(|f| *f != event_type) {
                own.insert("feature".to_owned(), Value::from(feature));
            }
            if let Some(region) = string(&regions, row) {
                own.insert("region".to_owned(), Value::from(region));
            }
            if let Some(user) = string(&users, row) {
                own.insert("user".to_owned(), Value::from(user));
            }
            out.push(StoredEvent {
                id: string(&ids, row).unwrap_or_default(),
                source: string(&sources, row).unwrap_or_default(),
                event_type,
                customer: string(&customers, row).unwrap_or_default(),
                time: instant(&times, row),
                data: own,
                decision: string(&decisions, row).unwrap_or_default(),
                ingested_at: instant(&ingested, row),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use chrono::Duration as Span;
    use datafusion::arrow::array::{Float64Array, StringArray, UInt16Array, UInt64Array};
    use serde_json::json;
    use tally_core::schema::{decision_codes, lake_schema};
    use tally_core::{Fence, SealedBatch};
    use tally_store::{CompactOptions, Lake, Location};

    use super::*;
    use crate::Lakehouse;

    const T0: &str = "2026-10-31T20:00:00Z";

    fn t0() -> DateTime<Utc> {
        T0.parse().unwrap()
    }

    /// Lake rows of partition 5 with stream sequences `seqs`, an event every 23 minutes
    /// from [`T0`] (across New York's clocks going back): prompts of three customers whose
    /// `data` has tokens (some missing, some not a number), a model (some missing) and a
    /// user; now and then an event of another type, or one refused (read by no meter).
    fn sealed(seqs: std::ops::RangeInclusive<u64>) -> SealedBatch {
        sealed_late(seqs, 0)
    }

    /// [`sealed`], each event dated as the event `late_by` sequences before it.
    fn sealed_late(seqs: std::ops::RangeInclusive<u64>, late_by: u64) -> SealedBatch {
        let seq: Vec<u64> = seqs.clone().collect();
        let n = seq.len();
        let text = |f: &dyn Fn(u64) -> String| -> ArrayRef {
            Arc::new(StringArray::from_iter_values(seq.iter().map(|&i| f(i))))
        };
        let ts = |v: Vec<i64>| -> ArrayRef {
            Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
        };
        let data = |i: u64| {
            let mut d = serde_json::Map::new();
            match i % 9 {
                0 => {}
                1 => {
                    d.insert("tokens".into(), json!("lots"));
                }
                2 => {
                    d.insert("tokens".into(), json!(format!("{}", i % 13)));
                }
                _ => {
                    d.insert("tokens".into(), json!((i * 7) % 31));
                }
            }
            if !i.is_multiple_of(5) {
                d.insert(
                    "model".into(),
                    json!(["gpt-4o", "claude"][(i % 2) as usize]),
                );
            }
            d.insert("user_id".into(), json!(format!("u{}", i % 4)));
            Value::Object(d).to_string()
        };
        let decisions = text(&|i| {
            match i % 11 {
                0 => "limit_reached",
                1 => "overage",
                2 => "metered",
                _ => "accepted",
            }
            .to_owned()
        });
        let codes = decision_codes(decisions.as_string::<i32>());
        let start = t0().timestamp_micros();
        let batch = RecordBatch::try_new(
            lake_schema(),
            vec![
                text(&|i| format!("e{i}")),
                text(&|i| ["ana", "bo", "cy"][(i % 3) as usize].to_owned()),
                text(&|_| "prompt".to_owned()),
                Arc::new(Float64Array::from_iter_values(
                    seq.iter().map(|&i| (i % 3 + 1) as f64),
                )),
                ts(seq
                    .iter()
                    .map(|&i| start + (i - late_by) as i64 * 23 * 60_000_000)
                    .collect()),
                Arc::new(StringArray::from(vec![None::<&str>; n])),
                Arc::new(StringArray::from(vec![None::<&str>; n])),
                text(&|_| "src".to_owned()),
                text(&|i| if i % 17 == 0 { "other" } else { "prompt" }.to_owned()),
                text(&|i| data(i)),
                decisions,
                ts(seq.iter().map(|&i| 1_000 + i as i64).collect()),
                Arc::new(UInt64Array::from(seq.clone())),
                Arc::new(UInt16Array::from(vec![5; n])),
                Arc::new(StringArray::from(vec![None::<&str>; n])),
                Arc::new(codes),
            ],
        )
        .unwrap();
        SealedBatch {
            partition: 5,
            first_seq: *seqs.start(),
            last_seq: *seqs.end(),
            after_seq: None,
            batch,
        }
    }

    fn meter(slug: &str, aggregation: &str, value: Option<&str>, id: u128) -> Meter {
        let mut m = json!({
            "slug": slug, "id": tally_core::meter::ulid_text(id), "eventType": "prompt",
            "aggregation": aggregation, "groupBy": {"model": "$.model", "who": "$.user_id"},
        });
        if let Some(v) = value {
            m["valueProperty"] = json!(v);
        }
        serde_json::from_value(m).unwrap()
    }

    fn queries() -> Vec<(&'static str, MeterQuery)> {
        let tz = |name: &str| name.parse::<Tz>().unwrap();
        let q = MeterQuery::default;
        vec![
            ("everything", q()),
            (
                "by subject",
                MeterQuery {
                    group_by: vec!["subject".into()],
                    ..q()
                },
            ),
            (
                "by hour and model",
                MeterQuery {
                    window: Some(WindowSize::Hour),
                    group_by: vec!["model".into()],
                    ..q()
                },
            ),
            (
                "by New York day, customer and model",
                MeterQuery {
                    window: Some(WindowSize::Day),
                    time_zone: tz("America/New_York"),
                    group_by: vec!["customer_id".into(), "model".into()],
                    ..q()
                },
            ),
            (
                "by month, filtered",
                MeterQuery {
                    window: Some(WindowSize::Month),
                    customers: vec!["ana".into(), "cy".into()],
                    filter_group_by: [("model".to_owned(), vec!["claude".to_owned()])].into(),
                    group_by: vec!["who".into()],
                    ..q()
                },
            ),
            (
                "by UTC day and customer",
                MeterQuery {
                    window: Some(WindowSize::Day),
                    group_by: vec!["customer_id".into()],
                    ..q()
                },
            ),
            (
                "a range of whole days by day and model, of some customers",
                MeterQuery {
                    from: Some("2026-10-31T00:00:00Z".parse().unwrap()),
                    to: Some("2026-11-02T00:00:00Z".parse().unwrap()),
                    window: Some(WindowSize::Day),
                    customers: vec!["ana".into(), "bo".into()],
                    group_by: vec!["model".into(), "subject".into()],
                    ..q()
                },
            ),
            (
                "an hour-aligned range by day",
                MeterQuery {
                    from: Some(t0() + Span::hours(7)),
                    to: Some(t0() + Span::hours(40)),
                    window: Some(WindowSize::Day),
                    ..q()
                },
            ),
            // Not answered from rollups: a range inside hours, minutes, a zone half an
            // hour off UTC.
            (
                "a range inside hours",
                MeterQuery {
                    from: Some(t0() + Span::minutes(90)),
                    group_by: vec!["subject".into()],
                    ..q()
                },
            ),
            (
                "by minute",
                MeterQuery {
                    window: Some(WindowSize::Minute),
                    ..q()
                },
            ),
            (
                "by Kolkata day",
                MeterQuery {
                    window: Some(WindowSize::Day),
                    time_zone: tz("Asia/Kolkata"),
                    ..q()
                },
            ),
        ]
    }

    /// The meter's rollups of `sources`, as the lakehouse reads them.
    fn rollup_rows(
        house: &Lakehouse,
        sources: &tally_store::meter_rollup::MeterSources,
    ) -> Vec<RollupRows> {
        let schema = tally_store::meter_rollup_schema;
        vec![
            RollupRows {
                rows: house.files(&sources.rollups, schema()).unwrap(),
                span_micros: MICROS_PER_HOUR,
            },
            RollupRows {
                rows: house.files(&sources.monthly, schema()).unwrap(),
                span_micros: MICROS_PER_DAY,
            },
        ]
    }

    fn assert_same(got: &[MeterRow], want: &[MeterRow], what: &str) {
        assert!(!want.is_empty(), "{what}: no rows");
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(want) {
            let close = (g.value - w.value).abs() <= 1e-9 * w.value.abs().max(1.0);
            assert!(
                close
                    && (g.window_start, g.window_end, &g.customer, &g.group_by)
                        == (w.window_start, w.window_end, &w.customer, &w.group_by),
                "{what}: {g:?} ≠ {w:?}"
            );
        }
    }

    /// Each meter's answer to each query through the lakehouse equals its answer from
    /// every event; the hourly rollups answer the queries they can, and so do the closed
    /// months' days, but for windows of days that are not UTC's.
    /// Returns the meter queries the closed months answered alone.
    async fn same_answers(house: &Lakehouse, lake: &Lake, meters: &[Meter]) -> Vec<String> {
        let mut folded = Vec::new();
        for m in meters {
            for (what, query) in queries() {
                let want = meter_query(house.context(), m, &query).await.unwrap();
                let key = tally_store::meter_rollup::rollup_key(m);
                let answerable = rollups_can_answer(m, &query);
                assert_eq!(
                    answerable,
                    !["a range inside hours", "by minute", "by Kolkata day"].contains(&what),
                    "{what}"
                );
                assert_eq!(
                    days_can_answer(m, &query),
                    [
                        "everything",
                        "by subject",
                        "by New York day, customer and model",
                        "by month, filtered",
                        "by UTC day and customer",
                        "a range of whole days by day and model, of some customers",
                    ]
                    .contains(&what),
                    "{what}"
                );
                for by_day in [false, true] {
                    if !answerable || (by_day && !days_can_answer(m, &query)) {
                        continue;
                    }
                    let sources = lake.meter_sources(&key, None, by_day).unwrap();
                    let events = house.files(&sources.events, lake_schema()).unwrap();
                    let direct =
                        meter_query_from_rollups(m, &query, rollup_rows(house, &sources), events)
                            .await
                            .unwrap();
                    let splits_days = what.contains("New York") && !sources.monthly.is_empty();
                    match direct {
                        Some(rows) => {
                            assert!(!splits_days, "{} {what}: days answered", m.slug);
                            assert_same(&rows, &want, &format!("{} {what} ({by_day})", m.slug));
                        }
                        None => assert!(splits_days, "{} {what}: rollups did not answer", m.slug),
                    }
                    // The closed months alone, folded without DataFusion.
                    let months_alone = sources.rollups.is_empty() && sources.events.is_empty();
                    if by_day && months_alone && days::can_answer(m) {
                        let read = lake
                            .read_meter_rollups(&sources.monthly, &days::columns(m, &query), |b| {
                                days::fold(m, &query, &b)
                            })
                            .unwrap()
                            .into_iter()
                            .collect::<Result<Option<Vec<_>>>>()
                            .unwrap();
                        match read {
                            Some(folded) => {
                                assert!(!splits_days, "{} {what}: days folded", m.slug);
                                let rows = days::answer(m, &query, &folded);
                                assert_same(&rows, &want, &format!("{} {what} (folded)", m.slug));
                            }
                            None => assert!(splits_days, "{} {what}: days not folded", m.slug),
                        }
                        folded.push(format!("{} {what}", m.slug));
                    }
                }
                let got = house.meter_query(m, &query).await.unwrap();
                assert_same(&got, &want, &format!("{} {what}", m.slug));
            }
        }
        folded
    }

    #[tokio::test]
    async fn meter_rollups_answer_as_the_events_do_before_and_after_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let mut meters: Vec<Meter> = [
            ("prompts", "COUNT", None),
            ("users", "UNIQUE_COUNT", Some("$.user_id")),
            ("tokens_sum", "SUM", Some("$.tokens")),
            ("tokens_avg", "AVG", Some("$.tokens")),
            ("tokens_min", "MIN", Some("$.tokens")),
            ("tokens_max", "MAX", Some("$.tokens")),
            ("tokens_latest", "LATEST", Some("$.tokens")),
            ("quantity", "SUM", Some("$.quantity")),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (slug, aggregation, value))| meter(slug, aggregation, value, i as u128 + 1))
        .collect();
        lake.set_meters(&meters);
        for seqs in [1..=70, 71..=150] {
            lake.write(&sealed(seqs), &Fence::open()).unwrap();
        }
        // A meter defined after those flushes, and one whose group-bys changed: their
        // rollups start with the next flush.
        meters.push(meter("defined_later", "SUM", Some("$.tokens"), 100));
        meters[2].group_by.insert("src".into(), "$.source".into());
        lake.set_meters(&meters);
        lake.write(&sealed(151..=230), &Fence::open()).unwrap();

        let house = Lakehouse::open(&Location::Local(dir.path().into()))
            .await
            .unwrap();
        let key = |m: &Meter| tally_store::meter_rollup::rollup_key(m);
        for m in &meters {
            let sources = lake.meter_sources(&key(m), None, true).unwrap();
            let (rollups, events) = if m.slug == "defined_later" || m.slug == "tokens_sum" {
                (2, 5)
            } else {
                (7, 0)
            };
            assert_eq!(
                (sources.rollups.len(), sources.events.len()),
                (rollups, events),
                "{}: {sources:?}",
                m.slug
            );
        }
        let folded = same_answers(&house, &lake, &meters).await;
        assert!(folded.is_empty(), "{folded:?}");

        // Compaction merges the closed dates; every merged file gets every live meter's
        // rollup, and the files it did not merge get the rollups they lacked. October and
        // November are closed: each meter gets its days of each.
        // Compaction's clock a month after the events (2026-12-02): both months closed.
        let now = SystemTime::from(t0() + Span::days(32));
        let done = lake
            .compact(5, 230, &Fence::open(), &CompactOptions::default(), now)
            .unwrap();
        assert!(done.merged > done.written, "{done:?}");
        for m in &meters {
            let sources = lake.meter_sources(&key(m), None, true).unwrap();
            assert!(
                sources.events.is_empty()
                    && sources.rollups.is_empty()
                    && sources.monthly.len() == 2,
                "{}: {sources:?}",
                m.slug
            );
            let hourly = lake.meter_sources(&key(m), None, false).unwrap();
            assert!(
                hourly.monthly.is_empty() && !hourly.rollups.is_empty(),
                "{hourly:?}"
            );
        }
        // Every days-answerable query of every meter but the `UNIQUE_COUNT` one, the New
        // York days included (found to split days, then answered from the hours).
        let folded = same_answers(&house, &lake, &meters).await;
        assert_eq!(folded.len(), (meters.len() - 1) * 6, "{folded:?}");

        // Late events of October 31 after the months closed: read from their hourly
        // rollup beside October's days until compaction writes October again, merged
        // with the file the days covered.
        lake.write(&sealed_late(231..=240, 231), &Fence::open())
            .unwrap();
        for m in &meters {
            let sources = lake.meter_sources(&key(m), None, true).unwrap();
            assert_eq!(
                (sources.monthly.len(), sources.rollups.len()),
                (2, 1),
                "{}: {sources:?}",
                m.slug
            );
        }
        let folded = same_answers(&house, &lake, &meters).await;
        assert!(folded.is_empty(), "{folded:?}");
        let done = lake
            .compact(5, 240, &Fence::open(), &CompactOptions::default(), now)
            .unwrap();
        assert!(done.merged >= 2, "{done:?}");
        for m in &meters {
            let sources = lake.meter_sources(&key(m), None, true).unwrap();
            assert_eq!(
                (
                    sources.monthly.len(),
                    sources.rollups.len(),
                    sources.events.len()
                ),
                (2, 0, 0),
                "{}: {sources:?}",
                m.slug
            );
        }
        let folded = same_answers(&house, &lake, &meters).await;
        assert_eq!(folded.len(), (meters.len() - 1) * 6, "{folded:?}");
    }
}
