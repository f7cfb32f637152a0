//! How the features are taken up over a range of days (`tally adoption`,
//! `GET /api/v1/adoption`).
//!
//! Usage comes from the lake ([`tally_query::analytics`]); entitlement is
//! [`Definitions::entitled`], the rule the quota engine enforces. Use of a feature means
//! an event decided `accepted` or `overage`: nothing else counts as use.
//!
//! The range is `--from D --to D`, both days included, UTC.
//!
//! - The customers considered are those defined now whose validity overlaps the range;
//!   the features, every feature a plan or an add-on lists, and any other used in the
//!   range (only `--feature` when given).
//! - A customer is *entitled* to a feature when its plan or an add-on it holds has the
//!   feature and it is not `boolean` with `enabled = false`. *Activation rate*: the share
//!   of entitled customers that used the feature in the range. `active_customers` counts
//!   every customer that used it, entitled now or not.
//! - *First use*: a customer's earliest use of the feature in the whole lake; the report
//!   lists the customers whose first use falls in the range, with the time since their
//!   entitlement started: the customer's `valid_from`, or, without one, its first event
//!   in the lake of any feature and any decision but `unknown_customer` and `metered`. The feature's
//!   figure is the median of those hours (the mean of the middle two for an even count).
//! - *Free tier without an advanced feature*: customers whose plan is a free plan
//!   (`free`, or the `--free-plan` ids) that have never used (up to the end of the range)
//!   any of their advanced features. A customer's advanced features are those it is not
//!   entitled to that some plan of the catalogue entitles to: what an upgrade would give.
//!   A customer with none is not listed. `tried` counts its events of those features
//!   refused as `not_entitled` in the range.
//! - *Regions*: events and quantity used per feature × region (null: no region).
//! - *Active users*: distinct users (a customer's `user_id`; events without one are not
//!   counted) per feature per UTC day, ISO week (from Monday) and calendar month, inside
//!   the range (a week or month the range cuts holds only the range's days). DAU, WAU and
//!   MAU are the averages over every day, week and month the range overlaps (one with no
//!   user counts 0), and the last value is that of the day, week or month holding the
//!   range's last day.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDate, NaiveTime, TimeZone, Utc};
use serde::Serialize;
use tally_core::entitlement::Customer;
use tally_query::Lakehouse;
use tally_query::analytics::{ActiveUsers, DateRange, FeatureUse, FirstUse, Grain, RegionUse};
use utoipa::ToSchema;

use crate::render::{Cell, Column, Kind, Report, Section, col};
use crate::{Definitions, Result};

/// The plan id of the free tier unless the request names others.
pub const FREE_PLAN: &str = "free";

/// What to report on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptionRequest {
    pub range: DateRange,
    /// Only this feature.
    pub feature: Option<String>,
    /// The plans whose customers are the free tier.
    pub free_plans: BTreeSet<String>,
}

impl AdoptionRequest {
    /// Every feature over `range`, with [`FREE_PLAN`] as the free tier.
    pub fn new(range: DateRange) -> Self {
        Self {
            range,
            feature: None,
            free_plans: BTreeSet::from([FREE_PLAN.to_owned()]),
        }
    }
}

/// The lake's usage an adoption report is made of.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdoptionUsage {
    /// Use per customer × feature in the range.
    pub used: Vec<FeatureUse>,
    /// First uses in the whole lake up to the range's end.
    pub firsts: Vec<FirstUse>,
    pub regions: Vec<RegionUse>,
    pub users: Vec<ActiveUsers>,
}

/// Adoption over the request's range, from the lake's usage.
pub async fn adoption(
    lake: &Lakehouse,
    defs: &Definitions,
    request: &AdoptionRequest,
) -> Result<AdoptionReport> {
    let (range, feature) = (request.range, request.feature.as_deref());
    let usage = AdoptionUsage {
        used: lake.feature_use(range, feature).await?,
        firsts: lake.first_uses(range.end(), feature).await?,
        regions: lake.region_use(range, feature).await?,
        users: lake.active_users(range, feature).await?,
    };
    Ok(adoption_of(defs, request, usage))
}

