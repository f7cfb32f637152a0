//! `tally overage` and `tally adoption`: the upgrade candidates of a month, and how the
//! features are taken up over a range of days.
//!
//! The usage comes from the lake (`tally_query::analytics`); the plans, add-ons and
//! customers from the key-value buckets as they are now, read as `tally billing` reads
//! them. Use of a feature means an event decided `accepted` or `overage`: nothing else
//! counts as use (refusals are reported apart where they matter).
//!
//! **A customer's entitlement to a feature** is computed as the quota engine computes
//! it: the plan's entitlement, replaced by that of an add-on the customer holds that
//! defines the feature; a metered feature's limit is raised by each held add-on's
//! `extra` for it times the units held. A plan that does not exist entitles to nothing.
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
//! **Adoption** (`tally adoption --from D --to D`, both days included, UTC).
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
//!   in the lake of any feature and any decision but `unknown_customer`. The feature's
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
use std::io::Write;

use anyhow::Context as _;
use chrono::{DateTime, NaiveDate, NaiveTime, TimeZone, Utc};
use clap::Args;
use serde::Serialize;
use tally_core::entitlement::{AddOn, Customer, Enforcement, Entitlement, Plan, UsagePeriod};
use tally_core::pricing::{self, Decimal};
use tally_ingest::definitions::{Definitions, Snapshot};
use tally_query::analytics::{DateRange, Grain, Window, WindowUsage};
use tally_query::{Lakehouse, Period};

use crate::config::Config;
use crate::output::{ReportFormat, sections_to_arrow};
use crate::pipeline::Nats;

/// The plan id of the free tier unless `--free-plan` names others.
pub const FREE_PLAN: &str = "free";

#[derive(Debug, Args)]
pub struct OverageArgs {
    /// The month, YYYY-MM.
    #[arg(long)]
    pub period: String,
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

#[derive(Debug, Args)]
pub struct AdoptionArgs {
    /// First day of the range, YYYY-MM-DD (UTC).
    #[arg(long)]
    pub from: NaiveDate,
    /// Last day of the range, YYYY-MM-DD (UTC), included.
    #[arg(long)]
    pub to: NaiveDate,
    /// Only this feature.
    #[arg(long)]
    pub feature: Option<String>,
    /// A plan whose customers are the free tier (repeat for several).
    #[arg(long = "free-plan", default_values_t = [FREE_PLAN.to_owned()])]
    pub free_plans: Vec<String>,
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}

/// `tally overage`: computes the report and prints it.
pub async fn run_overage(config: &Config, args: OverageArgs) -> anyhow::Result<()> {
    let period: Period = args.period.parse()?;
    let report = overage(config, period).await?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    write_overage(&mut out, &report, args.format)?;
    out.flush()?;
    Ok(())
}

/// `tally adoption`: computes the report and prints it.
pub async fn run_adoption(config: &Config, args: AdoptionArgs) -> anyhow::Result<()> {
    let range = DateRange::new(args.from, args.to)
        .with_context(|| format!("--to {} is before --from {}", args.to, args.from))?;
    let free: BTreeSet<String> = args.free_plans.into_iter().collect();
    let report = adoption(config, range, args.feature.as_deref(), &free).await?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    write_adoption(&mut out, &report, args.format)?;
    out.flush()?;
    Ok(())
}

/// The definitions as they are now, by id.
pub(crate) struct Defs {
    pub(crate) plans: BTreeMap<String, Plan>,
    pub(crate) addons: BTreeMap<String, AddOn>,
    pub(crate) customers: BTreeMap<String, Customer>,
}

pub(crate) async fn definitions(config: &Config) -> anyhow::Result<Defs> {
    let nats = Nats::connect(config).await?;
    let Snapshot {
        plans,
        addons,
        customers,
        ..
    } = Definitions::open(&nats.jetstream)
        .await?
        .load()
        .await
        .context("reading the plans and customers")?;
    Ok(Defs {
        plans: plans.into_iter().map(|p| (p.id.clone(), p)).collect(),
        addons: addons.into_iter().map(|a| (a.id.clone(), a)).collect(),
        customers: customers.into_iter().map(|c| (c.id.clone(), c)).collect(),
    })
}

/// A customer's entitlement to one feature under one plan.
struct Effective<'a> {
    entitlement: &'a Entitlement,
    /// A metered feature's limit with the add-ons' extra (`None`: unlimited or not
    /// metered).
    limit: Option<f64>,
    /// A metered feature's allowance: `included`, else `limit`, plus the add-ons' extra.
    allowance: Option<f64>,
}

