//! The analytics queries behind the overage report and adoption: what the lake says, in
//! small structs; the definitions (limits, entitlements, prices) are applied by the
//! binary, which reads them from NATS.
//!
//! Each function runs one file of `queries/` with its parameters (the first day and the
//! day after the last, which prune the hive `date` partitions), except the distinct
//! users, which are counted from the rollups ([`tally_store::users`]). Use of a feature means an
//! event decided `accepted` or `overage` ([`USED`]): the customer got what it asked for.
//! Refusals are kept apart: `limit_reached` in [`Lakehouse::usage_windows`] and
//! [`Lakehouse::limit_rejections`], `not_entitled` in [`Lakehouse::feature_use`]; the
//! other decisions (`expired`, `region_blocked`, `unknown_customer`, `seat_limit`, `late`, `metered`)
//! count nowhere here.

use chrono::{DateTime, Days, NaiveDate, Utc};
use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{
    DataType, Date32Type, Float64Type, Int64Type, TimeUnit, TimestampMicrosecondType,
};
use datafusion::error::DataFusionError;
use datafusion::prelude::{DataFrame, col, lit};
use datafusion::scalar::ScalarValue;

use crate::{Lakehouse, Period, Result, on_lake};

const USAGE_WINDOWS_SQL: &str = include_str!("../queries/usage_windows.sql");
const LIMIT_REJECTIONS_SQL: &str = include_str!("../queries/limit_rejections.sql");
const FEATURE_USE_SQL: &str = include_str!("../queries/feature_use.sql");
const FIRST_USE_SQL: &str = include_str!("../queries/first_use.sql");
const REGION_USE_SQL: &str = include_str!("../queries/region_use.sql");

/// The decisions that mean the customer used the feature.
pub const USED: [&str; 2] = ["accepted", "overage"];

/// Days from `from` to `to`, both included (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateRange {
    from: NaiveDate,
    to: NaiveDate,
}

impl DateRange {
    /// `None` when `to` is before `from`.
    pub fn new(from: NaiveDate, to: NaiveDate) -> Option<DateRange> {
        (from <= to).then_some(DateRange { from, to })
    }

    pub fn from(&self) -> NaiveDate {
        self.from
    }

    /// The last day, included.
    pub fn to(&self) -> NaiveDate {
        self.to
    }

    /// The day after the last: the range is `[from, end)` in time.
    pub fn end(&self) -> NaiveDate {
        self.to + Days::new(1)
    }

    /// Days in the range.
    pub fn days(&self) -> u64 {
        (self.to - self.from).num_days() as u64 + 1
    }
}

/// How finely [`Lakehouse::usage_windows`] splits a period: a metered feature's usage
/// period (`month` and `billing` periods use [`Window::Month`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Window {
    Hour,
    Day,
    Month,
}

impl Window {
    pub const fn as_str(self) -> &'static str {
        match self {
            Window::Hour => "hour",
            Window::Day => "day",
            Window::Month => "month",
        }
    }
}

/// One customer × plan × feature × window of a period.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowUsage {
    pub customer: String,
    /// The plan that decided the events (`None`: none did).
    pub plan: Option<String>,
    pub feature: String,
    /// The window's first instant.
    pub start: DateTime<Utc>,
    /// Events counted: decided `accepted` or `overage`.
    pub events: u64,
    /// Quantity decided `accepted`.
    pub accepted: f64,
    /// Quantity decided `overage` (past a soft limit).
    pub overage: f64,
    /// Events decided `limit_reached` (refused by a hard limit).
    pub refused_events: u64,
    /// Their quantity.
    pub refused: f64,
}

/// Events refused by a hard limit on one UTC day.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejections {
    pub customer: String,
    /// The plan whose limit refused them.
    pub plan: Option<String>,
    pub feature: String,
    pub day: NaiveDate,
    pub events: u64,
    pub quantity: f64,
}

/// One customer's use of one feature in a range.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureUse {
    pub customer: String,
    pub feature: String,
    /// Events used (`accepted` or `overage`); 0 when the customer was only refused.
    pub events: u64,
    pub quantity: f64,
    /// Events refused as `not_entitled`.
    pub not_entitled: u64,
}

