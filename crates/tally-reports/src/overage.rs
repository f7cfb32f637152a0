//! The month's upgrade candidates (`tally overage`, `GET /api/v1/overage`).
//!
//! Usage comes from the lake ([`tally_query::analytics`]); a customer's entitlement to a
//! feature is [`Definitions::effective`], the rule the quota engine enforces. Use of a
//! feature means an event decided `accepted` or `overage`.
//!
//! **The overage report** (`tally overage --period YYYY-MM`) has three parts.
//!
//! - *Over the allowance*: each customer × plan × feature of the month (usage under the
//!   plan that decided it, as billing splits it) whose usage went past its allowance.
//!   The allowance is the metered feature's `included` quantity, or its `limit` when it
//!   has none, plus the add-ons' extra quantity: the quantity the plan (and the add-ons
//!   bought) covers per usage period. A feature with neither is never over. Usage is
//!   compared with the allowance in each of the feature's usage periods inside the month
//!   (the month itself for `month` and `billing` periods, each UTC day or hour for `day`
//!   and `hour`): `over` is the sum, over those periods, of the usage past the
//!   allowance, `periods_over` how many went past, and `over_percent` is `over` as a
//!   percentage of the allowance of those periods (`over ÷ (allowance × periods_over)`;
//!   for a monthly feature simply `over ÷ allowance`). `overage` is the quantity the
//!   engine decided `overage` (past a soft limit; an event that did not fit is overage
//!   whole, so it can exceed `over`). What it adds to the bill, with the plan's price for
//!   the feature (`FeaturePrice::rate`, rounded with `round_money` as an invoice line
//!   is): the amount of the whole usage minus the amount of the usage capped at the
//!   allowance, where the capped usage keeps, in each period, the accepted quantity up to
//!   the allowance and then the overage quantity up to what is left of it. A plan with
//!   prices that does not price the feature adds 0; a plan without prices, nothing
//!   (null).
//! - *Rejections*: events decided `limit_reached` per customer × plan × feature × UTC
//!   day, the plan being the one whose hard limit refused them.
//! - *Upgrades*: per customer × plan × feature with rejections, the customer's demand:
//!   the largest, over the feature's usage periods inside the month, of the quantity
//!   counted (accepted or overage, under any plan) plus the quantity refused in that
//!   period. The plan that would have covered it: the feature's `next_plan`, if there
//!   the customer (with the same add-ons) is entitled to the feature and its limit is
//!   absent or at least the demand (a boolean or static feature covers any demand);
//!   otherwise that plan's own `next_plan` for the feature, and so on along the chain
//!   (a plan seen twice, missing, or without the feature ends it); none when nothing
//!   along it covers.
//!

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDate, NaiveTime, TimeZone, Utc};
use serde::Serialize;
use tally_core::entitlement::{Customer, Enforcement, UsagePeriod};
use tally_core::pricing::{self, Decimal};
use tally_query::analytics::{Rejections, Window, WindowUsage};
use tally_query::{Lakehouse, Period};
use utoipa::ToSchema;

use crate::render::{Cell, Column, Kind, Report, Section, col};
use crate::{Definitions, Error, Result};

/// The lake's usage an overage report is made of.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OverageUsage {
    /// Usage per window: the month's always, a finer window's when a feature is measured
    /// in it.
    pub windows: BTreeMap<Window, Vec<WindowUsage>>,
    /// Events refused by hard limits per day.
    pub rejections: Vec<Rejections>,
}

/// The overage report of `period`, from the lake's usage.
pub async fn overage(
    lake: &Lakehouse,
    defs: &Definitions,
    period: Period,
) -> Result<OverageReport> {
    let monthly = lake.usage_windows(period, Window::Month).await?;
    let rejections = lake.limit_rejections(period).await?;
    // The finer windows are read only when a feature involved is measured in them.
    let mut needed = BTreeSet::new();
    for w in &monthly {
        if let Some(plan) = &w.plan
            && let Some(e) = defs.effective(plan, defs.customers.get(&w.customer), &w.feature)
            && let Some(m) = e.metered()
        {
            needed.insert(window_of(m.period));
        }
    }
    let mut windows = BTreeMap::new();
    for window in needed {
        if window != Window::Month {
            windows.insert(window, lake.usage_windows(period, window).await?);
        }
    }
    windows.insert(Window::Month, monthly);
    overage_of(
        defs,
        period,
        OverageUsage {
            windows,
            rejections,
        },
    )
}