/// Adoption over the request's range from its usage.
pub fn adoption_of(
    defs: &Definitions,
    request: &AdoptionRequest,
    usage: AdoptionUsage,
) -> AdoptionReport {
    let range = request.range;
    let AdoptionUsage {
        used,
        firsts,
        regions,
        users,
    } = usage;

    let (start, end) = (at_midnight(range.from()), at_midnight(range.end()));
    let customers: Vec<&Customer> = defs
        .customers
        .values()
        .filter(|c| c.valid_from.is_none_or(|f| f < end) && c.valid_until.is_none_or(|u| u > start))
        .collect();
    let features: BTreeSet<String> = match request.feature.as_deref() {
        Some(f) => BTreeSet::from([f.to_owned()]),
        None => defs
            .features()
            .into_iter()
            .chain(
                used.iter()
                    .filter(|u| u.events > 0)
                    .map(|u| u.feature.clone()),
            )
            .collect(),
    };

    let mut first_uses = Vec::new();
    for f in &firsts {
        let Some(first) = f.first_use.filter(|t| *t >= start && *t < end) else {
            continue;
        };
        let valid_from = defs.customers.get(&f.customer).and_then(|c| c.valid_from);
        let (from, source) = match (valid_from, f.customer_first_event) {
            (Some(v), _) => (v, "valid_from"),
            (None, Some(e)) => (e, "first_event"),
            // A first use is an event of the customer: not reached.
            (None, None) => (first, "first_event"),
        };
        first_uses.push(FirstUseRow {
            feature: f.feature.clone(),
            customer: f.customer.clone(),
            first_use: first,
            entitlement_start: from,
            start_from: source,
            hours: (first - from).num_milliseconds() as f64 / 3_600_000.0,
        });
    }
    first_uses.sort_by(|a, b| (&a.feature, &a.customer).cmp(&(&b.feature, &b.customer)));

    let mut series: BTreeMap<(&str, Grain), BTreeMap<NaiveDate, u64>> = BTreeMap::new();
    for u in &users {
        series
            .entry((u.feature.as_str(), u.grain))
            .or_default()
            .insert(u.bucket, u.users);
    }
    let average_and_last = |feature: &str, grain: Grain| -> (f64, u64) {
        let buckets = grain.buckets(range.from(), range.to());
        let values = series.get(&(feature, grain));
        let at = |b: &NaiveDate| values.and_then(|v| v.get(b)).copied().unwrap_or(0);
        let sum: u64 = buckets.iter().map(at).sum();
        let last = buckets.last().map_or(0, at);
        (sum as f64 / buckets.len().max(1) as f64, last)
    };

    let mut rows = Vec::new();
    for f in &features {
        let entitled: BTreeSet<&str> = customers
            .iter()
            .filter(|c| defs.entitled(c, f))
            .map(|c| c.id.as_str())
            .collect();
        let active: Vec<_> = used
            .iter()
            .filter(|u| u.feature == *f && u.events > 0)
            .collect();
        let activated = active
            .iter()
            .filter(|u| entitled.contains(u.customer.as_str()))
            .count() as u64;
        let mut hours: Vec<f64> = first_uses
            .iter()
            .filter(|r| r.feature == *f)
            .map(|r| r.hours)
            .collect();
        let (dau_avg, dau_last) = average_and_last(f, Grain::Day);
        let (wau_avg, wau_last) = average_and_last(f, Grain::Week);
        let (mau_avg, mau_last) = average_and_last(f, Grain::Month);
        rows.push(FeatureAdoption {
            feature: f.clone(),
            entitled_customers: entitled.len() as u64,
            active_customers: active.len() as u64,
            activated_customers: activated,
            activation_rate: (!entitled.is_empty())
                .then(|| activated as f64 / entitled.len() as f64),
            events: active.iter().map(|u| u.events).sum(),
            // A sum of no floats is -0.0: start from 0.
            quantity: active.iter().fold(0.0, |sum, u| sum + u.quantity),
            first_uses: hours.len() as u64,
            median_hours_to_first_use: median(&mut hours),
            dau_avg,
            dau_last,
            wau_avg,
            wau_last,
            mau_avg,
            mau_last,
        });
    }

    let offered = defs.offered();
    let mut free_tier = Vec::new();
    for c in customers
        .iter()
        .filter(|c| request.free_plans.contains(&c.plan))
    {
        let advanced: Vec<String> = features
            .iter()
            .filter(|f| offered.contains(f.as_str()) && !defs.entitled(c, f))
            .cloned()
            .collect();
        if advanced.is_empty() {
            continue;
        }
        let used_advanced = firsts
            .iter()
            .any(|u| u.customer == c.id && u.first_use.is_some() && advanced.contains(&u.feature));
        if used_advanced {
            continue;
        }
        let mine = || used.iter().filter(|u| u.customer == c.id);
        free_tier.push(FreeTierRow {
            customer: c.id.clone(),
            plan: c.plan.clone(),
            tried: mine()
                .filter(|u| advanced.contains(&u.feature))
                .map(|u| u.not_entitled)
                .sum(),
            events: mine().map(|u| u.events).sum(),
            advanced,
        });
    }

    AdoptionReport {
        from: range.from(),
        to: range.to(),
        features: rows,
        first_uses,
        free_tier,
        regions: regions
            .into_iter()
            .map(|r| RegionRow {
                feature: r.feature,
                region: r.region,
                events: r.events,
                quantity: r.quantity,
            })
            .collect(),
        active_users: users
            .into_iter()
            .map(|u| ActiveUsersRow {
                feature: u.feature,
                grain: u.grain.as_str(),
                bucket: u.bucket,
                users: u.users,
            })
            .collect(),
    }
}