/// When a customer first used a feature, and first sent anything.
#[derive(Debug, Clone, PartialEq)]
pub struct FirstUse {
    pub customer: String,
    pub feature: String,
    /// The customer's earliest event of the feature decided `accepted` or `overage`
    /// (`None`: never used, only refused).
    pub first_use: Option<DateTime<Utc>>,
    /// The customer's earliest event of any feature, any decision but
    /// `unknown_customer` and `metered`.
    pub customer_first_event: Option<DateTime<Utc>>,
}

/// Use of a feature from one region (`None`: events that named no region).
#[derive(Debug, Clone, PartialEq)]
pub struct RegionUse {
    pub feature: String,
    pub region: Option<String>,
    pub events: u64,
    pub quantity: f64,
}

pub use tally_store::{ActiveUsers, Grain};

impl Lakehouse {
    /// Counted and refused usage per customer × plan × feature × `window` of `period`,
    /// ordered by customer, plan, feature and window (`queries/usage_windows.sql`).
    pub async fn usage_windows(&self, period: Period, window: Window) -> Result<Vec<WindowUsage>> {
        let df = self
            .ctx
            .sql(USAGE_WINDOWS_SQL)
            .await?
            .with_param_values(vec![
                day(period.first_day()),
                day(period.next().first_day()),
                ScalarValue::from(window.as_str()),
            ])?;
        rows(df, |r| {
            Ok(WindowUsage {
                customer: r.text("customer")?,
                plan: r.optional_text("plan")?,
                feature: r.text("feature")?,
                start: r
                    .time("window_start")?
                    .ok_or_else(|| missing("window_start"))?,
                events: r.count("events")?,
                accepted: r.number("accepted")?,
                overage: r.number("overage")?,
                refused_events: r.count("refused_events")?,
                refused: r.number("refused")?,
            })
        })
        .await
    }

    /// Events refused by hard limits per customer × plan × feature × day of `period`
    /// (`queries/limit_rejections.sql`).
    pub async fn limit_rejections(&self, period: Period) -> Result<Vec<Rejections>> {
        let df = self
            .ctx
            .sql(LIMIT_REJECTIONS_SQL)
            .await?
            .with_param_values(vec![
                day(period.first_day()),
                day(period.next().first_day()),
            ])?;
        rows(df, |r| {
            Ok(Rejections {
                customer: r.text("customer")?,
                plan: r.optional_text("plan")?,
                feature: r.text("feature")?,
                day: r.date("day")?,
                events: r.count("events")?,
                quantity: r.number("quantity")?,
            })
        })
        .await
    }

    /// Use per customer × feature in `range` (only `feature`'s when given), with the
    /// `not_entitled` refusals (`queries/feature_use.sql`, over the rollups).
    pub async fn feature_use(
        &self,
        range: DateRange,
        feature: Option<&str>,
    ) -> Result<Vec<FeatureUse>> {
        self.usage_rows(range.from(), range.to(), FEATURE_USE_SQL, feature, |r| {
            Ok(FeatureUse {
                customer: r.text("customer")?,
                feature: r.text("feature")?,
                events: r.count("events")?,
                quantity: r.number("quantity")?,
                not_entitled: r.count("not_entitled")?,
            })
        })
        .await
    }

    /// Every customer × feature in the lake before `until` (a day, excluded), with the
    /// first use and the customer's first event (`queries/first_use.sql`, over the
    /// rollups, which keep each group's earliest event time). With
    /// `feature`, only its rows; the customer's first event still covers every feature.
    pub async fn first_uses(
        &self,
        until: NaiveDate,
        feature: Option<&str>,
    ) -> Result<Vec<FirstUse>> {
        let lake = self.lake.clone();
        let first = on_lake(move || lake.first_date()).await?;
        let last = until - Days::new(1);
        // An empty lake is an empty range.
        self.usage_rows(first.unwrap_or(until), last, FIRST_USE_SQL, feature, |r| {
            Ok(FirstUse {
                customer: r.text("customer")?,
                feature: r.text("feature")?,
                first_use: r.time("first_use")?,
                customer_first_event: r.time("customer_first_event")?,
            })
        })
        .await
    }