/// The overage report of `period` from its usage.
pub fn overage_of(
    defs: &Definitions,
    period: Period,
    usage: OverageUsage,
) -> Result<OverageReport> {
    let OverageUsage {
        windows,
        rejections,
    } = usage;
    let by_line = |window: Window| -> BTreeMap<Key, Vec<&WindowUsage>> {
        let mut m: BTreeMap<Key, Vec<&WindowUsage>> = BTreeMap::new();
        for w in windows.get(&window).into_iter().flatten() {
            m.entry((w.customer.clone(), w.plan.clone(), w.feature.clone()))
                .or_default()
                .push(w);
        }
        m
    };
    let lines: BTreeMap<Window, BTreeMap<Key, Vec<&WindowUsage>>> =
        windows.keys().map(|w| (*w, by_line(*w))).collect();

    let mut over = Vec::new();
    for ((customer, plan, feature), month) in &lines[&Window::Month] {
        let Some(plan) = plan else { continue };
        let c = defs.customers.get(customer);
        let Some(e) = defs.effective(plan, c, feature) else {
            continue;
        };
        let (Some(m), Some(allowance)) = (e.metered(), e.allowance()) else {
            continue;
        };
        let window = window_of(m.period);
        let key = (customer.clone(), Some(plan.clone()), feature.clone());
        let parts = lines
            .get(&window)
            .and_then(|l| l.get(&key))
            .map_or(&[][..], Vec::as_slice);
        let (mut periods_over, mut excess) = (0u64, 0.0);
        let (mut cap_accepted, mut cap_overage) = (0.0, 0.0);
        for w in parts {
            let used = w.accepted + w.overage;
            if used > allowance {
                periods_over += 1;
                excess += used - allowance;
            }
            let accepted = w.accepted.min(allowance);
            cap_accepted += accepted;
            cap_overage += w.overage.min((allowance - accepted).max(0.0));
        }
        if periods_over == 0 {
            continue;
        }
        let accepted: f64 = month.iter().map(|w| w.accepted).sum();
        let overage: f64 = month.iter().map(|w| w.overage).sum();
        let prices = defs.plans[plan].prices.as_ref();
        let currency = prices.map(|p| p.currency.clone());
        let exact = |q: f64| pricing::quantity(q).ok_or(Error::Quantity(q));
        let (amount, within) = match prices {
            None => (None, None),
            Some(p) => match p.features.get(feature) {
                None => (Some(Decimal::ZERO), Some(Decimal::ZERO)),
                Some(price) => {
                    let rated = |a: f64, o: f64| -> Result<Decimal> {
                        Ok(pricing::round_money(
                            price.rate(exact(a)?, exact(o)?).amount,
                            &p.currency,
                        ))
                    };
                    (
                        Some(rated(accepted, overage)?),
                        Some(rated(cap_accepted, cap_overage)?),
                    )
                }
            },
        };
        let money = |d: Option<Decimal>| d.map(|d| pricing::format_money(d, currency.as_deref()));
        over.push(OverLine {
            customer: customer.clone(),
            plan: plan.clone(),
            feature: feature.clone(),
            enforcement: m.enforcement,
            usage_period: m.period,
            quantity: accepted + overage,
            accepted,
            overage,
            limit: e.limit(),
            allowance,
            periods_over,
            over: excess,
            over_percent: (allowance > 0.0)
                .then(|| excess * 100.0 / (allowance * periods_over as f64)),
            currency: currency.clone(),
            amount: money(amount),
            amount_within: money(within),
            added: money(amount.zip(within).map(|(a, w)| a - w)),
        });
    }

    let mut refused: BTreeMap<Key, (u64, f64)> = BTreeMap::new();
    for r in &rejections {
        let e = refused
            .entry((r.customer.clone(), r.plan.clone(), r.feature.clone()))
            .or_default();
        e.0 += r.events;
        e.1 += r.quantity;
    }
    let mut upgrades = Vec::new();
    for ((customer, plan, feature), (refused_events, refused_quantity)) in refused {
        let c = defs.customers.get(&customer);
        let e = plan.as_deref().and_then(|p| defs.effective(p, c, &feature));
        let m = e.as_ref().and_then(|e| e.metered());
        let window = m.map_or(Window::Month, |m| window_of(m.period));
        // Demand per window, every plan of the customer together.
        let mut demand: BTreeMap<DateTime<Utc>, (f64, f64)> = BTreeMap::new();
        for w in windows.get(&window).into_iter().flatten() {
            if w.customer == customer && w.feature == feature {
                let d = demand.entry(w.start).or_default();
                d.0 += w.accepted + w.overage;
                d.1 += w.refused;
            }
        }
        let (peak_period, (peak_counted, peak_refused)) = demand
            .iter()
            .fold(
                None,
                |best: Option<(&DateTime<Utc>, &(f64, f64))>, (t, d)| match best {
                    Some((_, b)) if b.0 + b.1 >= d.0 + d.1 => best,
                    _ => Some((t, d)),
                },
            )
            .map(|(t, d)| (*t, *d))
            .unwrap_or((at_midnight(period.first_day()), (0.0, 0.0)));
        let need = peak_counted + peak_refused;
        let next_plan = m.and_then(|m| m.next_plan.clone());
        let (covered_by, covered_limit) = covering(defs, plan.as_deref(), c, &feature, need);
        upgrades.push(Upgrade {
            customer,
            plan,
            feature,
            usage_period: m.map(|m| m.period),
            limit: e.as_ref().and_then(|e| e.limit()),
            refused_events,
            refused: refused_quantity,
            peak_period,
            peak_counted,
            peak_refused,
            demand: need,
            next_plan,
            covered_by,
            covered_limit,
        });
    }

    Ok(OverageReport {
        period: period.to_string(),
        over,
        rejections: rejections
            .into_iter()
            .map(|r| RejectionDay {
                customer: r.customer,
                plan: r.plan,
                feature: r.feature,
                day: r.day,
                events: r.events,
                quantity: r.quantity,
            })
            .collect(),
        upgrades,
    })
}