impl Effective<'_> {
    fn metered(&self) -> Option<&tally_core::entitlement::Metered> {
        match self.entitlement {
            Entitlement::Metered(m) => Some(m),
            _ => None,
        }
    }

    fn entitles(&self) -> bool {
        !matches!(self.entitlement, Entitlement::Boolean { enabled: false })
    }
}

impl Defs {
    /// `feature` for `customer` (its add-ons; none when undefined) on `plan`, as the quota
    /// engine compiles it; `None`: the plan lacks it (or does not exist).
    fn effective<'a>(
        &'a self,
        plan: &str,
        customer: Option<&Customer>,
        feature: &str,
    ) -> Option<Effective<'a>> {
        let plan = self.plans.get(plan)?;
        let held: Vec<(&AddOn, u32)> = customer
            .map(|c| {
                c.addons
                    .iter()
                    .filter_map(|r| self.addons.get(&r.id).map(|a| (a, r.quantity)))
                    .collect()
            })
            .unwrap_or_default();
        let mut entitlement = plan.features.get(feature);
        for (addon, _) in &held {
            if let Some(e) = addon.features.get(feature) {
                entitlement = Some(e);
            }
        }
        let entitlement = entitlement?;
        let (limit, allowance) = match entitlement {
            Entitlement::Metered(m) => {
                let extra: f64 = held
                    .iter()
                    .filter_map(|(a, units)| a.extra.get(feature).map(|x| x * f64::from(*units)))
                    .sum();
                (
                    m.limit.map(|l| l + extra),
                    m.included.or(m.limit).map(|q| q + extra),
                )
            }
            _ => (None, None),
        };
        Some(Effective {
            entitlement,
            limit,
            allowance,
        })
    }

    fn entitled(&self, customer: &Customer, feature: &str) -> bool {
        self.effective(&customer.plan, Some(customer), feature)
            .is_some_and(|e| e.entitles())
    }

    /// Every feature a plan or an add-on lists.
    fn features(&self) -> BTreeSet<String> {
        let plans = self.plans.values().flat_map(|p| p.features.keys());
        let addons = self.addons.values().flat_map(|a| a.features.keys());
        plans.chain(addons).cloned().collect()
    }

    /// Features some plan entitles to.
    fn offered(&self) -> BTreeSet<&str> {
        self.plans
            .values()
            .flat_map(|p| p.features.iter())
            .filter(|(_, e)| !matches!(e, Entitlement::Boolean { enabled: false }))
            .map(|(f, _)| f.as_str())
            .collect()
    }
}

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
#[derive(Debug, Serialize)]
pub struct OverageReport {
    pub period: String,
    pub over: Vec<OverLine>,
    pub rejections: Vec<RejectionDay>,
    pub upgrades: Vec<Upgrade>,
}