    /// Use per feature × region in `range` (`queries/region_use.sql`, over the rollups).
    pub async fn region_use(
        &self,
        range: DateRange,
        feature: Option<&str>,
    ) -> Result<Vec<RegionUse>> {
        self.usage_rows(range.from(), range.to(), REGION_USE_SQL, feature, |r| {
            Ok(RegionUse {
                feature: r.text("feature")?,
                region: r.optional_text("region")?,
                events: r.count("events")?,
                quantity: r.number("quantity")?,
            })
        })
        .await
    }

    /// Runs a named query over the rollups' usage of the days `from` to `to` (registered
    /// as `usage`), only `feature`'s rows when given, each row turned into a `T`.
    async fn usage_rows<T>(
        &self,
        from: NaiveDate,
        to: NaiveDate,
        sql: &str,
        feature: Option<&str>,
        each: impl FnMut(&Row<'_>) -> Result<T>,
    ) -> Result<Vec<T>> {
        let usage = self.range_usage(from, to).await?;
        self.over(usage, "usage", sql, |df| async move {
            rows(only(df, feature)?, each).await
        })
        .await
    }

    /// Distinct users per feature per day, week and month with any, in `range` (only
    /// `feature`, when given); a bucket without users has no row. Counted from the
    /// rollups, not by a query: see [`tally_store::users`].
    pub async fn active_users(
        &self,
        range: DateRange,
        feature: Option<&str>,
    ) -> Result<Vec<ActiveUsers>> {
        let lake = self.lake.clone();
        let feature = feature.map(str::to_owned);
        let (from, to) = (range.from(), range.to());
        on_lake(move || lake.active_users(from, to, feature.as_deref())).await
    }
}

fn day(d: NaiveDate) -> ScalarValue {
    ScalarValue::from(d.format("%Y-%m-%d").to_string())
}

fn only(df: DataFrame, feature: Option<&str>) -> Result<DataFrame> {
    Ok(match feature {
        Some(f) => df.filter(col("feature").eq(lit(f)))?,
        None => df,
    })
}

fn missing(name: &str) -> DataFusionError {
    DataFusionError::Internal(format!("the query returned a null {name}"))
}

/// Runs `df` and turns each row into a `T`.
async fn rows<T>(df: DataFrame, mut each: impl FnMut(&Row<'_>) -> Result<T>) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for batch in df.collect().await? {
        let cols = Columns::new(&batch);
        for i in 0..batch.num_rows() {
            out.push(each(&Row { cols: &cols, i })?);
        }
    }
    Ok(out)
}

/// A batch's columns, cast on first use to the type a field is read as.
struct Columns<'a> {
    batch: &'a RecordBatch,
    cast: std::cell::RefCell<std::collections::HashMap<String, ArrayRef>>,
}

impl<'a> Columns<'a> {
    fn new(batch: &'a RecordBatch) -> Self {
        Self {
            batch,
            cast: Default::default(),
        }
    }

    fn get(&self, name: &str, to: &DataType) -> Result<ArrayRef> {
        if let Some(a) = self.cast.borrow().get(name) {
            return Ok(a.clone());
        }
        let column = self
            .batch
            .column_by_name(name)
            .ok_or_else(|| DataFusionError::Internal(format!("the query has no column {name}")))?;
        let a = cast(column, to).map_err(DataFusionError::from)?;
        self.cast.borrow_mut().insert(name.to_owned(), a.clone());
        Ok(a)
    }
}

struct Row<'a> {
    cols: &'a Columns<'a>,
    i: usize,
}