/// The first plan along the `next_plan` chain from `plan` under which `customer` would
/// have had `demand` of `feature`, and its limit.
fn covering(
    defs: &Definitions,
    plan: Option<&str>,
    customer: Option<&Customer>,
    feature: &str,
    demand: f64,
) -> (Option<String>, Option<f64>) {
    let Some(plan) = plan else {
        return (None, None);
    };
    let mut seen = BTreeSet::from([plan.to_owned()]);
    let mut next = defs
        .effective(plan, customer, feature)
        .and_then(|e| e.metered().and_then(|m| m.next_plan.clone()));
    while let Some(candidate) = next {
        if !seen.insert(candidate.clone()) {
            break;
        }
        let Some(e) = defs.effective(&candidate, customer, feature) else {
            break;
        };
        if !e.entitles() {
            break;
        }
        match e.metered() {
            None => return (Some(candidate), None),
            Some(_) if e.limit().is_none_or(|l| l >= demand) => {
                return (Some(candidate), e.limit());
            }
            Some(m) => next = m.next_plan.clone(),
        }
    }
    (None, None)
}

type Key = (String, Option<String>, String);

/// The window of the lake a usage period is measured in.
fn window_of(period: UsagePeriod) -> Window {
    match period {
        UsagePeriod::Hour => Window::Hour,
        UsagePeriod::Day => Window::Day,
        UsagePeriod::Month | UsagePeriod::Billing => Window::Month,
    }
}

fn at_midnight(d: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&d.and_time(NaiveTime::MIN))
}

/// The overage report of one month.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct OverageReport {
    pub period: String,
    pub over: Vec<OverLine>,
    pub rejections: Vec<RejectionDay>,
    pub upgrades: Vec<Upgrade>,
}

/// A customer × plan × feature past its allowance.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct OverLine {
    pub customer: String,
    pub plan: String,
    pub feature: String,
    #[schema(value_type = String)]
    pub enforcement: Enforcement,
    #[schema(value_type = String)]
    pub usage_period: UsagePeriod,
    /// Quantity used (accepted and overage) in the month.
    pub quantity: f64,
    pub accepted: f64,
    /// Quantity decided `overage`.
    pub overage: f64,
    /// The limit per usage period, with the add-ons' extra (`None`: unlimited).
    pub limit: Option<f64>,
    /// The allowance per usage period: `included`, else `limit`, with the extra.
    pub allowance: f64,
    pub periods_over: u64,
    pub over: f64,
    pub over_percent: Option<f64>,
    pub currency: Option<String>,
    /// The usage rated, rounded as a bill line.
    pub amount: Option<String>,
    /// The usage capped at the allowance, rated.
    pub amount_within: Option<String>,
    /// `amount − amount_within`: what going past the allowance adds to the bill.
    pub added: Option<String>,
}

/// Events refused by a hard limit on one day.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct RejectionDay {
    pub customer: String,
    pub plan: Option<String>,
    pub feature: String,
    pub day: NaiveDate,
    pub events: u64,
    pub quantity: f64,
}

/// A customer refused by a hard limit, and the plan that would have covered it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Upgrade {
    pub customer: String,
    pub plan: Option<String>,
    pub feature: String,
    #[schema(value_type = Option<String>)]
    pub usage_period: Option<UsagePeriod>,
    /// The limit that refused (with the add-ons' extra).
    pub limit: Option<f64>,
    /// Events and quantity refused in the month.
    pub refused_events: u64,
    pub refused: f64,
    /// The usage period of the highest demand (its first instant).
    pub peak_period: DateTime<Utc>,
    /// Counted and refused quantity in that period, and their sum.
    pub peak_counted: f64,
    pub peak_refused: f64,
    pub demand: f64,
    pub next_plan: Option<String>,
    pub covered_by: Option<String>,
    /// The covering plan's limit (`None`: unlimited, or no such plan).
    pub covered_limit: Option<f64>,
}