/// The median (the mean of the middle two for an even count); `None` when empty.
fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

fn at_midnight(d: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&d.and_time(NaiveTime::MIN))
}

/// The adoption report of a range.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AdoptionReport {
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub features: Vec<FeatureAdoption>,
    pub first_uses: Vec<FirstUseRow>,
    pub free_tier: Vec<FreeTierRow>,
    pub regions: Vec<RegionRow>,
    pub active_users: Vec<ActiveUsersRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FeatureAdoption {
    pub feature: String,
    pub entitled_customers: u64,
    pub active_customers: u64,
    /// Entitled customers that used the feature in the range.
    pub activated_customers: u64,
    pub activation_rate: Option<f64>,
    pub events: u64,
    pub quantity: f64,
    /// Customers whose first use falls in the range.
    pub first_uses: u64,
    pub median_hours_to_first_use: Option<f64>,
    pub dau_avg: f64,
    pub dau_last: u64,
    pub wau_avg: f64,
    pub wau_last: u64,
    pub mau_avg: f64,
    pub mau_last: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FirstUseRow {
    pub feature: String,
    pub customer: String,
    pub first_use: DateTime<Utc>,
    pub entitlement_start: DateTime<Utc>,
    /// `valid_from` or `first_event`: where `entitlement_start` comes from.
    #[schema(value_type = String)]
    pub start_from: &'static str,
    pub hours: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FreeTierRow {
    pub customer: String,
    pub plan: String,
    /// The features an upgrade would give it.
    pub advanced: Vec<String>,
    /// Its events of those features refused as `not_entitled` in the range.
    pub tried: u64,
    /// Its events of any reported feature used in the range.
    pub events: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct RegionRow {
    pub feature: String,
    pub region: Option<String>,
    pub events: u64,
    pub quantity: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ActiveUsersRow {
    pub feature: String,
    /// `day`, `week` or `month`.
    #[schema(value_type = String)]
    pub grain: &'static str,
    pub bucket: NaiveDate,
    pub users: u64,
}

const FEATURES: &[Column] = &[
    col("feature", Kind::Text),
    col("entitled_customers", Kind::Int),
    col("active_customers", Kind::Int),
    col("activated_customers", Kind::Int),
    col("activation_rate", Kind::Fixed(4)),
    col("events", Kind::Int),
    col("quantity", Kind::Float),
    col("first_uses", Kind::Int),
    col("median_hours_to_first_use", Kind::Fixed(2)),
    col("dau_avg", Kind::Fixed(2)),
    col("dau_last", Kind::Int),
    col("wau_avg", Kind::Fixed(2)),
    col("wau_last", Kind::Int),
    col("mau_avg", Kind::Fixed(2)),
    col("mau_last", Kind::Int),
];

const FIRST_USES: &[Column] = &[
    col("feature", Kind::Text),
    col("customer", Kind::Text),
    col("first_use", Kind::Time),
    col("entitlement_start", Kind::Time),
    col("start_from", Kind::Text),
    col("hours", Kind::Fixed(2)),
];

const FREE_TIER: &[Column] = &[
    col("customer", Kind::Text),
    col("plan", Kind::Text),
    // The features, separated by spaces.
    col("advanced", Kind::Text),
    col("tried", Kind::Int),
    col("events", Kind::Int),
];

const REGIONS: &[Column] = &[
    col("feature", Kind::Text),
    col("region", Kind::Text),
    col("events", Kind::Int),
    col("quantity", Kind::Float),
];

const ACTIVE_USERS: &[Column] = &[
    col("feature", Kind::Text),
    col("grain", Kind::Text),
    col("bucket", Kind::Date),
    col("users", Kind::Int),
];

impl AdoptionReport {
    /// The parts; the distinct users per day, week and month only `with_series`.
    fn parts(&self, with_series: bool) -> Vec<Section> {
        let range = format!("{} to {}", self.from, self.to);
        let mut sections = vec![
            Section {
                name: "features",
                title: format!("{range}: adoption per feature"),
                columns: FEATURES,
                rows: self
                    .features
                    .iter()
                    .map(|f| {
                        vec![
                            Cell::from(f.feature.as_str()),
                            Cell::from(f.entitled_customers),
                            Cell::from(f.active_customers),
                            Cell::from(f.activated_customers),
                            Cell::from(f.activation_rate),
                            Cell::from(f.events),
                            Cell::from(f.quantity),
                            Cell::from(f.first_uses),
                            Cell::from(f.median_hours_to_first_use),
                            Cell::from(f.dau_avg),
                            Cell::from(f.dau_last),
                            Cell::from(f.wau_avg),
                            Cell::from(f.wau_last),
                            Cell::from(f.mau_avg),
                            Cell::from(f.mau_last),
                        ]
                    })
                    .collect(),
            },
            Section {
                name: "first_uses",
                title: format!("{range}: first uses"),
                columns: FIRST_USES,
                rows: self
                    .first_uses
                    .iter()
                    .map(|f| {
                        vec![
                            Cell::from(f.feature.as_str()),
                            Cell::from(f.customer.as_str()),
                            Cell::from(f.first_use),
                            Cell::from(f.entitlement_start),
                            Cell::from(f.start_from),
                            Cell::from(f.hours),
                        ]
                    })
                    .collect(),
            },
            Section {
                name: "free_tier",
                title: format!("{range}: free-tier customers who never used an advanced feature"),
                columns: FREE_TIER,
                rows: self
                    .free_tier
                    .iter()
                    .map(|f| {
                        vec![
                            Cell::from(f.customer.as_str()),
                            Cell::from(f.plan.as_str()),
                            Cell::Text(f.advanced.join(" ")),
                            Cell::from(f.tried),
                            Cell::from(f.events),
                        ]
                    })
                    .collect(),
            },
            Section {
                name: "regions",
                title: format!("{range}: use by region"),
                columns: REGIONS,
                rows: self
                    .regions
                    .iter()
                    .map(|r| {
                        vec![
                            Cell::from(r.feature.as_str()),
                            Cell::from(r.region.clone()),
                            Cell::from(r.events),
                            Cell::from(r.quantity),
                        ]
                    })
                    .collect(),
            },
        ];
        if with_series {
            sections.push(Section {
                name: "active_users",
                title: format!("{range}: distinct users"),
                columns: ACTIVE_USERS,
                rows: self
                    .active_users
                    .iter()
                    .map(|u| {
                        vec![
                            Cell::from(u.feature.as_str()),
                            Cell::from(u.grain),
                            Cell::from(u.bucket),
                            Cell::from(u.users),
                        ]
                    })
                    .collect(),
            });
        }
        sections
    }
}

impl Report for AdoptionReport {
    fn heading(&self) -> Vec<(Column, Cell)> {
        vec![
            (col("from", Kind::Date), Cell::from(self.from)),
            (col("to", Kind::Date), Cell::from(self.to)),
        ]
    }

    fn sections(&self) -> Vec<Section> {
        self.parts(true)
    }

    /// Without the per-day, week and month series of distinct users, which JSON, CSV and
    /// Arrow carry.
    fn for_people(&self) -> Vec<Section> {
        self.parts(false)
    }
}