/// A customer × plan × feature past its allowance.
#[derive(Debug, Serialize)]
pub struct OverLine {
    pub customer: String,
    pub plan: String,
    pub feature: String,
    pub enforcement: Enforcement,
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
#[derive(Debug, Serialize)]
pub struct RejectionDay {
    pub customer: String,
    pub plan: Option<String>,
    pub feature: String,
    pub day: NaiveDate,
    pub events: u64,
    pub quantity: f64,
}

/// A customer refused by a hard limit, and the plan that would have covered it.
#[derive(Debug, Serialize)]
pub struct Upgrade {
    pub customer: String,
    pub plan: Option<String>,
    pub feature: String,
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

type Key = (String, Option<String>, String);

/// Computes the overage report of `period`.
pub async fn overage(config: &Config, period: Period) -> anyhow::Result<OverageReport> {
    let lake = Lakehouse::open(&config.lake_dir()).await?;
    let defs = definitions(config).await?;
    let mut windows: BTreeMap<Window, Vec<WindowUsage>> = BTreeMap::new();
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
    for window in needed {
        if window != Window::Month {
            windows.insert(window, lake.usage_windows(period, window).await?);
        }
    }
    windows.insert(Window::Month, monthly);
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
        let (Some(m), Some(allowance)) = (e.metered(), e.allowance) else {
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
        let exact = |q: f64| pricing::quantity(q).with_context(|| format!("quantity {q}"));
        let (amount, within) = match prices {
            None => (None, None),
            Some(p) => match p.features.get(feature) {
                None => (Some(Decimal::ZERO), Some(Decimal::ZERO)),
                Some(price) => {
                    let rated = |a: f64, o: f64| -> anyhow::Result<Decimal> {
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
            limit: e.limit,
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
        let (covered_by, covered_limit) = covering(&defs, plan.as_deref(), c, &feature, need);
        upgrades.push(Upgrade {
            customer,
            plan,
            feature,
            usage_period: m.map(|m| m.period),
            limit: e.as_ref().and_then(|e| e.limit),
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
    defs: &Defs,
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
            Some(_) if e.limit.is_none_or(|l| l >= demand) => return (Some(candidate), e.limit),
            Some(m) => next = m.next_plan.clone(),
        }
    }
    (None, None)
}

/// The adoption report of a range.
#[derive(Debug, Serialize)]
pub struct AdoptionReport {
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub features: Vec<FeatureAdoption>,
    pub first_uses: Vec<FirstUseRow>,
    pub free_tier: Vec<FreeTierRow>,
    pub regions: Vec<RegionRow>,
    pub active_users: Vec<ActiveUsersRow>,
}

#[derive(Debug, Serialize)]
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

#[derive(Debug, Serialize)]
pub struct FirstUseRow {
    pub feature: String,
    pub customer: String,
    pub first_use: DateTime<Utc>,
    pub entitlement_start: DateTime<Utc>,
    /// `valid_from` or `first_event`: where `entitlement_start` comes from.
    pub start_from: &'static str,
    pub hours: f64,
}

#[derive(Debug, Serialize)]
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

#[derive(Debug, Serialize)]
pub struct RegionRow {
    pub feature: String,
    pub region: Option<String>,
    pub events: u64,
    pub quantity: f64,
}

#[derive(Debug, Serialize)]
pub struct ActiveUsersRow {
    pub feature: String,
    pub grain: &'static str,
    pub bucket: NaiveDate,
    pub users: u64,
}

/// Computes adoption over `range` (only `feature` when given); `free` names the free
/// tier's plans.
pub async fn adoption(
    config: &Config,
    range: DateRange,
    feature: Option<&str>,
    free: &BTreeSet<String>,
) -> anyhow::Result<AdoptionReport> {
    let lake = Lakehouse::open(&config.lake_dir()).await?;
    let used = lake.feature_use(range, feature).await?;
    let firsts = lake.first_uses(range.end(), feature).await?;
    let regions = lake.region_use(range, feature).await?;
    let users = lake.active_users(range, feature).await?;
    let defs = definitions(config).await?;

    let (start, end) = (at_midnight(range.from()), at_midnight(range.end()));
    let customers: Vec<&Customer> = defs
        .customers
        .values()
        .filter(|c| c.valid_from.is_none_or(|f| f < end) && c.valid_until.is_none_or(|u| u > start))
        .collect();
    let features: BTreeSet<String> = match feature {
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
            quantity: active.iter().map(|u| u.quantity).sum(),
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
    for c in customers.iter().filter(|c| free.contains(&c.plan)) {
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

    Ok(AdoptionReport {
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
    })
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

/// One part of a report as text: a title, column names and rows of cells.
struct Section {
    name: &'static str,
    title: String,
    columns: &'static [&'static str],
    rows: Vec<Vec<String>>,
}

fn num(v: f64) -> String {
    v.to_string()
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn fixed2(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}")).unwrap_or_default()
}

fn snake<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn overage_sections(r: &OverageReport) -> Vec<Section> {
    vec![
        Section {
            name: "over",
            title: format!("{}: past the allowance", r.period),
            columns: &[
                "customer",
                "plan",
                "feature",
                "enforcement",
                "usage_period",
                "quantity",
                "accepted",
                "overage",
                "limit",
                "allowance",
                "periods_over",
                "over",
                "over_percent",
                "currency",
                "amount",
                "amount_within",
                "added",
            ],
            rows: r
                .over
                .iter()
                .map(|l| {
                    vec![
                        l.customer.clone(),
                        l.plan.clone(),
                        l.feature.clone(),
                        snake(&l.enforcement),
                        snake(&l.usage_period),
                        num(l.quantity),
                        num(l.accepted),
                        num(l.overage),
                        opt(l.limit),
                        num(l.allowance),
                        l.periods_over.to_string(),
                        num(l.over),
                        fixed2(l.over_percent),
                        opt(l.currency.as_deref()),
                        opt(l.amount.as_deref()),
                        opt(l.amount_within.as_deref()),
                        opt(l.added.as_deref()),
                    ]
                })
                .collect(),
        },
        Section {
            name: "rejections",
            title: format!("{}: refused by hard limits, per day", r.period),
            columns: &["customer", "plan", "feature", "day", "events", "quantity"],
            rows: r
                .rejections
                .iter()
                .map(|x| {
                    vec![
                        x.customer.clone(),
                        opt(x.plan.as_deref()),
                        x.feature.clone(),
                        x.day.to_string(),
                        x.events.to_string(),
                        num(x.quantity),
                    ]
                })
                .collect(),
        },
        Section {
            name: "upgrades",
            title: format!("{}: the plan that would have covered them", r.period),
            columns: &[
                "customer",
                "plan",
                "feature",
                "limit",
                "refused_events",
                "refused",
                "peak_period",
                "peak_counted",
                "peak_refused",
                "demand",
                "next_plan",
                "covered_by",
                "covered_limit",
            ],
            rows: r
                .upgrades
                .iter()
                .map(|u| {
                    vec![
                        u.customer.clone(),
                        opt(u.plan.as_deref()),
                        u.feature.clone(),
                        opt(u.limit),
                        u.refused_events.to_string(),
                        num(u.refused),
                        u.peak_period
                            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        num(u.peak_counted),
                        num(u.peak_refused),
                        num(u.demand),
                        opt(u.next_plan.as_deref()),
                        opt(u.covered_by.as_deref()),
                        opt(u.covered_limit),
                    ]
                })
                .collect(),
        },
    ]
}

fn adoption_sections(r: &AdoptionReport, with_series: bool) -> Vec<Section> {
    let range = format!("{} to {}", r.from, r.to);
    let time = |t: &DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut sections = vec![
        Section {
            name: "features",
            title: format!("{range}: adoption per feature"),
            columns: &[
                "feature",
                "entitled_customers",
                "active_customers",
                "activated_customers",
                "activation_rate",
                "events",
                "quantity",
                "first_uses",
                "median_hours_to_first_use",
                "dau_avg",
                "dau_last",
                "wau_avg",
                "wau_last",
                "mau_avg",
                "mau_last",
            ],
            rows: r
                .features
                .iter()
                .map(|f| {
                    vec![
                        f.feature.clone(),
                        f.entitled_customers.to_string(),
                        f.active_customers.to_string(),
                        f.activated_customers.to_string(),
                        opt(f.activation_rate.map(|v| format!("{v:.4}"))),
                        f.events.to_string(),
                        num(f.quantity),
                        f.first_uses.to_string(),
                        fixed2(f.median_hours_to_first_use),
                        format!("{:.2}", f.dau_avg),
                        f.dau_last.to_string(),
                        format!("{:.2}", f.wau_avg),
                        f.wau_last.to_string(),
                        format!("{:.2}", f.mau_avg),
                        f.mau_last.to_string(),
                    ]
                })
                .collect(),
        },
        Section {
            name: "first_uses",
            title: format!("{range}: first uses"),
            columns: &[
                "feature",
                "customer",
                "first_use",
                "entitlement_start",
                "start_from",
                "hours",
            ],
            rows: r
                .first_uses
                .iter()
                .map(|f| {
                    vec![
                        f.feature.clone(),
                        f.customer.clone(),
                        time(&f.first_use),
                        time(&f.entitlement_start),
                        f.start_from.to_owned(),
                        format!("{:.2}", f.hours),
                    ]
                })
                .collect(),
        },
        Section {
            name: "free_tier",
            title: format!("{range}: free-tier customers who never used an advanced feature"),
            columns: &["customer", "plan", "advanced", "tried", "events"],
            rows: r
                .free_tier
                .iter()
                .map(|f| {
                    vec![
                        f.customer.clone(),
                        f.plan.clone(),
                        f.advanced.join(" "),
                        f.tried.to_string(),
                        f.events.to_string(),
                    ]
                })
                .collect(),
        },
        Section {
            name: "regions",
            title: format!("{range}: use by region"),
            columns: &["feature", "region", "events", "quantity"],
            rows: r
                .regions
                .iter()
                .map(|x| {
                    vec![
                        x.feature.clone(),
                        opt(x.region.as_deref()),
                        x.events.to_string(),
                        num(x.quantity),
                    ]
                })
                .collect(),
        },
    ];
    if with_series {
        sections.push(Section {
            name: "active_users",
            title: format!("{range}: distinct users"),
            columns: &["feature", "grain", "bucket", "users"],
            rows: r
                .active_users
                .iter()
                .map(|u| {
                    vec![
                        u.feature.clone(),
                        u.grain.to_owned(),
                        u.bucket.to_string(),
                        u.users.to_string(),
                    ]
                })
                .collect(),
        });
    }
    sections
}

/// Prints the overage report: tables, one JSON object, CSV (one table per part, each
/// with a header whose first column is `section`, separated by a blank line), or Arrow
/// ([`sections_to_arrow`]: one table of every part's rows).
pub fn write_overage(
    out: &mut dyn Write,
    r: &OverageReport,
    format: ReportFormat,
) -> anyhow::Result<()> {
    match format {
        ReportFormat::Json => {
            serde_json::to_writer(&mut *out, r)?;
            writeln!(out)?;
        }
        ReportFormat::Csv => write_csv(out, &overage_sections(r))?,
        ReportFormat::Table => write_tables(out, &overage_sections(r))?,
        ReportFormat::Arrow => out.write_all(&sections_to_arrow(r)?)?,
    }
    Ok(())
}

/// Prints the adoption report: tables (without the per-day, week and month series of
/// distinct users, which JSON, CSV and Arrow carry), one JSON object, or CSV and Arrow as
/// [`write_overage`] writes them.
pub fn write_adoption(
    out: &mut dyn Write,
    r: &AdoptionReport,
    format: ReportFormat,
) -> anyhow::Result<()> {
    match format {
        ReportFormat::Json => {
            serde_json::to_writer(&mut *out, r)?;
            writeln!(out)?;
        }
        ReportFormat::Csv => write_csv(out, &adoption_sections(r, true))?,
        ReportFormat::Table => write_tables(out, &adoption_sections(r, false))?,
        ReportFormat::Arrow => out.write_all(&sections_to_arrow(r)?)?,
    }
    Ok(())
}

fn write_csv(out: &mut dyn Write, sections: &[Section]) -> std::io::Result<()> {
    for (i, s) in sections.iter().enumerate() {
        if i > 0 {
            writeln!(out)?;
        }
        let header: Vec<String> = std::iter::once("section")
            .chain(s.columns.iter().copied())
            .map(csv)
            .collect();
        writeln!(out, "{}", header.join(","))?;
        for row in &s.rows {
            let cells: Vec<String> = std::iter::once(s.name)
                .chain(row.iter().map(String::as_str))
                .map(csv)
                .collect();
            writeln!(out, "{}", cells.join(","))?;
        }
    }
    Ok(())
}

/// A CSV field, quoted when it must be.
fn csv(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Aligned tables; numbers to the right.
fn write_tables(out: &mut dyn Write, sections: &[Section]) -> std::io::Result<()> {
    for (i, s) in sections.iter().enumerate() {
        if i > 0 {
            writeln!(out)?;
        }
        writeln!(out, "{}", s.title)?;
        if s.rows.is_empty() {
            writeln!(out, "  (none)")?;
            continue;
        }
        let width = |c: usize| {
            s.rows
                .iter()
                .map(|r| r[c].chars().count())
                .chain([s.columns[c].chars().count()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..s.columns.len()).map(width).collect();
        let numeric: Vec<bool> = (0..s.columns.len())
            .map(|c| {
                s.rows
                    .iter()
                    .all(|r| r[c].is_empty() || r[c].parse::<f64>().is_ok())
            })
            .collect();
        let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
            let parts: Vec<String> = cells
                .enumerate()
                .map(|(c, v)| {
                    if numeric[c] {
                        format!("{v:>w$}", w = widths[c])
                    } else {
                        format!("{v:<w$}", w = widths[c])
                    }
                })
                .collect();
            format!("  {}", parts.join("  ").trim_end())
        };
        writeln!(out, "{}", line(&mut s.columns.iter().copied()))?;
        for row in &s.rows {
            writeln!(out, "{}", line(&mut row.iter().map(String::as_str)))?;
        }
    }
    Ok(())
}