const OVER: &[Column] = &[
    col("customer", Kind::Text),
    col("plan", Kind::Text),
    col("feature", Kind::Text),
    col("enforcement", Kind::Text),
    col("usage_period", Kind::Text),
    col("quantity", Kind::Float),
    col("accepted", Kind::Float),
    col("overage", Kind::Float),
    col("limit", Kind::Float),
    col("allowance", Kind::Float),
    col("periods_over", Kind::Int),
    col("over", Kind::Float),
    col("over_percent", Kind::Fixed(2)),
    col("currency", Kind::Text),
    col("amount", Kind::Decimal),
    col("amount_within", Kind::Decimal),
    col("added", Kind::Decimal),
];

const REJECTIONS: &[Column] = &[
    col("customer", Kind::Text),
    col("plan", Kind::Text),
    col("feature", Kind::Text),
    col("day", Kind::Date),
    col("events", Kind::Int),
    col("quantity", Kind::Float),
];

const UPGRADES: &[Column] = &[
    col("customer", Kind::Text),
    col("plan", Kind::Text),
    col("feature", Kind::Text),
    col("limit", Kind::Float),
    col("refused_events", Kind::Int),
    col("refused", Kind::Float),
    col("peak_period", Kind::Time),
    col("peak_counted", Kind::Float),
    col("peak_refused", Kind::Float),
    col("demand", Kind::Float),
    col("next_plan", Kind::Text),
    col("covered_by", Kind::Text),
    col("covered_limit", Kind::Float),
];

/// A serialized enum's name (`soft`, `month`).
fn snake<T: Serialize>(v: &T) -> Cell {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(|s| Cell::Text(s.to_owned())))
        .unwrap_or(Cell::Null)
}

impl Report for OverageReport {
    fn heading(&self) -> Vec<(Column, Cell)> {
        vec![(col("period", Kind::Text), Cell::from(self.period.as_str()))]
    }

    fn sections(&self) -> Vec<Section> {
        let p = &self.period;
        vec![
            Section {
                name: "over",
                title: format!("{p}: past the allowance"),
                columns: OVER,
                rows: self
                    .over
                    .iter()
                    .map(|l| {
                        vec![
                            Cell::from(l.customer.as_str()),
                            Cell::from(l.plan.as_str()),
                            Cell::from(l.feature.as_str()),
                            snake(&l.enforcement),
                            snake(&l.usage_period),
                            Cell::from(l.quantity),
                            Cell::from(l.accepted),
                            Cell::from(l.overage),
                            Cell::from(l.limit),
                            Cell::from(l.allowance),
                            Cell::from(l.periods_over),
                            Cell::from(l.over),
                            Cell::from(l.over_percent),
                            Cell::from(l.currency.clone()),
                            Cell::from(l.amount.clone()),
                            Cell::from(l.amount_within.clone()),
                            Cell::from(l.added.clone()),
                        ]
                    })
                    .collect(),
            },
            Section {
                name: "rejections",
                title: format!("{p}: refused by hard limits, per day"),
                columns: REJECTIONS,
                rows: self
                    .rejections
                    .iter()
                    .map(|x| {
                        vec![
                            Cell::from(x.customer.as_str()),
                            Cell::from(x.plan.clone()),
                            Cell::from(x.feature.as_str()),
                            Cell::from(x.day),
                            Cell::from(x.events),
                            Cell::from(x.quantity),
                        ]
                    })
                    .collect(),
            },
            Section {
                name: "upgrades",
                title: format!("{p}: the plan that would have covered them"),
                columns: UPGRADES,
                rows: self
                    .upgrades
                    .iter()
                    .map(|u| {
                        vec![
                            Cell::from(u.customer.as_str()),
                            Cell::from(u.plan.clone()),
                            Cell::from(u.feature.as_str()),
                            Cell::from(u.limit),
                            Cell::from(u.refused_events),
                            Cell::from(u.refused),
                            Cell::from(u.peak_period),
                            Cell::from(u.peak_counted),
                            Cell::from(u.peak_refused),
                            Cell::from(u.demand),
                            Cell::from(u.next_plan.clone()),
                            Cell::from(u.covered_by.clone()),
                            Cell::from(u.covered_limit),
                        ]
                    })
                    .collect(),
            },
        ]
    }
}