impl Row<'_> {
    fn optional_text(&self, name: &str) -> Result<Option<String>> {
        let a = self.cols.get(name, &DataType::Utf8)?;
        let s = a.as_string::<i32>();
        Ok((!s.is_null(self.i)).then(|| s.value(self.i).to_owned()))
    }

    fn text(&self, name: &str) -> Result<String> {
        Ok(self.optional_text(name)?.ok_or_else(|| missing(name))?)
    }

    fn count(&self, name: &str) -> Result<u64> {
        let a = self.cols.get(name, &DataType::Int64)?;
        let v = a.as_primitive::<Int64Type>();
        Ok(if v.is_null(self.i) {
            0
        } else {
            u64::try_from(v.value(self.i)).unwrap_or(0)
        })
    }

    fn number(&self, name: &str) -> Result<f64> {
        let a = self.cols.get(name, &DataType::Float64)?;
        let v = a.as_primitive::<Float64Type>();
        Ok(if v.is_null(self.i) {
            0.0
        } else {
            v.value(self.i)
        })
    }

    fn time(&self, name: &str) -> Result<Option<DateTime<Utc>>> {
        let a = self.cols.get(
            name,
            &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        )?;
        let v = a.as_primitive::<TimestampMicrosecondType>();
        Ok((!v.is_null(self.i))
            .then(|| DateTime::from_timestamp_micros(v.value(self.i)))
            .flatten())
    }

    fn date(&self, name: &str) -> Result<NaiveDate> {
        let a = self.cols.get(name, &DataType::Date32)?;
        let v = a.as_primitive::<Date32Type>();
        if v.is_null(self.i) {
            return Err(missing(name).into());
        }
        Date32Type::to_naive_date_opt(v.value(self.i))
            .ok_or_else(|| DataFusionError::Internal(format!("{name} is out of range")).into())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{
        Float64Array, StringArray, TimestampMicrosecondArray, UInt16Array, UInt64Array,
    };
    use tally_core::schema::{decision_codes, lake_schema};
    use tally_core::{Fence, SealedBatch};
    use tally_store::Lake;

    use super::*;

    /// (customer, plan, feature, quantity, time, region, user, decision)
    type Ev = (
        &'static str,
        Option<&'static str>,
        &'static str,
        f64,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
        &'static str,
    );

    /// A lake holding `events` (one partition, in one batch: the lake splits it by date).
    async fn lake(events: &[Ev]) -> (tempfile::TempDir, Lakehouse) {
        let dir = tempfile::tempdir().unwrap();
        let n = events.len();
        let text = |f: &dyn Fn(&Ev) -> Option<&'static str>| -> ArrayRef {
            Arc::new(StringArray::from(events.iter().map(f).collect::<Vec<_>>()))
        };
        let micros: Vec<i64> = events
            .iter()
            .map(|e| e.4.parse::<DateTime<Utc>>().unwrap().timestamp_micros())
            .collect();
        let ts = |v: Vec<i64>| -> ArrayRef {
            Arc::new(TimestampMicrosecondArray::from(v).with_timezone("UTC"))
        };
        let decisions = StringArray::from_iter_values(events.iter().map(|e| e.7));
        let batch = RecordBatch::try_new(
            lake_schema(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| format!("e{i}")),
                )),
                text(&|e| Some(e.0)),
                text(&|e| Some(e.2)),
                Arc::new(Float64Array::from_iter_values(events.iter().map(|e| e.3))),
                ts(micros.clone()),
                text(&|e| e.5),
                text(&|e| e.6),
                text(&|_| Some("src")),
                text(&|_| Some("usage")),
                text(&|_| None),
                Arc::new(decisions.clone()),
                ts(micros),
                Arc::new(UInt64Array::from_iter_values(1..=n as u64)),
                Arc::new(UInt16Array::from(vec![0; n])),
                text(&|e| e.1),
                Arc::new(decision_codes(&decisions)),
            ],
        )
        .unwrap();
        let sealed = SealedBatch {
            partition: 0,
            first_seq: 1,
            last_seq: n as u64,
            after_seq: None,
            batch,
        };
        Lake::new(dir.path())
            .write(&sealed, &Fence::open())
            .unwrap();
        let house = Lakehouse::open(&tally_store::Location::Local(dir.path().into()))
            .await
            .unwrap();
        (dir, house)
    }

    const FREE: Option<&str> = Some("free");
    const PRO: Option<&str> = Some("pro");

    /// Two customers over two weeks of November 2026 (the 2nd is a Monday) and one
    /// event in October.
    const EVENTS: &[Ev] = &[
        (
            "acme",
            PRO,
            "calls",
            10.0,
            "2026-10-31T23:00:00Z",
            Some("eu"),
            Some("u1"),
            "accepted",
        ),
        (
            "acme",
            PRO,
            "calls",
            6.0,
            "2026-11-02T09:00:00Z",
            Some("eu"),
            Some("u1"),
            "accepted",
        ),
        (
            "acme",
            PRO,
            "calls",
            4.5,
            "2026-11-02T10:30:00Z",
            Some("us"),
            Some("u2"),
            "overage",
        ),
        (
            "acme",
            PRO,
            "calls",
            1.0,
            "2026-11-03T10:00:00Z",
            None,
            None,
            "overage",
        ),
        (
            "acme",
            PRO,
            "export",
            1.0,
            "2026-11-09T08:00:00Z",
            Some("eu"),
            Some("u1"),
            "accepted",
        ),
        (
            "bolt",
            FREE,
            "calls",
            3.0,
            "2026-11-02T12:00:00Z",
            Some("eu"),
            Some("u1"),
            "accepted",
        ),
        (
            "bolt",
            FREE,
            "calls",
            9.0,
            "2026-11-02T13:00:00Z",
            Some("eu"),
            Some("u1"),
            "limit_reached",
        ),
        (
            "bolt",
            FREE,
            "calls",
            2.0,
            "2026-11-04T13:00:00Z",
            Some("eu"),
            Some("u1"),
            "limit_reached",
        ),
        (
            "bolt",
            FREE,
            "export",
            1.0,
            "2026-11-05T13:00:00Z",
            Some("eu"),
            Some("u1"),
            "not_entitled",
        ),
        (
            "bolt",
            FREE,
            "calls",
            1.0,
            "2026-11-10T08:00:00Z",
            Some("eu"),
            Some("u2"),
            "accepted",
        ),
        (
            "bolt",
            FREE,
            "calls",
            1.0,
            "2026-11-11T08:00:00Z",
            Some("eu"),
            Some("u3"),
            "expired",
        ),
        (
            "nobody",
            None,
            "calls",
            1.0,
            "2026-11-01T08:00:00Z",
            None,
            None,
            "unknown_customer",
        ),
    ];

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn date(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn usage_windows_split_counted_and_refused_usage_by_window() {
        let (_dir, house) = lake(EVENTS).await;
        let nov: Period = "2026-11".parse().unwrap();
        let month = house.usage_windows(nov, Window::Month).await.unwrap();
        let got: Vec<(&str, &str, u64, f64, f64, u64, f64)> = month
            .iter()
            .map(|w| {
                assert_eq!(w.start, at("2026-11-01T00:00:00Z"));
                (
                    w.customer.as_str(),
                    w.feature.as_str(),
                    w.events,
                    w.accepted,
                    w.overage,
                    w.refused_events,
                    w.refused,
                )
            })
            .collect();
        // October's event is outside; not_entitled and expired count nowhere.
        assert_eq!(
            got,
            [
                ("acme", "calls", 3, 6.0, 5.5, 0, 0.0),
                ("acme", "export", 1, 1.0, 0.0, 0, 0.0),
                ("bolt", "calls", 2, 4.0, 0.0, 2, 11.0),
            ]
        );
        let days = house.usage_windows(nov, Window::Day).await.unwrap();
        let got: Vec<(&str, DateTime<Utc>, f64, f64)> = days
            .iter()
            .filter(|w| w.feature == "calls")
            .map(|w| {
                (
                    w.customer.as_str(),
                    w.start,
                    w.accepted + w.overage,
                    w.refused,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("acme", at("2026-11-02T00:00:00Z"), 10.5, 0.0),
                ("acme", at("2026-11-03T00:00:00Z"), 1.0, 0.0),
                ("bolt", at("2026-11-02T00:00:00Z"), 3.0, 9.0),
                ("bolt", at("2026-11-04T00:00:00Z"), 0.0, 2.0),
                ("bolt", at("2026-11-10T00:00:00Z"), 1.0, 0.0),
            ]
        );
        assert_eq!(days[0].plan.as_deref(), Some("pro"));
        let hours = house.usage_windows(nov, Window::Hour).await.unwrap();
        assert_eq!(hours[1].start, at("2026-11-02T10:00:00Z"));
        assert_eq!(hours.len(), 8);
    }

    #[tokio::test]
    async fn rejections_are_per_day() {
        let (_dir, house) = lake(EVENTS).await;
        let got = house
            .limit_rejections("2026-11".parse().unwrap())
            .await
            .unwrap();
        let got: Vec<(&str, Option<&str>, NaiveDate, u64, f64)> = got
            .iter()
            .map(|r| {
                (
                    r.customer.as_str(),
                    r.plan.as_deref(),
                    r.day,
                    r.events,
                    r.quantity,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("bolt", FREE, date("2026-11-02"), 1, 9.0),
                ("bolt", FREE, date("2026-11-04"), 1, 2.0),
            ]
        );
    }

    #[tokio::test]
    async fn adoption_queries_count_use_in_the_range() {
        let (_dir, house) = lake(EVENTS).await;
        let range = DateRange::new(date("2026-11-02"), date("2026-11-10")).unwrap();
        assert_eq!((range.days(), range.end()), (9, date("2026-11-11")));

        let used = house.feature_use(range, None).await.unwrap();
        let got: Vec<(&str, &str, u64, f64, u64)> = used
            .iter()
            .map(|u| {
                (
                    u.customer.as_str(),
                    u.feature.as_str(),
                    u.events,
                    u.quantity,
                    u.not_entitled,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("acme", "calls", 3, 11.5, 0),
                ("acme", "export", 1, 1.0, 0),
                ("bolt", "calls", 2, 4.0, 0),
                ("bolt", "export", 0, 0.0, 1),
            ]
        );

        let first = house.first_uses(range.end(), None).await.unwrap();
        type Time = Option<DateTime<Utc>>;
        let got: Vec<(&str, &str, Time, Time)> = first
            .iter()
            .map(|f| {
                (
                    f.customer.as_str(),
                    f.feature.as_str(),
                    f.first_use,
                    f.customer_first_event,
                )
            })
            .collect();
        let (acme0, bolt0) = (
            Some(at("2026-10-31T23:00:00Z")),
            Some(at("2026-11-02T12:00:00Z")),
        );
        assert_eq!(
            got,
            [
                ("acme", "calls", acme0, acme0),
                ("acme", "export", Some(at("2026-11-09T08:00:00Z")), acme0),
                ("bolt", "calls", bolt0, bolt0),
                ("bolt", "export", None, bolt0),
                ("nobody", "calls", None, None),
            ]
        );
        // Filtered by feature, the customer's first event still covers every feature.
        let export = house.first_uses(range.end(), Some("export")).await.unwrap();
        assert_eq!(export.len(), 2);
        assert_eq!(export[0].customer_first_event, acme0);

        let regions = house.region_use(range, Some("calls")).await.unwrap();
        let got: Vec<(Option<&str>, u64, f64)> = regions
            .iter()
            .map(|r| (r.region.as_deref(), r.events, r.quantity))
            .collect();
        assert_eq!(
            got,
            [(Some("eu"), 3, 10.0), (Some("us"), 1, 4.5), (None, 1, 1.0)]
        );

        let users = house.active_users(range, None).await.unwrap();
        let got: Vec<(&str, Grain, NaiveDate, u64)> = users
            .iter()
            .map(|u| (u.feature.as_str(), u.grain, u.bucket, u.users))
            .collect();
        assert_eq!(
            got,
            [
                // acme u1, acme u2 and bolt u1 on the 2nd; bolt u2 on the 10th.
                ("calls", Grain::Day, date("2026-11-02"), 3),
                ("calls", Grain::Day, date("2026-11-10"), 1),
                ("calls", Grain::Week, date("2026-11-02"), 3),
                ("calls", Grain::Week, date("2026-11-09"), 1),
                ("calls", Grain::Month, date("2026-11-01"), 4),
                ("export", Grain::Day, date("2026-11-09"), 1),
                ("export", Grain::Week, date("2026-11-09"), 1),
                ("export", Grain::Month, date("2026-11-01"), 1),
            ]
        );
    }

    #[test]
    fn buckets_cover_the_range() {
        let range = DateRange::new(date("2026-11-04"), date("2026-12-01")).unwrap();
        assert_eq!(Grain::Day.buckets(range.from(), range.to()).len(), 28);
        assert_eq!(
            Grain::Week.buckets(range.from(), range.to()),
            [
                "2026-11-02",
                "2026-11-09",
                "2026-11-16",
                "2026-11-23",
                "2026-11-30"
            ]
            .map(date)
        );
        assert_eq!(
            Grain::Month.buckets(range.from(), range.to()),
            ["2026-11-01", "2026-12-01"].map(date)
        );
        assert!(DateRange::new(date("2026-11-02"), date("2026-11-01")).is_none());
    }
}
