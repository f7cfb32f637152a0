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

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Float64Builder, StringBuilder, TimestampMicrosecondArray,
    TimestampMicrosecondBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type, TimeUnit, TimestampMicrosecondType};
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
use datafusion::prelude::{SessionContext, col, lit};
use datafusion::scalar::ScalarValue;
use serde_json::Value;
use tally_core::Decision;
use tally_core::meter::{Aggregation, JsonPath, Meter, OwnProperty, Tz, WindowSize};
use tally_core::schema;

use crate::Result;

/// The decisions whose events meters read.
pub const METERED: [Decision; 4] = [
    Decision::Accepted,
    Decision::Overage,
    Decision::Late,
    Decision::Metered,
];

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
        let each = data.iter().map(|text| {
            let value: Value = serde_json::from_str(text?).ok()?;
            path.text(&value)
        });
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
        // Consecutive rows often share a window: the last one found is tried first.
        let mut last: Option<(i64, i64)> = None;
        for t in times.iter() {
            let Some(t) = t else {
                out.append_null();
                continue;
            };
            if let Some((start, end)) = last
                && (start..end).contains(&t)
            {
                out.append_value(start);
                continue;
            }
            let at = Utc.timestamp_micros(t).single().unwrap_or_default();
            let start = size.start(at, tz);
            let end = size.end(start, tz);
            last = Some((start.timestamp_micros(), end.timestamp_micros()));
            out.append_value(start.timestamp_micros());
        }
        let out: TimestampMicrosecondArray = out.finish().with_timezone("UTC");
        Ok(ColumnarValue::Array(Arc::new(out)))
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
    fn start(&self, meter: &Meter) -> Option<DateTime<Utc>> {
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

/// Runs `query` of `meter` over the `events` table of `ctx` (the meter must be valid and
/// the query checked). Rows are ordered by window, customer and group-by values.
pub async fn meter_query(
    ctx: &SessionContext,
    meter: &Meter,
    query: &MeterQuery,
) -> Result<Vec<MeterRow>> {
    let mut filter = col(schema::EVENT_TYPE)
        .eq(lit(meter.event_type.as_str()))
        .and(
            col(schema::DECISION).in_list(METERED.iter().map(|d| lit(d.as_str())).collect(), false),
        );
    let start = query.start(meter);
    if let Some(from) = start {
        filter = filter
            .and(col(schema::DATE).gt_eq(day(from)))
            .and(col(schema::EVENT_TIME).gt_eq(micros(from)));
    }
    if let Some(to) = query.to {
        filter = filter
            .and(col(schema::DATE).lt_eq(day(to)))
            .and(col(schema::EVENT_TIME).lt(micros(to)));
    }
    if !query.customers.is_empty() {
        filter = filter.and(col(schema::CUSTOMER).in_list(
            query.customers.iter().map(|c| lit(c.as_str())).collect(),
            false,
        ));
    }
    let group_text = |name: &str| -> Expr {
        match name {
            "subject" | "customer_id" => col(schema::CUSTOMER),
            _ => JsonPath::parse(&meter.group_by[name])
                .map(|p| text_at(&p))
                .unwrap_or_else(|_| lit(ScalarValue::Utf8(None))),
        }
    };
    for (name, values) in &query.filter_group_by {
        filter = filter
            .and(group_text(name).in_list(values.iter().map(|v| lit(v.as_str())).collect(), false));
    }
    let value = meter.value_path();
    let value_expr = match (meter.aggregation, &value) {
        (Aggregation::Count, _) | (_, None) => lit(1.0),
        (Aggregation::UniqueCount, Some(p)) => text_at(p),
        (_, Some(p)) => number_at(p),
    };
    if meter.aggregation != Aggregation::Count {
        filter = filter.and(value_expr.clone().is_not_null());
    }
    let aggregate = match meter.aggregation {
        Aggregation::Sum => sum(value_expr),
        Aggregation::Count => count(lit(1)),
        Aggregation::UniqueCount => count_distinct(value_expr),
        Aggregation::Avg => avg(value_expr),
        Aggregation::Min => min(value_expr),
        Aggregation::Max => max(value_expr),
        Aggregation::Latest => last_value(
            value_expr,
            vec![
                col(schema::EVENT_TIME).sort(true, false),
                col(schema::INGEST_TIME).sort(true, false),
                col(schema::STREAM_SEQ).sort(true, false),
            ],
        ),
    };
    let by_customer = query
        .group_by
        .iter()
        .any(|g| g == "subject" || g == "customer_id");
    let named: Vec<&String> = query
        .group_by
        .iter()
        .filter(|g| g.as_str() != "subject" && g.as_str() != "customer_id")
        .collect();
    let mut groups = Vec::new();
    if let Some(size) = query.window {
        groups.push(
            ScalarUDF::from(MeterWindow::new())
                .call(vec![
                    col(schema::EVENT_TIME),
                    lit(size.as_str()),
                    lit(query.time_zone.name()),
                ])
                .alias("window_start"),
        );
    }
    if by_customer {
        groups.push(col(schema::CUSTOMER).alias("customer"));
    }
    for (i, name) in named.iter().enumerate() {
        groups.push(group_text(name).alias(format!("group_{i}")));
    }
    let aggregates = vec![
        aggregate.alias("value"),
        min(col(schema::EVENT_TIME)).alias("first_time"),
        max(col(schema::EVENT_TIME)).alias("last_time"),
    ];
    let batches = ctx
        .table(schema::EVENTS_TABLE)
        .await?
        .filter(filter)?
        .aggregate(groups, aggregates)?
        .collect()
        .await?;
    let mut rows = Vec::new();
    for batch in &batches {
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
            if value.is_null(row) {
                continue;
            }
            let at = |a: &ArrayRef| {
                let t = a.as_primitive::<TimestampMicrosecondType>().value(row);
                Utc.timestamp_micros(t).single().unwrap_or_default()
            };
            let (window_start, window_end) = match (query.window, &window) {
                (Some(size), Some(w)) => {
                    let s = at(w);
                    (s, size.end(s, query.time_zone))
                }
                // One window over the range: the query's bounds, or the minutes that hold
                // the first and the last event, as OpenMeter answers.
                _ => (
                    start.unwrap_or_else(|| WindowSize::Minute.start(at(&first), Tz::UTC)),
                    query.to.unwrap_or_else(|| {
                        let l = WindowSize::Minute.start(at(&last), Tz::UTC);
                        WindowSize::Minute.end(l, Tz::UTC)
                    }),
                ),
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
    rows.sort_by(|a, b| {
        (a.window_start, &a.customer, &a.group_by).cmp(&(b.window_start, &b.customer, &b.group_by))
    });
    Ok(rows)
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
